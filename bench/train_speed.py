"""Training speed: the plain HF Trainer + PEFT LoRA recipe (a) vs newslora's own training (b).

One command each (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/train_speed.py --backbone minilm           # speed + validation accuracy
    HF_HUB_OFFLINE=1 python bench/train_speed.py --backbone roberta-random   # speed only: random-init roberta-base

(a) is what a user would write: HF ``Trainer`` + PEFT ``LoraConfig``, ``DataCollatorWithPadding``, random
batches, fp32, the Trainer's default optimizer, tokenization inside the script. (b) is ``newslora.train.train``
with a recipe holding the same hyper-parameters (LoRA r=8/alpha=16/dropout=0.1 on query+value, lr, warmup,
weight decay, schedule, batch size, max length). Both see the same train and validation rows (newslora's
stratified split of the shared AG News sample) and take the same number of optimizer steps.

Each run is a fresh subprocess (so its peak RSS is its own); runs alternate a, b, b, a, ... over
``--repeats`` so background load hits both alike, and the summary uses medians. Per run it prints:
samples/s and real (non-pad) tokens/s of the training loop (first step to last optimizer step, evaluation and
saving excluded), padding fraction, peak memory (RSS on CPU; torch.cuda.max_memory_allocated on GPU), wall time
of the whole recipe (tokenization, model load, training, validation, saving), CPU seconds of the loop and
validation accuracy; then the speed ratio b/a.

``--variant NAME=key=value,key=value`` adds more newslora runs with recipe overrides, to measure one lever
at a time, e.g. ``--variant fp32=train.precision=fp32 --variant random-batches=train.group_by_length=false``.
The bench-only key ``collator.pad_to_multiple_of=N`` changes the newslora collator's padding multiple.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
ROBERTA = SHARED / "models" / "roberta-base"
TRAIN_CSV = SHARED / "data" / "ag_news" / "train_sample.csv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- shared by both recipes


def recipe_overrides(a, run_name: str) -> list[str]:
    """The newslora recipe for these options; the plain recipe reads the same values from it."""
    backbone = {"minilm": ["model.backbone=minilm"],
                "roberta-random": [f"model.backbone={ROBERTA}", "model.random_init=true"],
                "tiny": [f"model.backbone={ROBERTA}", "model.random_init=true", "model.config_overrides="
                         "{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 2}"],
                "host-proxy": [f"model.backbone={ROBERTA}", "model.random_init=true", "model.config_overrides="
                               "{hidden_size: 64, intermediate_size: 128, num_attention_heads: 4}"],
                }[a.backbone]
    return [f"name={run_name}", *backbone, f"model.max_length={a.max_length}",
            f"data.source={a.data}", f"data.validation_size={a.val_rows}", f"data.max_train_samples={a.rows}",
            "lora.r=8", "lora.alpha=16", "lora.dropout=0.1", "lora.target_modules=[query,value]",
            f"train.lr={a.lr}", f"train.batch_size={a.batch_size}", f"train.eval_batch_size={a.eval_batch_size}",
            *(["train.epochs=1", "train.max_steps=-1", "train.eval_steps=null"] if a.full_epoch else
              [f"train.max_steps={a.steps}", f"train.eval_steps={a.steps}"]),
            f"train.logging_steps={a.logging_steps}", "train.weight_decay=0.01", "train.warmup=0.06",
            "train.scheduler=linear", f"train.seed={a.seed}"]


class Counting:
    """Records (real tokens, padded tokens, rows) of every training batch while ``active``: as a collator wrapper
    (the plain recipe), or from the Trainer's ``training_step`` (newslora: its DataLoader workers, if any, run the
    collator in other processes). Real tokens are summed where the mask lives, without a device sync per batch."""

    def __init__(self, inner):
        self.inner, self.active, self.batches = inner, False, []

    def add(self, mask) -> None:
        if self.active:
            self.batches.append((mask.sum(), mask.numel(), mask.shape[0]))

    def __call__(self, features):
        batch = self.inner(features)
        self.add(batch["attention_mask"])
        return batch


def meter_callback(counter: Counting, warm_steps: int = 0, batches_per_step: int = 1):
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Times the training loop: train begin -> the last optimizer step (before the final evaluation)."""

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            counter.active = True
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if warm_steps and state.global_step == warm_steps and state.max_steps >= 2 * warm_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                # rows after this step: the batches of the steps after it (a collator-side count may hold one
                # batch the DataLoader fetched ahead)
                self.tw, self.batches_w = time.perf_counter(), warm_steps * batches_per_step
            if state.global_step >= state.max_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t1, self.c1 = time.perf_counter(), time.process_time()
                counter.active = False
                self.steps = state.global_step
                # the loop's figures now, so they survive a failure in the evaluation or saving that follows (stdout,
                # for the driver) or a time limit that kills the driver too (stderr: the --log file)
                line = "LOOP " + json.dumps(loop_stats(self, counter, batches_per_step))
                print(line, flush=True)
                print(line, file=sys.stderr, flush=True)

    return Meter()


