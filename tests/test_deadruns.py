"""Runs whose process stops: kill -9 (a real subprocess), a crash mid-training; what run.json and every reader say."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import tiny_overrides
from newslora.config import load_recipe
from newslora.run import Run
from newslora.train import train

# 24 optimizer steps, a checkpoint every 4: the kill lands mid-training, with checkpoints behind it
KILL = {"train.max_steps": 24, "train.eval_steps": 4, "train.threads": 1, "data.max_test_samples": 32}


def newslora(*args: str) -> list[str]:
    return [sys.executable, "-c", "from newslora.cli import main; main()", *map(str, args)]


def read(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    full = train(load_recipe(None, tiny_overrides(**KILL)), run_dir=tmp_path / "full").run_dir
    cut = tmp_path / "cut"
    log = tmp_path / "cut.log"
    p = subprocess.Popen(newslora("train", *tiny_overrides(**KILL), "--run-dir", cut),
                         stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.time() + 300
    while not list(cut.glob("checkpoints/checkpoint-*/trainer_state.json")):
        assert p.poll() is None, log.read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "adapter").exists(), "the kill came too late to test anything"

    # run.json still says running: every reader shows the run as dead
    info = read(cut)
    assert info["status"] == "running" and info["attempts"][0]["pid"] == p.pid
    assert Run(cut).status() == "dead"
    from newslora.report.common import load_view

    assert load_view(cut).title.endswith("[dead]")

    r = subprocess.run(newslora("train", "--resume", cut), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads((full / "eval.json").read_text()), json.loads((cut / "eval.json").read_text())
    assert a == b
    ta, tb = load_file(str(full / "adapter" / "adapter_model.safetensors")), load_file(
        str(cut / "adapter" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    info = read(cut)
    first, second = info["attempts"]
    assert info["status"] == "completed" and info["started"] == first["started"]
    assert first["outcome"] == "dead" and second["outcome"] == "completed" and second["pid"] != p.pid
    assert second["start_step"] >= 4 and second["steps"] == 24
    assert info["total_runtime_s"] == pytest.approx(first["runtime_s"] + second["runtime_s"], abs=0.02)

    # a resume of the completed run says so and changes nothing
    before = {q: q.stat().st_mtime_ns for q in cut.rglob("*")}
    r = subprocess.run(newslora("train", "--resume", cut), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "already completed" in r.stderr + r.stdout, r.stderr[-2000:]
    assert {q: q.stat().st_mtime_ns for q in cut.rglob("*")} == before


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= 10:
            raise RuntimeError("loss is nan at step 10\nsecond line")


def test_a_crash_is_recorded_as_failed_and_a_half_saved_checkpoint_is_skipped(tmp_path):
    run_dir = tmp_path / "crash"
    recipe = load_recipe(None, tiny_overrides(**{"train.threads": 1, "train.epochs": 2}))
    with pytest.raises(RuntimeError, match="nan"):
        train(recipe, run_dir=run_dir, extra_callbacks=[Boom()])
    info = read(run_dir)
    assert info["status"] == "failed" and info["error"] == "RuntimeError: loss is nan at step 10"
    assert info["attempts"][0]["outcome"] == "failed" and info["attempts"][0]["steps"] == 10
    assert Run(run_dir).status() == "failed"

    # as if killed while writing checkpoint-8 (the Trainer writes trainer_state.json last): a process that is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    info["attempts"][0].update(outcome="running", pid=gone.pid)
    info["status"] = "running"
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").unlink()
    assert Run(run_dir).status() == "dead"
    res = train(resume=run_dir)
    info = read(run_dir)
    assert [a["outcome"] for a in info["attempts"]] == ["dead", "completed"] and res.eval["test"]["n"] > 0
    assert info["attempts"][1]["start_step"] == 4 and info["attempts"][1]["steps"] == 16
    assert info["status"] == "completed" and info["error"] is None


def test_a_live_run_on_this_host_is_running_and_a_stale_one_elsewhere_is_dead(tmp_path):
    run = Run(tmp_path / "r").mkdir()
    info = run.start_attempt({"name": "r"})
    assert run.status() == "running" and info["attempts"][0]["pid"] == os.getpid()
    run.heartbeat(info, 3)
    assert read(run.path)["attempts"][0]["steps"] == 3
    info["attempts"][0].update(host="elsewhere", heartbeat="2020-01-01T00:00:00+00:00")
    run.write_info(info)
    assert run.status() == "dead"
    run.end_attempt(info, "interrupted", 3)
    assert run.status() == "interrupted"
