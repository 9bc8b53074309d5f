"""Recipes: pydantic models loaded from YAML plus ``key=value`` overrides, validated up front.

A recipe is the whole description of a run. Every section is a :class:`~newslora.sections.Section` model (the
methods bring their own sections); unknown keys, wrong kinds, non-finite numbers and impossible values are refused
in one line naming the key and the valid choices, before any model or data is touched. :func:`json_schema` is the
same definition as JSON Schema, for editors.
"""
from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from . import methods
from .errors import NewsloraError
from .sections import Float, Int, List, Section, Str
from .yamlfile import parse_yaml, read_yaml_mapping

# numpy's and torch's seeds are unsigned 32-bit
MAX_SEED = 2**32 - 1
# a run plans at most this many optimizer steps (more is a typo such as train.epochs=1e9, not a run)
MAX_OPTIMIZER_STEPS = 10**7


def _finite_leaves(value: Any, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value} is not a finite number; give a real value")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_leaves(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_leaves(v, f"{key}[{i}]")


class ModelConfig(Section):
    """The backbone and how texts reach it."""

    backbone: Str = "roberta-base"
    """hub id, local folder, or a short name (minilm, mpnet-base)"""
    max_length: Int = Field(128, gt=0)
    """tokens per text; longer texts are truncated (model.truncation)"""
    truncation: Literal["head", "tail", "head_tail"] = "head"
    """which tokens of a long text are kept: the first, the last, or both ends"""
    random_init: bool = False
    """build from the config only, no pretrained weights (tests, speed benchmarks)"""
    config_overrides: dict = Field(default_factory=dict, examples=[{"num_hidden_layers": 2}])
    """fields of the backbone's config to replace, e.g. {num_hidden_layers: 2} for tiny models"""
    tokenizer: Str | None = None
    """tokenizer hub id or folder; null: the backbone's"""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """attention kernel (families without SDPA fall back to eager)"""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """load the frozen backbone in 4 or 8 bit (QLoRA; CUDA only)"""

    @field_validator("config_overrides")
    @classmethod
    def _finite_overrides(cls, value: dict) -> dict:
        _finite_leaves(value, "model.config_overrides")
        return value


class DataConfig(Section):
    """Where the rows come from and how they are split."""

    source: Str = "ag_news"
    """hub dataset id, or a local file / folder with train (and test) files"""
    test: Str | None = None
    """a separate labelled test file; null: the source's test split"""
    validation: Str | None = None
    """a separate labelled validation file; null: carved from train (data.validation_size)"""
    text_column: Str = "text"
    """the column holding the text"""
    text_columns: List(Str) | None = Field(None, min_length=1, examples=[["title", "description"]])
    """several text columns, joined with a separator (overrides data.text_column)"""
    label_column: Str = "label"
    """the column holding the label"""
    label_names: List(Str) | None = None
    """class names, in label order (integer labels 0..K-1 map to them)"""
    num_labels: Int | None = Field(None, ge=2)
    """the number of classes of integer labels 0..K-1 (when no names are given)"""
    validation_size: Float = Field(0.05, gt=0)
    """fraction of train (< 1) or a number of rows (>= 1), stratified"""
    max_train_samples: Int | None = Field(None, gt=0)
    """use at most this many training rows"""
    max_test_samples: Int | None = Field(None, gt=0)
    """use at most this many test rows"""
    drop_overlap: bool = False
    """drop training rows whose text is also in validation or test (false: they are counted and warned about)"""
    seed: Int = Field(42, ge=0, le=MAX_SEED)
    """seed of the validation split and of the row samples"""

    @model_validator(mode="after")
    def _rules(self):
        if self.validation_size >= 1 and not self.validation_size.is_integer():
            raise ValueError(f"data.validation_size={self.validation_size}: use a fraction < 1 or a whole row count")
        if self.text_columns is not None and len(set(self.text_columns)) != len(self.text_columns):
            raise ValueError(f"data.text_columns={self.text_columns}: name one or more distinct columns, e.g. "
                             "[title, body]")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"data.label_names has duplicates: {self.label_names}")
        return self


class HeadConfig(Section):
    """The classification head. full: PEFT's default, the whole head trains (593,668 parameters on roberta-base);
    lora: the head's dense layer gets LoRA of rank head.r (AdaLoRA/VeRA: the method's own rank) and only the output
    projection trains fully (RoBERTa-style heads; a single-linear head such as BERT's needs type=full). Both keep
    the standard architecture, so merged models load with plain transformers."""

    type: Literal["full", "lora"] = "full"
    """how the head trains: fully, or LoRA on its dense layer"""
    r: Int = Field(8, gt=0)
    """rank of the head's LoRA (head.type=lora)"""


