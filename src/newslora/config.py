"""Recipes: typed dataclasses loaded from YAML plus ``key=value`` overrides, validated up front.

A recipe is the whole description of a run. Every section is a dataclass; unknown keys, wrong types
and impossible values raise :class:`NewsloraError` naming the key and the valid choices before any
model or data is touched.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from . import methods
from .errors import NewsloraError
from .methods import positive as _positive
from .methods.adalora import AdaLoraSection  # noqa: F401 - re-exported: the sections' old import path
from .methods.lora import LoraSection  # noqa: F401
from .methods.vera import VeraSection  # noqa: F401

# short backbone names newslora accepts, with the hub id of the same model (model cards, adapter configs)
BACKBONE_ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
                    "roberta-base": "FacebookAI/roberta-base"}  # the id the hub serves roberta-base under today


def hub_id(backbone: str) -> str | None:
    """The Hugging Face hub id of a recipe's ``model.backbone``, or None for a local folder (not a hub model)."""
    name = str(backbone or "").strip()
    if not name:
        return None
    if name.lower() in BACKBONE_ALIASES:
        return BACKBONE_ALIASES[name.lower()]
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1:
        return None
    return name


@dataclass
class ModelConfig:
    backbone: str = "roberta-base"  # hub id or local folder
    max_length: int = 128
    random_init: bool = False  # build from the config only (tests, speed benchmarks)
    config_overrides: dict = field(default_factory=dict)  # e.g. {num_hidden_layers: 2} for tiny models
    tokenizer: str | None = None  # defaults to the backbone
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    quantization: Literal["none", "4bit", "8bit"] = "none"

    def check(self):
        _positive("model.max_length", self.max_length)


@dataclass
class DataConfig:
    source: str = "ag_news"  # hub dataset id, or a local file / folder with train (and test) files
    test: str | None = None  # a separate labelled test file; default: the source's test split
    validation: str | None = None  # a separate labelled validation file; default: carved from train (validation_size)
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = None
    num_labels: int | None = None  # the number of classes of integer labels 0..K-1 (when no names are given)
    validation_size: float = 0.05  # fraction of train (<1) or a number of rows (>=1), stratified
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    seed: int = 42

    def check(self):
        if self.validation_size <= 0:
            raise NewsloraError("data.validation_size must be > 0 (a fraction < 1 or a row count >= 1): "
                                "model selection needs a validation split")
        if self.validation_size >= 1 and self.validation_size != int(self.validation_size):
            raise NewsloraError(f"data.validation_size={self.validation_size}: use a fraction < 1 or a whole row count")
        for k in ("max_train_samples", "max_test_samples"):
            if getattr(self, k) is not None:
                _positive(f"data.{k}", getattr(self, k))
        if self.num_labels is not None and self.num_labels < 2:
            raise NewsloraError(f"data.num_labels={self.num_labels} must be at least 2")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise NewsloraError(f"data.label_names has duplicates: {self.label_names}")


@dataclass
class HeadConfig:
    # full: PEFT's default, the whole classification head trains (593,668 params on roberta-base);
    # lora: the head's dense layer gets LoRA of rank head.r (AdaLoRA/VeRA: the method's own rank) and only the
    # output projection trains fully (RoBERTa-style heads; a single-linear head such as BERT's needs type=full).
    # Both keep the standard architecture, so merged models load with plain transformers.
    type: Literal["full", "lora"] = "full"
    r: int = 8  # rank of the head's LoRA (type=lora)

    def check(self):
        _positive("head.r", self.r)


@dataclass
class BudgetConfig:
    max_params: int = 1_000_000  # trainable parameters, classification head included
    auto_fit: bool = False  # raise the rank to the largest value that fits

    def check(self):
        _positive("budget.max_params", self.max_params)


@dataclass
class TrainConfig:
    lr: float = 5e-4
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    weight_decay: float = 0.01
    label_smoothing: float = 0.0  # cross-entropy label smoothing (the Trainer's label_smoothing_factor)
    warmup: float = 0.06  # fraction of the optimizer steps (<1) or a step count (>=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    eval_steps: int | None = None  # None: evaluate at each epoch end
    logging_steps: int = 50
    save_total_limit: int = 2
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    metric: Literal["accuracy", "macro_f1", "loss"] = "accuracy"
    # auto: TF32 on an Ampere+ GPU (fp16 autocast on older ones), fp32 on CPU; tf32: fp32 with TF32 matmuls
    # (Ampere+ GPUs, no autocast casts); bf16/fp16: autocast, for batches large enough to keep a GPU busy
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    group_by_length: bool = True  # shuffled length buckets: less padding, still random
    torch_compile: bool = False
    # compile one encoder block and reuse it for every layer (accelerate's regional compilation), the embeddings
    # and head apart, instead of tracing and compiling the whole model as one graph
    compile_regions: bool = True
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    threads: int | None = None  # CPU threads (default: torch's choice)
    # DataLoader worker processes: batches fetched and padded off the main thread (a GPU run whose step is bound by
    # the host); 0 on a CPU-only run, where a worker would take a core from the model
    dataloader_workers: int = 0
    seed: int = 42
    # experiment tracking through the Trainer's integrations (newslora[tracking]); tracking_uri: the MLflow store
    # (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs folder>/mlflow.db)
    report_to: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)
    tracking_uri: str | None = None

    def check(self):
        _positive("train.lr", self.lr)
        if self.max_steps <= 0 and self.epochs <= 0:
            raise NewsloraError("set train.epochs > 0 or train.max_steps > 0")
        for k in ("batch_size", "eval_batch_size", "grad_accum", "logging_steps", "save_total_limit"):
            _positive(f"train.{k}", getattr(self, k))
        for k in ("eval_steps", "early_stopping_patience", "threads"):
            if getattr(self, k) is not None:
                _positive(f"train.{k}", getattr(self, k))
        if self.weight_decay < 0:
            raise NewsloraError(f"train.weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise NewsloraError(f"train.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.dataloader_workers < 0:
            raise NewsloraError(f"train.dataloader_workers={self.dataloader_workers} must be >= 0 (0: load batches in "
                                "the main process)")
        if self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup)):
            raise NewsloraError(f"train.warmup={self.warmup}: use a fraction in [0, 1) or a whole step count")


