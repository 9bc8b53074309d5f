"""Model stage: backbone (hub id or local folder) + PEFT adapter + the trainable-parameter budget.

The same :func:`build_model` serves training and counting: :func:`count_trainable` builds the model on
PyTorch's meta device (no weights loaded, no memory used), so the count printed before training is
the count of the model that trains. The module is longer than most (about 470 lines) for that reason: loading the
backbone, attaching the adapter and counting it exactly (auto_fit included) are one piece of knowledge; what is
specific to a method lives in :mod:`newslora.methods`.
"""
from __future__ import annotations

import contextlib
import copy
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import families, methods
from .config import Recipe
from .errors import NewsloraError, first_line
from .families import LAYER_RE, resolve_backbone


# ----------------------------------------------------------------------------- backbone


def _hub_error(what: str, name: str, e: Exception) -> NewsloraError:
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return NewsloraError(f"cannot load {what} from {name}: {first_line(e)}")
    return NewsloraError(
        f"cannot load {what} {name!r}: it is not a local folder and the Hugging Face hub is unreachable "
        f"(offline?); pass a local folder instead, e.g. model.backbone=minilm (packaged MiniLM) or "
        f"model.backbone=/path/to/model")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    name = resolve_backbone(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _hub_error("the tokenizer", name, e) from None


def load_backbone_config(recipe: Recipe, label_names: list[str]):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    name = resolve_backbone(recipe.model.backbone)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _hub_error("the model config", name, e) from None
    for k, v in recipe.model.config_overrides.items():
        if not hasattr(config, k):
            raise NewsloraError(f"model.config_overrides.{k}: {config.model_type} configs have no such field")
        try:
            setattr(config, k, v)
        except (ValueError, TypeError, StrictDataclassError) as e:  # transformers' configs check kinds on assignment
            why = " ".join(str(e).split())  # the field and the expected kind are on the message's second line
            raise NewsloraError(f"model.config_overrides.{k}={v!r} is refused by the {config.model_type} config: "
                                f"{why}") from None
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    config.problem_type = "single_label_classification"
    return config


# Encoders whose position ids start after the padding index (RoBERTa's scheme): pad_token_id + 1 of their
# max_position_embeddings can never be used (roberta-base, MPNet: 514 embeddings, 512 usable positions).
PADDING_OFFSET_MODELS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer",
                         "data2vec-text", "roberta-prelayernorm", "xmod", "ibert"}


