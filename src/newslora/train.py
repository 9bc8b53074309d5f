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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import (DataCollatorWithPadding, EarlyStoppingCallback, ProgressCallback, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)
from transformers.trainer_callback import ExportableState

from . import __version__
from .config import Recipe, load_recipe
from .data import Splits, load_splits, pad_batch, pads_right, tokenize
from .errors import NewsloraError
from .evaluate import classification_metrics, summary
from .model import (Breakdown, adalora_schedule, apply_auto_fit, attach_adapter, breakdown, check_budget,
                    check_max_length, check_quantization, count_trainable, head_dense_name, head_state, load_backbone,
                    load_head_state, load_tokenizer)

console = Console(stderr=True)
STEP_COLUMNS = ["step", "epoch", "loss", "train_accuracy", "learning_rate", "eval_loss", "eval_accuracy",
                "eval_macro_precision", "eval_macro_recall", "eval_macro_f1"]
EPOCH_COLUMNS = ["epoch", "step", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "eval_macro_precision",
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


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AMX or AVX512-BF16), not emulated ones."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_precision(choice: str) -> str:
    """The precision a run trains in: ``fp32``, ``tf32``, ``bf16`` or ``fp16``; refuses what this machine can't do.
    ``auto``: TF32 on an Ampere-or-newer GPU, fp16 autocast on an older one, fp32 on CPU (reproducible everywhere).
    ``tf32``: fp32 weights and activations, TF32 tensor-core matmuls (Ampere or newer): no autocast, so none of its
    per-matmul cast kernels. At the recipes' batch sizes (16-32) a LoRA step of roberta-base is bound by the host on
    such a GPU, and autocast's casts cost ~20% more host time per step than fp32 (bench/RESULTS.md); ``bf16`` stays an
    explicit choice for batches large enough to keep the GPU busy. ``bf16`` on a CPU with AMX/AVX512-BF16 is an
    explicit opt-in: bf16 autocast, faster per step there (bench/RESULTS.md), at the cost of CPU-model-dependent
    numerics."""
    cuda = torch.cuda.is_available()
    ampere = cuda and torch.cuda.get_device_capability()[0] >= 8
    if choice == "auto":
        if not cuda:
            return "fp32"
        choice = "tf32" if ampere else "fp16"
    if choice == "tf32" and not ampere:
        raise NewsloraError("train.precision=tf32 needs an NVIDIA GPU of the Ampere generation or newer; use "
                            "train.precision=auto or fp32 on this machine")
    if not cuda and (choice == "fp16" or (choice == "bf16" and not cpu_has_bf16())):
        raise NewsloraError(f"train.precision={choice} needs a GPU (or, for bf16, a CPU with AMX/AVX512-BF16); "
                            "use train.precision=auto or fp32 on this machine")
    return choice


def precision_flags(precision: str) -> dict:
    """TrainingArguments flags for a resolved precision. TF32 is not among them: the Trainer's ``tf32=True`` flips a
    process-wide switch and leaves it on; ``tf32_matmuls`` scopes it to the run."""
    if precision == "bf16" and not torch.cuda.is_available():
        return {"bf16": True, "use_cpu": True}  # bf16 autocast on the CPU
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


@contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 for CUDA matmuls inside the block, the previous setting restored after it (so an export or a prediction
    later in the same process compares and predicts in full fp32)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9's setting, else the legacy flag (mixing the two is an error on torch >= 2.9)
    name, on = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, name)
    setattr(matmul, name, on)
    try:
        yield
    finally:
        setattr(matmul, name, before)


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
    """metrics_steps.csv (one row per log event) and metrics_epochs.csv (one row per epoch) from the Trainer log.

    An epoch's train_loss and train_accuracy are :class:`TrainTally`'s exact means over all the epoch's training
    rows (its ``epoch_train_loss`` entries); a log without them (a run that stopped mid-epoch) falls back to the
    mean of the epoch's logged windows."""
    rows = [h for h in log_history if "loss" in h or "eval_loss" in h]
    with open(run_dir / "metrics_steps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, STEP_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    epochs: dict[int, dict] = {}
    for h in log_history:
        if not ("loss" in h or "eval_loss" in h or "epoch_train_loss" in h):
            continue
        e = max(1, math.ceil(round(h.get("epoch", 0), 6)))
        row = epochs.setdefault(e, {"epoch": e, "_losses": []})
        row["step"] = h.get("step")
        if "loss" in h:
            row["_losses"].append(h["loss"])
        if "epoch_train_loss" in h:
            row["train_loss"], row["train_accuracy"] = h["epoch_train_loss"], h["epoch_train_accuracy"]
        for k in EPOCH_COLUMNS[4:]:
            if k in h:
                row[k] = h[k]
    with open(run_dir / "metrics_epochs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, EPOCH_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for e in sorted(epochs):
            row = epochs[e]
            if "train_loss" not in row:
                row["train_loss"] = float(np.mean(row["_losses"])) if row["_losses"] else ""
            w.writerow(row)


class TrainTally(TrainerCallback, ExportableState):
    """Training loss and accuracy from the training forward passes themselves (no extra pass): the trainer adds each
    batch's mean loss x rows and correct predictions (:meth:`add`, summed on the model's device: no per-step sync);
    they are read at each log (``train_accuracy`` of the window since the last log) and at each epoch end (an
    ``epoch_train_loss``/``epoch_train_accuracy`` entry in the log history: exact means over the epoch's rows, where
    a mean of the logged windows would count the one-step first window as a whole window and miss the steps after
    the epoch's last log). The sums are saved in checkpoints (``ExportableState``: trainer_state.json) and read back
    when a run resumes, so a resumed epoch and window are still exact."""

    def __init__(self):
        self.window = [0.0, 0.0, 0]  # loss x rows, correct, rows
        self.epoch = [0.0, 0.0, 0]

    def add(self, loss, logits, labels) -> None:
        n = labels.numel()
        loss_sum = loss.detach().float().mean() * n  # mean: DataParallel gives one loss per GPU
        correct = (logits.detach().argmax(-1) == labels).sum()
        for acc in (self.window, self.epoch):
            acc[0] = acc[0] + loss_sum
            acc[1] = acc[1] + correct
            acc[2] += n

    @staticmethod
    def _read(acc: list) -> tuple[float, float] | None:
        if not acc[2]:
            return None
        return float(acc[0]) / acc[2], float(acc[1]) / acc[2]

    def window_accuracy(self) -> float | None:
        """Accuracy of the rows since the last call; starts a new window."""
        got = self._read(self.window)
        self.window = [0.0, 0.0, 0]
        return None if got is None else got[1]

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if isinstance(saved, dict):  # resumed: the sums up to the checkpoint (see state())
            self.window, self.epoch = (list(saved["attributes"][k]) for k in ("window", "epoch"))

    def on_epoch_end(self, args, state, control, **kwargs):
        got = self._read(self.epoch)
        self.epoch = [0.0, 0.0, 0]
        if got is not None:
            state.log_history.append({"epoch": state.epoch, "step": state.global_step,
                                      "epoch_train_loss": round(got[0], 6), "epoch_train_accuracy": round(got[1], 6)})

    def state(self) -> dict:
        return {"args": {}, "attributes": {"window": [float(self.window[0]), float(self.window[1]), self.window[2]],
                                           "epoch": [float(self.epoch[0]), float(self.epoch[1]), self.epoch[2]]}}


class Collator(DataCollatorWithPadding):
    """Pads each batch to its own longest row; drops the ``length`` helper column.

    The usual batch (input_ids, attention_mask, labels, right padding) is padded with numpy: ~15x less CPU
    per batch than ``tokenizer.pad`` (bench/RESULTS.md), which matters when a GPU step takes milliseconds.
    Anything else goes through ``DataCollatorWithPadding``.
    """

    FAST_KEYS = {"input_ids", "attention_mask", "labels", "length"}

    def __call__(self, features):
        if (features and pads_right(self.tokenizer) and set(features[0]) <= self.FAST_KEYS
                and "input_ids" in features[0]):
            return pad_batch(features, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        return super().__call__([{k: v for k, v in f.items() if k != "length"} for f in features])


class NewsloraTrainer(Trainer):
    """The HF Trainer without per-step bookkeeping that costs CPU time and changes nothing. Each optimizer step the
    stock Trainer walks every parameter of the model twice for nothing: ``floating_point_ops`` recounts the
    (constant) non-embedding parameters for ``total_flos``, and clipping hands the frozen backbone's parameters,
    which have no gradients, to ``clip_grad_norm_``. On a GPU, where a LoRA step is bound by the Python side,
    that is time the accelerator waits (bench/RESULTS.md). Same ``total_flos``, same norm, same clipping."""

    _flops_per_token: int | None = None
    _trainable: list | None = None
    _tally: TrainTally | None = None

    def train_tally(self) -> TrainTally | None:
        """The run's :class:`TrainTally` callback (a resumed Trainer replaces it with one restored from the
        checkpoint, so it is looked up again then)."""
        if self._tally is None or self._tally not in self.callback_handler.callbacks:
            self._tally = next((c for c in self.callback_handler.callbacks if isinstance(c, TrainTally)), None)
        return self._tally

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and labels is not None:
            self.record_train_batch(loss, outputs, labels)
        return (loss, outputs) if return_outputs else loss

    def record_train_batch(self, loss, outputs, labels) -> None:
        """Count one training batch's loss and correct predictions (subclasses with their own loss call this)."""
        tally = self.train_tally()
        if tally is not None:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            tally.add(loss, logits, labels)

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self.train_tally() is not None:  # a training log: the window's accuracy beside its loss
            acc = self._tally.window_accuracy()
            if acc is not None:
                logs["train_accuracy"] = round(acc, 4)
        super().log(logs, start_time)

    def floating_point_ops(self, inputs) -> int:
        main = getattr(self.model, "main_input_name", "input_ids")
        if self._flops_per_token is None:  # the stock count for a single token
            self._flops_per_token = super().floating_point_ops({main: torch.ones(1, 1)})
        return self._flops_per_token * inputs[main].numel() if main in inputs else 0

    def _clip_grad_norm(self, model):
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.NO:
            return super()._clip_grad_norm(model)  # sharded / scaled gradients: the Trainer's own path
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)


class ReadableProgress(ProgressCallback):
    """The Trainer's progress bars, with one short line per log instead of a raw dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        where = f"step {state.global_step}/{state.max_steps} (epoch {state.epoch or 0:.2f})"
        if "eval_accuracy" in logs:
            line = (f"{where}  validation: loss {logs['eval_loss']:.4f}  accuracy {logs['eval_accuracy']:.4f}  "
                    f"macro-F1 {logs['eval_macro_f1']:.4f}")
        elif "loss" in logs:
            acc = f"  accuracy {logs['train_accuracy']:.4f}" if "train_accuracy" in logs else ""
            line = f"{where}  train loss {logs['loss']:.4f}{acc}  lr {logs.get('learning_rate', 0):.2e}"
        elif "train_runtime" in logs:
            line = f"trained in {logs['train_runtime']:.1f} s ({logs.get('train_samples_per_second', 0):.1f} samples/s)"
        else:
            return
        self.training_bar.write(line)


class MetricsFileCallback(TrainerCallback):
    """Keeps the metric CSVs current after every log, so an interrupted run still has its curves."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_metric_csvs(self.run_dir, state.log_history)


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA's rank allocation: ``update_and_allocate`` exactly once per optimizer step (``on_optimizer_step``:
    after ``optimizer.step()``, before ``zero_grad``, so gradient accumulation is respected), with the 0-based
    index of that step -- the Trainer increments ``global_step`` after this event -- as in PEFT's reference loop.

    The allocation (PEFT's ``rank_pattern``) lives here and is put on the adapter config only around the call and
    at the end (:meth:`finish`): with a pattern on its config PEFT saves *shrunk* tensors, which the Trainer's
    checkpoints could not load back into the full-size model on ``--resume``. Checkpoints hold full-size tensors
    (pruned singular values are zeros) plus ``adalora_state.pt`` (allocation, importance scores, call count).
    Rank over time goes to ``adalora_ranks.csv`` (step, module, rank; step = optimizer steps done): at the start,
    after every re-allocation that changes a rank, and at the end.
    """

    STATE = "adalora_state.pt"
    COLUMNS = ["step", "module", "rank"]

    def __init__(self, run_dir: Path, total_steps: int):
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.calls = 0  # update_and_allocate calls
        self.steps: list[int] = []  # the step index given to each call
        self.pattern: dict | None = None  # {"<module>.lora_E.default": [kept?] * init_r}; None: nothing pruned yet
        self.last: dict[str, int] = {}

    @staticmethod
    def _config(model):
        return model.peft_config[model.active_adapter]

    def ranks(self, model) -> dict[str, int]:
        """Current rank of every AdaLoRA module under the current allocation (init_r before the first one)."""
        out = {}
        for name, p in model.get_base_model().named_parameters():
            if ".lora_E." in name:
                kept = self.pattern.get(name) if self.pattern else None
                out[name.split(".lora_E.")[0]] = int(sum(kept)) if kept is not None else int(p.shape[0])
        return out

    def _truncate(self, keep_until: int) -> dict[str, int]:
        """Resumed: drop the rows the interrupted part logged after the checkpoint; return the last ranks kept."""
        path, rows = self.run_dir / "adalora_ranks.csv", []
        if path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self.COLUMNS)
            w.writeheader()
            w.writerows(rows)
        return {r["module"]: int(r["rank"]) for r in rows}

    def _write(self, step: int, ranks: dict[str, int]) -> None:
        path = self.run_dir / "adalora_ranks.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.COLUMNS)
            w.writerows((step, m, n) for m, n in ranks.items())
        self.last = dict(ranks)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.max_steps != self.total_steps:
            raise NewsloraError(f"AdaLoRA was built for total_step={self.total_steps} optimizer steps but the Trainer "
                                f"will take {state.max_steps}; please report this")
        if state.global_step > 0:  # --resume: restore the allocation and the importance scores
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.STATE
            if ckpt.is_file():
                st = torch.load(ckpt, weights_only=True)  # tensors and plain data only: never code
                self.pattern, self.calls, self.steps = st["pattern"], st["calls"], st["steps"]
                alloc = model.base_model.rankallocator
                alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = st["ipt"], st["exp_avg_ipt"], st["exp_avg_unc"]
            self.last = self._truncate(state.global_step)
            if self.ranks(model) != self.last:
                self._write(state.global_step, self.ranks(model))
        else:
            (self.run_dir / "adalora_ranks.csv").unlink(missing_ok=True)
            self._write(0, self.ranks(model))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        cfg = self._config(model)
        cfg.rank_pattern = self.pattern
        model.base_model.update_and_allocate(state.global_step)
        pattern, cfg.rank_pattern = cfg.rank_pattern, None
        self.calls += 1
        self.steps.append(state.global_step)
        if pattern is not None and pattern is not self.pattern:
            self.pattern = pattern
            ranks = self.ranks(model)
            if ranks != self.last:
                self._write(state.global_step + 1, ranks)

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            alloc = model.base_model.rankallocator
            torch.save({"pattern": self.pattern, "calls": self.calls, "steps": self.steps, "ipt": alloc.ipt,
                        "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc}, ckpt / self.STATE)

    def finish(self, model, step: int) -> dict:
        """Put the final allocation on the adapter config (the saved adapter is then shrunk to it), log the final
        ranks and write ``adalora_rank_pattern.json``; returns a summary for run.json."""
        cfg = self._config(model)
        cfg.rank_pattern = self.pattern
        ranks = self.ranks(model)
        self._write(step, ranks)
        a = {"init_r": cfg.init_r, "target_r": cfg.target_r, "total_step": cfg.total_step, "tinit": cfg.tinit,
             "tfinal": cfg.tfinal, "deltaT": cfg.deltaT}
        summary = {**a, "ranks": ranks, "total_rank": sum(ranks.values()), "target_total_rank": cfg.target_r * len(ranks),
                   "rank_pattern": {k: [bool(x) for x in v] for k, v in (self.pattern or {}).items()}}
        write_json(self.run_dir / "adalora_rank_pattern.json", summary)
        return {**a, "optimizer_step_calls": self.calls, "total_rank": summary["total_rank"],
                "ranks_changed": any(n != cfg.init_r for n in ranks.values())}


# ----------------------------------------------------------------------------- the run


def prepare(recipe: Recipe):
    """Cheap, complete validation before anything is written: quantization and precision support, data, tokenizer,
    the AdaLoRA schedule, ``budget.auto_fit`` (sets the recipe's rank in place) and the budget (meta device)."""
    check_quantization(recipe.model.quantization)
    resolve_precision(recipe.train.precision)  # e.g. fp16 or tf32 asked for on a machine without the GPU for it
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.backbone)
    check_max_length(recipe)
    splits = load_splits(recipe.data)
    if recipe.method == "adalora":
        adalora_schedule(recipe, optimizer_steps(len(splits.train), recipe.train))
    fit = apply_auto_fit(recipe, splits.label_names)
    b = count_trainable(recipe, splits.label_names, fit=False)
    if fit is not None:
        b.fit = fit.to_dict()
        console.print(fit.describe())
    check_budget(b, recipe)
    return tokenizer, splits, b


def check_checkpoint(ckpt: Path, run_dir: Path) -> None:
    """Refuse to resume from a checkpoint whose files hold anything but tensors and plain data (a pickle that runs
    code), or are damaged, before anything in the run folder changes. Every ``.pt``/``.pth``/``.bin`` file is read
    as the Trainer and :class:`AdaLoraCallback` read it, ``torch.load(weights_only=True)``; ``training_args.bin``
    (pickled TrainingArguments) is skipped: resuming never loads it."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers.trainer_pt_utils import safe_globals

    fix = (f"delete {ckpt} to resume from the checkpoint before it, or start the run again")
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise NewsloraError(f"--resume {run_dir}: {ckpt / 'trainer_state.json'} is missing or damaged "
                            f"({type(e).__name__}); {fix}") from None
    for f in sorted(ckpt.iterdir()):
        try:
            if f.suffix in (".pt", ".pth", ".bin") and f.name != "training_args.bin":
                with safe_globals():
                    torch.load(f, map_location="cpu", weights_only=True)
            elif f.suffix == ".safetensors":
                load_file(str(f))
        except pickle.UnpicklingError:
            raise NewsloraError(f"--resume {run_dir}: {f} holds pickled objects beyond tensors (code could run when "
                                f"they load); refusing to load it: {fix}") from None
        except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as e:
            raise NewsloraError(f"--resume {run_dir}: {f} is damaged ({type(e).__name__}); {fix}") from None


def new_run_dir(recipe: Recipe, run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        path = Path(run_dir)
        for p in (path, *path.parents):
            if p.exists() and not p.is_dir():
                raise NewsloraError(f"--run-dir {path}: {p} is a file, not a folder; choose another --run-dir")
        if path.exists() and any(path.iterdir()):
            raise NewsloraError(f"run folder {path} exists and is not empty; choose another --run-dir, or "
                                f"continue it with --resume {path}")
        return path
    path, i = Path("runs") / recipe.name, 2
    while path.exists():
        path, i = Path("runs") / f"{recipe.name}-{i}", i + 1
    return path


def train(recipe: Recipe | None = None, run_dir: str | Path | None = None, resume: str | Path | None = None,
          trainer_factory=None, extra_callbacks=(), evaluate_test: bool = True) -> RunResult:
    """Train one recipe into one run folder (or continue ``resume``, an interrupted run folder).

    ``trainer_factory(**kwargs) -> Trainer`` (default :class:`NewsloraTrainer`) lets other stages (distillation)
    swap the Trainer class.
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "recipe.yaml").is_file():
            raise NewsloraError(f"--resume {run_dir}: not a run folder (no recipe.yaml)")
        recipe = load_recipe(run_dir / "recipe.yaml")
        checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            raise NewsloraError(f"--resume {run_dir}: no checkpoint saved yet; start the run again instead")
        check_checkpoint(checkpoints[-1], run_dir)  # the one the Trainer resumes from
    recipe = recipe or Recipe()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.train.seed)
    tokenizer, splits, b = prepare(recipe)
    if not evaluate_test:  # search trials: validation only, the test split is never evaluated
        splits.test = None
    print_breakdown(b, recipe)
    if resume is None:
        run_dir = new_run_dir(recipe, run_dir)
    distiller = None
    if recipe.distill.teachers:  # distill.py: teachers checked, their train outputs cached, before the run folder
        from .distill import Distiller

        distiller = Distiller(recipe, splits)
        trainer_factory = distiller.trainer_factory(trainer_factory)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = _run(recipe, run_dir, tokenizer, splits, resume is not None, trainer_factory, list(extra_callbacks),
                  fit=b.fit)
    return distiller.finish(result) if distiller else result


