"""The training loop's parts: newslora's Trainer, collator, progress and metric-file callbacks, precision choice.

:mod:`newslora.train` assembles them (``setup``) and runs them (``fit``); distillation and the benches reuse them.
"""
from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils._pytree import tree_map
from transformers import DataCollatorWithPadding, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from . import __version__, distributed
from .config import MAX_OPTIMIZER_STEPS
from .data import pad_batch, pads_right
from .errors import NewsloraError


class TrainHook:
    """Something that plugs into :func:`newslora.train.setup` (distillation, search trials, benches): it may change
    the Trainer's class and keyword arguments before the Trainer is built, and the result after ``fit``."""

    added_train_rows = 0  # rows ``configure`` appends to the training set (counted in the step plan)

    def configure(self, trainer_cls: type, kwargs: dict) -> type:
        """Called with the Trainer class and the keyword arguments it will get; returns the class to build."""
        return trainer_cls

    def finish(self, result):
        """Called with ``fit``'s :class:`~newslora.train.RunResult` once the run folder is complete."""
        return result

    def abort(self, outcome: str) -> None:
        """Called when training stopped by an exception (``outcome``: interrupted, terminated or failed)."""


def optimizer_steps(n_train: int, t, processes: int | None = None) -> int:
    """The number of optimizer steps the Trainer will take (same formula as ``Trainer.set_initial_training_values``).
    ``processes`` (default: this launch's): each takes every ``processes``-th batch of ``t.batch_size`` rows, the
    last round filled up from the start (accelerate's even batches)."""
    if t.max_steps > 0:
        return t.max_steps
    processes = distributed.world_size() if processes is None else processes
    batches = math.ceil(math.ceil(n_train / t.batch_size) / processes)
    per_epoch = max(batches // t.grad_accum + int(batches % t.grad_accum > 0), 1)
    return math.ceil(t.epochs * per_epoch)


def planned_steps(n_train: int, t) -> int:
    """:func:`optimizer_steps`, refused in one line (with the numbers) above ``MAX_OPTIMIZER_STEPS``: a plan that
    large is a typo (``train.epochs=1e9``), not a run."""
    steps = optimizer_steps(n_train, t)
    if steps > MAX_OPTIMIZER_STEPS:
        per_epoch = optimizer_steps(n_train, t.model_copy(update={"epochs": 1.0, "max_steps": -1}))
        raise NewsloraError(f"train.epochs={t.epochs:g} plans {steps:,} optimizer steps ({per_epoch:,} per epoch: "
                            f"{n_train:,} training rows, train.batch_size={t.batch_size}, train.grad_accum="
                            f"{t.grad_accum}); the limit is {MAX_OPTIMIZER_STEPS:,}: lower train.epochs or set "
                            "train.max_steps")
    return steps


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AMX or AVX512-BF16), not emulated ones."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


# bf16 autocast must beat fp32 by this much on the probe below before ``auto`` picks it on a CPU: a margin over the
# probe's noise, so that a CPU where the two are even does not flip between runs
BF16_MIN_SPEEDUP = 1.1


def cpu_bf16_speedup(threads: int | None = None) -> float:
    """How many times faster this CPU runs a frozen base-size linear layer (1024 tokens x 768 -> 768, forward and the
    input's gradient, as under LoRA) in bf16 autocast than in fp32, at ``threads`` threads (default: the current
    count); 0.0 without native bf16. The CPU flags alone do not tell: with AVX512-BF16, bf16 trained 1.5-1.8x as fast
    as fp32 on one CPU (an AMD EPYC) and 0.70-0.89x on another (a virtualised Intel Xeon, no AMX exposed;
    bench/RESULTS.md)."""
    return measure_bf16_speedup(threads or torch.get_num_threads()) if cpu_has_bf16() else 0.0


