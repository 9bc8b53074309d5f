"""Every folder a model can be loaded from, described the same way without loading any weights.

=========  ==========================================================================================
kind       what the folder holds
=========  ==========================================================================================
run        a newslora run folder (``recipe.yaml`` + ``run.json`` + ``adapter/``)
merged     a standalone transformers model (``config.json`` + safetensors), e.g. ``newslora export``'s
onnx       ``model.onnx`` + ``config.json`` + tokenizer (``newslora export --onnx``)
adapter    a plain PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)
           whose base model is named by its ``base_model_name_or_path``
=========  ==========================================================================================

:func:`describe` reads a folder into a :class:`ModelFolder` (labels, ``max_length``, text columns, truncation,
backbone); :func:`write_meta` writes the ``newslora.json`` that merged and ONNX folders carry, the one file
:func:`describe` reads those settings back from. A folder written before a setting existed reads its default.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import families
from .config import ModelConfig
from .errors import NewsloraError, first_line
from .outputs import read_json, write_json
from .texts import TRUNCATIONS

# tokens per text in a folder that does not say: the recipe's own model.max_length default, defined there once
DEFAULT_MAX_LENGTH = ModelConfig().max_length
DEFAULT_TRUNCATION = "head"
MODEL_META = "newslora.json"  # inside merged and ONNX folders
ONNX_FILE = "model.onnx"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PLACEHOLDER_LABEL = re.compile(r"^LABEL_\d+$")  # transformers' names for classes nobody named
KINDS = ("run", "merged", "onnx", "adapter")
RUNTIMES = (None, "torch", "onnx")


@dataclass
class ModelFolder:
    """What any model folder says about the model in it; :func:`describe` builds one."""

    path: Path  # the folder the model loads from (a run's onnx/ for --runtime onnx on a run folder)
    kind: str  # one of KINDS
    label_names: list[str]
    max_length: int = DEFAULT_MAX_LENGTH
    text_columns: list[str] | None = None  # columns joined into the text (None: the single text column)
    truncation: str = DEFAULT_TRUNCATION  # which tokens a text longer than max_length keeps: head, tail, head_tail
    backbone: str | None = None  # the recipe's model.backbone, or an adapter's base model
    meta: dict = field(default_factory=dict)  # the rest of newslora.json (export checks, source run)

    def settings(self) -> dict:
        """The settings a merged or ONNX folder made from this model carries in its ``newslora.json``."""
        d = asdict(self)
        return {k: d[k] for k in ("max_length", "text_columns", "truncation", "backbone")}


def read_meta(folder: str | os.PathLike) -> dict:
    """``newslora.json`` of a merged or ONNX folder as a mapping; {} when missing or damaged."""
    return read_json(Path(folder) / MODEL_META)


def write_meta(folder: str | os.PathLike, model: ModelFolder, **extra) -> Path:
    """Write ``folder/newslora.json``: ``model``'s settings (what :func:`describe` reads back) and ``extra``."""
    return write_json(Path(folder) / MODEL_META, {**model.settings(), **extra})


def is_onnx_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ONNX_FILE).is_file()


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def describe(path: str | os.PathLike, runtime: str | None = None,
             label_names: list[str] | None = None) -> ModelFolder:
    """The :class:`ModelFolder` of ``path``. ``runtime``: None picks by what the folder holds (``model.onnx`` ->
    onnx); "onnx" also accepts a run folder with an exported ``onnx/`` (or ``onnx-int8/``); "torch" refuses an
    ONNX-only folder. ``label_names``: the classes of a plain adapter whose base model does not name them (the
    ``--label-names`` option); refused for the other kinds, which name their own."""
    from .run import Run

    path = Path(path)
    if not path.exists():
        raise NewsloraError(f"model not found: {path} (pass a run folder or its merged/ folder)")
    if runtime not in RUNTIMES:
        raise NewsloraError(f"unknown runtime {runtime!r}: use torch or onnx")
    if runtime == "onnx" or (runtime is None and is_onnx_folder(path)):
        found = _described(_onnx_folder(path), "onnx")
    elif is_onnx_folder(path) and not any(path.glob("*.safetensors")) and not Run.is_run(path):
        raise NewsloraError(f"{path} holds only an ONNX model: drop --runtime torch, or pass the merged folder")
    elif Run.is_run(path):
        found = _run(path)
    elif (path / "config.json").is_file():
        found = _described(path, "merged")
    elif is_adapter_folder(path):
        return _adapter(path, label_names)
    else:
        raise NewsloraError(f"{path} is neither a newslora run folder (recipe.yaml + adapter/), a model folder "
                            f"(config.json) nor a PEFT adapter folder ({ADAPTER_CONFIG})")
    if label_names:
        raise NewsloraError(f"--label-names is for plain PEFT adapter folders; {path} names its own classes "
                            f"({', '.join(found.label_names)}): drop --label-names")
    return found


def _onnx_folder(path: Path) -> Path:
    from .run import Run

    for folder in (path, Run(path).onnx_dir(), Run(path).onnx_dir(int8=True)):
        if is_onnx_folder(folder):
            return folder
    raise NewsloraError(f"{path} holds no ONNX model ({ONNX_FILE}): export one with newslora export RUN --onnx, "
                        "or use --runtime torch")