def _run(recipe: Recipe, run_dir: Path, tokenizer, splits: Splits, resuming: bool, trainer_factory, callbacks,
         fit: dict | None = None):
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
    if recipe.head.type == "lora" and head_dense_name(base):  # the LoRA head's frozen, freshly drawn base weights
        if resuming and (run_dir / "head_init.safetensors").is_file():
            load_head_state(base, run_dir / "head_init.safetensors")
        elif not resuming:
            from safetensors.torch import save_file

            save_file(head_state(base), str(run_dir / "head_init.safetensors"))
    model = attach_adapter(base, recipe, total_steps)
    b = breakdown(model, recipe.budget.max_params)
    b.fit = fit  # budget.auto_fit's choice (prepare applied it to the recipe)
    check_budget(b, recipe)
    if recipe.method == "pissa" and not resuming:
        model.peft_config["default"].init_lora_weights = True  # saved as a plain LoRA start for conversion
        model.save_pretrained(run_dir / "pissa_init")
        model.peft_config["default"].init_lora_weights = "pissa"

    precision = resolve_precision(t.precision)
    info = {"name": recipe.name, "method": recipe.method, "backbone": recipe.model.backbone,
            "label_names": splits.label_names, "trainable": {"total": b.total, "head": b.head, "adapter": b.adapter,
                                                             "budget": b.budget},
            "target_modules": recipe.lora.target_modules,
            "rank": {"adalora": recipe.adalora.init_r, "vera": recipe.vera.r}.get(recipe.method, recipe.lora.r),
            "rows": {"train": len(train_ds), "validation": len(val_ds), "test": len(test_ds) if test_ds else 0},
            "optimizer_steps": total_steps, "auto_fit": b.fit, "device": device_name(), "versions": versions(),
            "precision": precision, "started": started,
            "finished": None, "status": "running", "train_runtime_s": None, "train_samples_per_second": None}
    write_json(run_dir / "run.json", info)

    eval_strategy = "steps" if t.eval_steps else "epoch"
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum, weight_decay=t.weight_decay,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup), lr_scheduler_type=t.scheduler,
        # fused AdamW on CPU too: one kernel per step instead of ~8 per tensor (1.1 vs 5.7 ms per step for
        # roberta-base LoRA's trainable tensors on this project's CPU)
        optim="sgd" if t.optimizer == "sgd" else "adamw_torch_fused",
        eval_strategy=eval_strategy, eval_steps=t.eval_steps, save_strategy=eval_strategy, save_steps=t.eval_steps,
        # AdaLoRA's model is the one at the end of its rank schedule: an earlier "best" checkpoint holds another
        # allocation (and more than target_r ranks); every other method keeps the best validation checkpoint.
        save_total_limit=t.save_total_limit, load_best_model_at_end=recipe.method != "adalora",
        metric_for_best_model=f"eval_{t.metric}", greater_is_better=t.metric != "loss",
        logging_steps=t.logging_steps, logging_first_step=True, report_to="none", seed=t.seed, data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random", length_column_name="length",
        remove_unused_columns=False, torch_compile=t.torch_compile,
        torch_compile_mode=t.compile_mode if t.torch_compile else None, dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=t.dataloader_workers, dataloader_persistent_workers=t.dataloader_workers > 0,
        # The NaN/inf filter reads the loss as a Python bool every step: a device sync that stops the CPU from
        # queueing the next step while the GPU works. A diverged run logs nan instead of a smoothed-over value.
        logging_nan_inf_filter=False,
        disable_tqdm=False, **precision_flags(precision))

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return summary(classification_metrics(p.label_ids, logits.argmax(-1), splits.label_names))

    callbacks = [TrainTally(), MetricsFileCallback(run_dir), *callbacks]
    ada = AdaLoraCallback(run_dir, total_steps) if recipe.method == "adalora" else None
    if ada:
        callbacks.append(ada)
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    optimizers = (loraplus_optimizer(model, recipe), None) if recipe.method == "loraplus" else (None, None)
    kwargs = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                  data_collator=Collator(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
                  processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=callbacks,
                  optimizers=optimizers)
    trainer = (trainer_factory or NewsloraTrainer)(**kwargs)
    # Sequence classifiers accept **kwargs but ignore num_items_in_batch; without this the Trainer would skip
    # averaging over gradient-accumulation steps and the loss (and gradients) would be grad_accum times too large.
    trainer.model_accepts_loss_kwargs = False
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ReadableProgress())
    t0 = time.time()
    try:
        with tf32_matmuls(precision == "tf32"):
            out = trainer.train(resume_from_checkpoint=True if resuming else None)
    except KeyboardInterrupt:
        info.update(status="interrupted", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json(run_dir / "run.json", info)
        console.print(f"[yellow]interrupted; continue with: newslora train --resume {run_dir}[/yellow]")
        raise
    info["train_runtime_s"] = round(time.time() - t0, 2)
    info["train_samples_per_second"] = out.metrics.get("train_samples_per_second")
    write_metric_csvs(run_dir, trainer.state.log_history)
    info["trainer_max_steps"] = trainer.state.max_steps
    if ada:
        info["adalora"] = ada.finish(model, trainer.state.global_step)

    save_adapter(model, recipe, run_dir)
    tokenizer.save_pretrained(run_dir / "adapter")
    with tf32_matmuls(precision == "tf32"):  # evaluated as validated during training
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
        _keep_saved_modules(model, target)
    else:
        with warnings.catch_warnings():  # AdaLoRA may prune a module to rank 0: PEFT warns about its empty tensors
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            model.save_pretrained(target)


def _keep_saved_modules(model, target: Path) -> None:
    """PEFT's PiSSA -> LoRA conversion writes only the lora_A/lora_B tensors: put the fully trained modules
    (``modules_to_save``: the classification head) back into the converted adapter."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = target / "adapter_model.safetensors"
    saved = load_file(str(path))
    full = get_peft_model_state_dict(model)
    extra = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in saved and ".lora_" not in k}
    if extra:
        saved.update(extra)
        save_file(saved, str(path), metadata={"format": "pt"})


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
