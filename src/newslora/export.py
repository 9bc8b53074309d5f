"""Export stage: merge the adapter into the backbone and save a standalone model (safetensors) + tokenizer.

The merged model is checked against the adapter model on a fixed set of texts before it is kept.
"""
from __future__ import annotations

import json
import shutil
import tempfile
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


def is_export(path: Path) -> bool:
    """A folder written by :func:`export` (its ``newslora.json`` marker next to a model config)."""
    return (path / "newslora.json").is_file() and (path / "config.json").is_file()


def export(run_dir: str | Path, output: str | Path | None = None, atol: float = 1e-4, overwrite: bool = False) -> Path:
    """Merge ``run_dir``'s adapter (``merge_and_unload``) into ``run_dir/merged`` (or ``output``). An earlier export
    there is replaced only with ``overwrite``; any other non-empty folder is refused."""
    from .model import merge_adapter
    from .outputs import check_output_folder, make_parents, remove_created, replace_folder
    from .predict import Classifier, _load_run

    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir() or not (run_dir / "recipe.yaml").is_file():
        raise NewsloraError(f"{run_dir} is not a finished run folder (needs recipe.yaml and adapter/)")
    target = Path(output) if output else run_dir / "merged"
    check_output_folder(target, is_export, "merged model (newslora export)", overwrite, protect=[run_dir])
    model, tok, names, max_length = _load_run(run_dir, full_precision=True)  # QLoRA runs merge into full precision
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
    created = make_parents(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the exported model private
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "newslora.json").write_text(json.dumps({"max_length": max_length, "run": str(run_dir.resolve()),
                                                       "merge_max_logit_diff": diff}, indent=2))
        after = Classifier(_reload(tmp), tok, names, max_length).predict_proba(CHECK_TEXTS)
        if not np.array_equal(before.argmax(-1), after.argmax(-1)):
            raise NewsloraError("the saved merged model predicts differently from the adapter model; not exported")
        try:
            from .report import write_model_card

            write_model_card(tmp, run_dir)
        except ImportError:
            pass
        return replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise


def _reload(path: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
