"""The host's share of a training step: what a GPU waits for when a LoRA step is bound by the Python side.

One command (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/host_step.py

1. Per-step host cost by precision, on a proxy: random-init roberta-base *depth* (12 layers, LoRA r=8 on
   query/value, the recipe's dropouts) at width 64, batch 8 x 32 tokens, one thread, so the arithmetic is negligible
   and a step costs what PyTorch and Python spend per operator, as on a GPU whose kernels are faster than their
   launches. Rows: fp32; bf16 autocast (newslora's GPU default until TF32 replaced it); bf16 autocast with the
   frozen Linear weights stored in bf16 (checked bit-identical to autocast). Median ms per step over interleaved
   repeats, and the aten operators one step dispatches.
2. Fetching and padding one training batch (newslora's DataLoader over the tokenized shared sample, in the main
   process as by default): ms per batch at several batch sizes, and what that adds up to per 120k-row epoch.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def precision_table(repeats: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoConfig, AutoModelForSequenceClassification

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    cfg = AutoConfig.from_pretrained(SHARED / "models" / "roberta-base", num_labels=4, hidden_size=64,
                                     intermediate_size=128, num_attention_heads=4, vocab_size=1000)

    def build(frozen_bf16: bool):
        torch.manual_seed(0)
        m = get_peft_model(AutoModelForSequenceClassification.from_config(cfg),
                           LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                      target_modules=["query", "value"]))
        if frozen_bf16:
            for mod in m.modules():
                if isinstance(mod, torch.nn.Linear):
                    for p in mod.parameters(recurse=False):
                        if not p.requires_grad:
                            p.data = p.data.to(torch.bfloat16)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, fused=True)
        return m, opt

    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, cfg.vocab_size, (8, 32), generator=g)
    mask = torch.ones_like(x)
    mask[:2, 24:] = 0
    y = torch.randint(0, 4, (8,), generator=g)
    rows = {"fp32": (False, False), "bf16 autocast": (True, False),
            "bf16 autocast, frozen weights in bf16": (True, True)}
    built = {k: build(frozen) for k, (_, frozen) in rows.items()}

    def logits(k):
        m = built[k][0]
        m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=x, attention_mask=mask).logits
        m.train()
        return out

    same = torch.equal(logits("bf16 autocast"), logits("bf16 autocast, frozen weights in bf16"))

    def step(k):
        m, opt = built[k]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rows[k][0]):
            loss = m(input_ids=x, attention_mask=mask, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ops, times = {}, collections.defaultdict(list)
    for k in rows:
        step(k)
        with Count() as c:
            step(k)
        ops[k] = c.ops
    for _ in range(repeats):
        for k in rows:
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    print(f"host cost of one LoRA step: 12 layers x width 64, batch 8 x 32, {torch.get_num_threads()} thread(s), "
          f"median of {repeats} interleaved steps")
    print(f"{'step':<40} {'aten ops':>9} {'_to_copy':>9} {'ms/step':>9}")
    base = statistics.median(times["fp32"])
    for k in rows:
        med = statistics.median(times[k])
        print(f"{k:<40} {sum(ops[k].values()):>9,} {ops[k]['aten._to_copy']:>9,} {1000 * med:>9.1f}"
              f"  ({100 * (med / base - 1):+.0f}% vs fp32)")
    print(f"frozen weights in bf16 give autocast's logits bit for bit: {same}\n")


def fetch_table(batch_sizes: list[int], batches: int) -> None:
    from captured_trainer import newslora_trainer

    print(f"fetch + pad one training batch (main process), median of {batches} batches")
    print(f"{'batch':>6} {'ms/batch':>9} {'s per 120k-row epoch':>21}")
    tmp = Path(tempfile.mkdtemp(prefix="newslora-host-step-"))
    os.environ.setdefault("NEWSLORA_CACHE", str(tmp / "cache"))
    for bs in batch_sizes:
        trainer = newslora_trainer([f"model.backbone={SHARED / 'models' / 'roberta-base'}", "model.random_init=true",
                                    "model.config_overrides={num_hidden_layers: 1, hidden_size: 32, "
                                    "intermediate_size: 64, num_attention_heads: 2}",
                                    f"data.source={SHARED / 'data' / 'ag_news' / 'train_sample.csv'}",
                                    "data.validation_size=200", f"train.batch_size={bs}"], tmp / f"b{bs}")
        it = iter(trainer.get_train_dataloader())
        next(it)
        times = []
        for _ in range(batches):
            t = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"{bs:>6} {1000 * med:>9.2f} {med * 120_000 / bs:>21.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="timed steps per precision row")
    p.add_argument("--batch-sizes", default="32,128,512")
    p.add_argument("--batches", type=int, default=30, help="timed batches per batch size")
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    precision_table(a.repeats)
    fetch_table([int(b) for b in a.batch_sizes.split(",")], a.batches)


if __name__ == "__main__":
    main()
