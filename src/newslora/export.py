"""Export stage: merge the adapter into the backbone and save a standalone model (safetensors) + tokenizer.

The merged model is checked against the adapter model on a fixed set of texts before it is kept.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import NewsloraError

CHECK_TEXTS = [
    "Stocks fall as oil prices climb to a record high",
    "Late goal lifts United past Chelsea in the derby",
    "NASA probe sends back images of Saturn's moon Titan",
    "UN envoy calls for ceasefire as talks resume in Geneva",
    "Chipmaker unveils faster processor for laptops",
    "Central bank holds interest rates steady",
]


def export(run_dir: str | Path, output: str | Path | None = None, atol: float = 1e-4) -> Path:
    """Merge ``run_dir``'s adapter (``merge_and_unload``) into ``run_dir/merged`` (or ``output``)."""
    from .model import merge_adapter
    from .predict import Classifier, load_run
    from .report import write_model_card
    from .run import Run, write_model_meta

    run_path = Path(run_dir)
    if not Run.is_run(run_path) or not (run_path / Run.ADAPTER).is_dir():
        raise NewsloraError(f"{run_path} is not a finished run folder (needs {Run.RECIPE} and {Run.ADAPTER}/)")
    run = Run.open(run_path, need="adapter")
    target = Path(output) if output else run.merged_dir
    model, tok, names, max_length = load_run(run, full_precision=True)  # QLoRA runs merge into full precision
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
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.config.name_or_path = ""  # the config would otherwise record where the backbone was loaded from
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    write_model_meta(tmp, run, max_length, diff)
    after = Classifier(_reload(tmp), tok, names, max_length).predict_proba(CHECK_TEXTS)
    if not np.array_equal(before.argmax(-1), after.argmax(-1)):
        shutil.rmtree(tmp)
        raise NewsloraError("the saved merged model predicts differently from the adapter model; not exported")
    write_model_card(tmp, run.path, model_path=_display_path(target, run))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
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

    return AutoModelForSequenceClassification.from_pretrained(path).eval()