def loop_stats(meter, counter: Counting, batches_per_step: int) -> dict:
    import torch

    # a collator-side count (the plain recipe) may hold one batch the DataLoader fetched ahead
    used = counter.batches[: meter.steps * batches_per_step]
    real, padded, rows = (int(sum(x[i] for x in used)) for i in range(3))
    secs = meter.t1 - meter.t0
    out = {"steps": meter.steps, "rows_seen": rows, "loop_s": secs, "loop_cpu_s": meter.c1 - meter.c0,
           "samples_per_s": rows / secs, "tokens_per_s": real / secs, "pad_fraction": 1 - real / padded,
           "real_tokens": real, "padded_tokens": padded}
    if hasattr(meter, "tw"):  # after the warm-up steps (compilation, CUDA graph recording, allocator growth)
        warm_rows = sum(x[2] for x in used[meter.batches_w:])
        out["steady_samples_per_s"] = warm_rows / (meter.t1 - meter.tw)
        out["warm_s"] = meter.tw - meter.t0
    if torch.cuda.is_available():
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_mem_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        out["peak_mem_kind"] = "process peak RSS"
    return out


# ----------------------------------------------------------------------------- (a) the plain recipe


def run_plain(a, workdir: Path) -> dict:
    """What a user would write with HF Trainer + PEFT (the rows come from newslora's split, to be the same)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments, set_seed)

    from newslora.config import load_recipe
    from newslora.data import load_splits
    from newslora.families import resolve_backbone

    recipe = load_recipe(None, recipe_overrides(a, "plain"))
    splits = load_splits(recipe.data)  # the same rows newslora trains and validates on
    t_start = time.perf_counter()  # the user's script starts with its data in hand
    name = resolve_backbone(recipe.model.backbone)
    tok = AutoTokenizer.from_pretrained(name)

    def encode(batch):
        return tok(batch["text"], truncation=True, max_length=recipe.model.max_length)

    train_ds = Dataset.from_pandas(splits.train).map(encode, batched=True, remove_columns=["text"])
    val_ds = Dataset.from_pandas(splits.validation).map(encode, batched=True, remove_columns=["text"])
    labels = splits.label_names
    set_seed(a.seed)
    if recipe.model.random_init:
        config = AutoConfig.from_pretrained(name, num_labels=len(labels), **recipe.model.config_overrides)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
    counter = Counting(DataCollatorWithPadding(tok))
    meter = meter_callback(counter, a.warm_steps)
    args = TrainingArguments(
        output_dir=str(workdir / "plain"), max_steps=-1 if a.full_epoch else a.steps, num_train_epochs=1,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.eval_batch_size, learning_rate=a.lr, weight_decay=0.01, warmup_steps=0.06,
        lr_scheduler_type="linear", logging_steps=a.logging_steps, eval_strategy="no", save_strategy="no",
        report_to="none", seed=a.seed)

    def accuracy(p):
        return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=counter,
                      processing_class=tok, compute_metrics=accuracy, callbacks=[meter])
    trainer.train()
    acc = trainer.evaluate()["eval_accuracy"]
    model.save_pretrained(workdir / "plain" / "adapter")
    wall = time.perf_counter() - t_start
    return {**loop_stats(meter, counter, 1), "wall_s": wall, "val_accuracy": acc, "optim": args.optim,
            "precision": "fp32", "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- (b) newslora


def run_newslora(a, workdir: Path, overrides: list[str]) -> dict:
    import torch
    from newslora.config import load_recipe
    from newslora.train import TrainHook, train

    pad_multiple = None
    extra = []
    for o in overrides:
        if o.startswith("collator.pad_to_multiple_of="):
            pad_multiple = int(o.split("=", 1)[1])
        else:
            extra.append(o)
    recipe = load_recipe(None, recipe_overrides(a, "newslora") + extra)
    seen = {}

    class CountBatches(TrainHook):  # counts the batches each training step gets
        def configure(self, trainer_cls, kwargs):
            collator = kwargs["data_collator"]
            if pad_multiple is not None:
                collator.pad_to_multiple_of = pad_multiple
            seen["pad_to_multiple_of"] = collator.pad_to_multiple_of
            seen["optim"] = kwargs["args"].optim
            seen["sampling"] = kwargs["args"].train_sampling_strategy

            class Counted(trainer_cls):
                def training_step(self, model, inputs, *args, **kw):
                    counter.add(inputs["attention_mask"])
                    return super().training_step(model, inputs, *args, **kw)

            return Counted

    counter = Counting(None)
    meter = meter_callback(counter, a.warm_steps, recipe.train.grad_accum)
    t_start = time.perf_counter()
    result = train(recipe, run_dir=workdir / "newslora", hooks=[CountBatches()], extra_callbacks=[meter])
    wall = time.perf_counter() - t_start
    precision = json.loads((result.run_dir / "run.json").read_text())["precision"]  # what auto resolved to
    return {**loop_stats(meter, counter, recipe.train.grad_accum), "wall_s": wall,
            "val_accuracy": result.eval["validation"]["accuracy"], "optim": str(seen["optim"]),
            "precision": precision, "sampling": seen["sampling"], "pad_to_multiple_of": seen["pad_to_multiple_of"],
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def worker(a) -> None:
    spec = json.loads(a.worker)
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if spec["kind"] == "plain":
        out = run_plain(a, workdir)
    else:
        out = run_newslora(a, workdir, spec["overrides"])
    print("RESULT " + json.dumps(out), flush=True)


def run_child(a, kind: str, overrides: list[str], workdir: Path, log: Path) -> dict:
    spec = json.dumps({"kind": kind, "overrides": overrides, "workdir": str(workdir)})
    argv = [sys.executable, __file__, *sys.argv[1:], "--worker", spec]  # the worker reads the same options
    with open(log, "a") as f:
        f.write(f"\n===== {kind} {overrides}\n")
        f.flush()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:  # one failed variant must not cost the others' figures
        last = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or [""]
        why = f"exit {proc.returncode}: {last[0].strip()[:200]}"
        loop = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOOP ")]
        if loop:  # the training loop finished: keep its figures, say what failed after it
            print(f"  ({kind} {overrides}: failed after the training loop, its figures kept: {why})", flush=True)
            return {**json.loads(loop[-1][len("LOOP "):]), "wall_s": float("nan"), "val_accuracy": float("nan"),
                    "failed_after_loop": why}
        return {"failed": why}
    return json.loads(lines[-1][len("RESULT "):])


def fmt_row(name: str, r: dict) -> str:
    steady = f"{r['steady_samples_per_s']:>9.1f}" if "steady_samples_per_s" in r else f"{'-':>9}"
    return (f"{name:<22} {r['samples_per_s']:>9.1f} {steady} {r['tokens_per_s']:>10.0f} {100 * r['pad_fraction']:>6.1f}% "
            f"{r['peak_mem_mb']:>9.0f} {r['loop_s']:>8.1f} {r['loop_cpu_s']:>8.1f} {r['wall_s']:>8.1f} "
            f"{100 * r['val_accuracy']:>8.2f}")


HEADER = (f"{'run':<22} {'samples/s':>9} {'steady':>9} {'tokens/s':>10} {'pad':>7} {'peak MB':>9} {'loop s':>8} {'cpu s':>8} "
          f"{'wall s':>8} {'val acc':>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=["minilm", "roberta-random", "tiny", "host-proxy"],
                   default="minilm", help="tiny: a 2-layer random-init roberta, for smoke tests; host-proxy: "
                   "roberta-base's 12 layers at width 64, so the arithmetic is negligible and a step costs its "
                   "host (Python/PyTorch) work, as on a GPU bound by kernel launches")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps for each run")
    p.add_argument("--rows", type=int, default=None, help="train rows (default: steps x batch size, one epoch)")
    p.add_argument("--val-rows", type=int, default=2000, help="validation rows (stratified, from the sample)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (minilm) / 5e-4 (roberta)")
    p.add_argument("--logging-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warm-steps", type=int, default=20,
                   help="also report samples/s after this many optimizer steps (steady state: compilation and CUDA "
                        "graph recording excluded); 0: off")
    p.add_argument("--repeats", type=int, default=1, help="a/b pairs, alternating order")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both runs (default: torch's)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=key=value,...",
                   help="an extra newslora run with recipe overrides (repeatable)")
    p.add_argument("--only", choices=["plain", "newslora", "variants"], default=None,
                   help="skip the other recipe (variants: only the --variant runs)")
    p.add_argument("--full-epoch", type=int, default=None, metavar="ROWS",
                   help="one full epoch over ROWS train rows (the sample repeated to ROWS + val rows) instead of "
                        "--steps; speed only (repeated rows leak into validation)")
    p.add_argument("--data", default=str(TRAIN_CSV))
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--log", default=None, help="the runs' stderr (progress bars, warnings) here (default: a temp file)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.lr = a.lr or (1e-3 if a.backbone == "minilm" else 5e-4)
    if a.full_epoch:
        a.rows = a.full_epoch
    a.rows = a.rows or a.steps * a.batch_size
    if a.worker:
        return worker(a)

    import torch

    variants = [("plain", "plain", []), ("newslora", "newslora", [])]
    if a.only:
        variants = [v for v in variants if v[0] == a.only]  # "variants": neither plain nor default newslora
    if a.only == "variants" and not a.variant:
        p.error("--only variants needs at least one --variant")
    for v in a.variant:
        name, _, rest = v.partition("=")
        variants.append((name, "newslora", [x for x in rest.split(",") if x]))
    device = f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else \
        f"cpu: {os.cpu_count()} logical cores, torch threads {a.threads or torch.get_num_threads()}, " \
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    steps = f"1 epoch of {a.rows} rows" if a.full_epoch else f"{a.steps} steps"
    print(f"device {device} | backbone {a.backbone} | {steps} x batch {a.batch_size} | rows {a.rows} | "
          f"val {a.val_rows} | max_length {a.max_length} | lr {a.lr} | "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="newslora-train-bench-"))
    os.environ["NEWSLORA_CACHE"] = str(tmp / "cache")  # a fresh tokenization cache: the first run pays for it
    if a.full_epoch:  # the sample repeated (in shuffled copies) to the epoch's rows plus the validation rows
        import pandas as pd

        df = pd.read_csv(a.data)
        need = a.full_epoch + a.val_rows
        copies = [df.sample(frac=1, random_state=i) for i in range(-(-need // len(df)))]
        pd.concat(copies).head(need).to_csv(tmp / "repeated.csv", index=False)
        a.data = str(tmp / "repeated.csv")
        sys.argv += ["--data", a.data]  # the workers read the same file
    log = Path(a.log) if a.log else tmp / "bench.log"
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    failed: dict[str, str] = {}
    for rep in range(a.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for name, kind, overrides in order:
            r = run_child(a, kind, overrides, tmp / f"{name}-{rep}", log)
            if "failed" in r:
                failed[name] = r["failed"]
                print(f"  repeat {rep + 1}: {name:<22} FAILED ({r['failed']})", flush=True)
                continue
            results[name].append(r)
            if "failed_after_loop" in r:
                failed[name] = "after the training loop: " + r["failed_after_loop"]
            print(f"  repeat {rep + 1}: {fmt_row(name, r)}", flush=True)
            if a.json:  # after every run, so a time limit on the whole bench keeps the runs before it
                Path(a.json).write_text(json.dumps({"args": vars(a), "device": device, "results": results,
                                                    "failed": failed}, indent=2))
    results = {name: rs for name, rs in results.items() if rs}
    print("\nmedians over repeats" if a.repeats > 1 else "")
    print(HEADER)
    med = {}
    for name, rs in results.items():
        med[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        extra = {k: rs[0][k] for k in ("precision", "optim", "sampling", "pad_to_multiple_of") if k in rs[0]}
        print(fmt_row(name, med[name]) + "   " + " ".join(f"{k}={v}" for k, v in extra.items()))
    if "plain" in med:
        for name in med:
            if name == "plain":
                continue
            ratios = [b["samples_per_s"] / p_["samples_per_s"] for b, p_ in zip(results[name], results["plain"])]
            acc = 100 * (med[name]["val_accuracy"] - med["plain"]["val_accuracy"])
            print(f"speed ratio {name}/plain (samples/s): {med[name]['samples_per_s'] / med['plain']['samples_per_s']:.2f}x"
                  f" (per repeat: {', '.join(f'{x:.2f}' for x in ratios)}); validation accuracy {acc:+.2f} pt")
            if "steady_samples_per_s" in med[name] and "steady_samples_per_s" in med["plain"]:
                print(f"  steady state (after {a.warm_steps} steps) {name}/plain: "
                      f"{med[name]['steady_samples_per_s'] / med['plain']['steady_samples_per_s']:.2f}x")
    if a.full_epoch:
        for name, m in med.items():
            steady = (f"; after the first {a.warm_steps} steps ({m['warm_s']:.1f} s, compilation included) "
                      f"{m['steady_samples_per_s']:.0f} samples/s, i.e. {a.rows / m['steady_samples_per_s']:.1f} s "
                      f"per epoch at that rate" if "steady_samples_per_s" in m else "")
            print(f"{name}: {m['loop_s']:.1f} s per epoch of {a.rows} rows ({m['steps']:.0f} steps), "
                  f"peak memory {m['peak_mem_mb']:.0f} MB{steady}")
    for name, why in failed.items():
        print(f"{name}: FAILED ({why})")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "device": device, "results": results, "failed": failed},
                                           indent=2))
    print(f"(logs: {log})")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
