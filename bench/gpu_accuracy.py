"""The accuracy benchmark's GPU sweep: many ``bench/accuracy.py`` recipes at once on one GPU, in one timed call.

    python bench/gpu_accuracy.py --workdir runs/accuracy-gpu --out $OUT --deadline 520 [--jobs 12] [--sweep a:42,b:43]

Small encoders leave a GPU idle between the kernels of one process (the step is bound by the host), so the
sweep runs up to ``--jobs`` recipes side by side, each its own ``bench/accuracy.py --recipes NAME --seeds 1
--first-seed S`` process on the same protocol split (prepared once, before any job starts). A job waits for
the jobs it needs: a distilled student for its teachers' runs, a chosen recipe (``best_of``/``test_of``) for
the runs it chooses among. Each job writes its result file into the workdir as a sequential sweep would (its
own output into ``logs/<recipe>-s<seed>.out``, its subprocesses' into ``.log``), so ``python bench/accuracy.py
--recipes ... --workdir ...`` afterwards prints the table from the stored results without training anything.

Whatever has finished is packed into ``OUT/results.tgz`` every ``--snapshot`` seconds and at the end (run
folders without checkpoints or weights; the adapters of the teacher and of the chosen runs as
``OUT/adapter-<run>.tgz``), so a call cut short by its time limit still returns every finished recipe. A job
still running at ``--deadline`` seconds is stopped (SIGTERM to its process group: the newslora run ends as
terminated, and resumes from its last checkpoint in a later call) and reported as unfinished; a job whose result
is already stored is not started again.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (bench/accuracy.py: the recipes and the protocol)

# (recipe, seed), highest priority first: the longest runs and the teacher start at once
SWEEP = [("mpg-all-r2", 42), ("mpg-qv-r8", 42), ("mpg-all-lorahead", 42), ("mpg-qkv-r6", 42), ("all-ep5", 42),
         ("all-ep3", 42), ("all-ep3", 43), ("all-ep3", 44), ("ep3-loraplus", 42), ("ep3-dora", 42),
         ("ep3-ls0.1", 42), ("ep3-lr1e-3", 42), ("ep3-lr2.5e-4", 42), ("ep3-cosine", 42), ("ep3-rslora", 42),
         ("ep3-alpha96", 42), ("ep3-bias", 42), ("all-ep2", 42), ("all-r24", 42), ("qv-r8", 42), ("plain", 42),
         ("tfidf", 42), *[(kd, s) for kd in ("kd-t2-a0.5", "kd-t2-a0.2") for s in (42, 43, 44)],
         ("minilm-best-gpu", 42), *[("kd-chosen", s) for s in (42, 43, 44)], *[("ep3-test", s) for s in (42, 43, 44)]]

# a lent machine returns at most 8 files: results.tgz and 7 adapters
ADAPTERS_BACK = 7


def needs(name: str, seed: int) -> list[tuple[str, int]]:
    """The jobs whose results (name, seed) must exist before this job can run."""
    spec = accuracy.RECIPES[name]
    if spec.get("teacher"):
        return [(t, 42) for t in accuracy.teachers_of(spec)]
    if spec.get("best_of"):  # the seeds it chooses on, and its own (the seed whose run it reads on the test set)
        seeds = sorted({*range(42, 42 + spec.get("choose_seeds", 1)), seed})
        return [(c, s) for c in spec["best_of"] for s in seeds]
    if spec.get("test_of"):
        return [(spec["test_of"], seed)]
    return []


def result(workdir: Path, name: str, seed: int) -> Path:
    return workdir / "results" / f"{name}-s{seed}.json"


def adapter_runs(workdir: Path) -> list[str]:
    """The runs whose adapters come back, most wanted first: the teachers, then the runs chosen on validation (the
    shipped candidates, minilm-best-gpu's and kd-chosen's, before the others); at most ADAPTERS_BACK."""
    results = [json.loads(f.read_text()) for f in sorted((workdir / "results").glob("*-s[0-9]*.json"))
               if f.name.count(".") == 1]  # result rows, not a choice's test metrics (.test.json) or raw files
    teachers = [f"{t}-s42" for r in results for t in accuracy.teachers_of(accuracy.RECIPES.get(r["recipe"], {}))]
    first = ["minilm-best-gpu", "kd-chosen"]
    chosen = sorted((r for r in results if r.get("chosen")),
                    key=lambda r: (first.index(r["recipe"]) if r["recipe"] in first else len(first), r["recipe"],
                                   r["seed"]))
    return list(dict.fromkeys([*teachers, *(f"{r['chosen']}-s{r['seed']}" for r in chosen)]))[:ADAPTERS_BACK]


def pack(workdir: Path, out: Path, adapters: bool = False) -> None:
    """results.tgz: results, logs and run folders without checkpoints, weights, plots or the split (the same seeded
    split is made again from the sample); with ``adapters``, the adapters of :func:`adapter_runs`. Each file is
    written under a temp name and renamed, so a call cut short returns whole files only."""
    def small(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if ({"checkpoints", "adapter", "plots"} & set(parts) or parts[1:2] == ("data",)
                or info.name.endswith((".safetensors", ".bin", ".npy", ".pt"))):
            return None
        return info

    def write(name: str, folder: Path, arcname: str, **kw) -> None:
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder, arcname=arcname, **kw)
        tmp.replace(out / name)

    write("results.tgz", workdir, workdir.name, filter=small)
    if adapters:
        for run in adapter_runs(workdir):
            if (workdir / "runs" / run / "adapter").is_dir():
                write(f"adapter-{run}.tgz", workdir / "runs" / run / "adapter", f"{run}/adapter")


def stop_jobs(running: dict, grace: float = 30) -> None:
    """SIGTERM to each job's process group (the bench wrapper and its newslora child, which ends its run as
    terminated), then SIGKILL to what is left after ``grace`` seconds in all."""
    for proc, _ in running.values():
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + grace
    for proc, _ in running.values():
        try:
            proc.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def parse_sweep(text: str) -> list[tuple[str, int]]:
    jobs = []
    for item in text.split(","):
        name, _, seed = item.strip().partition(":")
        if not seed.isdigit():
            raise SystemExit(f"error: --sweep item {item!r} is not recipe:seed (e.g. all-ep3:42)")
        jobs.append((name, int(seed)))
    return list(dict.fromkeys(jobs))  # a job listed twice runs once


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=accuracy.REPO / "runs" / "accuracy-gpu")
    p.add_argument("--out", type=Path, required=True, help="folder the packed results go to")
    p.add_argument("--jobs", type=int, default=12, help="recipes running at once")
    p.add_argument("--deadline", type=float, default=520, help="seconds; jobs still running then are stopped")
    p.add_argument("--snapshot", type=float, default=30, help="seconds between packs of the finished results")
    p.add_argument("--sweep", default=None, help="comma-separated recipe:seed jobs instead of the built-in sweep")
    p.add_argument("--rows", type=int, default=None, help="as bench/accuracy.py's (the split every job reads)")
    p.add_argument("--val-rows", type=int, default=2000)
    p.add_argument("--source", type=Path, default=accuracy.TRAIN_CSV)
    p.add_argument("--test", type=Path, default=accuracy.TEST_CSV)
    a = p.parse_args()
    t0 = time.time()
    # the jobs run in the repo root: every path they are given is absolute
    a.workdir, a.out, a.source, a.test = (x.resolve() for x in (a.workdir, a.out, a.source, a.test))
    jobs = SWEEP if a.sweep is None else parse_sweep(a.sweep)
    unknown = sorted({n for n, _ in jobs} - set(accuracy.RECIPES))
    if unknown:
        print(f"error: unknown recipe(s) {unknown}; python bench/accuracy.py --list shows them", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    a.workdir.mkdir(parents=True, exist_ok=True)
    info = accuracy.prepare_data(a.workdir, a.source, a.test, a.rows, a.val_rows, None)
    split = ["--source", str(a.source), "--test", str(a.test), "--val-rows", str(a.val_rows),
             *(["--rows", str(a.rows)] if a.rows else [])]
    print(f"protocol: {info['rows']}; {len(jobs)} jobs, {a.jobs} at once", flush=True)
    (a.workdir / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    done: dict[tuple[str, int], str] = {}
    stop, packing = threading.Event(), threading.Lock()

    def note(job, what: str) -> None:
        done[job] = what
        print(f"[{time.time() - t0:5.0f} s] {job[0]} s{job[1]}: {what}", flush=True)

    def reap() -> None:
        for job, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[job]
                ok = proc.returncode == 0 and result(a.workdir, *job).is_file()
                note(job, f"ok in {time.time() - start:.0f} s" if ok else f"failed (exit {proc.returncode})")

    def snapshots() -> None:
        while not stop.wait(a.snapshot):
            with packing:
                try:
                    pack(a.workdir, a.out)
                except OSError as e:
                    print(f"snapshot failed: {e}", flush=True)

    snapshotter = threading.Thread(target=snapshots, daemon=True)
    snapshotter.start()
    while len(done) < len(jobs) and time.time() - t0 < a.deadline:
        reap()
        for job in jobs:
            if len(running) >= a.jobs:
                break
            if job in done or job in running:
                continue
            if result(a.workdir, *job).is_file():  # finished in an earlier call
                note(job, "ok (stored)")
                continue
            missing = [d for d in needs(*job) if not result(a.workdir, *d).is_file()]
            if any(d not in jobs or d in done for d in missing):  # failed, or not in this sweep: never comes
                note(job, "skipped (a job it needs failed or is not in the sweep)")
                continue
            if missing:
                continue
            log = a.workdir / "logs" / f"{job[0]}-s{job[1]}.log"
            cmd = [sys.executable, str(accuracy.REPO / "bench" / "accuracy.py"), "--recipes", job[0], "--seeds", "1",
                   "--first-seed", str(job[1]), "--workdir", str(a.workdir), "--output", "-", "--log", str(log),
                   *split]
            with open(log.with_suffix(".out"), "w") as fh:
                running[job] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                                 cwd=accuracy.REPO, start_new_session=True), time.time())
        time.sleep(1)
    reap()
    for job in running:
        note(job, "unfinished at the deadline")
    stop_jobs(running)
    stop.set()
    snapshotter.join()
    for job in jobs:
        print(f"{job[0]:18s} s{job[1]}  {done.get(job, 'not started')}")
    try:
        pack(a.workdir, a.out, adapters=True)
    except OSError as e:
        print(f"the last pack failed: {e}", flush=True)
        return 1
    print(f"packed into {a.out} after {time.time() - t0:.0f} s", flush=True)
    return 0 if len(done) == len(jobs) and all(v.startswith("ok") for v in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
