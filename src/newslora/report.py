"""Reporting stage: plots, Excel workbook, cross-run comparison and model card.

Everything here reads a *run folder* written by the training stage::

    recipe.yaml  run.json  metrics_steps.csv  metrics_epochs.csv  eval.json
    adalora_ranks.csv (AdaLoRA only)

Any of these may be missing or partial (interrupted / single-evaluation runs);
each output degrades gracefully instead of failing.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state
from openpyxl import Workbook
from openpyxl.styles import Font
from openpyxl.utils import get_column_letter

from .errors import NewsloraError

__all__ = ["plot_run", "write_workbook", "compare_runs", "write_model_card", "finalize_run"]

log = logging.getLogger(__name__)

DPI = 120
SPLITS = ("validation", "test")
STEP_COLUMNS = ["step", "epoch", "loss", "train_accuracy", "learning_rate", "eval_loss", "eval_accuracy",
                "eval_macro_precision", "eval_macro_recall", "eval_macro_f1"]
EPOCH_COLUMNS = ["epoch", "step", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy",
                 "eval_macro_precision", "eval_macro_recall", "eval_macro_f1"]
PER_CLASS_COLUMNS = ["split", "class", "precision", "recall", "f1", "support"]
COMPARE_COLUMNS = ["name", "method", "modules", "rank", "trainable", "budget", "val_accuracy",
                   "test_accuracy", "val_macro_f1", "test_macro_f1", "train_time_s",
                   "samples_per_s", "path"]
KEY_PLOTS = ("loss.png", "accuracy.png", "confusion_test.png", "per_class_f1.png")
_BOLD = Font(bold=True)


# --------------------------------------------------------------------------- loading

def _get(d: Any, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def _read_mapping(path: Path, loader: Callable[[Any], Any]) -> dict:
    if not path.is_file():
        return {}
    try:
        with path.open(encoding="utf-8") as fh:
            data = loader(fh)
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
        log.warning("cannot parse %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _read_csv(path: Path, numeric: Sequence[str]) -> pd.DataFrame | None:
    """Read a metrics CSV; tolerate truncation (interrupted runs) and emptiness."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, on_bad_lines="skip")
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    for col in numeric:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return None if df.empty else df


@dataclass
class _Run:
    path: Path
    recipe: dict
    info: dict  # run.json
    evals: dict  # eval.json
    steps: pd.DataFrame | None
    epochs: pd.DataFrame | None
    ranks: pd.DataFrame | None

    @property
    def name(self) -> str:
        return self.info.get("name") or self.recipe.get("name") or self.path.name

    @property
    def title(self) -> str:
        status = self.info.get("status")
        return self.name if status in (None, "completed") else f"{self.name} [{status}]"

    @property
    def method(self) -> str | None:
        return self.info.get("method") or self.recipe.get("method")

    @property
    def backbone(self) -> str | None:
        return self.info.get("backbone") or _get(self.recipe, "model.backbone")

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


def _load(run_dir: str | os.PathLike) -> _Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise NotADirectoryError(f"run folder {path} does not exist")
    return _Run(
        path=path,
        recipe=_read_mapping(path / "recipe.yaml", yaml.safe_load),
        info=_read_mapping(path / "run.json", json.load),
        evals=_read_mapping(path / "eval.json", json.load),
        steps=_read_csv(path / "metrics_steps.csv", STEP_COLUMNS),
        epochs=_read_csv(path / "metrics_epochs.csv", EPOCH_COLUMNS),
        ranks=_read_csv(path / "adalora_ranks.csv", ["step", "rank"]),
    )


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write via a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_text(path: Path, text: str) -> Path:
    return _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- plots

def _figure(width: float = 7.5, height: float = 4.5) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _curves(run: _Run) -> pd.DataFrame | None:
    """Per-step metrics; falls back to the per-epoch file (train_loss -> loss)."""
    if run.steps is not None:
        return run.steps
    if run.epochs is not None:
        return run.epochs.rename(columns={"train_loss": "loss"})
    return None