def usable_positions(config) -> tuple[int, int] | None:
    """(positions a sequence can use, positions lost to the padding offset), or None for models without learnt
    absolute position embeddings."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    offset = (getattr(config, "pad_token_id", None) or 0) + 1 if config.model_type in PADDING_OFFSET_MODELS else 0
    return n - offset, offset


def check_max_length(recipe: Recipe) -> None:
    """Refuse ``model.max_length`` above the backbone's usable positions (longer rows would index past the
    position embeddings mid-run)."""
    config = load_backbone_config(recipe, ["0", "1"])
    usable = usable_positions(config)
    if usable is not None and recipe.model.max_length > usable[0]:
        n, offset = usable
        lost = f", {offset} of them reserved by the padding offset" if offset else ""
        raise NewsloraError(f"model.max_length={recipe.model.max_length} is above the {n} positions {config.model_type} "
                            f"can use ({config.max_position_embeddings} position embeddings{lost}); set "
                            f"model.max_length={n} or less")


def load_backbone(recipe: Recipe, label_names: list[str], meta: bool = False, for_training: bool = True):
    """The base classifier: pretrained weights, random init (``model.random_init``) or meta tensors (counting).

    With ``model.quantization`` (CUDA only) the weights load in 4 or 8 bit through bitsandbytes and, for training,
    go through PEFT's ``prepare_model_for_kbit_training`` (QLoRA); the classification head stays unquantized.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = load_backbone_config(recipe, label_names)
    kwargs = {"attn_implementation": families.attn_implementation(config, recipe.model.attn_implementation)}
    if meta or recipe.model.random_init:
        torch.manual_seed(recipe.train.seed)
        ctx = torch.device("meta") if meta else contextlib.nullcontext()
        with ctx:
            try:
                return AutoModelForSequenceClassification.from_config(config, **kwargs)
            except (ValueError, TypeError, KeyError, ZeroDivisionError, RuntimeError) as e:
                if not recipe.model.config_overrides:
                    raise
                raise NewsloraError(f"model.config_overrides={recipe.model.config_overrides} do not build a "
                                    f"{config.model_type} model ({first_line(e, with_type=True)}); fix or remove "
                                    "them") from None
    name = resolve_backbone(recipe.model.backbone)
    quantized = recipe.model.quantization != "none"
    if quantized:
        kwargs.update(quantization_kwargs(recipe.model.quantization, families.of(config).head))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name, config=config, **kwargs)
        if quantized and for_training:  # QLoRA: freeze, upcast norms/head to fp32, checkpoint activations
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    except (OSError, ValueError) as e:
        if Path(name).is_dir() and not any(Path(name).glob("*.safetensors")) and not any(Path(name).glob("*.bin")):
            raise NewsloraError(f"{name} has a config but no weights; set model.random_init=true for a random-init "
                                "model, or point model.backbone at a folder with weights") from None
        raise _hub_error("the model", name, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def check_quantization(mode: str) -> None:
    """Raise one clear line unless ``model.quantization=mode`` can run here (CUDA GPU + bitsandbytes)."""
    if mode == "none":
        return
    if not torch.cuda.is_available():
        raise NewsloraError(f"model.quantization={mode} needs a CUDA GPU (bitsandbytes) and none is available here; "
                            "set model.quantization=none to train in full precision")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise NewsloraError(f"model.quantization={mode} needs bitsandbytes: pip install 'newslora[quant]'") from None


def quantization_kwargs(mode: str, head: tuple[str, ...] = families.HEAD_PREFIXES) -> dict:
    from transformers import BitsAndBytesConfig

    check_quantization(mode)
    skip = list(head)  # the head is trained (fully or with LoRA): keep it in full precision
    if mode == "4bit":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return {"quantization_config": q, "device_map": {"": torch.cuda.current_device()}}


# ----------------------------------------------------------------------------- adapter


def head_dense_name(model) -> str | None:
    """Name of the head's hidden dense layer (RoBERTa-style heads, DeBERTa's pooler, DistilBERT's pre_classifier),
    or None (BERT-style: a single linear)."""
    name = families.of(model).head_dense
    try:
        return name if name and isinstance(model.get_submodule(name), torch.nn.Linear) else None
    except AttributeError:
        return None


def head_modules(model, recipe: Recipe) -> list[str]:
    """Modules trained in full (PEFT ``modules_to_save``)."""
    if recipe.head.type == "lora" and head_dense_name(model):
        return [families.of(model).head_out]
    return families.head_modules(model)


def head_state(model) -> dict:
    """The head's base weights. With ``head.type=lora`` the head's dense layer keeps its (randomly initialised,
    never pretrained) base weight frozen under the LoRA: it is saved with the run, or a reload would re-draw it."""
    return {f"{p}.{k}": v.detach().cpu().contiguous() for p in families.head_modules(model)
            for k, v in getattr(model, p).state_dict().items()}


def load_head_state(model, path: Path) -> None:
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected:
        raise NewsloraError(f"{path}: head weights {unexpected} do not fit {model.config.model_type}")


def merge_adapter(model):
    """``merge_and_unload`` for every method: fully trained modules (PEFT ``modules_to_save``) are unwrapped first,
    since PEFT's generic unload (VeRA) cannot unwrap a non-Linear module such as a RoBERTa head."""
    from peft.utils import ModulesToSaveWrapper

    inner = model.get_base_model()
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent) if parent else inner, child,
                    module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None))
    return model.merge_and_unload()


def target_regex(model, recipe: Recipe) -> str:
    """One regex for PEFT's ``target_modules``: the chosen module names in the chosen layers, plus the head's
    dense layer when ``head.type=lora``. A regex (full match) keeps layer selection and head exact."""
    return "|".join(re.escape(n) for n in target_names(model, recipe))


