"""Evaluation stage: scikit-learn metrics for a split, and ``newslora evaluate`` on any labelled file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


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


def evaluate(model_path: str | Path, data: str | Path, text_column: str | None = None, label_column: str = "label",
             batch_size: int | None = None, output: str | Path | None = None, overwrite: bool = False,
             options: tuple[str, str] = ("text_column", "label_column"), runtime: str | None = None,
             label_names: list[str] | None = None) -> dict:
    """Evaluate a run folder or merged model on a labelled file; optionally write the metrics as JSON (never over
    the data file; over an existing file only with ``overwrite``). ``options``: the caller's names for the column
    settings, for error messages. The labels must be the model's classes (ids 0..K-1 or its label names).
    ``runtime``: torch or onnx (default: chosen by what the folder holds). ``text_column``: default the columns
    the model was trained on (:func:`newslora.predict.input_columns`). ``label_names``: a plain PEFT adapter's
    classes."""
    from .data import encode_labels
    from .readers import check_texts, read_table
    from .outputs import check_output_file, write_file_atomic
    from .predict import input_columns, load_classifier

    if output:
        check_output_file(output, [data], overwrite)
    columns = input_columns(model_path, text_column, runtime, label_names)
    df = check_texts(read_table(data, columns, label_column, options),
                     str(data))  # before the model loads
    clf = load_classifier(model_path, runtime=runtime, label_names=label_names)
    df, _ = encode_labels(df, clf.label_names, str(data), names_from=f"the model {model_path}",
                          fix="evaluate on a file with the model's classes")
    pred = clf.predict_proba(df["text"].tolist(), batch_size=batch_size).argmax(-1)
    m = classification_metrics(df["label"].to_numpy(), pred, clf.label_names)
    if output:
        write_file_atomic(output, lambda tmp: tmp.write_text(json.dumps(m, indent=2)))
    return m