@functools.cache
def measure_bf16_speedup(threads: int) -> float:
    """The probe behind :func:`cpu_bf16_speedup`, once per process and thread count: medians of 5 interleaved
    timings each (~0.2 s) at ``threads`` threads, rounded to 2 decimals (the value run.json records is the one
    decided on)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.enable_grad():
            return _time_bf16_speedup()
    finally:
        torch.set_num_threads(before)


def _time_bf16_speedup() -> float:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(768, 768, generator=gen)
    x = torch.randn(1024, 768, generator=gen, requires_grad=True)

    def timed(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = torch.nn.functional.linear(x, w)
        y.float().sum().backward()
        x.grad = None
        return time.perf_counter() - start

    timed(True), timed(False)  # warm-up: kernel selection and first-touch allocations
    fp32, bf16 = zip(*((timed(False), timed(True)) for _ in range(5)))
    return round(statistics.median(fp32) / statistics.median(bf16), 2)


def cpu_precision_probe(choice: str) -> dict:
    """What ``auto`` measured on a CPU, for run.json: ``{"cpu_bf16_speedup": x}``; empty on a GPU, on a CPU without
    native bf16 or for a named precision."""
    if choice != "auto" or torch.cuda.is_available() or not cpu_has_bf16():
        return {}
    return {"cpu_bf16_speedup": cpu_bf16_speedup()}


def resolve_precision(choice: str, threads: int | None = None) -> str:
    """The precision a run trains in: ``fp32``, ``tf32``, ``bf16`` or ``fp16``; refuses what this machine can't do.
    ``auto``: TF32 on an Ampere-or-newer GPU, fp16 autocast on an older one; on a CPU, bf16 autocast where the CPU has
    native bf16 matmuls (AMX or AVX512-BF16) and they measure at least ``BF16_MIN_SPEEDUP`` times as fast as fp32
    (``cpu_bf16_speedup``), fp32 elsewhere. bf16 autocast trains at the same validation accuracy as fp32
    (bench/ACCURACY.md, bf16); its numerics depend on the CPU model, so ``fp32`` is the choice for runs that must
    match bit for bit across machines. ``threads``: the thread count the run will train at, where it differs from
    this process's (the probe measures at it).
    ``tf32``: fp32 weights and activations, TF32 tensor-core matmuls (Ampere or newer): no autocast, so none of its
    per-matmul cast kernels. At the recipes' batch sizes (16-32) a LoRA step of roberta-base is bound by the host on
    such a GPU, and autocast's casts cost ~20% more host time per step than fp32 (bench/RESULTS.md); ``bf16`` stays an
    explicit choice on a GPU, for batches large enough to keep it busy."""
    cuda = torch.cuda.is_available()
    ampere = cuda and torch.cuda.get_device_capability()[0] >= 8
    if choice == "auto":
        if not cuda:
            return "bf16" if cpu_has_bf16() and cpu_bf16_speedup(threads) >= BF16_MIN_SPEEDUP else "fp32"
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


@contextmanager
def compile_settings(enabled: bool, regions: bool):
    """torch.compile settings for a Trainer built inside the block. The Trainer builds its own
    ``TorchDynamoPlugin`` with ``dynamic`` and ``use_regional_compilation`` unset, which accelerate then reads from
    its environment variables; they are restored after the block.

    ``dynamic``: batches are padded to their own longest row, so sequence lengths vary from batch to batch (and the
    last batch is smaller): one graph with symbolic sizes instead of a static compile, then a recompile once the
    second shape comes. ``regions``: accelerate's regional compilation, each repeated encoder block compiled once
    and reused for every layer, the rest of the model apart."""
    if not enabled:
        yield
        return
    values = {"ACCELERATE_DYNAMO_USE_DYNAMIC": "true", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": str(regions).lower()}
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


class TrainTally(TrainerCallback, ExportableState):
    """Training loss and accuracy from the training forward passes themselves (no extra pass): the trainer adds each
    batch's mean loss x rows and correct predictions (:meth:`add`, summed on the model's device: no per-step sync);
    they are read at each log (``train_accuracy`` of the window since the last log) and at each epoch end (an
    ``epoch_train_loss``/``epoch_train_accuracy`` entry in the log history: exact means over the epoch's rows, where
    a mean of the logged windows would count the one-step first window as a whole window and miss the steps after
    the epoch's last log). The sums are saved in checkpoints (``ExportableState``: trainer_state.json) and read back
    when a run resumes, so a resumed epoch and window are still exact.

    On several processes each rank sums its own share of the rows; a read sums them over all ranks (every rank
    reads at the same log and epoch end), and before a checkpoint is saved (rank 0 alone writes it) the sums are
    moved onto rank 0, so the checkpoint holds the totals and a resumed run restores them on rank 0 only."""

    def __init__(self):
        self.window = [0.0, 0.0, 0]  # loss x rows, correct, rows
        self.epoch = [0.0, 0.0, 0]
        self.device = None  # the model's device: where the sums are reduced over ranks

    def add(self, loss, logits, labels) -> None:
        n = labels.numel()
        loss_sum = loss.detach().float().mean() * n  # mean: DataParallel gives one loss per GPU
        correct = (logits.detach().argmax(-1) == labels).sum()
        for acc in (self.window, self.epoch):
            acc[0] = acc[0] + loss_sum
            acc[1] = acc[1] + correct
            acc[2] += n

    def _read(self, acc: list) -> tuple[float, float] | None:
        if distributed.active():
            acc = distributed.all_sum(acc, self.device)
        if not acc[2]:
            return None
        return float(acc[0]) / acc[2], float(acc[1]) / acc[2]

    def _fold(self) -> None:
        """Several processes: the sums over all ranks onto rank 0, zeros elsewhere (the totals are unchanged)."""
        if not distributed.active():
            return
        tot = distributed.all_sum([*self.window, *self.epoch], self.device)
        main = distributed.is_main()
        self.window = [tot[0], tot[1], int(tot[2])] if main else [0.0, 0.0, 0]
        self.epoch = [tot[3], tot[4], int(tot[5])] if main else [0.0, 0.0, 0]

    def window_accuracy(self) -> float | None:
        """Accuracy of the rows since the last call; starts a new window."""
        got = self._read(self.window)
        self.window = [0.0, 0.0, 0]
        return None if got is None else got[1]

    def on_train_begin(self, args, state, control, **kwargs):
        self.device = args.device
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if isinstance(saved, dict) and distributed.is_main():  # resumed: the sums up to the checkpoint (state())
            self.window, self.epoch = (list(saved["attributes"][k]) for k in ("window", "epoch"))

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # decided by the Trainer's flow callback, which runs first
            self._fold()

    def on_epoch_end(self, args, state, control, **kwargs):
        got = self._read(self.epoch)
        self.epoch = [0.0, 0.0, 0]
        if got is not None:
            state.log_history.append({"epoch": state.epoch, "step": state.global_step,
                                      "epoch_train_loss": round(got[0], 6), "epoch_train_accuracy": round(got[1], 6)})
        if control.should_save:
            self._fold()

    def state(self) -> dict:
        return {"args": {}, "attributes": {"window": [float(self.window[0]), float(self.window[1]), self.window[2]],
                                           "epoch": [float(self.epoch[0]), float(self.epoch[1]), self.epoch[2]]}}


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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if self.args.torch_compile and self.args.torch_compile_mode in ("reduce-overhead", "max-autotune"):
            # A Trainer that evaluates before it ever trains compiles its model for evaluation; in these modes its
            # outputs live in CUDA graph memory that the next replay overwrites, while the evaluation loop keeps
            # each batch's logits until it concatenates them. (After training, evaluation runs the eager model.)
            loss, logits = (tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, v) for v in (loss, logits))
        return loss, logits, labels

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

    def close(self) -> None:
        """End the open bars on their own lines (training stopped by an exception), so what is printed next starts
        on a fresh line."""
        for name in ("prediction_bar", "training_bar"):
            bar = getattr(self, name, None)
            if bar is not None:
                bar.close()
                setattr(self, name, None)


class Heartbeat(TrainerCallback):
    """Writes the attempt's heartbeat (and step) into run.json at most every ``every`` seconds: a time check per
    training step and per evaluation batch, a write every ~30 s, so a reader can tell a live run from a dead one."""

    def __init__(self, run, info: dict, every: float | None = None):  # a newslora.run.Run and its run.json
        from .run import HEARTBEAT_S

        self.run, self.info, self.every = run, info, HEARTBEAT_S if every is None else every
        self.last = time.monotonic()

    def beat(self, state) -> None:
        t = time.monotonic()
        if t - self.last >= self.every and state.is_world_process_zero:
            self.last = t
            self.run.heartbeat(self.info, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.beat(state)

    def on_prediction_step(self, args, state, control, **kwargs):
        self.beat(state)


class NonFiniteLoss(NewsloraError):
    """Training diverged: a logged loss or gradient norm is NaN or infinite."""


class StopOnNonFinite(TrainerCallback):
    """Stop training at the first logged loss, gradient norm or validation loss that is NaN or infinite, by raising
    :class:`NonFiniteLoss`: ``fit`` then marks the attempt ``failed`` with this one line, and no NaN model is saved,
    evaluated or called completed. (Each log already reads the loss on the host: no extra device sync.)"""

    KEYS = ("loss", "grad_norm", "eval_loss")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteLoss(
                    f"training stopped at step {state.global_step}: the {key.replace('_', ' ')} is {value} (the "
                    f"model diverged); lower train.lr (now {args.learning_rate:g}) or check the recipe's numbers, "
                    "then train again")


class MetricsFileCallback(TrainerCallback):
    """Keeps the metric CSVs current after every log, so an interrupted run still has its curves."""

    def __init__(self, run):  # a newslora.run.Run
        self.run = run

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.run.write_metric_csvs(state.log_history)