def target_names(model, recipe: Recipe) -> list[str]:
    """Full names of the linear modules that get an adapter (see :func:`target_regex`)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    matches = families.resolve_targets(model, recipe.lora.target_modules, names)  # neutral or the family's names
    hits = sorted({n for ns in matches.values() for n in ns}, key=names.index)
    if recipe.lora.layers is not None:
        n_layers = model.config.num_hidden_layers
        bad = [i for i in recipe.lora.layers if i >= n_layers]
        if bad:
            raise NewsloraError(f"lora.layers: {bad} out of range, the model has layers 0..{n_layers - 1}")
        keep = set(recipe.lora.layers)
        hits = [n for n in hits if (m := LAYER_RE.search(n)) and int(m.group(1)) in keep]
    if recipe.head.type == "lora" and head_dense_name(model):
        hits.append(head_dense_name(model))
    return hits


def peft_config(model, recipe: Recipe, total_steps: int | None = None, for_count: bool = False):
    """The PEFT config for ``recipe.method``: what every method shares (targets, head) here, the rest from the
    method's module (:mod:`newslora.methods`)."""
    from peft import TaskType

    method = methods.get(recipe.method)
    if recipe.head.type == "lora" and head_dense_name(model) is None:
        head = sum(p.numel() for pre in families.head_modules(model) for p in getattr(model, pre).parameters())
        raise NewsloraError(f"head.type=lora: the {model.config.model_type} classification head is a single linear "
                            f"layer ({head:,} parameters), nothing to low-rank; use head.type=full")
    out = families.of(model).head_out
    clash = [n for n, _ in model.named_modules() if n.endswith(out) and n != out]
    if recipe.head.type == "lora" and clash:
        raise NewsloraError(f"head.type=lora is not available for {model.config.model_type}: PEFT selects the fully "
                            f"trained {out!r} by name suffix, which also catches {clash[0]!r}; use head.type=full")
    # PEFT's SEQ_CLS task always trains the whole classifier; with a LoRA head we name what trains ourselves.
    lora_head = recipe.head.type == "lora" and head_dense_name(model) is not None
    common = dict(task_type=None if lora_head else TaskType.SEQ_CLS, target_modules=target_regex(model, recipe),
                  modules_to_save=head_modules(model, recipe))
    if lora_head and method.head_rank_pattern:
        common["rank_pattern"] = {head_dense_name(model): recipe.head.r}
    return method.peft_config(recipe, common, total_steps, for_count)


def attach_adapter(base, recipe: Recipe, total_steps: int | None = None, for_count: bool = False):
    from peft import get_peft_model

    cfg = peft_config(base, recipe, total_steps, for_count)
    try:
        return get_peft_model(base, cfg)
    except ValueError as e:
        raise NewsloraError(f"method={recipe.method}: {first_line(e)}") from None


# ----------------------------------------------------------------------------- budget


@dataclass
class Breakdown:
    total: int
    head: int
    adapter: int
    budget: int
    by_module: dict = field(default_factory=dict)  # e.g. {"query": 36864, "value": 36864}
    by_layer: dict = field(default_factory=dict)  # {"0": 12288, ..., "head": 593668}
    fit: dict | None = None  # budget.auto_fit: RankFit.to_dict() of the rank it chose
    params: int = 0  # all the model's parameters, frozen ones included (the trainable share's denominator)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def summary(self) -> str:
        """``head 593,668 + adapter 147,456 (attention.self.query 73,728, ...)``: the breakdown on one line."""
        groups = ", ".join(f"{m} {n:,}" for m, n in self.by_module.items())
        return f"head {self.head:,} + adapter {self.adapter:,}" + (f" ({groups})" if groups else "")

    def to_dict(self) -> dict:
        return {"trainable": self.total, "head": self.head, "adapter": self.adapter, "budget": self.budget,
                "fits": self.fits, "by_module": self.by_module, "by_layer": self.by_layer, "params": self.params,
                **({"auto_fit": self.fit} if self.fit is not None else {})}


