"""Export stage: merge the adapter into the backbone and save a standalone model (safetensors) + tokenizer.

The merged model is checked against the adapter model on a fixed set of texts before it is kept.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import NewsloraError
from .modelfolder import ADAPTER_CONFIG, MODEL_META, describe, is_adapter_folder, write_meta

CHECK_TEXTS = [
    "Stocks fall as oil prices climb to a record high",
    "Late goal lifts United past Chelsea in the derby",
    "NASA probe sends back images of Saturn's moon Titan",
    "UN envoy calls for ceasefire as talks resume in Geneva",
    "Chipmaker unveils faster processor for laptops",
    "Central bank holds interest rates steady",
]


def is_export(path: Path) -> bool:
    """A folder written by :func:`export` (its ``newslora.json`` marker next to a model config)."""
    return (path / MODEL_META).is_file() and (path / "config.json").is_file()


def export(run_dir: str | Path, output: str | Path | None = None, atol: float = 1e-4, overwrite: bool = False,
           label_names: list[str] | None = None) -> Path:
    """Merge ``run_dir``'s adapter (``merge_and_unload``) into ``run_dir/merged`` (or ``output``). ``run_dir`` may
    also be a plain PEFT adapter folder (``label_names``: its classes where its base model does not name them).
    An earlier export there is replaced only with ``overwrite``; any other non-empty folder is refused."""
    from .model import merge_adapter
    from .outputs import build_folder, check_output_folder
    from .predict import Classifier, load_folder, load_run, refuse_non_finite
    from .report import write_model_card
    from .run import Run

    source = Path(run_dir)
    if is_adapter_folder(source) and not Run.is_run(source):
        run, folder = None, describe(source, "torch", label_names)
        target = Path(output) if output else source / Run.MERGED
    else:
        if not Run.is_run(source) or not (source / Run.ADAPTER).is_dir():
            raise NewsloraError(f"{source} is not a finished run folder (needs {Run.RECIPE} and {Run.ADAPTER}/) "
                                f"nor a PEFT adapter folder ({ADAPTER_CONFIG})")
        run = Run.open(source, need="adapter")
        folder = describe(source, "torch", label_names)
        target = Path(output) if output else run.merged_dir
    names, max_length = folder.label_names, folder.max_length
    check_output_folder(target, is_export, "merged model (newslora export)", overwrite, protect=[source])
    if run is None:
        model, tok, _ = load_folder(folder)
    else:
        model, tok, _, _ = load_run(run, full_precision=True)  # QLoRA runs merge into full precision
    refuse_non_finite(model, source)
    model.eval()
    before = Classifier(model, tok, names, max_length).predict_proba(CHECK_TEXTS)
    with torch.inference_mode():
        enc = tok(CHECK_TEXTS, padding=True, return_tensors="pt")
        logits_adapter = model(**enc).logits
        merged = merge_adapter(model)
        logits_merged = merged(**enc).logits
    diff = (logits_adapter - logits_merged).abs().max().item()
    if diff > atol:
        raise NewsloraError(f"merged model differs from the adapter model (max logit diff {diff:.2e} > {atol}); "
                            "not exported")
    with build_folder(target) as tmp:
        merged.config.name_or_path = ""  # the config would otherwise record where the backbone was loaded from
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # where it came from: a path relative to the model folder, the same for the temp folder and its final name
        origin = os.path.relpath(source.resolve(), tmp.resolve())
        write_meta(tmp, folder, **({"run": origin} if run else {"adapter": origin}), merge_max_logit_diff=diff)
        after = Classifier(_reload(tmp), tok, names, max_length).predict_proba(CHECK_TEXTS)
        if not np.array_equal(before.argmax(-1), after.argmax(-1)):
            raise NewsloraError("the saved merged model predicts differently from the adapter model; not exported")
        if run is not None:
            write_model_card(tmp, run.path, model_path=_display_path(target, run))
    return target


def _display_path(target: Path, run) -> str:
    """How the card names the merged folder: from the run folder's parent (``demo/merged``) when it lies inside
    the run, else the path as given; never the temp folder it is written in."""
    try:
        return target.resolve().relative_to(run.path.resolve().parent).as_posix()
    except ValueError:
        return target.as_posix()


def _reload(path: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