def _run(path: Path) -> ModelFolder:
    """A run folder: classes from run.json, the settings from its recipe (tolerant of keys a recipe lacks)."""
    from .run import Run

    run = Run.open(path, need="adapter")
    recipe = run.read_recipe_dict()
    model, data = recipe.get("model") or {}, recipe.get("data") or {}
    # the column(s) the run read its texts from: data.text_columns, else a single data.text_column
    columns = data.get("text_columns") or ([data["text_column"]] if data.get("text_column", "text") != "text" else None)
    return ModelFolder(path, "run", run.label_names(), int(model.get("max_length") or DEFAULT_MAX_LENGTH),
                       columns, _truncation(model.get("truncation"), path / Run.RECIPE), model.get("backbone"))


def _truncation(value, where: Path) -> str:
    """A recorded truncation, checked: a value the tokenizer step does not know is refused in one line."""
    if value is None:
        return DEFAULT_TRUNCATION
    if value not in TRUNCATIONS:
        raise NewsloraError(f"{where}: truncation {value!r} is not one of {', '.join(TRUNCATIONS)}; set it to how the "
                            "model was trained (head if unsure), or export the model again")
    return value


def _described(path: Path, kind: str) -> ModelFolder:
    """A merged or ONNX folder: classes from config.json, the settings from newslora.json."""
    config = read_json(path / "config.json")
    if not config:
        raise NewsloraError(f"{path / 'config.json'} is missing or damaged; it names the model's classes: export "
                            "the folder again")
    meta = read_meta(path)
    settings = ("max_length", "text_columns", "truncation", "backbone")
    max_length = meta.get("max_length", DEFAULT_MAX_LENGTH)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise NewsloraError(f"{path / MODEL_META}: max_length {max_length!r} is not a positive whole number of "
                            f"tokens; set it to what the model was trained with (e.g. {DEFAULT_MAX_LENGTH}), or "
                            "export the model again")
    return ModelFolder(path, kind, config_label_names(config), max_length,
                       meta.get("text_columns") or None, _truncation(meta.get("truncation"), path / MODEL_META),
                       meta.get("backbone"), {k: v for k, v in meta.items() if k not in settings})


def config_label_names(config: dict) -> list[str]:
    """The class names of a transformers ``config.json`` mapping, in id order."""
    id2label = config.get("id2label") or {}
    n = len(id2label) or int(config.get("num_labels", 2))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def is_placeholder(names: list[str]) -> bool:
    """Whether class names are transformers' defaults (LABEL_0, LABEL_1, ...): nobody named the classes."""
    return all(PLACEHOLDER_LABEL.match(n) for n in names)


def _adapter(path: Path, label_names: list[str] | None) -> ModelFolder:
    """A plain PEFT adapter: its base model names the backbone; the classes are the base model's own, or
    ``label_names`` where the base has only LABEL_i placeholders; the count is checked against the head's
    saved weights."""
    cfg = read_json(path / ADAPTER_CONFIG)
    base = str(cfg.get("base_model_name_or_path") or "")
    if not base:
        raise NewsloraError(f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path): set it to the "
                            "hub id or folder of the model the adapter was trained on")
    if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        raise NewsloraError(f"{path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): save the adapter "
                            "again with save_pretrained")
    base_names = config_label_names(_base_config(base))
    count = head_outputs(path)
    if label_names:
        names = list(label_names)
    elif not is_placeholder(base_names) and count in (None, len(base_names)):
        names = base_names
    else:
        n = count or len(base_names)
        raise NewsloraError(f"{path} is a PEFT adapter whose base model {base} does not name its classes: pass "
                            f"--label-names with its {n} class names in id order, e.g. --label-names "
                            f"{','.join(f'class{i}' for i in range(n))}")
    if count is not None and len(names) != count:
        raise NewsloraError(f"--label-names gives {len(names)} classes but the adapter's head in {path} predicts "
                            f"{count}: pass {count} names in id order")
    return ModelFolder(path, "adapter", names, DEFAULT_MAX_LENGTH, backbone=base)


def _base_config(base: str) -> dict:
    """The base model's config.json as a mapping (a local folder, a packaged alias or the hub cache)."""
    from transformers import AutoConfig

    name = families.resolve_backbone(base)
    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError) as e:
        raise NewsloraError(f"cannot read the config of the adapter's base model {base}: {first_line(e)}; make it "
                            "reachable (a local folder, or the hub cache)") from None


def read_adapter_weights(path: str | os.PathLike) -> dict:
    """An adapter's tensors: safetensors, else ``adapter_model.bin`` read with ``torch.load(weights_only=True)``,
    which loads tensors only and refuses any other pickled object (no code runs)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if (path / ADAPTER_WEIGHTS[0]).is_file():
        return load_file(path / ADAPTER_WEIGHTS[0])
    try:
        state = torch.load(path / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True)
    except Exception as e:  # pickle's and torch's errors for a damaged file or one holding more than tensors
        raise NewsloraError(f"cannot read {path / ADAPTER_WEIGHTS[1]} as tensors: {first_line(e)}; re-save the "
                            "adapter with save_pretrained(..., safe_serialization=True)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NewsloraError(f"{path / ADAPTER_WEIGHTS[1]} does not hold a mapping of tensors: re-save the adapter "
                            "with save_pretrained")
    return state


def head_outputs(path: str | os.PathLike) -> int | None:
    """How many classes an adapter's saved classification head predicts, None when it saved no head."""
    from safetensors import safe_open

    path = Path(path)
    if (path / ADAPTER_WEIGHTS[0]).is_file():
        with safe_open(path / ADAPTER_WEIGHTS[0], "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    else:
        shapes = {k: list(v.shape) for k, v in read_adapter_weights(path).items()}
    heads = {f"base_model.model.{f.head_out}.weight" for f in (*families.FAMILIES.values(), families.GENERIC)}
    outs = [s[0] for k, s in shapes.items() if k in heads and len(s) == 2]
    return outs[0] if outs else None
