"""The training loop's parts: newslora's Trainer, collator, progress and metric-file callbacks, precision choice.

:mod:`newslora.train` assembles them (``setup``) and runs them (``fit``); distillation and the benches reuse them.
"""
from __future__ import annotations

import math
import platform
from contextlib import contextmanager

import torch
from transformers import DataCollatorWithPadding, ProgressCallback, Trainer, TrainerCallback

from . import __version__
from .data import pad_batch, pads_right
from .errors import NewsloraError


class TrainHook:
    """Something that plugs into :func:`newslora.train.setup` (distillation, search trials, benches): it may change
    the Trainer's class and keyword arguments before the Trainer is built, and the result after ``fit``."""

    def configure(self, trainer_cls: type, kwargs: dict) -> type:
        """Called with the Trainer class and the keyword arguments it will get; returns the class to build."""
        return trainer_cls

    def finish(self, result):
        """Called with ``fit``'s :class:`~newslora.train.RunResult` once the run folder is complete."""
        return result


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
            line = f"{where}  train loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
        elif "train_runtime" in logs:
            line = f"trained in {logs['train_runtime']:.1f} s ({logs.get('train_samples_per_second', 0):.1f} samples/s)"
        else:
            return
        self.training_bar.write(line)


class MetricsFileCallback(TrainerCallback):
    """Keeps the metric CSVs current after every log, so an interrupted run still has its curves."""

    def __init__(self, run):  # a newslora.run.Run
        self.run = run

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.run.write_metric_csvs(state.log_history)
