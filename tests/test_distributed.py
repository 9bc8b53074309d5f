"""Several processes: ``torchrun --nproc_per_node 2 -m newslora train`` on CPU (gloo), against one process.

The comparison is fair by construction: the same recipe, seed and GLOBAL batch (1 process x 8 rows vs 2 processes x
4 rows). The Trainer's seedable random sampler draws the same permutation in both, and accelerate deals the
batches of 4 out in turn, so each global batch of 8 holds the same rows in both runs. Length grouping is off
(``train.group_by_length=false``): its buckets are sized by the per-process batch, so the order would differ. Dropout
is off (``lora.dropout=0`` and the backbone's dropout probabilities): its masks come from each process's RNG.

SGD, not AdamW: a step of SGD is proportional to the gradient, so a gradient that was summed instead of averaged
over the ranks, or taken over other rows, changes every later loss; Adam would normalise a scale error away.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, tiny_overrides

# Tolerance on every logged training loss, the epoch's training loss and the validation loss (absolute, losses
# ~1.4). What may differ between the runs: DDP averages the two halves' gradients (two means of 4, then a mean of 2
# instead of one mean of 8), and each process pads its 4 rows to their own longest row. Both only change the
# order of float32 additions: ~1e-7 relative per operation, a few 1e-6 after 32 steps. A real fault -- other rows
# in a global batch, a gradient not averaged over ranks, a lost step -- moves the losses by more than 1e-2 within a
# few steps at this learning rate (the logged loss swings by 0.05-0.1 between windows).
TOL = 1e-3

GLOBAL_BATCH = 8
DROPOUT_OFF = {**TINY, "hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}
# 256 training rows: 32 global batches of 8 in both runs, no ragged last batch
RECIPE = {"model.config_overrides": "{" + ", ".join(f"{k}: {v}" for k, v in DROPOUT_OFF.items()) + "}",
          "lora.dropout": 0, "train.group_by_length": "false", "train.optimizer": "sgd", "train.lr": 0.5,
          "train.eval_steps": 8, "train.logging_steps": 2, "train.threads": 1, "data.max_test_samples": 32,
          "train.precision": "fp32"}  # one precision on both sides, whatever each process's probe of the CPU says


def overrides(batch_size: int) -> list[str]:
    return tiny_overrides(**RECIPE, **{"train.batch_size": batch_size})


def torchrun(*args: str | Path, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group: on a timeout the whole group (torchrun and its workers) is killed,
    so no worker is left waiting in gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, errs = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, errs)


def layout(run_dir: Path) -> set[str]:
    """Every file's path relative to the run folder; the Trainer's RNG state file is one per process
    (``rng_state_<rank>.pth`` with several, ``rng_state.pth`` with one): counted as one name."""
    return {re.sub(r"rng_state_\d+\.pth$", "rng_state.pth", p.relative_to(run_dir).as_posix())
            for p in run_dir.rglob("*") if p.is_file()}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged training loss, from metrics_steps.csv."""
    return {int(r["step"]): float(r["loss"]) for r in rows(run_dir / "metrics_steps.csv") if r["loss"]}