@dataclass
class DistillConfig:
    teachers: list[str] = field(default_factory=list)  # run folders or merged models; empty: no distillation
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the cross-entropy on labels; 1 - alpha goes to the KL term
    # a file of texts without labels: the teachers' soft labels on them join the training rows (KL term only)
    unlabelled: str | None = None
    unlabelled_weight: float = 1.0  # weight of an unlabelled row's T^2 * KL term, against a labelled row's loss

    def check(self):
        _positive("distill.temperature", self.temperature)
        if not 0 <= self.unlabelled_weight < float("inf"):
            raise NewsloraError(f"distill.unlabelled_weight={self.unlabelled_weight} must be a number >= 0")
        if self.unlabelled and not self.teachers:
            raise NewsloraError("distill.unlabelled needs distill.teachers: the soft labels of unlabelled texts come "
                                "from a teacher (set distill.teachers=[RUN_DIR])")
        if not 0 <= self.alpha <= 1:
            raise NewsloraError(f"distill.alpha={self.alpha} must be in [0, 1]")


class _RecipeMethods:
    """Behaviour of :class:`Recipe`, whose fields are built below from the sections the methods register."""

    def check(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise NewsloraError(f"name={self.name!r}: use a plain folder name such as 'lora-r8'")
        method = methods.get(self.method)  # one line naming the valid choices
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check()
        method.check_recipe(self)
        if self.model.quantization != "none" and self.model.random_init:
            raise NewsloraError(f"model.quantization={self.model.quantization} quantizes pretrained weights; it "
                                "does not combine with model.random_init=true")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# name, method, model, data, the methods' sections (lora, adalora, vera, ...), head, budget, train, distill
Recipe = dataclasses.make_dataclass(
    "Recipe",
    [("name", str, field(default="run")),
     ("method", str, field(default="lora")),  # a registered method (checked against the registry in check())
     ("model", ModelConfig, field(default_factory=ModelConfig)),
     ("data", DataConfig, field(default_factory=DataConfig)),
     *[(name, cls, field(default_factory=cls)) for name, cls in methods.sections()],
     ("head", HeadConfig, field(default_factory=HeadConfig)),
     ("budget", BudgetConfig, field(default_factory=BudgetConfig)),
     ("train", TrainConfig, field(default_factory=TrainConfig)),
     ("distill", DistillConfig, field(default_factory=DistillConfig))],
    bases=(_RecipeMethods,))
Recipe.__module__ = __name__  # pickling (search workers) finds it here
Recipe.__doc__ = "A whole run: every section of the recipe, validated by ``check()``."


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults), apply ``key=value`` overrides and validate it."""
    data = read_yaml_mapping(path, "recipe", "--config", "configs/demo.yaml") if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return recipe_from_dict(data)


def read_yaml_mapping(path: str | Path, what: str, option: str, example: str) -> dict:
    """A YAML file holding a mapping, or one clear error line (missing file, bad YAML, not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise NewsloraError(f"{what} not found: {path} (pass {option} with a YAML file, e.g. {example})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise NewsloraError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise NewsloraError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def recipe_from_dict(data: dict) -> Recipe:
    recipe = _build(Recipe, data, "")
    recipe.check()
    return recipe


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``[q,v]``, ``3e-4``, ``null``)."""
    if "=" not in item:
        raise NewsloraError(f"override {item!r} is not key=value (e.g. lora.r=8 train.lr=3e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    set_key(data, key.strip(), value, f"override {item!r}")


def set_key(data: dict, key: str, value, where: str = "recipe") -> None:
    """Set the dotted recipe key ``a.b.c`` in a recipe mapping, in place (overrides, search trials)."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise NewsloraError(f"{where}: {p} is not a section")
    node[parts[-1]] = value


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NewsloraError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise NewsloraError(unknown_key_message(prefix + str(key), key, list(fields)))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, tp)
    return cls(**kwargs)


def unknown_key_message(full: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown recipe key {full!r}{hint}; valid keys here: {', '.join(valid)}"


def _coerce(key: str, value: Any, tp) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise NewsloraError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise NewsloraError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise NewsloraError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise NewsloraError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise NewsloraError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NewsloraError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise NewsloraError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value
