"""What must not pass silently and is not a one-line refusal: a diverged training fails its run, one run folder is
trained by one process at a time, an interrupted export leaves no temp folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides
from transformers import TrainerCallback


class NanAfter(TrainerCallback):
    """From optimizer step ``at`` on, the model's embeddings are NaN (a forward hook): a diverged model."""

    def __init__(self, at: int):
        self.at, self.hook = at, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= self.at and self.hook is None:
            embeddings = next(m for name, m in model.named_modules() if name.endswith("embeddings"))
            self.hook = embeddings.register_forward_hook(lambda m, i, out: out * float("nan"))


def test_non_finite_loss_fails_the_run_at_its_first_occurrence(tmp_path):
    from newslora.config import load_recipe
    from newslora.train import train
    from newslora.trainer import NonFiniteLoss

    recipe = load_recipe(None, tiny_overrides(**{"data.max_train_samples": 96, "train.logging_steps": 1,
                                                 "train.eval_steps": "null", "train.batch_size": 16}))
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match="step 2: the loss is nan"):
        train(recipe, run_dir=run, extra_callbacks=[NanAfter(1)])
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["attempts"][-1]["steps"] == 2
    assert info["error"].startswith("NonFiniteLoss: training stopped at step 2: the loss is nan")
    assert not (run / "adapter").exists() and not (run / "eval.json").exists()
    assert not list(run.glob("checkpoints/checkpoint-*"))  # nothing NaN saved to resume from


HOLD_SCRIPT = r"""
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from newslora.train import train

run, started = Path(sys.argv[1]), Path(sys.argv[2])

class Hold(TrainerCallback):  # a slow training: it waits once training has begun
    def on_train_begin(self, args, state, control, **kwargs):
        started.write_text("1")
        time.sleep(600)

train(resume=run, extra_callbacks=[Hold()])
"""


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """An interrupted tiny run with a checkpoint: what ``train --resume`` continues."""
    from conftest import ctrl_c_after

    from newslora.config import load_recipe
    from newslora.train import train

    run = tmp_path_factory.mktemp("cut") / "cut"
    recipe = load_recipe(None, tiny_overrides(**{"train.max_steps": 6, "train.batch_size": 16, "train.eval_steps": 2,
                                                 "data.max_train_samples": 96}))
    with pytest.raises(KeyboardInterrupt):
        train(recipe, run_dir=run, extra_callbacks=[ctrl_c_after(3)])
    assert list(run.glob("checkpoints/checkpoint-2"))
    return run


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_two_resumes_of_one_folder_the_second_is_refused(cut_run, tmp_path):
    import fcntl
    import os
    import signal
    import subprocess
    import sys
    import time

    started = tmp_path / "started"
    first = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(cut_run), str(started)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not started.exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        before = _snapshot(cut_run)
        second = subprocess.run([sys.executable, "-m", "newslora", "train", "--resume", str(cut_run)],
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "another process is training this run folder" in errors[0], second.stderr
        assert _snapshot(cut_run) == before  # the refused launch wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    fd = os.open(cut_run, os.O_RDONLY)  # the killed holder's lock is gone with it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_sigterm_during_export_leaves_no_temp_folder(tiny_run, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-m", "newslora", "export", str(tiny_run.run_dir), "--output",
                             str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob(".merged.*.tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the export ended before its temp folder was seen"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: export terminated (SIGTERM); nothing was written, the run folder is unchanged"]
    assert list(tmp_path.iterdir()) == []  # no temp folder, no half-written export


def test_export_removes_stale_temp_folders(tiny_run, tmp_path):
    from newslora.export import export

    stale = tmp_path / ".merged.0badc0de.tmp"  # a killed export's temp folder for this target: removed
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    for name in (".other.0badc0de.tmp", ".merged.int8.0badc0de.tmp"):  # another target's, a sibling's: kept
        (tmp_path / name).mkdir()
    export(tiny_run.run_dir, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.int8.0badc0de.tmp", ".other.0badc0de.tmp",
                                                          "merged"]


@pytest.mark.parametrize("drop", [False, True])
def test_rows_in_train_and_held_out_splits_are_counted_or_dropped(tmp_path, drop, capsys):
    import pandas as pd
    from conftest import TRAIN_CSV

    from newslora.config import load_recipe
    from newslora.train import setup

    df = pd.read_csv(TRAIN_CSV).groupby("label").head(30).reset_index(drop=True)
    df.to_csv(tmp_path / "train.csv", index=False)
    val = pd.concat([df.iloc[[0, 40, 80]], pd.read_csv(TRAIN_CSV).iloc[-20:]])  # 3 training rows
    val.assign(text=val["text"] + pd.Series([" ", "", "\t"] + [""] * 20, index=val.index)).to_csv(
        tmp_path / "val.csv", index=False)  # surrounding blanks do not hide a copy
    pd.concat([df.iloc[[1, 2, 41, 100]], pd.read_csv(TRAIN_CSV).iloc[-40:-20]]).to_csv(tmp_path / "test.csv",
                                                                                   index=False)
    recipe = load_recipe(None, tiny_overrides(**{"data.source": tmp_path / "train.csv",
                                                 "data.validation": tmp_path / "val.csv",
                                                 "data.test": tmp_path / "test.csv",
                                                 "data.drop_overlap": str(drop).lower()}))
    s = setup(recipe, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["overlap"] == {"validation": 3, "test": 4, "dropped": 7 if drop else 0}
    assert info["rows"]["train"] == 120 - (7 if drop else 0) == len(s.train_dataset)
    err = capsys.readouterr().err
    assert ("7 training rows also in a held-out split dropped" if drop else "warning: training rows also in a "
            "held-out split: 3 in validation, 4 in test") in err
