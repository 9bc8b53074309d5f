"""Where a newslora training step spends its time: ``torch.profiler`` over a window of optimizer steps.

One command (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/profile_train.py --backbone roberta-random --batch-size 32
    HF_HUB_OFFLINE=1 python bench/profile_train.py ... train.precision=fp32   # any recipe override

Trains a short newslora run (random-init roberta-base from ../shared by default) and profiles optimizer steps
``--start`` .. ``--start + --steps``. Prints wall ms per step, the device's busy time per step (CUDA kernels; on
a CPU there is none) and the top operators by self CPU time: if wall >> device busy, the step is bound by the
Python/CPU side, and fewer, larger steps (batch size), CUDA graphs or ``torch.compile`` are the levers, not
faster kernels. ``--trace FILE`` also writes a Chrome trace.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=["roberta-random", "minilm"], default="roberta-random")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--start", type=int, default=20, help="first profiled optimizer step (after warm-up)")
    p.add_argument("--steps", type=int, default=20, help="profiled optimizer steps")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from newslora.config import load_recipe
    from newslora.train import train

    cuda = torch.cuda.is_available()
    backbone = ["model.backbone=minilm"] if a.backbone == "minilm" else \
        [f"model.backbone={SHARED / 'models' / 'roberta-base'}", "model.random_init=true"]
    end = a.start + a.steps
    recipe = load_recipe(None, [*backbone, "name=profile", f"model.max_length={a.max_length}",
                                f"data.source={SHARED / 'data' / 'ag_news' / 'train_sample.csv'}",
                                f"data.max_train_samples={(end + 2) * a.batch_size}", "data.validation_size=200",
                                f"train.batch_size={a.batch_size}", f"train.max_steps={end + 1}",
                                f"train.eval_steps={end + 1}", "train.logging_steps=1000", *a.overrides])

    class Profiled(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == a.start:
                if cuda:
                    torch.cuda.synchronize()
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.prof = profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == end and self.prof is not None:
                if cuda:
                    torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)

    cb = Profiled()
    tmp = Path(tempfile.mkdtemp(prefix="newslora-profile-"))
    os.environ.setdefault("NEWSLORA_CACHE", str(tmp / "cache"))
    train(recipe, run_dir=tmp / "run", extra_callbacks=[cb], evaluate_test=False)
    events = cb.prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if cuda else 0.0
    print(f"\n{'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'} | {a.backbone} | batch {a.batch_size} | "
          f"max_length {a.max_length} | overrides {a.overrides or '-'}")
    print(f"profiled steps {a.start}..{end}: wall {1000 * cb.wall / a.steps:.1f} ms/step"
          + (f", device busy {device_us / 1000 / a.steps:.1f} ms/step ({100 * device_us / 1e6 / cb.wall:.0f}%)"
             if cuda else ""))
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=48))
    if a.trace:
        cb.prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