def breakdown(model, budget: int) -> Breakdown:
    """Trainable parameters of a (PEFT) model, split into head and adapter, per module and per layer."""
    by_module: dict[str, int] = OrderedDict()
    by_layer: dict[str, int] = OrderedDict()
    head = adapter = params = 0
    constants, prefixes = methods.constant_param_names(), methods.param_prefixes()
    for name, p in model.named_parameters():
        params += p.numel()
        # constants some methods keep as parameters (AdaLoRA's ranknum) are not trainable parameters
        if not p.requires_grad or name.rsplit(".", 2)[-2] in constants:
            continue
        n = p.numel()
        short = name.removeprefix("base_model.model.")
        if families.is_head(short, model):
            head += n
            by_layer["head"] = by_layer.get("head", 0) + n
            continue
        adapter += n
        parts = short.split(".")
        end = next((i for i, x in enumerate(parts) if x.startswith(prefixes)), len(parts) - 1)
        mod = ".".join(parts[:end])  # module path inside its layer, e.g. attention.self.query
        mod = LAYER_RE.split("." + mod)[-1] if LAYER_RE.search("." + mod) else mod
        by_module[mod] = by_module.get(mod, 0) + n
        layer = m.group(1) if (m := LAYER_RE.search("." + short)) else "other"
        by_layer[layer] = by_layer.get(layer, 0) + n
    return Breakdown(head + adapter, head, adapter, budget, dict(by_module), dict(by_layer), params=params)


def count_trainable(recipe: Recipe, label_names: list[str] | None = None, fit: bool = True) -> Breakdown:
    """Exact trainable count of the recipe's model, built on the meta device (no weights are read).

    With ``budget.auto_fit`` (and ``fit``) the count is that of the fitted rank (see :func:`fit_rank`); the recipe
    itself is not changed (use :func:`apply_auto_fit`).
    """
    names = label_names or recipe.data.label_names or ["0", "1", "2", "3"]
    if fit and recipe.budget.auto_fit:
        recipe = copy.deepcopy(recipe)
        rf = apply_auto_fit(recipe, names)
        b = _count(recipe, names)
        b.fit = rf.to_dict()
        return b
    return _count(recipe, names)


def _count(recipe: Recipe, names: list[str]) -> Breakdown:
    return build_model(recipe, names, meta=True, fit=False, check=False)[1]


def check_budget(b: Breakdown, recipe: Recipe) -> None:
    fix = (f"set head.type: lora (the full head trains {b.head:,} of them), " if recipe.head.type == "full" else
           "") + "use a smaller rank, target fewer modules/layers, or set budget.auto_fit=true"
    if not b.fits:
        raise NewsloraError(f"over budget: {b.total:,} trainable parameters > budget.max_params={b.budget:,} for "
                            f"method={recipe.method}: {b.summary()}; {fix}")


# ----------------------------------------------------------------------------- auto fit

def rank_key(method: str) -> str:
    """``lora.r``, ``adalora.init_r``, ``vera.r``: the recipe key of the method's rank."""
    return methods.get(method).rank_key


def get_rank(recipe: Recipe) -> int:
    return methods.get(recipe.method).get_rank(recipe)


def with_rank(recipe: Recipe, r: int) -> Recipe:
    out = copy.deepcopy(recipe)
    methods.get(recipe.method).set_rank(out, r)
    return out


@dataclass
class RankFit:
    key: str  # "lora.r", "adalora.init_r" or "vera.r"
    requested: int  # the recipe's value
    chosen: int  # the largest value that fits (capped at ``limit``)
    limit: int  # the largest rank that makes sense for the targeted modules
    total: int  # trainable parameters at ``chosen``
    next_total: int | None  # trainable parameters at ``chosen + 1`` (None when ``chosen == limit``)
    budget: int

    @property
    def capped(self) -> bool:
        return self.chosen == self.limit and (self.next_total is None or self.next_total <= self.budget)

    def describe(self) -> str:
        why = (f"capped at {self.limit}, the rank limit of the targeted modules" if self.capped else
               f"{self.chosen + 1} would need {self.next_total:,} > {self.budget:,}")
        return f"budget.auto_fit: {self.key} {self.requested} -> {self.chosen} ({self.total:,} trainable; {why})"

    def to_dict(self) -> dict:
        return {"key": self.key, "requested": self.requested, "chosen": self.chosen, "limit": self.limit,
                "trainable": self.total, "next_trainable": self.next_total, "capped": self.capped}


