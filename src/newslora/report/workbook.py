"""``metrics.xlsx`` of one run: summary, epochs, steps, per-class and confusion sheets."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from openpyxl import Workbook
from openpyxl.utils import get_column_letter

from ..outputs import write_file_atomic
from ..run import EPOCH_COLUMNS, STEP_COLUMNS, Run
from .common import BOLD, PER_CLASS_COLUMNS, SPLITS, RunView, get_key, load_view, per_class_rows

MAX_MATRIX_CLASSES = 50  # past this the confusion sheet lists the non-zero cells instead of a K x K grid


def _cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def write_table(ws, header: Sequence[str], rows: Iterable[Sequence[Any]], start: int = 1) -> int:
    """Write a bold header and rows from row ``start``; return the next free row."""
    for c, name in enumerate(header, 1):
        ws.cell(start, c, name).font = BOLD
    r = start
    for r, row in enumerate(rows, start + 1):
        for c, value in enumerate(row, 1):
            ws.cell(r, c, _cell(value))
    return r + 1


def _frame_table(ws, df: pd.DataFrame | None, default_columns: Sequence[str]) -> None:
    if df is None:
        write_table(ws, default_columns, [])
    else:
        write_table(ws, list(df.columns), df.itertuples(index=False))


def autofit(wb: Workbook) -> None:
    for ws in wb.worksheets:
        for col in ws.iter_cols():
            width = max((len(str(c.value)) for c in col if c.value is not None), default=8)
            ws.column_dimensions[get_column_letter(col[0].column)].width = min(60, width + 2)
        ws.freeze_panes = "A2" if ws.title != "confusion" else None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _summary_rows(run: RunView) -> list[tuple[str, Any]]:
    info, trainable = run.info, run.info.get("trainable") or {}
    rows: list[tuple[str, Any]] = [
        ("name", run.name), ("method", run.method), ("backbone", run.backbone),
        ("trainable_total", trainable.get("total")), ("trainable_head", trainable.get("head")),
        ("trainable_adapter", trainable.get("adapter")),
        ("budget", trainable.get("budget", get_key(run.recipe, "budget.max_params"))),
        ("device", info.get("device")), ("started", info.get("started")),
        ("finished", info.get("finished")), ("status", run.status),
        ("train_runtime_s", info.get("train_runtime_s")), ("total_runtime_s", info.get("total_runtime_s")),
        ("attempts", len(info.get("attempts") or []) or None),
        ("train_samples_per_second", info.get("train_samples_per_second")),
    ]
    for split in SPLITS:
        m = run.split(split) or {}
        rows += [(f"{split}_accuracy", m.get("accuracy")), (f"{split}_macro_f1", m.get("macro_f1"))]
    rows += [(f"recipe.{k}", v) for k, v in _flatten(run.recipe).items()]
    return rows


def _confusion_sheet(ws, run: RunView) -> None:
    """Up to MAX_MATRIX_CLASSES classes: the matrix. More: its non-zero cells as (true, predicted, count) rows, most
    frequent first -- every count kept, in at most as many rows as evaluated examples, never K x K cells."""
    row = 1
    for split in SPLITS:
        m = run.split(split) or {}
        cm = m.get("confusion_matrix")
        if not cm:
            continue
        labels = run.labels(m) or [str(i) for i in range(len(cm))]
        if len(cm) <= MAX_MATRIX_CLASSES:
            ws.cell(row, 1, f"{split} (rows = true, columns = predicted)").font = BOLD
            row = write_table(ws, ["true \\ predicted", *labels],
                              ([labels[i], *counts] for i, counts in enumerate(cm)), row + 1) + 1
            continue
        a = np.asarray(cm, dtype=np.int64)
        t, p = np.nonzero(a)
        order = np.lexsort((p, t, -a[t, p]))
        ws.cell(row, 1, f"{split}: {len(cm):,} classes, the non-zero cells (rows of true, predicted, count)").font = BOLD
        row = write_table(ws, ["true", "predicted", "count"],
                          ((labels[t[i]], labels[p[i]], int(a[t[i], p[i]])) for i in order), row + 1) + 1
    if row == 1:
        write_table(ws, ["true \\ predicted"], [])


def write_workbook(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/metrics.xlsx`` (sheets summary, epochs, steps, per_class, confusion)."""
    run = load_view(run_dir)
    wb = Workbook()
    summary = wb.active
    summary.title = "summary"
    write_table(summary, ["key", "value"], _summary_rows(run))
    _frame_table(wb.create_sheet("epochs"), run.epochs, EPOCH_COLUMNS)
    _frame_table(wb.create_sheet("steps"), run.steps, STEP_COLUMNS)
    write_table(wb.create_sheet("per_class"), PER_CLASS_COLUMNS, per_class_rows(run))
    _confusion_sheet(wb.create_sheet("confusion"), run)
    autofit(wb)
    return write_file_atomic(Run(run.path).file(Run.WORKBOOK), lambda p: wb.save(p))
