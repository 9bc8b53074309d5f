"""newslora search on a real PostgreSQL server shared by separate processes (standing in for machines): exactly
--trials trials, the best trial reported by every process, a SIGKILLed worker's trial failed by the heartbeat and
retried. Needs the PostgreSQL server binaries (``.ci/run`` installs them): without them these tests fail."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from postgres_server import PostgresMissing, PostgresServer

from newslora.errors import NewsloraError

# one evaluation after 2 optimizer steps, one thread: three processes share a small CPU; the validation loss (to
# minimize) tells every trial apart, where the accuracy of 2 steps is the same for most
FAST = {"train.metric": "loss", "data.max_train_samples": 32, "data.validation_size": 32, "model.max_length": 32,
        "train.batch_size": 16, "train.eval_steps": 2, "train.logging_steps": 2, "train.save_total_limit": 1,
        "train.max_steps": 2, "train.threads": 1}
SPACE = {"pruner": "none", "sampler": {"n_startup_trials": 2}, "seed": 0, "baseline": False,
         "params": {"train.lr": {"type": "loguniform", "low": 1.0e-3, "high": 3.0e-2},
                    "lora.r": {"type": "int", "low": 2, "high": 8}}}


@pytest.fixture(scope="module")
def pg():
    try:
        server = PostgresServer()
    except PostgresMissing as e:
        pytest.fail(str(e), pytrace=False)
    with server:
        yield server


@pytest.fixture
def processes():
    """Popen objects to reap: whatever a failing test left running is killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _search(pg, tmp_path: Path, study: str, n: int, tag: str, heartbeat: int, procs: list) -> subprocess.Popen:
    space = tmp_path / "space.yaml"
    if not space.exists():
        space.write_text(yaml.safe_dump(SPACE))
    cmd = [sys.executable, "-m", "newslora.cli", "search", "--space", str(space), "--trials", str(n),
           "--storage", pg.url, "--study", study, "--output", str(tmp_path / tag), "--heartbeat", str(heartbeat),
           *tiny_overrides(**FAST)]
    with open(tmp_path / f"{tag}.log", "w") as log:
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"}))
    return procs[-1]


def _wait(procs, tmp_path: Path, timeout: float = 900) -> None:
    """Wait for every process under one overall deadline; on expiry kill them all, so none outlives the test."""
    deadline = time.time() + timeout
    for tag, p in procs.items():
        try:
            code = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise
        assert code == 0, f"{tag} exited {code}:\n{(tmp_path / f'{tag}.log').read_text()[-3000:]}"


def _trials(pg, study: str):
    import optuna

    from newslora.search.storage import open_storage

    if getattr(pg, "storage", None) is None:
        pg.storage = open_storage(pg.url)
    return optuna.load_study(study_name=study, storage=pg.storage).get_trials()


def _check_best(tmp_path: Path, tags, complete) -> None:
    best = min(t.value for t in complete)
    assert sum(t.value == best for t in complete) == 1  # the losses tell the trials apart
    for tag in tags:
        summary = json.loads((tmp_path / tag / "summary.json").read_text())
        reported = next(t for t in complete if t.number == summary["best_trial"])
        assert reported.value == best and summary["best_value"] == pytest.approx(best)
        assert summary["states"]["COMPLETE"] == len(complete) and summary["states"]["RUNNING"] == 0


@pytest.mark.slow  # three processes run a whole study
def test_three_processes_run_exactly_n_trials(pg, tmp_path, processes):
    n = 5
    # a heartbeat the busiest CPU keeps: no live trial is taken for a dead one here
    procs = {f"machine{i}": _search(pg, tmp_path, "exact", n, f"machine{i}", 5, processes) for i in range(3)}
    _wait(procs, tmp_path)
    trials = _trials(pg, "exact")
    assert len(trials) == n  # never n + 1: no trial was created beyond --trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    assert {t.user_attrs["pid"] for t in trials} <= {p.pid for p in procs.values()}
    _check_best(tmp_path, procs, complete)
    ran_here = {tag: len(list((tmp_path / tag / "trials").iterdir())) for tag in procs}
    assert sum(ran_here.values()) == n  # every trial ran once, in the folder of the process that claimed it


@pytest.mark.slow  # three processes run a whole study, then wait for the dead one's heartbeat to lapse
def test_a_killed_worker_trial_is_retried_and_the_count_stays_exact(pg, tmp_path, processes):
    n = 3
    victim = _search(pg, tmp_path, "killed", n, "victim", 5, processes)
    deadline = time.time() + 600
    running = None
    while running is None:  # SIGKILL it as soon as its trial, parameters drawn and budget checked, starts training
        assert victim.poll() is None and time.time() < deadline, (tmp_path / "victim.log").read_text()[-3000:]
        try:
            running = next((t for t in _trials(pg, "killed") if t.state.name == "RUNNING"
                            and t.user_attrs.get("pid") == victim.pid and "trainable" in t.user_attrs), None)
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    procs = {f"machine{i}": _search(pg, tmp_path, "killed", n, f"machine{i}", 5, processes) for i in range(2)}
    _wait(procs, tmp_path)

    trials = _trials(pg, "killed")
    dead = trials[running.number]
    assert dead.state.name == "FAIL" and "reason" not in dead.user_attrs  # failed by the heartbeat, not counted
    retry = next(t for t in trials if t.system_attrs.get("retry_history", [None])[-1] == running.number)
    assert retry.params == dead.params and dead.params and retry.user_attrs["pid"] != victim.pid
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n and {t.state.name for t in trials} == {"COMPLETE", "FAIL"}
    # every failed trial is one whose heartbeat lapsed (a loaded CPU can starve a live one too), replaced by a retry
    retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    assert {t.number for t in trials if t.state.name == "FAIL"} == retried
    _check_best(tmp_path, procs, complete)
    table = (tmp_path / "machine0" / "trials.csv").read_text()
    assert f"retry of trial {running.number}" in table


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    pg = request.getfixturevalue("pg")
    name = f"claims{abs(hash(str(tmp_path))) % 10**8}"
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