def close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > TOL}
    assert not bad, f"differ by more than {TOL}: {bad}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 8, in its own process as a user runs it."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    r = subprocess.run([sys.executable, "-m", "newslora", "train", *overrides(GLOBAL_BATCH), "--run-dir", run_dir],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Two processes, batch 4 each."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    r = torchrun("-m", "newslora", "train", *overrides(GLOBAL_BATCH // 2), "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, r


@pytest.mark.slow
def test_two_processes_write_one_run_folder_equal_to_one_process(single, ddp):
    run_dir, r = ddp
    assert layout(run_dir) == layout(single)
    assert not list(run_dir.parent.glob("run-*")), "a second run folder"
    info, one = (json.loads((d / "run.json").read_text()) for d in (run_dir, single))
    assert info["processes"] == 2 and one["processes"] == 1
    assert info["status"] == "completed" and [a["outcome"] for a in info["attempts"]] == ["completed"]
    assert info["trainable"] == one["trainable"]
    assert info["optimizer_steps"] == one["optimizer_steps"] == 256 // GLOBAL_BATCH
    # one log row per event, as with one process (no row written twice by two ranks)
    steps, single_steps = rows(run_dir / "metrics_steps.csv"), rows(single / "metrics_steps.csv")
    key = [(s["step"], bool(s["loss"]), bool(s["eval_loss"])) for s in steps]
    assert len(key) == len(set(key)) and key == [(s["step"], bool(s["loss"]), bool(s["eval_loss"])) for s in single_steps]
    assert len(rows(run_dir / "metrics_epochs.csv")) == 1
    # the final passes ran once over every row: not twice, not half of them
    ev = json.loads((run_dir / "eval.json").read_text())
    assert {s: ev[s]["n"] for s in ev} == {"validation": 64, "test": 32}
    assert sum(map(sum, ev["validation"]["confusion_matrix"])) == 64
    # rank 0 alone printed the budget table and the result
    assert r.stderr.count("trainable parameters") == 1, r.stderr[-3000:]
    assert r.stdout.count("run folder:") == 1, r.stdout


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_global_batch(single, ddp):
    run_dir, _ = ddp
    close(losses(run_dir), losses(single))
    (e2,), (e1,) = rows(run_dir / "metrics_epochs.csv"), rows(single / "metrics_epochs.csv")
    # the epoch's train loss and accuracy cover both ranks' rows (summed over ranks), not rank 0's half
    close({k: float(e2[k]) for k in ("train_loss", "eval_loss")}, {k: float(e1[k]) for k in ("train_loss", "eval_loss")})
    assert abs(float(e2["train_accuracy"]) - float(e1["train_accuracy"])) <= 2 / 256
    windows = {int(s["step"]): float(s["train_accuracy"]) for s in rows(run_dir / "metrics_steps.csv") if s["loss"]}
    assert all(abs(a - b) <= 1 / GLOBAL_BATCH for a, b in zip(windows.values(), (
        float(s["train_accuracy"]) for s in rows(single / "metrics_steps.csv") if s["loss"])))


STOP_AFTER_SAVE = """
import sys
import torch.distributed as dist
from transformers import TrainerCallback
from newslora.config import load_recipe
from newslora.train import train

class StopAfterCheckpoint(TrainerCallback):
    # Ctrl-C on rank 0 right after the checkpoint of step 8 is on disk
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 8 and dist.get_rank() == 0:
            raise KeyboardInterrupt

run_dir, *overrides = sys.argv[1:]
train(load_recipe(None, overrides), run_dir=run_dir, extra_callbacks=[StopAfterCheckpoint()])
"""


@pytest.mark.slow
def test_resume_finishes_a_two_process_run_stopped_after_a_checkpoint(tmp_path, ddp):
    script = tmp_path / "stop.py"
    script.write_text(STOP_AFTER_SAVE)
    run_dir = tmp_path / "run"
    r = torchrun(script, run_dir, *overrides(GLOBAL_BATCH // 2))
    assert r.returncode != 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted" and info["attempts"][0]["steps"] == 8, info["attempts"]
    assert not (run_dir / "adapter").exists()

    # one process cannot continue it: the global batch, so the data order and the step count, would change
    r = subprocess.run([sys.executable, "-m", "newslora", "train", "--resume", run_dir], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "the run trained on 2 processes, this launch has 1 process" in r.stderr, r.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text()) == info

    r = torchrun("-m", "newslora", "train", "--resume", run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert [(a["outcome"], a["start_step"], a["steps"]) for a in info["attempts"]] == [
        ("interrupted", 0, 8), ("completed", 8, 32)]
    assert layout(run_dir) == layout(ddp[0])
    # the resumed run continues where it stopped: the same losses as the uninterrupted two-process run, each once
    steps = [s["step"] for s in rows(run_dir / "metrics_steps.csv") if s["loss"]]
    assert len(steps) == len(set(steps))
    close(losses(run_dir), losses(ddp[0]))
    assert r.stdout.count("run folder:") == 1


TRACKER_FAILS = """
import os
import sys
import time
from newslora.config import load_recipe
from newslora.errors import NewsloraError
from newslora.train import train

run_dir, *overrides = sys.argv[1:]
try:
    train(load_recipe(None, overrides), run_dir=run_dir)
except NewsloraError as e:
    print(f"rank {os.environ['RANK']} stopped: {e}", flush=True)
    sys.exit(3)
except Exception:
    if os.environ["RANK"] == "0":
        time.sleep(2)  # rank 1 has printed before the launcher ends it when rank 0 exits
    raise
"""


@pytest.mark.slow
def test_a_tracker_failing_on_rank_0_stops_every_rank(tmp_path, monkeypatch):
    """Rank 0 alone starts the MLflow run; its error (here ``MLFLOW_RUN_ID`` names no run) is raised on every rank,
    so rank 1 stops with it instead of waiting at the barrier after the tracker until the launcher ends it."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    script = tmp_path / "tracker.py"
    script.write_text(TRACKER_FAILS)
    r = torchrun(script, tmp_path / "run", *overrides(GLOBAL_BATCH // 2), "train.report_to=[mlflow]", timeout=300)
    assert r.returncode != 0
    assert re.search(r"rank 1 stopped: rank 0 failed: \w*Exception: .*0{32}", r.stdout), (r.stdout + r.stderr)[-3000:]
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_run_that_only_reads_writes_nothing(tmp_path):
    """What the ranks other than 0 hold: every write of the run folder is skipped, the attempt is kept in memory."""
    from newslora.run import Run

    reader = Run(tmp_path / "run", writes=False).mkdir()
    info = reader.start_attempt({"label_names": ["a", "b"]})
    reader.heartbeat(info, 3)
    reader.write_metric_csvs([{"step": 1, "epoch": 0.5, "loss": 1.0}])
    reader.write_csv("ranks.csv", ["step", "module", "rank"], [(1, "m", 2)], append=True)
    reader.write_record("method.json", {"x": 1})
    reader.write_eval({"validation": {}})
    reader.end_attempt(info, "completed", 4)
    assert not (tmp_path / "run").exists()
    assert info["status"] == "completed" and info["attempts"][0]["steps"] == 4

    writer = Run(tmp_path / "run").mkdir()
    writer.write_info({"status": "completed"})
    assert Run(writer.path, writes=False).read_info()["status"] == "completed"


def test_steps_per_process_follow_the_trainers_sharding():
    """Each of N processes takes every N-th batch, the last round filled up from the start (accelerate's even
    batches): the step count the schedule (and AdaLoRA's budget) is built for."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from newslora.config import TrainConfig
    from newslora.trainer import optimizer_steps

    for rows, batch, procs, accum in [(256, 4, 2, 1), (250, 4, 2, 1), (250, 4, 3, 2), (7, 4, 2, 1)]:
        t = TrainConfig(batch_size=batch, grad_accum=accum, epochs=1)
        shard = BatchSamplerShard(BatchSampler(SequentialSampler(range(rows)), batch, False), procs, 0)
        per_process = len(shard)
        expected = per_process // accum + int(per_process % accum > 0)
        assert optimizer_steps(rows, t, processes=procs) == max(expected, 1), (rows, batch, procs, accum)
    assert optimizer_steps(250, TrainConfig(batch_size=8, epochs=1)) == 32  # one process without a launcher
