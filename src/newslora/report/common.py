"""What every report reads: a run folder loaded through :class:`newslora.run.Run` (tolerant of missing and partial
files), atomic writes and shared formatting."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from openpyxl.styles import Font

from ..outputs import write_file_atomic
from ..run import Run


DPI = 120
SPLITS = ("validation", "test")
PER_CLASS_COLUMNS = ["split", "class", "precision", "recall", "f1", "support"]
KEY_PLOTS = ("loss.png", "accuracy.png", "confusion_test.png", "per_class_f1.png")
BOLD = Font(bold=True)


def get_key(d: Any, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


@dataclass
class RunView:
    path: Path
    recipe: dict
    info: dict  # run.json
    evals: dict  # eval.json
    steps: pd.DataFrame | None
    epochs: pd.DataFrame | None
    status: str | None = None  # Run.status(): run.json's status, "dead" for a "running" run whose process is gone

    @property
    def name(self) -> str:
        return self.info.get("name") or self.recipe.get("name") or self.path.name

    @property
    def title(self) -> str:
        return self.name if self.status in (None, "completed") else f"{self.name} [{self.status}]"

    @property
    def method(self) -> str | None:
        return self.info.get("method") or self.recipe.get("method")

    @property
    def backbone(self) -> str | None:
        return self.info.get("backbone") or get_key(self.recipe, "model.backbone")

    def split(self, name: str) -> dict | None:
        m = self.evals.get(name)
        return m if isinstance(m, dict) and m else None

    def labels(self, m: dict) -> list[str]:
        return list(m.get("labels") or self.info.get("label_names") or m.get("per_class") or [])

    def confusion_split(self) -> tuple[str, dict] | None:
        """Test split if it has a confusion matrix, else validation."""
        for name in ("test", "validation"):
            m = self.split(name)
            if m and m.get("confusion_matrix"):
                return name, m
        return None


def load_view(run_dir: str | os.PathLike) -> RunView:
    run = Run.open(run_dir, need="exists")
    info = run.read_info()
    return RunView(path=run.path, recipe=run.read_recipe_dict(), info=info, evals=run.read_eval(),
                steps=run.read_steps(), epochs=run.read_epochs(), status=run.status(info))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_file_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def per_class_rows(run: RunView) -> list[list[Any]]:
    rows = []
    for split in SPLITS:
        m = run.split(split) or {}
        for cls, v in (m.get("per_class") or {}).items():
            rows.append([split, cls, v.get("precision"), v.get("recall"), v.get("f1"),
                         v.get("support")])
    return rows


def view_label_names(run: RunView) -> list[str]:
    return run.info.get("label_names") or next(
        (run.labels(m) for s in SPLITS if (m := run.split(s))), [])


def label_text(run: RunView) -> str:
    labels = view_label_names(run)
    return f"{len(labels)} classes: {', '.join(labels)}" if labels else "AG News topics"
