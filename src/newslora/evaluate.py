"""Evaluation stage: scikit-learn metrics for a split, and ``newslora evaluate`` on any labelled file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from .errors import NewsloraError


def classification_metrics(y_true, y_pred, label_names: list[str]) -> dict:
    """Accuracy, macro P/R/F1, per-class P/R/F1/support and the confusion matrix (rows true, columns predicted)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "n": int(len(y_true)),
        "labels": list(label_names),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, name in enumerate(label_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def summary(m: dict) -> dict:
    """The scalar part of :func:`classification_metrics` (what the Trainer logs at each evaluation)."""
    return {k: m[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}


def evaluate(model_path: str | Path, data: str | Path, text_column: str = "text", label_column: str = "label",
             batch_size: int | None = None, output: str | Path | None = None, runtime: str | None = None) -> dict:
    """Evaluate a run folder or merged model on a labelled file; optionally write the metrics as JSON."""
    from .data import check_texts, encode_labels, read_table
    from .predict import load_classifier

    clf = load_classifier(model_path, runtime=runtime)
    df = check_texts(read_table(data, text_column, label_column), str(data))
    df, names = encode_labels(df, clf.label_names, str(data))
    if len(names) != len(clf.label_names):
        raise NewsloraError(f"{data} has {len(names)} classes but the model has {len(clf.label_names)}")
    pred = clf.predict_proba(df["text"].tolist(), batch_size=batch_size).argmax(-1)
    m = classification_metrics(df["label"].to_numpy(), pred, clf.label_names)
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(m, indent=2))
        tmp.replace(out)
    return m
