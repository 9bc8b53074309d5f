"""Model cards: the merged model's Hugging Face card and the adapter folder's README."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .. import methods
from ..families import hub_id
from .common import (SPLITS, RunView, format_value, get_key, label_text, load_view, per_class_rows, view_label_names,
                     write_text_atomic)


def _method_name(method: str | None) -> str:
    if method in methods.names():
        return methods.get(method).display
    return method or "parameter-efficient"


def _dataset_id(recipe: dict) -> str:
    source = get_key(recipe, "data.source")
    if not isinstance(source, str) or not source.strip():
        return "ag_news"
    source = source.strip().removeprefix("hf:")
    local = source.startswith(("/", ".", "~")) or Path(source).suffix in {
        ".csv", ".json", ".jsonl", ".parquet", ".tsv"}
    return "ag_news" if local else source


def _card_metadata(run: RunView, dataset: str) -> dict:
    meta: dict[str, Any] = {}
    if hub_id(run.backbone or ""):  # a local backbone folder is no hub model: no base_model
        meta["base_model"] = hub_id(run.backbone)
    meta.update({"datasets": [dataset], "library_name": "transformers",
                 "pipeline_tag": "text-classification",
                 "tags": [t for t in ("newslora", "peft", run.method) if t]})
    license_ = run.recipe.get("license") or run.info.get("license")
    if license_:
        meta["license"] = license_
    split = "test" if run.split("test") else "validation"
    m = run.split(split)
    if m:
        metrics = [{"type": "accuracy", "name": "Accuracy", "value": m["accuracy"]}]
        if m.get("macro_f1") is not None:
            metrics.append({"type": "f1", "name": "Macro F1", "value": m["macro_f1"],
                            "args": {"average": "macro"}})
        meta["model-index"] = [{"name": run.name, "results": [{
            "task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": {"type": dataset, "name": "AG News" if dataset.endswith("ag_news")
                        else dataset, "split": split},
            "metrics": metrics}]}]
    return meta


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _card_budget(run: RunView) -> str:
    t = run.info.get("trainable") or {}
    budget = t.get("budget", get_key(run.recipe, "budget.max_params"))
    if not t and budget is None:
        return "Trainable-parameter counts were not recorded for this run."
    rows = [("total", t.get("total")), ("classification head", t.get("head")),
            ("adapter", t.get("adapter")), ("budget", budget)]
    text = _md_table(["trainable parameters", "count"], rows)
    if t.get("total") is not None and budget:
        text += f"\n\nThe run used **{100 * t['total'] / budget:.1f}%** of its budget."
    return text


def _card_results(run: RunView) -> str:
    splits = [(s, m) for s in SPLITS if (m := run.split(s))]
    if not splits:
        return "No evaluation results were recorded for this run."
    overall = _md_table(["split", "accuracy", "macro precision", "macro recall", "macro F1", "n"],
                        [(s, m.get("accuracy"), m.get("macro_precision"), m.get("macro_recall"),
                          m.get("macro_f1"), m.get("n")) for s, m in splits])
    per_class = _md_table(["split", "class", "precision", "recall", "F1", "support"],
                          per_class_rows(run))
    return f"{overall}\n\n### Per class\n\n{per_class}"


def _card_limitations(run: RunView, dataset: str) -> str:
    labels = view_label_names(run)
    sample = get_key(run.info, "rows.train")  # training examples the run really used
    sample = sample if isinstance(sample, int) else None
    items = [
        "Trained and evaluated on English news headlines/snippets only; other languages and "
        "domains (social media, scientific text, long documents) are out of scope.",
        f"Predicts exactly {len(labels) or 4} classes"
        + (f" ({', '.join(labels)})" if labels else "")
        + "; every input is forced into one of them, even when none applies.",
        f"Training data: `{dataset}`"
        + (f", {sample:,} training examples." if sample else ".")
        + " AG News reflects the topics and sources of its collection period (mid-2000s) and "
        "may carry their biases.",
        "Not intended for decisions about people or for content moderation.",
    ]
    if run.status not in (None, "completed"):
        items.insert(0, f"**This model comes from a run with status `{run.status}`** "
                        "and may be under-trained.")
    return "\n".join(f"- {item}" for item in items)


def write_model_card(export_dir: str | os.PathLike, run_dir: str | os.PathLike,
                     model_path: str | None = None) -> Path:
    """Write a Hugging Face model card ``export_dir/README.md`` for an exported run. ``model_path``: how the card
    names the model folder (export writes into a temp folder first and passes the final one)."""
    run, export = load_view(run_dir), Path(export_dir)
    dataset = _dataset_id(run.recipe)
    model = model_path or export.name or "path/to/model"
    recipe_yaml = (yaml.safe_dump(run.recipe, sort_keys=False, allow_unicode=True).strip()
                   if run.recipe else "# recipe.yaml was not found")
    hub = hub_id(run.backbone or "")
    backbone = (f"[`{hub}`](https://huggingface.co/{hub})" if hub else
                f"`{Path(run.backbone).name}` (a local model folder)" if run.backbone else "a pretrained encoder")
    method = _method_name(run.method)
    sections = [
        f"# {run.name}",
        "## Model description",
        f"{backbone} fine-tuned for news topic classification ({label_text(run)}) on "
        f"`{dataset}` with **{method}** adapters under a trainable-parameter budget, using "
        "newslora. Trained on "
        f"`{run.info.get('device', 'unknown device')}` with "
        + ", ".join(f"{k} {v}" for k, v in (run.info.get("versions") or {}).items()) + ".",
        "## How to use",
        f"Replace `{model}` below with this folder's path or its Hub repo id.",
        "With 🤗 Transformers:",
        f'```python\nfrom transformers import pipeline\n\nclf = pipeline("text-classification", '
        f'model="{model}")\nprint(clf("Stocks rally as oil prices fall."))\n```',
        "With newslora:",
        f'```bash\nnewslora classify {model} "Stocks rally as oil prices fall."\n'
        f'newslora predict {model} --input test.csv --output submission.csv   # Kaggle ID,Label file\n```',
        f'```python\nfrom newslora import load_classifier\n\nclf = load_classifier("{model}")\n'
        'print(clf.classify("Stocks rally as oil prices fall."))\n```',
        "## Training recipe",
        f"```yaml\n{recipe_yaml}\n```",
        "## Trainable parameters vs budget",
        _card_budget(run),
        "## Evaluation results",
        _card_results(run),
        "## Limitations",
        _card_limitations(run, dataset),
    ]
    front = yaml.safe_dump(_card_metadata(run, dataset), sort_keys=False, allow_unicode=True)
    return write_text_atomic(export / "README.md", f"---\n{front}---\n\n" + "\n\n".join(sections) + "\n")


def adapter_card(run_dir: str | os.PathLike) -> str:
    """The README of a run's ``adapter/`` folder (instead of PEFT's empty template): what the adapter is and how to
    load it. It is written at the end of training, before evaluation, so it carries no results."""
    run = load_view(run_dir)
    meta: dict[str, Any] = {}
    if hub_id(run.backbone or ""):
        meta["base_model"] = hub_id(run.backbone)
    meta.update({"library_name": "peft", "pipeline_tag": "text-classification",
                 "tags": [t for t in ("newslora", run.method) if t]})
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    method = _method_name(run.method)
    return (f"---\n{front}---\n\n# {run.name}: {method} adapter\n\n"
            f"The {method} adapter (with its classification head) of the newslora run in the parent folder, for "
            f"{label_text(run)}. The run folder's `recipe.yaml` names the backbone and every setting.\n\n"
            "Load it through its run folder, which also restores anything the adapter alone lacks (a random-init "
            "backbone, a LoRA head's frozen base weights):\n\n"
            '```python\nfrom newslora import load_classifier\n\nclf = load_classifier("path/to/run")\n```\n\n'
            "`newslora export path/to/run` merges it into a standalone model (`merged/`).\n")