class BudgetConfig(Section):
    """The hard limit on trainable parameters."""

    max_params: Int = Field(1_000_000, gt=0)
    """trainable parameters, classification head included"""
    auto_fit: bool = False
    """raise the rank to the largest value that fits the budget"""


class TrainConfig(Section):
    """The optimisation: schedule, batches, precision, evaluation and logging."""

    lr: Float = Field(5e-4, gt=0)
    """peak learning rate"""
    epochs: Float = 3.0
    """passes over the training rows (fractions allowed); ignored when train.max_steps > 0"""
    max_steps: Int = Field(-1, le=MAX_OPTIMIZER_STEPS)
    """optimizer steps; > 0 overrides train.epochs"""
    batch_size: Int = Field(32, gt=0)
    """training rows per device and step"""
    eval_batch_size: Int = Field(128, gt=0)
    """rows per evaluation batch"""
    grad_accum: Int = Field(1, gt=0)
    """batches accumulated per optimizer step"""
    weight_decay: Float = Field(0.01, ge=0)
    """AdamW / SGD weight decay"""
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    """cross-entropy label smoothing (the Trainer's label_smoothing_factor)"""
    class_weights: Literal["none", "balanced"] = "none"
    """balanced: cross-entropy weighted by n_rows / (n_classes * n_rows_of_class), counted on the training split"""
    warmup: Float = Field(0.06, ge=0)
    """warm-up: a fraction of the optimizer steps (< 1) or a step count (>= 1)"""
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """learning-rate schedule after warm-up"""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """the optimizer (method=loraplus builds it with LoRA+'s learning rates)"""
    eval_steps: Int | None = Field(None, gt=0)
    """evaluate (and checkpoint) every this many optimizer steps; null: at each epoch end"""
    logging_steps: Int = Field(50, gt=0)
    """optimizer steps between two loss logs"""
    save_total_limit: Int = Field(2, gt=0)
    """checkpoints kept"""
    early_stopping_patience: Int | None = Field(None, gt=0)
    """evaluations without improvement before stopping; null: never stop early"""
    metric: Literal["accuracy", "macro_f1", "loss"] = "accuracy"
    """validation metric that chooses the best checkpoint"""
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    """auto: TF32 on an Ampere+ GPU (fp16 autocast on older ones); on CPU bf16 autocast where the CPU has native bf16
    (AMX/AVX512-BF16) that measures >= 1.1x fp32, else fp32; tf32: fp32 with TF32 matmuls (Ampere+ GPUs); bf16/fp16:
    autocast; fp32: bit-for-bit the same on every machine"""
    group_by_length: bool = True
    """shuffled length buckets: less padding, still random"""
    torch_compile: bool = False
    """compile the model with torch.compile"""
    compile_regions: bool = True
    """compile one encoder block and reuse it for every layer (regional compilation) instead of the whole model"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode"""
    threads: Int | None = Field(None, gt=0)
    """CPU threads; null: torch's choice"""
    dataloader_workers: Int = Field(0, ge=0)
    """DataLoader worker processes (0: load batches in the main process, best on CPU)"""
    report_to: List(Literal["tensorboard", "mlflow"]) = Field(default_factory=list, examples=[["tensorboard"]])
    """experiment trackers that receive the run's metrics"""
    tracking_uri: Str | None = None
    """the MLflow store (needs mlflow in train.report_to); null: $MLFLOW_TRACKING_URI, else
    sqlite:///<runs folder>/mlflow.db"""
    seed: Int = Field(42, ge=0, le=MAX_SEED)
    """seed of the model's initialisation and the batch order"""

    @model_validator(mode="after")
    def _rules(self):
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError(f"train.epochs={self.epochs} and train.max_steps={self.max_steps}: set train.epochs > 0 "
                             "or train.max_steps > 0")
        if self.warmup >= 1 and not self.warmup.is_integer():
            raise ValueError(f"train.warmup={self.warmup}: use a fraction in [0, 1) or a whole step count")
        return self