def rank_limit(recipe: Recipe, names: list[str]) -> int:
    """The largest sensible rank: an update of a d_in x d_out layer has rank <= min(d_in, d_out)."""
    base = load_backbone(recipe, names, meta=True)
    targets = set(target_names(base, recipe))
    width = min(min(m.in_features, m.out_features) for n, m in base.named_modules() if n in targets)
    return width * methods.get(recipe.method).rank_factor


def fit_rank(recipe: Recipe, label_names: list[str] | None = None) -> RankFit:
    """The largest rank (``lora.r``, ``adalora.init_r`` or ``vera.r``) whose model fits ``budget.max_params``
    for the recipe's modules, layers and head.

    The count is affine in the rank for every method (a rank adds the same parameters to each targeted module),
    so two meta-device counts give the answer; it is then verified by counting it and the next rank, with a
    binary search over meta-device counts as the fallback.
    """
    names = label_names or recipe.data.label_names or ["0", "1", "2", "3"]
    budget, key = recipe.budget.max_params, rank_key(recipe.method)
    lo, why = methods.get(recipe.method).min_rank(recipe)
    limit = rank_limit(recipe, names)
    cache: dict[int, Breakdown] = {}

    def count(r: int) -> Breakdown:
        if r not in cache:
            cache[r] = _count(with_rank(recipe, r), names)
        return cache[r]

    if limit < lo or not count(lo).fits:
        floor = count(min(lo, limit))
        raise NewsloraError(
            f"over budget even at {key}={min(lo, limit)}"
            f"{f' ({why})' if why else ''}: "
            f"{floor.total:,} trainable parameters > budget.max_params={budget:,}: {floor.summary()}; target fewer "
            f"modules/layers or use head.type=lora")
    if lo == limit:
        r = lo
    else:
        slope = count(lo + 1).total - count(lo).total
        r = limit if slope <= 0 else min(limit, lo + (budget - count(lo).total) // slope)
        if not (count(r).fits and (r == limit or not count(r + 1).fits)):  # not affine after all: search
            a, b = lo, limit  # count(a) fits
            while a < b:
                mid = (a + b + 1) // 2
                a, b = (mid, b) if count(mid).fits else (a, mid - 1)
            r = a
    nxt = count(r + 1).total if r < limit else None
    return RankFit(key, get_rank(recipe), r, limit, count(r).total, nxt, budget)


def apply_auto_fit(recipe: Recipe, label_names: list[str] | None = None) -> RankFit | None:
    """Set the recipe's rank (in place) to :func:`fit_rank`'s choice when ``budget.auto_fit``; return the fit."""
    if not recipe.budget.auto_fit:
        return None
    rf = fit_rank(recipe, label_names)
    methods.get(recipe.method).set_rank(recipe, rf.chosen)
    return rf


def build_model(recipe: Recipe, label_names: list[str], total_steps: int | None = None, *, meta: bool = False,
                run=None, resuming: bool = False, fit: bool = True, check: bool = True):
    """Backbone + adapter: ``(peft_model, breakdown)``. The one builder behind counting and training.

    ``meta``: on PyTorch's meta device, no weights read (counting). ``run``: the run folder of a training run keeps
    what a reload needs and cannot fetch again (a random-init backbone, a LoRA head's freshly drawn base weights);
    ``resuming`` reads them back from it. ``fit``: apply ``budget.auto_fit`` to the recipe first (in place).
    ``check``: refuse an over-budget model."""
    if fit:
        apply_auto_fit(recipe, label_names)
    base = load_backbone(recipe, label_names, meta=meta)
    if run is not None:
        _keep_init_weights(base, recipe, run, resuming)
    model = attach_adapter(base, recipe, total_steps, for_count=meta)
    b = breakdown(model, recipe.budget.max_params)
    if check:
        check_budget(b, recipe)
    return model, b


def _keep_init_weights(base, recipe: Recipe, run, resuming: bool) -> None:
    if recipe.model.random_init and not resuming and run.writes:  # random weights cannot be fetched again: keep them
        base.save_pretrained(run.backbone_dir)
    if recipe.head.type == "lora" and head_dense_name(base):  # the LoRA head's frozen, freshly drawn base weights
        if resuming and run.head_init.is_file():
            load_head_state(base, run.head_init)
        elif not resuming and run.writes:
            from safetensors.torch import save_file

            save_file(head_state(base), str(run.head_init))
