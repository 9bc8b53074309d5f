"""Experiment tracking (train.report_to): TensorBoard event files in the run folder, MLflow runs in the embedded
default store and in a real ``mlflow server``, search trials nested under their study, the missing-library refusal.

Tiny random-init RoBERTa runs of a few optimizer steps each.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_overrides

from newslora.config import load_recipe

FAST = {"data.max_train_samples": 64, "data.validation_size": 32, "data.max_test_samples": 64,
        "model.max_length": 32, "train.batch_size": 16, "train.eval_steps": 2, "train.logging_steps": 1,
        "train.save_total_limit": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, temporary artifacts folder), stopped after the module."""
    import urllib.request

    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'server.db'}",
                             "--artifacts-destination", str(home / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=home)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"url": url, "home": home}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN",
              "MLFLOW_MAX_LOG_PARAMS", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(k, raising=False)
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def tracked_run(run_dir: Path, **extra):
    from newslora.train import train

    over = {**FAST, "train.report_to": "[tensorboard,mlflow]", **extra}
    return train(load_recipe(None, tiny_overrides(**over)), run_dir=run_dir)


def the_mlflow_run(uri: str, run_dir: Path):
    """The one MLflow run tagged with ``run_dir`` in the store at ``uri``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("newslora")
    path = str(run_dir.resolve())
    literal = f'"{path}"' if "'" in path else f"'{path}'"
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`newslora.run_dir` = {literal}")
    assert len(found) == 1
    return client, found[0]


def check_mlflow_run(client, mrun, run_dir: Path) -> None:
    """Parameters, every logged metric at its step, final metrics, artifacts of a finished run folder."""
    import json

    import yaml

    assert mrun.info.status == "FINISHED" and mrun.info.run_name == run_dir.name
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    params = mrun.data.params
    assert params["recipe.train.lr"] == str(recipe["train"]["lr"])
    assert params["recipe.model.backbone"] == recipe["model"]["backbone"]
    assert params["recipe.train.report_to"] == "['tensorboard', 'mlflow']"
    info = json.loads((run_dir / "run.json").read_text())
    m = mrun.data.metrics
    assert m["budget_trainable"] == info["trainable"]["total"] and m["budget_max_params"] == info["trainable"]["budget"]
    steps = pd.read_csv(run_dir / "metrics_steps.csv")
    for key in ("loss", "learning_rate", "eval_accuracy", "eval_loss"):
        rows = steps.dropna(subset=[key])
        hist = {h.step: h.value for h in client.get_metric_history(mrun.info.run_id, key)}
        assert len(rows) >= 2 and sorted(hist) == list(rows["step"])
        for step, value in zip(rows["step"], rows[key]):
            assert hist[step] == pytest.approx(value, abs=1e-6)
    epochs = pd.read_csv(run_dir / "metrics_epochs.csv")
    assert m["epoch_train_loss"] == pytest.approx(epochs["train_loss"].iloc[-1], abs=1e-6)
    ev = json.loads((run_dir / "eval.json").read_text())
    for split in ("validation", "test"):
        assert m[f"final_{split}_accuracy"] == pytest.approx(ev[split]["accuracy"])
        assert m[f"final_{split}_macro_f1"] == pytest.approx(ev[split]["macro_f1"])
    names = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"recipe.yaml", "run.json", "eval.json", "metrics_steps.csv", "metrics.xlsx", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(mrun.info.run_id, "plots")}
    assert plots == {f"plots/{p.name}" for p in (run_dir / "plots").iterdir()} and len(plots) >= 3
    local = Path(client.download_artifacts(mrun.info.run_id, "metrics.xlsx", str(run_dir.parent / "dl")))
    assert local.read_bytes() == (run_dir / "metrics.xlsx").read_bytes()


def test_tensorboard_and_default_mlflow_store(tmp_path, monkeypatch, clean_mlflow_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    res = tracked_run(Path("runs") / "tb")
    run_dir = tmp_path / "runs" / "tb"
    assert res.run_dir.resolve() == run_dir
    # TensorBoard: the Trainer's callback wrote into the run folder; every logged step equals metrics_steps.csv
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    steps = pd.read_csv(run_dir / "metrics_steps.csv")
    for tag, col in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"),
                     ("eval/accuracy", "eval_accuracy")):
        rows = steps.dropna(subset=[col])
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert len(rows) >= 2 and sorted(got) == list(rows["step"])
        for step, value in zip(rows["step"], rows[col]):
            assert got[step] == pytest.approx(value, abs=1e-6)
    # MLflow: the embedded store beside the run folders, its artifacts beside it too (nothing in the working folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mlartifacts", "mlflow.db", "tb"]
    client, mrun = the_mlflow_run(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", run_dir)
    check_mlflow_run(client, mrun, run_dir)
    assert mrun.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())


def test_mlflow_server_through_the_environment(tmp_path, monkeypatch, clean_mlflow_env, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    run_dir = tmp_path / "served"
    tracked_run(run_dir, **{"train.report_to": "[mlflow]"})
    assert not (tmp_path / "mlflow.db").exists() and not (run_dir / "tensorboard").exists()
    client, mrun = the_mlflow_run(mlflow_server["url"], run_dir)
    assert mrun.data.params["recipe.train.report_to"] == "['mlflow']"
    mrun.data.params["recipe.train.report_to"] = "['tensorboard', 'mlflow']"  # the one key that differs here
    check_mlflow_run(client, mrun, run_dir)
    # the artifacts went through the server into its artifacts folder
    stored = list((mlflow_server["home"] / "artifacts").rglob("metrics.xlsx"))
    assert len(stored) == 1 and stored[0].read_bytes() == (run_dir / "metrics.xlsx").read_bytes()


def test_search_trials_are_nested_runs_of_the_study(tmp_path, monkeypatch, clean_mlflow_env, mlflow_server):
    import mlflow
    import yaml

    import newslora.train
    from newslora.search import search

    monkeypatch.setattr(newslora.train, "finalize", lambda run_dir: None)  # per-run plots: slow, not needed here
    space = {"pruner": "none", "seed": 0, "params": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}}
    over = {**FAST, "train.max_steps": 2, "train.report_to": "[mlflow]", "train.tracking_uri": mlflow_server["url"]}
    out = tmp_path / "study"
    search(load_recipe(None, tiny_overrides(**over)), space, 2, output=out, study_name="nest")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server["url"])
    exp = client.get_experiment_by_name("newslora")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`newslora.study` = 'nest'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["0", "1"]
    for c in children:
        trial_dir = out / "trials" / c.info.run_name
        assert c.info.status == "FINISHED" and c.data.tags["newslora.run_dir"] == str(trial_dir.resolve())
        trial = yaml.safe_load((trial_dir / "recipe.yaml").read_text())
        assert float(c.data.params["recipe.train.lr"]) == pytest.approx(trial["train"]["lr"])
        assert "final_validation_accuracy" in c.data.metrics and "final_test_accuracy" not in c.data.metrics
    assert not (out / "mlflow.db").exists()  # train.tracking_uri named the server


def test_missing_tracking_library_is_one_error_line(tmp_path):
    """mlflow made unimportable in a fresh process: one ``error:`` line naming the extra, no run folder."""
    code = ("import sys; sys.modules['mlflow'] = None; from newslora.cli import app; "
            "sys.argv = ['newslora'] + sys.argv[1:]; app()")
    args = ["train", "--run-dir", str(tmp_path / "runs" / "x"),
            *tiny_overrides(**{"train.report_to": "[tensorboard,mlflow]"})]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1, p.stdout + p.stderr
    assert lines[0].startswith("error:") and "newslora[tracking]" in lines[0] and "mlflow" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_run_ends_killed_in_mlflow(tmp_path, clean_mlflow_env, mlflow_server):
    """Ctrl-C during training: the MLflow run is ended as KILLED (not left running), with what was logged so far."""
    import mlflow
    from conftest import ctrl_c_after

    from newslora.train import train

    run_dir = tmp_path / "stopped"
    over = {**FAST, "train.report_to": "[mlflow]", "train.tracking_uri": mlflow_server["url"]}
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(None, tiny_overrides(**over)), run_dir=run_dir, extra_callbacks=[ctrl_c_after(2)])
    assert mlflow.active_run() is None
    client, mrun = the_mlflow_run(mlflow_server["url"], run_dir)
    assert mrun.info.status == "KILLED" and mrun.data.params["recipe.train.report_to"] == "['mlflow']"
    logged = list(pd.read_csv(run_dir / "metrics_steps.csv").dropna(subset=["loss"])["step"])
    assert logged and [h.step for h in client.get_metric_history(mrun.info.run_id, "loss")] == logged


def test_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch, clean_mlflow_env, mlflow_server):
    """Ctrl-C after a checkpoint, then ``--resume``: the same MLflow run (one per run folder) ends FINISHED, with the
    loss of every step of the finished folder and the final metrics. The folder's path holds a quote (MLflow's
    filter syntax has no escapes)."""
    from conftest import ctrl_c_after
    from transformers import TrainingArguments

    from newslora.train import train

    run_dir = tmp_path / "it's" / "resumed"
    over = {**FAST, "train.report_to": "[mlflow]", "train.tracking_uri": mlflow_server["url"]}
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(None, tiny_overrides(**over)), run_dir=run_dir, extra_callbacks=[ctrl_c_after(3)])
    _, first = the_mlflow_run(mlflow_server["url"], run_dir)
    assert first.info.status == "KILLED"
    # resumed on "another machine", whose TrainingArguments differ (MLflow would refuse a changed value, dropping
    # the batch): the reattached run keeps the first attempt's parameters; the callback logs none again
    to_dict = TrainingArguments.to_dict
    monkeypatch.setattr(TrainingArguments, "to_dict", lambda self: {**to_dict(self), "resumed_elsewhere": "1"})
    monkeypatch.setenv("MLFLOW_MAX_LOG_PARAMS", "500")
    res = train(resume=run_dir)
    client, mrun = the_mlflow_run(mlflow_server["url"], run_dir)
    assert mrun.info.run_id == first.info.run_id and mrun.info.status == "FINISHED"
    assert mrun.data.params == first.data.params and os.environ["MLFLOW_MAX_LOG_PARAMS"] == "500"
    logged = set(pd.read_csv(run_dir / "metrics_steps.csv").dropna(subset=["loss"])["step"])
    assert len(logged) >= 4 and {h.step for h in client.get_metric_history(mrun.info.run_id, "loss")} == logged
    assert mrun.data.metrics["final_test_accuracy"] == pytest.approx(res.eval["test"]["accuracy"])


def test_tracking_uri_without_mlflow_is_refused(tmp_path):
    from newslora.errors import NewsloraError
    from newslora.train import train

    recipe = load_recipe(None, tiny_overrides(**{"train.report_to": "[tensorboard]",
                                                 "train.tracking_uri": "http://127.0.0.1:1"}))
    with pytest.raises(NewsloraError, match=r"train.tracking_uri=.* train.report_to has no mlflow"):
        train(recipe, run_dir=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
