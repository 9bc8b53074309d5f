"""Peak memory of ``newslora predict`` against the input's size: streaming keeps it flat.

One command (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/predict_memory.py

It builds a really tiny random-init RoBERTa classifier (1 layer, hidden 32, the real roberta-base tokenizer from
``../shared``, max_length 32) so that a million rows take minutes, writes CSV files of short synthetic headlines
(10,000 and 1,000,000 rows by default, ``--rows``), and runs ``newslora predict`` as a subprocess on each. The
peak RSS of that process is the kernel's own count (``ru_maxrss`` from ``os.wait4``, so no sampling can miss a
spike); RSS is also sampled every 0.5 s to show its course. Each output is checked (one row per input row, IDs
0..N-1). Target: the largest file's peak within +300 MiB of the smallest's. ``--one-chunk`` also runs each file
with ``--chunk-rows`` as large as the file: the whole input in memory at once, as before streaming.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
ROBERTA = SHARED / "models" / "roberta-base"
TARGET_MIB = 300
WORDS = ("stocks oil prices rally fall rise team wins cup final season coach league market shares profit loss "
         "bank rates inflation chip software launch space probe rocket election minister talks peace troops "
         "storm city court ruling deal merger record quarter growth jobs report phone internet search players "
         "injury title coach champions summit leaders vote government police study scientists climate").split()


def build_model(folder: Path) -> Path:
    """A standalone (merged-format) classifier folder: 1 layer, hidden 32, random init, safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    names = ["World", "Sports", "Business", "Sci/Tech"]
    config = AutoConfig.from_pretrained(ROBERTA, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_labels=4, id2label=dict(enumerate(names)),
                                        label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ROBERTA).save_pretrained(folder)
    (folder / "newslora.json").write_text(json.dumps({"max_length": 32}))
    return folder


def write_headlines(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` synthetic headlines of 5-12 words in a ``text`` column, written 100,000 rows at a time."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\n")
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            lengths = rng.integers(5, 13, n)
            picks = words[rng.integers(0, len(words), (n, 12))]
            f.write("".join(" ".join(p[:k]).capitalize() + "\n" for p, k in zip(picks, lengths)))
    return path


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_predict(model: Path, data: Path, out: Path, chunk_rows: int, batch_size: int, threads: int, log: Path) -> dict:
    """Run ``newslora predict`` and reap it with ``os.wait4``: exit code, wall seconds, peak RSS (MiB, the kernel's
    high-water mark) and the RSS samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "newslora.cli", "predict", str(model), "-i", str(data), "-o", str(out),
           "--chunk-rows", str(chunk_rows), "--batch-size", str(batch_size), "--overwrite"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    samples = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append((round(time.perf_counter() - t0, 1), round(rss, 1)))
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {"code": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_mib": usage.ru_maxrss / 1024,
            "samples": samples}


def check_output(path: Path, rows: int) -> None:
    """One output row per input row and IDs 0..N-1, read in chunks (the file may hold a million rows)."""
    import pandas as pd

    expected = 0
    for chunk in pd.read_csv(path, chunksize=200_000):
        ids = chunk["ID"].to_numpy()
        if not (ids == np.arange(expected, expected + len(ids))).all():
            raise SystemExit(f"{path}: IDs are not continuous after row {expected}")
        expected += len(ids)
    if expected != rows:
        raise SystemExit(f"{path}: {expected} rows for {rows} input rows")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="10000,1000000", help="comma-separated input sizes (default 10000,1000000)")
    ap.add_argument("--chunk-rows", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the predict process (OMP_NUM_THREADS)")
    ap.add_argument("--one-chunk", action="store_true", help="also run each file as one chunk (the whole input "
                    "in memory, as before streaming)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the model, inputs and outputs "
                    "(default: a temp folder, removed afterwards)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="newslora-predict-memory-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = build_model(work / "model")
        results = []
        for rows in sizes:
            data = write_headlines(work / f"headlines-{rows}.csv", rows)
            runs = [("streamed", args.chunk_rows)] + ([("one chunk", rows)] if args.one_chunk else [])
            for label, chunk in runs:
                out = work / f"sub-{rows}-{chunk}.csv"
                r = run_predict(model, data, out, chunk, args.batch_size, args.threads, work / f"log-{rows}-{chunk}.txt")
                if r["code"]:
                    log = (work / f"log-{rows}-{chunk}.txt").read_text()
                    raise SystemExit(f"newslora predict failed on {rows} rows (exit {r['code']}):\n{log[-2000:]}")
                check_output(out, rows)
                out.unlink()
                r.update(rows=rows, mode=label, chunk_rows=chunk, input_mib=data.stat().st_size / 2**20)
                results.append(r)
                print(f"{rows:>9,} rows ({r['input_mib']:.1f} MiB CSV), {label} (--chunk-rows {chunk:,}): peak RSS "
                      f"{r['peak_mib']:,.1f} MiB, {r['wall_s']:.1f} s ({rows / r['wall_s']:,.0f} rows/s incl. start)",
                      flush=True)
                s = r["samples"]
                if s:
                    shown = [s[int(i * (len(s) - 1) / 4)] for i in range(5)]
                    print("           RSS course (s, MiB): " + ", ".join(f"{t:g}: {m:,.0f}" for t, m in shown))
        streamed = [r for r in results if r["mode"] == "streamed"]
        small, large = min(streamed, key=lambda r: r["rows"]), max(streamed, key=lambda r: r["rows"])
        diff = large["peak_mib"] - small["peak_mib"]
        ok = diff <= TARGET_MIB
        print(f"streamed peak RSS: {large['rows']:,} rows {large['peak_mib']:,.1f} MiB - {small['rows']:,} rows "
              f"{small['peak_mib']:,.1f} MiB = {diff:+,.1f} MiB (target <= +{TARGET_MIB} MiB: "
              f"{'met' if ok else 'NOT met'})")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
