"""Per-step CPU bookkeeping of the Trainer: the stock ``Trainer`` vs ``NewsloraTrainer``, on random-init roberta-base.

One command (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/step_overhead.py

On a GPU a LoRA step of roberta-base is bound by the Python side (bench/RESULTS.md): what the Trainer does on the
CPU between kernels is time the GPU waits. This times, per optimizer step, the two pieces of bookkeeping that
``NewsloraTrainer`` replaces (``floating_point_ops`` for ``total_flos``, gradient-norm clipping) with the stock
version side by side, after one real backward so the gradients exist, and checks both give the same numbers.
Medians of ``--repeats`` calls, in microseconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--method", default="lora", help="adapter method of the recipe")
    a = p.parse_args()

    import torch
    from transformers import Trainer

    from captured_trainer import newslora_trainer

    tmp = Path(tempfile.mkdtemp(prefix="newslora-step-bench-"))
    os.environ.setdefault("NEWSLORA_CACHE", str(tmp / "cache"))
    ours = newslora_trainer([f"model.backbone={SHARED / 'models' / 'roberta-base'}", "model.random_init=true",
                             f"method={a.method}", f"data.source={SHARED / 'data' / 'ag_news' / 'train_sample.csv'}",
                             "data.max_train_samples=256", "data.validation_size=64", "model.max_length=64",
                             "train.batch_size=8", "train.max_steps=1"], tmp / "run")
    model = ours.model
    batch = next(iter(ours.get_train_dataloader()))
    model.train()
    model(**batch).loss.backward()
    n_params = sum(1 for _ in model.parameters())
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    print(f"random-init roberta-base + {a.method}: {n_params} parameter tensors, {n_trainable} trainable | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads | median of {a.repeats} calls", flush=True)

    ours.args.max_grad_norm = float("inf")  # measure the norm, leave the gradients as they are
    rows = [
        ("floating_point_ops", lambda: Trainer.floating_point_ops(ours, batch), lambda: ours.floating_point_ops(batch)),
        ("clip grad norm", lambda: Trainer._clip_grad_norm(ours, model), lambda: ours._clip_grad_norm(model)),
    ]
    same = (Trainer.floating_point_ops(ours, batch) == ours.floating_point_ops(batch)
            and torch.allclose(Trainer._clip_grad_norm(ours, model), ours._clip_grad_norm(model)))
    print(f"\n{'per optimizer step':<20} {'stock µs':>10} {'newslora µs':>12} {'ratio':>7}")
    total = [0.0, 0.0]
    for name, stock, new in rows:
        s, n = timed(stock, a.repeats), timed(new, a.repeats)
        total[0] += s
        total[1] += n
        print(f"{name:<20} {s:>10.0f} {n:>12.0f} {s / n:>6.1f}x")
    print(f"{'total':<20} {total[0]:>10.0f} {total[1]:>12.0f} {total[0] / total[1]:>6.1f}x")
    print(f"same FLOP count and gradient norm: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
