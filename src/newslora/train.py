"""Training stage: one recipe -> one run folder, with the HF Trainer doing the loop.

Order matters: everything that can fail cheaply (recipe, data, budget on the meta device) runs before the
run folder is created, so a bad input leaves nothing behind.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import (DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from . import __version__
from .config import Recipe, load_recipe
from .data import Splits, load_splits, tokenize
from .errors import NewsloraError
from .evaluate import classification_metrics, summary
from .model import Breakdown, attach_adapter, breakdown, check_budget, count_trainable, load_backbone, load_tokenizer

console = Console(stderr=True)
STEP_COLUMNS = ["step", "epoch", "loss", "learning_rate", "eval_loss", "eval_accuracy", "eval_macro_precision",
                "eval_macro_recall", "eval_macro_f1"]
EPOCH_COLUMNS = ["epoch", "step", "train_loss", "eval_loss", "eval_accuracy", "eval_macro_precision",
                 "eval_macro_recall", "eval_macro_f1"]


@dataclass
class RunResult:
    run_dir: Path
    eval: dict  # {"validation": {...}, "test": {...}}
    trainable: Breakdown


# ----------------------------------------------------------------------------- helpers


def optimizer_steps(n_train: int, t) -> int:
    """The number of optimizer steps the Trainer will take (same formula as ``Trainer.set_initial_training_values``)."""
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(n_train / t.batch_size)
    per_epoch = max(batches // t.grad_accum + int(batches % t.grad_accum > 0), 1)
    return math.ceil(t.epochs * per_epoch)


def precision_flags(choice: str) -> dict:
    if choice == "auto":
        if not torch.cuda.is_available():
            return {}
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice in ("bf16", "fp16") and not torch.cuda.is_available():
        raise NewsloraError(f"train.precision={choice} needs a GPU; use train.precision=auto or fp32 on CPU")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import datasets
    import peft
    import transformers

    return {"newslora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "datasets": datasets.__version__}


def print_breakdown(b: Breakdown, recipe: Recipe) -> None:
    t = Table(title=f"trainable parameters ({recipe.method})", show_header=True)
    t.add_column("group")
    t.add_column("params", justify="right")
    for mod, n in b.by_module.items():
        t.add_row(f"adapter: {mod}", f"{n:,}")
    t.add_row("classification head", f"{b.head:,}")
    t.add_row("[bold]total[/bold]", f"[bold]{b.total:,}[/bold]")
    t.add_row("budget", f"{b.budget:,} ({100 * b.total / b.budget:.1f}% used)")
    console.print(t)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def write_metric_csvs(run_dir: Path, log_history: list[dict]) -> None:
    """metrics_steps.csv (one row per log event) and metrics_epochs.csv (one row per epoch) from the Trainer log."""
    rows = [h for h in log_history if "loss" in h or "eval_loss" in h]
    with open(run_dir / "metrics_steps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, STEP_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    epochs: dict[int, dict] = {}
    for h in rows:
        e = max(1, math.ceil(round(h.get("epoch", 0), 6)))
        row = epochs.setdefault(e, {"epoch": e, "_losses": []})
        row["step"] = h.get("step")
        if "loss" in h:
            row["_losses"].append(h["loss"])
        for k in EPOCH_COLUMNS[3:]:
            if k in h:
                row[k] = h[k]
    with open(run_dir / "metrics_epochs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, EPOCH_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for e in sorted(epochs):
            row = epochs[e]
            row["train_loss"] = float(np.mean(row["_losses"])) if row["_losses"] else ""
            w.writerow(row)


class Collator(DataCollatorWithPadding):
    """Pads each batch to its own longest row; drops the ``length`` helper column."""

    def __call__(self, features):
        return super().__call__([{k: v for k, v in f.items() if k != "length"} for f in features])


class MetricsFileCallback(TrainerCallback):
    """Keeps the metric CSVs current after every log, so an interrupted run still has its curves."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_metric_csvs(self.run_dir, state.log_history)


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA's rank allocation: ``update_and_allocate`` after every optimizer step, before zero_grad.

    The Trainer increments ``global_step`` after this event, so ``state.global_step`` is the 0-based index of
    the step just taken (as in PEFT's reference loop). Ranks are recorded at each log for the run folder.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.calls = 0
        self.rows: list[tuple[int, str, int]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)
        self.calls += 1

    def record(self, model, step: int):
        for name, n in adalora_ranks(model).items():
            self.rows.append((step, name, n))
        with open(self.run_dir / "adalora_ranks.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "module", "rank"])
            w.writerows(self.rows)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record(model, state.global_step)

    def on_log(self, args, state, control, model=None, **kwargs):
        self.record(model, state.global_step)


def adalora_ranks(model) -> dict[str, int]:
    """Current rank of every AdaLoRA module: the number of non-zero singular values (lora_E)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_E" in name:
            module = name.removeprefix("base_model.model.").split(".lora_E")[0]
            out[module] = int((p.detach() != 0).sum())
    return out


# ----------------------------------------------------------------------------- the run


def prepare(recipe: Recipe):
    """Cheap, complete validation before anything is written: data, tokenizer, budget (meta device)."""
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.backbone)
    splits = load_splits(recipe.data)
    b = count_trainable(recipe, splits.label_names)
    check_budget(b, recipe)
    return tokenizer, splits, b


def new_run_dir(recipe: Recipe, run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists() and any(path.iterdir()):
            raise NewsloraError(f"run folder {path} exists and is not empty; choose another --run-dir, or "
                                f"continue it with --resume {path}")
        return path
    path, i = Path("runs") / recipe.name, 2
    while path.exists():
        path, i = Path("runs") / f"{recipe.name}-{i}", i + 1
    return path


def train(recipe: Recipe | None = None, run_dir: str | Path | None = None, resume: str | Path | None = None,
          trainer_factory=None, extra_callbacks=()) -> RunResult:
    """Train one recipe into one run folder (or continue ``resume``, an interrupted run folder).

    ``trainer_factory(**kwargs) -> Trainer`` lets other stages (distillation) swap the Trainer class.
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "recipe.yaml").is_file():
            raise NewsloraError(f"--resume {run_dir}: not a run folder (no recipe.yaml)")
        recipe = load_recipe(run_dir / "recipe.yaml")
        checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            raise NewsloraError(f"--resume {run_dir}: no checkpoint saved yet; start the run again instead")
    recipe = recipe or Recipe()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.train.seed)
    tokenizer, splits, b = prepare(recipe)
    print_breakdown(b, recipe)
    if resume is None:
        run_dir = new_run_dir(recipe, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _run(recipe, run_dir, tokenizer, splits, resume is not None, trainer_factory, list(extra_callbacks))


def _run(recipe: Recipe, run_dir: Path, tokenizer, splits: Splits, resuming: bool, trainer_factory, callbacks):
    t, started = recipe.train, datetime.now(timezone.utc).isoformat(timespec="seconds")
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    ml = recipe.model.max_length
    train_ds = tokenize(splits.train, tokenizer, ml)
    val_ds = tokenize(splits.validation, tokenizer, ml)
    test_ds = tokenize(splits.test, tokenizer, ml) if splits.test is not None else None
    total_steps = optimizer_steps(len(train_ds), t)

    set_seed(t.seed)
    base = load_backbone(recipe, splits.label_names)
    if recipe.model.random_init and not resuming:  # random weights cannot be fetched again: keep them
        base.save_pretrained(run_dir / "backbone")
    model = attach_adapter(base, recipe, total_steps)
    b = breakdown(model, recipe.budget.max_params)
    check_budget(b, recipe)
    if recipe.method == "pissa" and not resuming:
        model.peft_config["default"].init_lora_weights = True  # saved as a plain LoRA start for conversion
        model.save_pretrained(run_dir / "pissa_init")
        model.peft_config["default"].init_lora_weights = "pissa"

    info = {"name": recipe.name, "method": recipe.method, "backbone": recipe.model.backbone,
            "label_names": splits.label_names, "trainable": {"total": b.total, "head": b.head, "adapter": b.adapter,
                                                             "budget": b.budget},
            "target_modules": recipe.lora.target_modules,
            "rank": {"adalora": recipe.adalora.init_r, "vera": recipe.vera.r}.get(recipe.method, recipe.lora.r),
            "rows": {"train": len(train_ds), "validation": len(val_ds), "test": len(test_ds) if test_ds else 0},
            "optimizer_steps": total_steps, "device": device_name(), "versions": versions(), "started": started,
            "finished": None, "status": "running", "train_runtime_s": None, "train_samples_per_second": None}
    write_json(run_dir / "run.json", info)

    eval_strategy = "steps" if t.eval_steps else "epoch"
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum, weight_decay=t.weight_decay,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup), lr_scheduler_type=t.scheduler,
        optim="sgd" if t.optimizer == "sgd" else ("adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"),
        eval_strategy=eval_strategy, eval_steps=t.eval_steps, save_strategy=eval_strategy, save_steps=t.eval_steps,
        save_total_limit=t.save_total_limit, load_best_model_at_end=True,
        metric_for_best_model=f"eval_{t.metric}", greater_is_better=t.metric != "loss",
        logging_steps=t.logging_steps, logging_first_step=True, report_to="none", seed=t.seed, data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random", length_column_name="length",
        remove_unused_columns=False, torch_compile=t.torch_compile, dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False, **precision_flags(t.precision))

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return summary(classification_metrics(p.label_ids, logits.argmax(-1), splits.label_names))

    callbacks = [MetricsFileCallback(run_dir), *callbacks]
    ada = AdaLoraCallback(run_dir) if recipe.method == "adalora" else None
    if ada:
        callbacks.append(ada)
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    optimizers = (loraplus_optimizer(model, recipe), None) if recipe.method == "loraplus" else (None, None)
    kwargs = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                  data_collator=Collator(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
                  processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=callbacks,
                  optimizers=optimizers)
    trainer = (trainer_factory or Trainer)(**kwargs)
    t0 = time.time()
    try:
        out = trainer.train(resume_from_checkpoint=True if resuming else None)
    except KeyboardInterrupt:
        info.update(status="interrupted", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json(run_dir / "run.json", info)
        console.print(f"[yellow]interrupted; continue with: newslora train --resume {run_dir}[/yellow]")
        raise
    info["train_runtime_s"] = round(time.time() - t0, 2)
    info["train_samples_per_second"] = out.metrics.get("train_samples_per_second")
    write_metric_csvs(run_dir, trainer.state.log_history)
    if ada:
        ada.record(model, trainer.state.global_step)
        write_json(run_dir / "adalora_rank_pattern.json", model.peft_config["default"].rank_pattern or {})
        info["adalora_optimizer_step_calls"] = ada.calls

    save_adapter(model, recipe, run_dir)
    tokenizer.save_pretrained(run_dir / "adapter")
    results = {"validation": split_metrics(trainer, val_ds, splits.label_names)}
    if test_ds is not None:
        results["test"] = split_metrics(trainer, test_ds, splits.label_names)
    write_json(run_dir / "eval.json", results)
    info.update(status="completed", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                best_checkpoint=trainer.state.best_model_checkpoint)
    write_json(run_dir / "run.json", info)
    finalize(run_dir)
    return RunResult(run_dir, results, b)


def split_metrics(trainer, ds, label_names) -> dict:
    out = trainer.predict(ds)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return classification_metrics(out.label_ids, logits.argmax(-1), label_names)


def save_adapter(model, recipe: Recipe, run_dir: Path) -> None:
    """PEFT ``save_pretrained`` into ``run_dir/adapter`` (PiSSA converted to a plain LoRA on the original weights)."""
    target = run_dir / "adapter"
    if target.exists():
        shutil.rmtree(target)
    if recipe.method == "pissa":
        model.save_pretrained(target, path_initial_model_for_weight_conversion=str(run_dir / "pissa_init"))
    else:
        model.save_pretrained(target)


def loraplus_optimizer(model, recipe: Recipe):
    from peft.optimizers import create_loraplus_optimizer

    opt_cls = torch.optim.SGD if recipe.train.optimizer == "sgd" else torch.optim.AdamW
    return create_loraplus_optimizer(model=model, optimizer_cls=opt_cls, lr=recipe.train.lr,
                                     loraplus_lr_ratio=recipe.lora.loraplus_lr_ratio,
                                     weight_decay=recipe.train.weight_decay)


def finalize(run_dir: Path) -> None:
    """Plots and the metrics workbook (reporting stage); never fails a finished run."""
    try:
        from .report import finalize_run
    except ImportError:
        return
    try:
        finalize_run(run_dir)
    except Exception as e:  # a plot must not cost the user a trained model
        console.print(f"[yellow]warning: report for {run_dir} failed: {e}[/yellow]")