class DistillConfig(Section):
    """Knowledge distillation from trained teachers (newslora distill)."""

    teachers: List(Str) = Field(default_factory=list)
    """run folders or merged models; empty: no distillation"""
    temperature: Float = Field(2.0, gt=0)
    """softmax temperature of teacher and student logits"""
    alpha: Float = Field(0.5, ge=0, le=1)
    """weight of the cross-entropy on labels; 1 - alpha goes to the KL term"""
    unlabelled: Str | None = None
    """a file of texts without labels: the teachers' soft labels on them join the training rows (KL term only)"""
    unlabelled_weight: Float = Field(1.0, ge=0)
    """weight of an unlabelled row's T^2 * KL term, against a labelled row's loss"""

    @model_validator(mode="after")
    def _rules(self):
        if self.unlabelled and not self.teachers:
            raise ValueError("distill.unlabelled needs distill.teachers: the soft labels of unlabelled texts come from "
                             "a teacher (set distill.teachers=[RUN_DIR])")
        return self


class RecipeBase(Section):
    """Behaviour of :class:`Recipe`, whose fields are built below from the sections the methods register."""

    @model_validator(mode="after")
    def _rules(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name={self.name!r}: use a plain folder name such as 'lora-r8'")
        try:
            methods.get(self.method).check_recipe(self)
        except NewsloraError as e:
            raise ValueError(str(e)) from None
        if self.model.quantization != "none" and self.model.random_init:
            raise ValueError(f"model.quantization={self.model.quantization} quantizes pretrained weights; it does "
                             "not combine with model.random_init=true")
        if self.distill.teachers and self.train.class_weights != "none":
            raise ValueError("train.class_weights does not combine with distill.teachers (the distillation loss "
                             "weighs every row alike): drop one of them")
        return self

    def check(self) -> None:
        """Validate the recipe again after it was changed in place (e.g. distill.teachers set by the CLI)."""
        recipe_from_dict(self.to_dict())

    def to_dict(self) -> dict:
        return self.model_dump(mode="python")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# name, method, model, data, the methods' sections (lora, adalora, vera, loraplus), head, budget, train, distill
Recipe = create_model(
    "Recipe", __base__=RecipeBase, __module__=__name__,  # pickling (search workers) finds it here
    __doc__="A whole run: every section of the recipe, validated when it is built.",
    name=(Str, Field("run", description="the run's name: its folder is runs/<name> by default")),
    method=(Str, Field("lora", description="the fine-tuning method (a registered one: see the schema's enum)")),
    model=(ModelConfig, Field(default_factory=ModelConfig)),
    data=(DataConfig, Field(default_factory=DataConfig)),
    **{name: (cls, Field(default_factory=cls)) for name, cls in methods.sections()},
    head=(HeadConfig, Field(default_factory=HeadConfig)),
    budget=(BudgetConfig, Field(default_factory=BudgetConfig)),
    train=(TrainConfig, Field(default_factory=TrainConfig)),
    distill=(DistillConfig, Field(default_factory=DistillConfig)))


def json_schema() -> dict:
    """The JSON Schema of a recipe (``newslora schema``): keys, kinds, choices, ranges and descriptions."""
    schema = Recipe.model_json_schema()
    schema["properties"]["method"]["enum"] = list(methods.names())  # methods register themselves: listed now
    schema["title"] = "newslora recipe"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults), apply ``key=value`` overrides and validate it."""
    data = read_yaml_mapping(path, "recipe", "--config", "configs/demo.yaml") if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return recipe_from_dict(data)


# old key -> new key; the old one still works, with a notice on stderr
DEPRECATED_KEYS = {"lora.loraplus_lr_ratio": "loraplus.ratio"}


def _deprecated(old: str, new: str) -> None:
    print(f"deprecated: {old} -> use {new} (the old key still works for now)", file=sys.stderr)


def _migrate(data: dict) -> dict:
    """Move old keys to their new place, with a one-line notice each."""
    for old, new in DEPRECATED_KEYS.items():
        section, key = old.split(".")
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            value = node.pop(key)
            _deprecated(old, new)
            target = data.setdefault(new.split(".")[0], {})
            if isinstance(target, dict):
                target.setdefault(new.split(".")[1], value)
    lora, ada = data.get("lora"), data.get("adalora")
    if (data.get("method") == "adalora" and isinstance(lora, dict) and "alpha" in lora
            and (ada is None or isinstance(ada, dict) and "alpha" not in ada)):
        _deprecated("lora.alpha with method=adalora", "adalora.alpha")
        data["adalora"] = {**(ada or {}), "alpha": lora["alpha"]}
    return data


def recipe_from_dict(data: dict) -> Recipe:
    if not isinstance(data, dict):
        raise NewsloraError(f"recipe must be a mapping, got {data!r}")
    data = _migrate(dict(data))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise NewsloraError(error_line(e.errors(include_url=False)[0])) from None


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``[q,v]``, ``3e-4``, ``null``)."""
    if "=" not in item:
        raise NewsloraError(f"override {item!r} is not key=value (e.g. lora.r=8 train.lr=3e-4)")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw) if raw != "" else None
    except NewsloraError as e:
        raise NewsloraError(f"override {item!r}: {e}") from None
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


