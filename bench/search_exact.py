"""Exact trial count of ``newslora search`` with several machines on one PostgreSQL study, beside Optuna's
``MaxTrialsCallback``.

One command (repo root, venv active; needs the PostgreSQL server binaries, see tests/postgres_server.py):

    HF_HUB_OFFLINE=1 python bench/search_exact.py                  # 3 workers, --trials 12, 5 repetitions

Each repetition starts a new study on a throwaway PostgreSQL server (127.0.0.1) and runs ``--workers`` separate
``newslora search --storage postgresql://...`` processes on it at once (each standing in for a machine; tiny
random-init RoBERTa trials of 2 optimizer steps), then counts the study's trials in the database: the target is
exactly ``--trials`` complete, no more trials at all. The baseline is what ``MaxTrialsCallback`` gives
``study.optimize`` in the same number of processes on the same server (a 0.2-2 s sleep as the objective).
``--storage URL`` uses an existing server instead (each repetition then needs a fresh study name: they are
suffixed with the time).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPACE = """pruner: none
sampler: {n_startup_trials: 3}
seed: 0
params:
  train.lr: {type: loguniform, low: 1.0e-3, high: 3.0e-2}
  lora.r: {type: int, low: 2, high: 8}
"""
TINY = ["name=tiny", f"model.backbone={SHARED / 'models' / 'roberta-base'}", "model.random_init=true",
        "model.config_overrides={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, "
        "num_attention_heads: 2}", "model.max_length=32", f"data.source={SHARED / 'data' / 'ag_news' / 'train_sample.csv'}",
        "data.max_train_samples=32", "data.validation_size=32", "train.batch_size=16", "train.max_steps=2",
        "train.eval_steps=2", "train.logging_steps=2", "train.save_total_limit=1", "train.threads=1"]

# the baseline: Optuna's own stopping rule, one process per "machine"
BASELINE = """
import random, sys, time, optuna
from optuna.study import MaxTrialsCallback
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, name, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
study = optuna.create_study(study_name=name, storage=url, load_if_exists=True, direction="maximize")
rng = random.Random(seed)
def objective(trial):
    time.sleep(rng.uniform(0.2, 2.0))
    return trial.suggest_float("x", 0, 1)
study.optimize(objective, callbacks=[MaxTrialsCallback(n)])  # its default: counts COMPLETE trials
"""


def count(url: str, name: str) -> dict:
    import optuna

    from newslora.search.storage import open_storage

    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials(deepcopy=False)
    states = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"trials": len(trials), **states}


def run_newslora(url: str, name: str, n: int, workers: int, heartbeat: int, tmp: Path) -> tuple[float, list[int]]:
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    procs, t0 = [], time.perf_counter()
    for w in range(workers):
        cmd = [sys.executable, "-m", "newslora.cli", "search", "--space", str(space), "--trials", str(n),
               "--storage", url, "--study", name, "--output", str(tmp / name / f"machine{w}"),
               "--heartbeat", str(heartbeat), *TINY]
        log = open(tmp / f"{name}-machine{w}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"}))
    codes = [p.wait() for p in procs]
    return time.perf_counter() - t0, codes


def run_baseline(url: str, name: str, n: int, workers: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", BASELINE, url, name, str(n), str(w)]) for w in range(workers)]
    codes = [p.wait() for p in procs]
    return time.perf_counter() - t0, codes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--workers", type=int, default=3, help="separate newslora search processes (machines)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--heartbeat", type=int, default=10, help="newslora search --heartbeat")
    p.add_argument("--storage", help="an existing PostgreSQL URL (default: a throwaway server on 127.0.0.1)")
    p.add_argument("--no-baseline", action="store_true", help="skip Optuna's MaxTrialsCallback")
    a = p.parse_args()

    server = None
    url = a.storage
    if url is None:
        sys.path.insert(0, str(REPO / "tests"))
        from postgres_server import PostgresServer

        server = PostgresServer().start()
        url = server.url
    tmp = Path(tempfile.mkdtemp(prefix="newslora-search-exact-"))
    os.environ.setdefault("NEWSLORA_CACHE", str(tmp / "cache"))
    stamp = time.strftime("%H%M%S")
    print(f"{a.workers} processes on one PostgreSQL study, --trials {a.trials}, {a.repeats} repetitions")
    print("| run | repetition | complete | trials in the study | seconds | exit codes |")
    print("|---|---:|---:|---:|---:|---|")
    exact = True
    try:
        for r in range(1, a.repeats + 1):
            name = f"exact-{stamp}-{r}"
            seconds, codes = run_newslora(url, name, a.trials, a.workers, a.heartbeat, tmp)
            c = count(url, name)
            exact &= c.get("COMPLETE", 0) == a.trials and c["trials"] == a.trials and not any(codes)
            print(f"| newslora search | {r} | {c.get('COMPLETE', 0)} | {c['trials']} | {seconds:.1f} | {codes} |",
                  flush=True)
            if not a.no_baseline:
                name = f"maxtrials-{stamp}-{r}"
                seconds, codes = run_baseline(url, name, a.trials, a.workers)
                c = count(url, name)
                print(f"| Optuna MaxTrialsCallback | {r} | {c.get('COMPLETE', 0)} | {c['trials']} | {seconds:.1f} | "
                      f"{codes} |", flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"newslora search: exactly {a.trials} complete trials in every repetition: {'yes' if exact else 'NO'} "
          f"(logs in {tmp})")
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
