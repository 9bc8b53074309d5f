"""bf16 autocast vs fp32 on this CPU: what ``precision: auto`` measures, and what a LoRA training step costs in each.

    HF_HUB_OFFLINE=1 python bench/cpu_bf16.py                                  # MiniLM and random-init roberta-base
    HF_HUB_OFFLINE=1 python bench/cpu_bf16.py --backbone mpnet-base --batch-size 16   # after install_mpnet.sh

A CPU that reports native bf16 (AVX512-BF16 or AMX) may still run bf16 matmuls slower than fp32, so the flag alone
cannot choose the precision. This prints ``trainer.cpu_bf16_speedup()`` (the probe behind ``auto``) beside the
measured time of one LoRA training step (forward, backward, AdamW) of a newslora model in fp32 and in bf16 autocast,
on real AG News rows padded to a fixed length, the two precisions interleaved so background load hits both alike.
Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BACKBONES = {  # recipe overrides for each backbone the bench knows
    "minilm": ["model.backbone=minilm"],
    "mpnet-base": ["model.backbone=mpnet-base"],
    "roberta-random": [f"model.backbone={SHARED / 'models' / 'roberta-base'}", "model.random_init=true"],
}


def step_times(backbone: str, targets: str, batch_size: int, length: int, steps: int) -> dict[str, float]:
    """Median seconds of one training step in fp32 and in bf16 autocast (alternating blocks of ``steps``)."""
    from newslora.config import load_recipe
    from newslora.model import build_model, load_tokenizer

    labels = ["World", "Sports", "Business", "Sci/Tech"]
    recipe = load_recipe(REPO / "configs" / "demo.yaml", [*BACKBONES[backbone], f"lora.target_modules=[{targets}]",
                                                           "lora.r=8", "budget.max_params=200000000"])
    torch.manual_seed(0)
    model, _ = build_model(recipe, labels)
    model.train()
    rows = pd.read_csv(SHARED / "data" / "ag_news" / "train_sample.csv").sample(batch_size, random_state=0)
    batch = load_tokenizer(recipe.model.backbone)(rows["text"].tolist(), truncation=True, max_length=length,
                                                   padding="max_length", return_tensors="pt")
    batch["labels"] = torch.tensor(rows["label"].tolist())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for block in range(4):  # bf16, fp32, bf16, fp32; the first step of each block is a warm-up
        precision = "bf16" if block % 2 == 0 else "fp32"
        for i in range(steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:
                times[precision].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", action="append", choices=sorted(BACKBONES), default=None,
                   help="repeatable (default: minilm and roberta-random)")
    p.add_argument("--targets", default="q,v", help="LoRA target modules (r=8), neutral names")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=64, help="tokens per row (padded)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per block (4 blocks)")
    a = p.parse_args(argv)
    from newslora.trainer import BF16_MIN_SPEEDUP, cpu_bf16_speedup, cpu_has_bf16, resolve_precision

    if not cpu_has_bf16():
        print("this CPU has no native bf16 (AMX or AVX512-BF16): precision auto is fp32, nothing to compare")
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; probe: bf16 matmuls "
          f"{cpu_bf16_speedup():.2f}x fp32 -> precision auto = {resolve_precision('auto')} "
          f"(bf16 needs >= {BF16_MIN_SPEEDUP}x)")
    print("| backbone | LoRA r=8 on | batch x tokens | fp32 s/step | bf16 autocast s/step | bf16 speedup |")
    print("|---|---|---|---:|---:|---:|")
    for backbone in a.backbone or ["minilm", "roberta-random"]:
        t = step_times(backbone, a.targets, a.batch_size, a.length, a.steps)
        print(f"| {backbone} | {a.targets} | {a.batch_size} x {a.length} | {t['fp32']:.3f} | {t['bf16']:.3f} | "
              f"{t['fp32'] / t['bf16']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