def unknown_key_message(full: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown recipe key {full!r}{hint}; valid keys here: {', '.join(valid)}"


# ----------------------------------------------------------------------------- schema introspection


def is_section(tp) -> bool:
    """Whether a recipe key's type is a section (a mapping of keys) rather than a value."""
    return isinstance(tp, type) and issubclass(tp, Section)


def section_keys(cls) -> list[str]:
    return list(cls.model_fields)


def key_type(cls, name: str):
    """The annotation of key ``name`` of section ``cls`` (Annotated wrappers removed)."""
    return _bare(cls.model_fields[name].annotation)


def _bare(tp):
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_bare(a) for a in typing.get_args(tp))]
    return tp


def _field(loc: tuple):
    """(section model, field info) of the key at ``loc``, or (None, None)."""
    cls, info = Recipe, None
    for part in loc:
        if isinstance(part, int):
            continue
        if not is_section(cls) or part not in cls.model_fields:
            return None, None
        info = cls.model_fields[part]
        cls = _bare(info.annotation)
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if typing.get_origin(cls) in (typing.Union, types.UnionType) and len(args) == 1:
            cls = args[0]
    return cls, info


def _choices(tp) -> list:
    """The allowed values of a Literal anywhere inside ``tp``."""
    tp = _bare(tp)
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    for a in typing.get_args(tp):
        found = _choices(a)
        if found:
            return found
    return []


def _bounds(info) -> str:
    lo = hi = ""
    show = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"  # noqa: E731
    for m in info.metadata if info is not None else ():
        if isinstance(m, annotated_types.Gt):
            lo = f"> {show(m.gt)}"
        elif isinstance(m, annotated_types.Ge):
            lo = f">= {show(m.ge)}"
        elif isinstance(m, annotated_types.Lt):
            hi = f"< {show(m.lt)}"
        elif isinstance(m, annotated_types.Le):
            hi = f"<= {show(m.le)}"
    if lo and hi:
        return f"in {'(' if lo[1] != '=' else '['}{lo.split()[-1]}, {hi.split()[-1]}{')' if hi[1] != '=' else ']'}"
    if lo.startswith(">="):
        return f"at least {lo.split()[-1]}"
    return f"{lo or hi}"


def error_line(err: dict) -> str:
    """One line for pydantic's first validation error: the key, what is wrong, and the valid choices."""
    loc = tuple(err["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "recipe"
    kind, value = err["type"], err.get("input")
    if kind == "value_error":
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        parent, _ = _field(loc[:-1]) if loc[:-1] else (Recipe, None)
        valid = section_keys(parent) if is_section(parent) else []
        return unknown_key_message(key, loc[-1], valid)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key} must be a mapping, got {value!r}"
    _, info = _field(loc)
    if kind == "literal_error":
        choices = _choices(info.annotation) if info is not None else []
        return f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}"
    if kind == "finite_number":
        return f"{key}={value} is not a finite number; give a real value (default: {info.default if info else '-'})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}={value} must be {_bounds(info)}"
    if kind == "too_short":
        example = f", e.g. {info.examples[0]}" if info is not None and info.examples else ""
        return f"{key} is empty: give at least one value{example}"
    if kind.startswith("int_"):
        return f"{key} must be an integer, got {value!r}"
    if kind.startswith("float_"):
        return f"{key} must be a number, got {value!r}"
    if kind.startswith("bool_"):
        return f"{key} must be true or false, got {value!r}"
    if kind.startswith("string_"):
        quote = " (YAML reads yes/no/on/off/true/false as booleans: quote it)" if isinstance(value, bool) else ""
        return f"{key} must be a string, got {value!r}{quote}"
    if kind.startswith("list_"):
        return f"{key} must be a list, got {value!r}"
    return f"{key}={value!r}: {err['msg']}"
