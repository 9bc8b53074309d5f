"""Inference speed: HF ``pipeline("text-classification")`` vs newslora ``load_classifier(...).predict_proba``
(PyTorch, ONNX fp32 and ONNX int8).

One command (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/infer_speed.py                  # trains a short MiniLM run first (a few minutes)
    HF_HUB_OFFLINE=1 python bench/infer_speed.py --model runs/demo # a run folder, or its merged/ folder

Both classify the official AG News test set (7,600 rows; ``--rows`` takes the first N) with the same merged
model: the pipeline as a user would call it (its default batch size of 1, ``truncation=True`` and the run's
``max_length`` so both see the same tokens, ``top_k=None`` to get every class probability), newslora through
its own API (tokenize all texts at once, sort by length, large batches, ``inference_mode``). Given a run
folder, newslora is also timed on the run folder itself (the adapter model as ``load_classifier`` loads it).
The merged model is exported to ONNX (``newslora.export_onnx.export_onnx``: fp32, and int8 weights) unless
``--no-onnx``; those folders run through the same ``predict_proba`` with onnxruntime (same tokenizer, same
max_length, same length-sorted batches). Timings include tokenization and exclude model loading; calls alternate
over ``--repeats`` and the medians are reported. Prints samples/s, accuracy, agreement with the pipeline and with
the PyTorch path for each, and the ratios to the pipeline last.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
TRAIN_CSV = SHARED / "data" / "ag_news" / "train_sample.csv"
TEST_CSV = SHARED / "data" / "ag_news" / "test.csv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_short_run(workdir: Path, steps: int, max_length: int, backbone: str) -> Path:
    from newslora.config import load_recipe
    from newslora.train import train

    model = {"minilm": ["model.backbone=minilm"],  # a random-init roberta-base: speed only (no weights here)
             "roberta-random": [f"model.backbone={SHARED / 'models' / 'roberta-base'}", "model.random_init=true"],
             "tiny": [f"model.backbone={SHARED / 'models' / 'roberta-base'}", "model.random_init=true",
                      "model.config_overrides={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, "
                      "num_attention_heads: 2}"]}
    recipe = load_recipe(None, ["name=infer-bench", *model[backbone], f"model.max_length={max_length}",
                                f"data.source={TRAIN_CSV}", "data.validation_size=500",
                                f"data.max_train_samples={steps * 32}", f"train.max_steps={steps}",
                                "train.batch_size=32", "train.lr=1e-3", f"train.eval_steps={steps}"])
    return train(recipe, run_dir=workdir / "run").run_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="run folder or merged model folder (default: train a short run)")
    p.add_argument("--rows", type=int, default=None, help="first N test rows (default: all 7,600)")
    p.add_argument("--batch-size", default="default", help="newslora predict_proba batch size (default: the "
                   "library's, 32 on CPU / 128 on GPU); a comma list (default,128) also times the others")
    p.add_argument("--pipeline-batch-size", type=int, default=1, help="pipeline batch size (its default: 1)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--backbone", choices=["minilm", "roberta-random", "tiny"], default="minilm",
                   help="backbone of the short run (no --model); roberta-random: speed only; tiny: smoke tests")
    p.add_argument("--train-steps", type=int, default=150, help="steps of the short MiniLM run (no --model)")
    p.add_argument("--max-length", type=int, default=128, help="max length of the short run (no --model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--test", default=str(TEST_CSV))
    p.add_argument("--pipeline-rows", type=int, default=None, help="time the pipeline on the first N rows only "
                   "(its samples/s; agreement columns then compare those rows); default: all rows")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX fp32/int8 rows")
    p.add_argument("--extra-onnx", action="append", default=[], metavar="NAME=FOLDER",
                   help="also time this ONNX folder (e.g. one exported another way), as row NAME")
    a = p.parse_args()
    sizes = [None if x == "default" else int(x) for x in str(a.batch_size).split(",")]

    import numpy as np
    import torch
    from transformers import pipeline

    from newslora.data import encode_labels
    from newslora.readers import read_table
    from newslora.export import export
    from newslora.export_onnx import export_onnx, is_onnx_folder
    from newslora.predict import load_classifier

    if a.threads:
        torch.set_num_threads(a.threads)
    device = f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else \
        f"cpu: {os.cpu_count()} logical cores, torch {torch.get_num_threads()} threads, " \
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    tmp = Path(tempfile.mkdtemp(prefix="newslora-infer-bench-"))
    os.environ.setdefault("NEWSLORA_CACHE", str(tmp / "cache"))
    run_dir = merged = None
    if a.model is None:
        t = time.perf_counter()
        run_dir = train_short_run(tmp, a.train_steps, a.max_length, a.backbone)
        print(f"trained {run_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    elif (Path(a.model) / "adapter").is_dir():
        run_dir = Path(a.model)
    else:
        merged = Path(a.model)
    if merged is None:
        merged = run_dir / "merged" if (run_dir / "merged" / "config.json").is_file() else export(run_dir, tmp / "merged")

    df = read_table(a.test)
    df = df.head(a.rows) if a.rows else df
    clf = load_classifier(merged)
    df, _ = encode_labels(df, clf.label_names, a.test)
    texts, y = df["text"].tolist(), df["label"].to_numpy()
    print(f"device {device} | model {merged} | {len(texts)} test rows | max_length {clf.max_length} | "
          f"newslora batch {sizes[0] or 'default (32 on CPU, 128 on GPU)'} | pipeline batch {a.pipeline_batch_size} | "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}", flush=True)

    pipe = pipeline("text-classification", model=str(merged), device=0 if torch.cuda.is_available() else -1)
    label2id = {n: i for i, n in enumerate(clf.label_names)}

    def run_pipeline(xs):
        out = pipe(xs, truncation=True, max_length=clf.max_length, top_k=None, batch_size=a.pipeline_batch_size)
        probs = np.zeros((len(xs), len(label2id)), dtype=np.float32)
        for i, scores in enumerate(out):
            for s in scores:
                probs[i, label2id[s["label"]]] = s["score"]
        return probs

    runners = {"pipeline": run_pipeline, "newslora": lambda xs: clf.predict_proba(xs, batch_size=sizes[0])}
    for bs in sizes[1:]:
        runners[f"newslora batch {bs}"] = lambda xs, bs=bs: clf.predict_proba(xs, batch_size=bs)
    if a.onnx:
        base_dir = run_dir if run_dir is not None else merged.parent  # reuse RUN/onnx, RUN/onnx-int8 if exported
        for precision, name in (("fp32", "onnx"), ("int8", "onnx-int8")):
            folder = base_dir / name
            if not is_onnx_folder(folder):
                t = time.perf_counter()
                folder = export_onnx(merged, tmp / name, int8=precision == "int8")
                print(f"exported {folder} in {time.perf_counter() - t:.0f} s", flush=True)
            onnx_clf = load_classifier(folder)
            assert onnx_clf.max_length == clf.max_length, (onnx_clf.max_length, clf.max_length)
            runners[f"onnx {precision}"] = lambda xs, c=onnx_clf: c.predict_proba(xs, batch_size=sizes[0])
    for extra in a.extra_onnx:
        label, _, folder = extra.partition("=")
        runners[label] = lambda xs, c=load_classifier(folder): c.predict_proba(xs, batch_size=sizes[0])
    if run_dir is not None:
        clf_run = load_classifier(run_dir)
        runners["newslora (run folder)"] = lambda xs: clf_run.predict_proba(xs, batch_size=sizes[0])
    for fn in runners.values():  # warm-up: allocator, oneDNN/cuBLAS kernels
        fn(texts[:64])

    times: dict[str, list[float]] = {k: [] for k in runners}
    probs: dict[str, np.ndarray] = {}
    names = list(runners)
    for rep in range(a.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            probs[name] = runners[name](texts[:a.pipeline_rows] if name == "pipeline" else texts)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            print(f"  repeat {rep + 1}: {name:<22} {len(probs[name]) / times[name][-1]:8.1f} samples/s", flush=True)

    base, ref = probs["pipeline"], probs["newslora"]
    m = len(base)  # rows the pipeline classified (all, unless --pipeline-rows)
    print(f"\n{'':<22} {'samples/s':>9} {'seconds':>8} {'accuracy':>9} {'same argmax':>12} {'max |dp|':>9} "
          f"{'same as torch':>14} {'acc - torch':>11}")
    speed = {}
    for name in names:
        s = statistics.median(times[name])
        n = len(probs[name])
        speed[name] = n / s
        pred = probs[name].argmax(-1)
        same = int((pred[:m] == base.argmax(-1)).sum())
        same_torch = int((pred == ref.argmax(-1)[:n]).sum())
        print(f"{name:<22} {speed[name]:9.1f} {s:8.2f} {100 * (pred == y[:n]).mean():8.2f}% {same:>6}/{m:<5} "
              f"{np.abs(probs[name][:m] - base).max():9.2e} {same_torch:>8}/{n:<5} "
              f"{100 * ((pred == y[:n]).mean() - (ref.argmax(-1)[:n] == y[:n]).mean()):+10.2f}pt")
    identical = bool((probs["newslora"].argmax(-1)[:m] == base.argmax(-1)).all())
    print(f"predictions identical (newslora vs pipeline): {identical}")
    for name in names[1:]:
        print(f"speed ratio {name}/pipeline (samples/s): {speed[name] / speed['pipeline']:.2f}x")


if __name__ == "__main__":
    main()