def _curve_plot(run: _Run, path: Path, series: Sequence[tuple[str, str]], title: str,
                ylabel: str) -> Path | None:
    df = _curves(run)
    if df is None:
        return None
    x = "step" if "step" in df else "epoch"
    fig, ax = _figure()
    xs: set[float] = set()
    for col, label in series:
        if col not in df or x not in df:
            continue
        pts = df[[x, col]].dropna().sort_values(x)
        if pts.empty:
            continue
        if len(pts) == 1:  # single evaluation: put the number in the legend
            label = f"{label} = {pts[col].iloc[0]:.4f}"
        ax.plot(pts[x], pts[col], label=label, marker="o" if len(pts) <= 30 else None,
                markersize=5 if len(pts) == 1 else 4, linewidth=1.5)
        xs.update(pts[x])
    if not xs:
        return None
    if len(xs) == 1:  # one x value: no fractional ticks around it
        ax.set_xticks(sorted(xs))
    ax.set(title=f"{title} — {run.title}", xlabel=x, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_loss(run: _Run, path: Path) -> Path | None:
    return _curve_plot(run, path, [("loss", "train loss"), ("eval_loss", "validation loss")],
                       "Loss", "loss")


def _plot_accuracy(run: _Run, path: Path) -> Path | None:
    return _curve_plot(run, path, [("train_accuracy", "training accuracy"), ("eval_accuracy", "validation accuracy")],
                       "Training vs validation accuracy", "accuracy")


def _plot_prf(run: _Run, path: Path) -> Path | None:
    return _curve_plot(run, path, [("eval_macro_precision", "macro precision"),
                                   ("eval_macro_recall", "macro recall"),
                                   ("eval_macro_f1", "macro F1")],
                       "Validation macro precision / recall / F1", "score")


def _plot_confusion(run: _Run, path: Path) -> Path | None:
    found = run.confusion_split()
    if found is None:
        return None
    split, m = found
    cm = np.asarray(m["confusion_matrix"], dtype=float)
    labels = run.labels(m) or [str(i) for i in range(len(cm))]
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) * 100
    n = len(labels)
    side = max(4.5, 1.3 * n + 1.5)
    fig, ax = _figure(side + 1.2, side)
    norm = PowerNorm(gamma=0.4, vmin=0, vmax=100)  # make the few-% error cells visible
    im = ax.imshow(pct, cmap="Blues", norm=norm)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(cm[i, j]):,}\n{pct[i, j]:.1f}%", ha="center", va="center",
                    fontsize=9, color="white" if norm(pct[i, j]) > 0.6 else "black")
    long = max(map(len, labels)) > 9
    ax.set_xticks(range(n), labels, rotation=30 if long else 0, ha="right" if long else "center",
                  rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion matrix — {split} (n={int(cm.sum()):,})\n{run.title}")
    fig.colorbar(im, ax=ax, label="% of true class (row-normalised)", shrink=0.8,
                 ticks=[0, 2, 5, 10, 25, 50, 75, 100])
    return _save(fig, path)


def _grouped_bars(path: Path, classes: Sequence[str], groups: dict[str, Sequence[float]],
                  title: str, ylabel: str, fmt: str, ylim: float | None = None) -> Path:
    fig, ax = _figure(max(6.5, 1.6 * len(classes) + 2), 4.8)
    x = np.arange(len(classes))
    width = 0.8 / max(len(groups), 1)
    for k, (label, values) in enumerate(groups.items()):
        bars = ax.bar(x + (k - (len(groups) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2)
    ax.set_xticks(x, classes)
    top = ylim if ylim is not None else max(max(v) for v in groups.values()) or 1
    ax.set_ylim(0, top * 1.12)
    ax.set(title=title, ylabel=ylabel, xlabel="class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(groups), frameon=False)
    return _save(fig, path)


def _plot_per_class_f1(run: _Run, path: Path) -> Path | None:
    per_split = {s: m["per_class"] for s in SPLITS if (m := run.split(s)) and m.get("per_class")}
    if not per_split:
        return None
    classes: list[str] = []
    for s, pc in per_split.items():
        classes += [c for c in (run.labels(run.split(s)) or pc) if c not in classes]
    groups = {s: [float(pc.get(c, {}).get("f1", np.nan)) for c in classes]
              for s, pc in per_split.items()}
    return _grouped_bars(path, classes, groups, f"Per-class F1 — {run.title}", "F1", "%.3f", 1.0)


def _plot_label_distribution(run: _Run, path: Path) -> Path | None:
    found = run.confusion_split()
    if found is None:
        return None
    split, m = found
    cm = np.asarray(m["confusion_matrix"], dtype=int)
    labels = run.labels(m) or [str(i) for i in range(len(cm))]
    groups = {"true": cm.sum(axis=1).tolist(), "predicted": cm.sum(axis=0).tolist()}
    return _grouped_bars(path, labels, groups,
                         f"True vs predicted label counts — {split}\n{run.title}", "examples",
                         "{:,.0f}")


def _module_label(module: str) -> str:
    """'roberta.encoder.layer.3.attention.self.query' -> 'L3 query'."""
    m = re.search(r"layers?\.(\d+)\.(.+)$", module)
    if not m:
        return ".".join(module.split(".")[-2:])
    rest = m.group(2)
    for old, new in (("attention.self.", ""), ("attention.output.dense", "attn.output"),
                     ("intermediate.dense", "ffn.in"), ("output.dense", "ffn.out")):
        rest = rest.replace(old, new)
    return f"L{m.group(1)} {rest}"


def _layer(module: str) -> int:
    m = re.search(r"layers?\.(\d+)\.", module)
    return int(m.group(1)) if m else -1


def _plot_adalora_ranks(run: _Run, path: Path) -> Path | None:
    df = run.ranks
    if df is None or not {"step", "module", "rank"} <= set(df.columns):
        return None
    df = df.dropna(subset=["step", "module", "rank"])
    if df.empty:
        return None
    table = df.pivot_table(index="module", columns="step", values="rank", aggfunc="last")
    first_seen = {m: i for i, m in reversed(list(enumerate(df["module"])))}
    table = table.loc[sorted(table.index, key=lambda m: (_layer(m), first_seen[m]))]
    labels = [_module_label(m) for m in table.index]
    title = f"AdaLoRA rank per module — {run.title}"
    if len(table) <= 8:  # few modules: lines are clearer
        fig, ax = _figure()
        for label, (_, row) in zip(labels, table.iterrows()):
            pts = row.dropna()
            ax.step(pts.index, pts.values, where="post", marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel="step", ylabel="rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        return _save(fig, path)
    steps = list(table.columns)
    fig, ax = _figure(max(7.5, 0.25 * len(steps) + 4), 0.16 * len(table) + 1.8)
    im = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis",
                   interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    layers = [_layer(m) for m in table.index]
    for i in range(1, len(layers)):
        if layers[i] != layers[i - 1]:  # separate transformer layers
            ax.axhline(i - 0.5, color="white", linewidth=1.2)
    every = max(1, math.ceil(len(steps) / 12))
    ax.set_xticks(range(0, len(steps), every), [f"{s:,.0f}" for s in steps[::every]])
    ax.set(title=title, xlabel="step", ylabel="module")
    fig.colorbar(im, ax=ax, label="rank", shrink=0.6)
    return _save(fig, path)


_PLOTS: list[tuple[str, Callable[[_Run, Path], Path | None]]] = [
    ("loss.png", _plot_loss),
    ("accuracy.png", _plot_accuracy),
    ("prf.png", _plot_prf),
    ("confusion_test.png", _plot_confusion),
    ("per_class_f1.png", _plot_per_class_f1),
    ("label_distribution.png", _plot_label_distribution),
    ("adalora_ranks.png", _plot_adalora_ranks),
]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write the run's PNG plots into ``run_dir/plots/``; return the files written.

    A plot whose data is missing is skipped (and a failing plot is logged and skipped).
    """
    run = _load(run_dir)
    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for filename, plot in _PLOTS:
        try:
            result = plot(run, out / filename)
        except Exception as exc:  # noqa: BLE001 - one bad plot must not stop the others
            log.warning("skipping %s for %s: %s", filename, run.path, exc)
            continue
        if result is not None:
            written.append(result)
    return written


# --------------------------------------------------------------------------- workbook

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


def _table(ws, header: Sequence[str], rows: Iterable[Sequence[Any]], start: int = 1) -> int:
    """Write a bold header and rows from row ``start``; return the next free row."""
    for c, name in enumerate(header, 1):
        ws.cell(start, c, name).font = _BOLD
    r = start
    for r, row in enumerate(rows, start + 1):
        for c, value in enumerate(row, 1):
            ws.cell(r, c, _cell(value))
    return r + 1


def _frame_table(ws, df: pd.DataFrame | None, default_columns: Sequence[str]) -> None:
    if df is None:
        _table(ws, default_columns, [])
    else:
        _table(ws, list(df.columns), df.itertuples(index=False))


def _autofit(wb: Workbook) -> None:
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


def _summary_rows(run: _Run) -> list[tuple[str, Any]]:
    info, trainable = run.info, run.info.get("trainable") or {}
    rows: list[tuple[str, Any]] = [
        ("name", run.name), ("method", run.method), ("backbone", run.backbone),
        ("trainable_total", trainable.get("total")), ("trainable_head", trainable.get("head")),
        ("trainable_adapter", trainable.get("adapter")),
        ("budget", trainable.get("budget", _get(run.recipe, "budget.max_params"))),
        ("device", info.get("device")), ("started", info.get("started")),
        ("finished", info.get("finished")), ("status", info.get("status")),
        ("train_runtime_s", info.get("train_runtime_s")),
        ("train_samples_per_second", info.get("train_samples_per_second")),
    ]
    for split in SPLITS:
        m = run.split(split) or {}
        rows += [(f"{split}_accuracy", m.get("accuracy")), (f"{split}_macro_f1", m.get("macro_f1"))]
    rows += [(f"recipe.{k}", v) for k, v in _flatten(run.recipe).items()]
    return rows


def _per_class_rows(run: _Run) -> list[list[Any]]:
    rows = []
    for split in SPLITS:
        m = run.split(split) or {}
        for cls, v in (m.get("per_class") or {}).items():
            rows.append([split, cls, v.get("precision"), v.get("recall"), v.get("f1"),
                         v.get("support")])
    return rows


def _confusion_sheet(ws, run: _Run) -> None:
    row = 1
    for split in SPLITS:
        m = run.split(split) or {}
        cm = m.get("confusion_matrix")
        if not cm:
            continue
        labels = run.labels(m) or [str(i) for i in range(len(cm))]
        ws.cell(row, 1, f"{split} (rows = true, columns = predicted)").font = _BOLD
        row = _table(ws, ["true \\ predicted", *labels],
                     ([labels[i], *counts] for i, counts in enumerate(cm)), row + 1) + 1
    if row == 1:
        _table(ws, ["true \\ predicted"], [])


def write_workbook(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/metrics.xlsx`` (sheets summary, epochs, steps, per_class, confusion)."""
    run = _load(run_dir)
    wb = Workbook()
    summary = wb.active
    summary.title = "summary"
    _table(summary, ["key", "value"], _summary_rows(run))
    _frame_table(wb.create_sheet("epochs"), run.epochs, EPOCH_COLUMNS)
    _frame_table(wb.create_sheet("steps"), run.steps, STEP_COLUMNS)
    _table(wb.create_sheet("per_class"), PER_CLASS_COLUMNS, _per_class_rows(run))
    _confusion_sheet(wb.create_sheet("confusion"), run)
    _autofit(wb)
    return _atomic_write(run.path / "metrics.xlsx", lambda p: wb.save(p))


# --------------------------------------------------------------------------- comparison

def _require_run(path: Path) -> None:
    if not ((path / "run.json").is_file() or (path / "eval.json").is_file()):
        raise NewsloraError(f"{path} is not a newslora run folder (it has neither run.json nor eval.json)")


def _compare_row(run: _Run) -> dict[str, Any]:
    info, recipe = run.info, run.recipe
    trainable = info.get("trainable") or {}
    modules = info.get("target_modules") or _get(recipe, "lora.target_modules") or []
    rank = info.get("rank")
    if rank is None:
        rank = _get(recipe, "adalora.target_r" if run.method == "adalora" else "lora.r")
    val, test = run.split("validation") or {}, run.split("test") or {}
    return {
        "name": run.name, "method": run.method,
        "modules": ",".join(modules) if isinstance(modules, list) else modules,
        "rank": rank, "trainable": trainable.get("total"),
        "budget": trainable.get("budget", _get(recipe, "budget.max_params")),
        "val_accuracy": val.get("accuracy"), "test_accuracy": test.get("accuracy"),
        "val_macro_f1": val.get("macro_f1"), "test_macro_f1": test.get("macro_f1"),
        "train_time_s": info.get("train_runtime_s"),
        "samples_per_s": info.get("train_samples_per_second"), "path": str(run.path),
    }


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _markdown(rows: list[dict]) -> str:
    lines = [
        "# newslora run comparison", "",
        f"{len(rows)} run(s), sorted by validation accuracy (best first).", "",
        "| " + " | ".join(COMPARE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in COMPARE_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r[c]).replace("|", "\\|") for c in COMPARE_COLUMNS) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;font-size:.9rem;margin:1rem 0}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th{background:#f2f2f2}td.t{text-align:left}tr:nth-child(even){background:#fafafa}
section{margin-top:2.5rem;border-top:1px solid #ddd}code{font-size:.85rem;color:#555}
.plots{display:flex;flex-wrap:wrap;gap:.75rem}.plots img{max-width:48%;height:auto;border:1px solid #eee}
"""


def _run_plots(run: _Run) -> list[Path]:
    plots = run.path / "plots"
    wanted = [*KEY_PLOTS, *(["adalora_ranks.png"] if run.ranks is not None else [])]
    if not all((plots / name).is_file() for name in wanted):
        plot_run(run.path)
    return [plots / name for name in wanted if (plots / name).is_file()]


def _html(runs: list[_Run], rows: list[dict]) -> str:
    esc = html.escape
    numeric = {"rank", "trainable", "budget", "val_accuracy", "test_accuracy", "val_macro_f1",
               "test_macro_f1", "train_time_s", "samples_per_s"}
    head = "".join(f"<th>{esc(c)}</th>" for c in COMPARE_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f'<td{"" if c in numeric else " class=t"}>{esc(_fmt(r[c]))}</td>'
                         for c in COMPARE_COLUMNS) + "</tr>\n" for r in rows)
    sections = []
    for run in runs:
        imgs = "".join(
            f'<img alt="{esc(p.stem)}" src="data:image/png;base64,'
            f'{base64.b64encode(p.read_bytes()).decode("ascii")}">' for p in _run_plots(run))
        sections.append(f"<section><h2>{esc(run.name)}</h2><p><code>{esc(str(run.path))}</code>"
                        f"</p><div class=plots>{imgs or '<p>No plots available.</p>'}</div>"
                        "</section>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>newslora run comparison</title><style>{_CSS}</style></head><body>"
            f"<h1>newslora run comparison</h1><p>{len(rows)} run(s), sorted by validation "
            f"accuracy (best first). Generated {stamp}.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"
            f"{''.join(sections)}</body></html>\n")


def compare_runs(run_dirs: Iterable[str | os.PathLike],
                 output_dir: str | os.PathLike) -> dict[str, Path]:
    """Compare runs in one table; write report.md, report.html and report.xlsx."""
    paths = [Path(d) for d in run_dirs]
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise NewsloraError(f"--output {output_dir} is a file; give a folder for report.md, report.html and "
                            "report.xlsx")
    for path in paths:
        _require_run(path)
    runs = [_load(p) for p in paths]
    pairs = sorted(zip(runs, map(_compare_row, runs)),
                   key=lambda rr: (rr[1]["val_accuracy"] is None, -(rr[1]["val_accuracy"] or 0)))
    runs, rows = [r for r, _ in pairs], [row for _, row in pairs]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wb = Workbook()
    wb.active.title = "comparison"
    _table(wb.active, COMPARE_COLUMNS, ([r[c] for c in COMPARE_COLUMNS] for r in rows))
    _autofit(wb)
    return {
        "md": _write_text(out / "report.md", _markdown(rows)),
        "html": _write_text(out / "report.html", _html(runs, rows)),
        "xlsx": _atomic_write(out / "report.xlsx", lambda p: wb.save(p)),
    }


# --------------------------------------------------------------------------- model card

_METHOD_NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "dora": "DoRA", "vera": "VeRA"}


def _dataset_id(recipe: dict) -> str:
    source = _get(recipe, "data.source")
    if not isinstance(source, str) or not source.strip():
        return "ag_news"
    source = source.strip().removeprefix("hf:")
    local = source.startswith(("/", ".", "~")) or Path(source).suffix in {
        ".csv", ".json", ".jsonl", ".parquet", ".tsv"}
    return "ag_news" if local else source


def _card_metadata(run: _Run, dataset: str) -> dict:
    meta: dict[str, Any] = {}
    if run.backbone:
        meta["base_model"] = run.backbone
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
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _card_budget(run: _Run) -> str:
    t = run.info.get("trainable") or {}
    budget = t.get("budget", _get(run.recipe, "budget.max_params"))
    if not t and budget is None:
        return "Trainable-parameter counts were not recorded for this run."
    rows = [("total", t.get("total")), ("classification head", t.get("head")),
            ("adapter", t.get("adapter")), ("budget", budget)]
    text = _md_table(["trainable parameters", "count"], rows)
    if t.get("total") is not None and budget:
        text += f"\n\nThe run used **{100 * t['total'] / budget:.1f}%** of its budget."
    return text


def _card_results(run: _Run) -> str:
    splits = [(s, m) for s in SPLITS if (m := run.split(s))]
    if not splits:
        return "No evaluation results were recorded for this run."
    overall = _md_table(["split", "accuracy", "macro precision", "macro recall", "macro F1", "n"],
                        [(s, m.get("accuracy"), m.get("macro_precision"), m.get("macro_recall"),
                          m.get("macro_f1"), m.get("n")) for s, m in splits])
    per_class = _md_table(["split", "class", "precision", "recall", "F1", "support"],
                          _per_class_rows(run))
    return f"{overall}\n\n### Per class\n\n{per_class}"


def _label_names(run: _Run) -> list[str]:
    return run.info.get("label_names") or next(
        (run.labels(m) for s in SPLITS if (m := run.split(s))), [])


def _label_text(run: _Run) -> str:
    labels = _label_names(run)
    return f"{len(labels)} classes: {', '.join(labels)}" if labels else "AG News topics"


def _card_limitations(run: _Run, dataset: str) -> str:
    labels = _label_names(run)
    data = run.recipe.get("data") or {}
    sample = next((data[k] for k in ("max_train_samples", "train_samples", "train_size",
                                     "limit_train") if isinstance(data.get(k), int)), None)
    items = [
        "Trained and evaluated on English news headlines/snippets only; other languages and "
        "domains (social media, scientific text, long documents) are out of scope.",
        f"Predicts exactly {len(labels) or 4} classes"
        + (f" ({', '.join(labels)})" if labels else "")
        + "; every input is forced into one of them, even when none applies.",
        f"Training data: `{dataset}`"
        + (f", a sample of {sample:,} training examples." if sample else ".")
        + " AG News reflects the topics and sources of its collection period (mid-2000s) and "
        "may carry their biases.",
        "Not intended for decisions about people or for content moderation.",
    ]
    if run.info.get("status") not in (None, "completed"):
        items.insert(0, f"**This model comes from a run with status `{run.info['status']}`** "
                        "and may be under-trained.")
    return "\n".join(f"- {item}" for item in items)


def write_model_card(export_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face model card ``export_dir/README.md`` for an exported run."""
    run, export = _load(run_dir), Path(export_dir)
    dataset = _dataset_id(run.recipe)
    model = export.name or "path/to/model"
    recipe_yaml = (yaml.safe_dump(run.recipe, sort_keys=False, allow_unicode=True).strip()
                   if run.recipe else "# recipe.yaml was not found")
    backbone = f"[`{run.backbone}`](https://huggingface.co/{run.backbone})" if run.backbone \
        else "a pretrained encoder"
    method = _METHOD_NAMES.get(run.method or "", run.method or "parameter-efficient")
    sections = [
        f"# {run.name}",
        "## Model description",
        f"{backbone} fine-tuned for news topic classification ({_label_text(run)}) on "
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
    return _write_text(export / "README.md", f"---\n{front}---\n\n" + "\n\n".join(sections) + "\n")


# --------------------------------------------------------------------------- training hook

def finalize_run(run_dir: str | os.PathLike) -> None:
    """Plots + workbook at the end of training; never raises, logs a warning instead."""
    for stage in (plot_run, write_workbook):
        try:
            stage(run_dir)
        except Exception as exc:  # noqa: BLE001
            log.warning("finalize_run: %s failed for %s: %s", stage.__name__, run_dir, exc)