def test_claims_stop_at_n_and_a_stale_trial_is_retried_with_its_parameters(storage_url):
    """The claim step alone (no training), on both storages: --trials 2, heartbeat 3 s (stale after 9 s, so the
    claims before the wait fit in that window even on a loaded machine). SQLite's clock counts whole seconds, so the
    stale trial is polled for, not expected at an exact instant."""
    import optuna

    from newslora.search.runner import Job, _claim
    from newslora.search.storage import open_storage

    storage = open_storage(storage_url, heartbeat=3)
    study = optuna.create_study(study_name="claims", storage=storage, direction="maximize")
    job = Job("claims", storage_url, "unused", {}, {}, 2, [], 0, "none", heartbeat=3)
    before_first = time.monotonic()  # its heartbeat is recorded after this instant
    first, _ = _claim(study, storage, job)
    x = first.suggest_float("x", 0.0, 1.0)  # then its worker dies: no more heartbeats, never told
    second, _ = _claim(study, storage, job)
    assert _claim(study, storage, job) == (None, 2)  # full: 2 running
    study.tell(second, 0.5)
    assert _claim(study, storage, job) == (None, 1)  # the first is not stale yet
    started = time.monotonic()
    retry = None
    while retry is None and time.monotonic() - started < 60:
        time.sleep(0.5)
        retry, running = _claim(study, storage, job)
        assert retry is not None or running == 1  # until then, the dead trial still counts as running
    assert retry is not None, "the dead worker's trial never went stale"
    # stale only after the grace period: 9 s after its last heartbeat (a whole-second clock only delays that)
    assert time.monotonic() - before_first > 8.5
    assert retry.number == 2 and retry.suggest_float("x", 0.0, 1.0) == x
    assert study.get_trials()[first.number].state.name == "FAIL"
    assert _claim(study, storage, job) == (None, 1)
    study.tell(retry, 0.7)
    assert _claim(study, storage, job) == (None, 0)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "COMPLETE", "COMPLETE"]


def test_a_worker_with_another_heartbeat_is_refused_while_trials_run(storage_url):
    """A worker beating every 3 s would fail a 30 s worker's live trial after 9 s: its claim is refused, under the
    study lock, and the other trial keeps running."""
    import optuna

    from newslora.search.runner import Job, _claim, check_heartbeat
    from newslora.search.storage import open_storage

    storage = open_storage(storage_url, heartbeat=30)
    study = optuna.create_study(study_name="beats", storage=storage, direction="maximize")
    slow = Job("beats", storage_url, "unused", {}, {}, 3, [], 0, "none", heartbeat=30)
    live, _ = _claim(study, storage, slow)
    time.sleep(10)  # a 30 s worker beats that rarely; by a 3 s worker's grace (9 s) its trial looks dead now
    fast = Job("beats", storage_url, "unused", {}, {}, 3, [], 1, "none", heartbeat=3)
    fast_storage = open_storage(storage_url, heartbeat=3)  # the other worker's own storage and study
    fast_study = optuna.load_study(study_name="beats", storage=fast_storage)
    with pytest.raises(NewsloraError, match=r"--heartbeat 3: .*running .*with --heartbeat 30.*use --heartbeat 30$"):
        _claim(fast_study, fast_storage, fast)
    assert study.get_trials()[live.number].state.name == "RUNNING" and len(study.get_trials()) == 1
    same, _ = _claim(study, storage, slow)  # the same interval joins
    assert same is not None
    study.tell(live, 1.0)
    study.tell(same, 0.5)
    check_heartbeat(study, 3)  # nothing running: another interval is free


def test_unreachable_server_and_missing_driver_are_one_line_errors(tmp_path, monkeypatch):
    from newslora.search.storage import open_storage

    with pytest.raises(NewsloraError, match=r"^cannot open study storage postgresql\+psycopg://u:\*\*\*@127\.0\.0\.1:1/db: "):
        open_storage("postgresql://u:secret@127.0.0.1:1/db")
    with pytest.raises(NewsloraError, match="unsupported database 'mysql'"):
        open_storage("mysql://u@localhost/db")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the driver were not installed
    with pytest.raises(NewsloraError, match=r"driver psycopg is not installed: pip install 'newslora\[postgres\]'"):
        open_storage("postgresql://u@127.0.0.1:1/db")


def test_cli_reports_an_unreachable_server_without_writing(tmp_path):
    from typer.testing import CliRunner

    from newslora.cli import app

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    res = CliRunner().invoke(app, ["search", "--space", str(space), "--trials", "2", "--output", str(tmp_path / "s"),
                                   "--storage", "postgresql://u:secret@127.0.0.1:1/db", *tiny_overrides(**FAST)])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot open study storage") and "secret" not in lines[0]
    assert not (tmp_path / "s").exists()


def test_missing_server_binaries_fail_with_a_clear_message(monkeypatch):
    import postgres_server

    monkeypatch.setattr(postgres_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres_server.glob, "glob", lambda pattern: [])
    with pytest.raises(PostgresMissing, match=r"initdb is not on PATH .*apt-get install -y postgresql"):
        PostgresServer()
