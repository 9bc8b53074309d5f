"""PNG plots of one run: loss (per step and per epoch), accuracy, P/R/F1, confusion matrix, per-class F1, label
distribution, and the plots the run's method adds (:class:`newslora.methods.MethodPlot`, e.g. AdaLoRA's ranks)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

from ..errors import first_line
from ..run import Run
from .common import DPI, SPLITS, RunView, load_view

log = logging.getLogger(__name__)

# Past these label counts a plot shows the classes with the most support: its size (and memory) stays bounded for
# any label set, and every class keeps its numbers in metrics.xlsx.
MAX_HEATMAP_CLASSES = 30
MAX_ANNOTATED_CLASSES = 12
MAX_BAR_CLASSES = 30


def _figure(width: float = 7.5, height: float = 4.5) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _curves(run: RunView) -> pd.DataFrame | None:
    """Per-step metrics; falls back to the per-epoch file (train_loss -> loss)."""
    if run.steps is not None:
        return run.steps
    if run.epochs is not None:
        return run.epochs.rename(columns={"train_loss": "loss"})
    return None


def _curve_plot(run: RunView, path: Path, series: Sequence[tuple[str, str]], title: str,
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


def _plot_loss(run: RunView, path: Path) -> Path | None:
    return _curve_plot(run, path, [("loss", "train loss"), ("eval_loss", "validation loss")],
                       "Loss", "loss")


def _plot_loss_epochs(run: RunView, path: Path) -> Path | None:
    """Training and validation loss against epochs (metrics_epochs.csv: one row per epoch)."""
    if run.epochs is None or "epoch" not in run.epochs:
        return None
    fig, ax = _figure()
    for col, label in (("train_loss", "training loss"), ("eval_loss", "validation loss")):
        pts = run.epochs[["epoch", col]].dropna() if col in run.epochs else pd.DataFrame()
        if not pts.empty:
            ax.plot(pts["epoch"], pts[col], label=label, marker="o")
    if not ax.lines:
        return None
    ax.set_xticks(sorted(set(run.epochs["epoch"].dropna())))
    ax.set(title=f"Loss per epoch — {run.title}", xlabel="epoch", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_accuracy(run: RunView, path: Path) -> Path | None:
    return _curve_plot(run, path, [("train_accuracy", "training accuracy"), ("eval_accuracy", "validation accuracy")],
                       "Training vs validation accuracy", "accuracy")


def _plot_prf(run: RunView, path: Path) -> Path | None:
    return _curve_plot(run, path, [("eval_macro_precision", "macro precision"),
                                   ("eval_macro_recall", "macro recall"),
                                   ("eval_macro_f1", "macro F1")],
                       "Validation macro precision / recall / F1", "score")


def _top(support: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the ``limit`` classes with the most support (all of them, in their order, when few)."""
    if len(support) <= limit:
        return np.arange(len(support))
    return np.sort(np.argsort(-support, kind="stable")[:limit])


def _shown(n_shown: int, n: int) -> str:
    return "" if n_shown == n else f", top {n_shown} of {n:,} classes by support (all in metrics.xlsx)"


def _plot_confusion(run: RunView, path: Path) -> Path | None:
    found = run.confusion_split()
    if found is None:
        return None
    split, m = found
    full = np.asarray(m["confusion_matrix"], dtype=np.int64)
    all_labels = run.labels(m) or [str(i) for i in range(len(full))]
    rows_all = full.sum(axis=1)
    keep = _top(rows_all, MAX_HEATMAP_CLASSES)  # a K x K picture of thousands of classes is unreadable and huge
    cm = full[np.ix_(keep, keep)].astype(float)
    labels = [all_labels[i] for i in keep]
    rows = rows_all[keep].astype(float)[:, None]  # % of the whole true class, also of cells not shown
    pct = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) * 100
    n = len(labels)
    side = max(4.5, (1.3 if n <= MAX_ANNOTATED_CLASSES else 0.45) * n + 1.5)
    fig, ax = _figure(side + 1.2, side)
    norm = PowerNorm(gamma=0.4, vmin=0, vmax=100)  # make the few-% error cells visible
    im = ax.imshow(pct, cmap="Blues", norm=norm)
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j]):,}\n{pct[i, j]:.1f}%", ha="center", va="center",
                        fontsize=9, color="white" if norm(pct[i, j]) > 0.6 else "black")
    long = max(map(len, labels)) > 9
    ax.set_xticks(range(n), labels, rotation=30 if long else 0, ha="right" if long else "center",
                  rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion matrix — {split} (n={int(full.sum()):,}{_shown(n, len(full))})\n{run.title}")
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
    long = max(map(len, classes), default=0) > 9
    ax.set_xticks(x, classes, rotation=30 if long else 0, ha="right" if long else "center", rotation_mode="anchor")
    top = ylim if ylim is not None else max(max(v) for v in groups.values()) or 1
    ax.set_ylim(0, top * 1.12)
    ax.set(title=title, ylabel=ylabel, xlabel="class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(groups), frameon=False)
    return _save(fig, path)


def _plot_per_class_f1(run: RunView, path: Path) -> Path | None:
    per_split = {s: m["per_class"] for s in SPLITS if (m := run.split(s)) and m.get("per_class")}
    if not per_split:
        return None
    classes: list[str] = []
    for s, pc in per_split.items():
        seen = set(classes)
        classes += [c for c in (run.labels(run.split(s)) or pc) if c not in seen]
    support = np.array([max(float(pc.get(c, {}).get("support") or 0) for pc in per_split.values())
                        for c in classes])
    keep = _top(support, MAX_BAR_CLASSES)
    shown = [classes[i] for i in keep]
    groups = {s: [float(pc.get(c, {}).get("f1", np.nan)) for c in shown] for s, pc in per_split.items()}
    return _grouped_bars(path, shown, groups, f"Per-class F1{_shown(len(shown), len(classes))} — {run.title}",
                         "F1", "%.3f", 1.0)


def _plot_label_distribution(run: RunView, path: Path) -> Path | None:
    found = run.confusion_split()
    if found is None:
        return None
    split, m = found
    cm = np.asarray(m["confusion_matrix"], dtype=np.int64)
    labels = run.labels(m) or [str(i) for i in range(len(cm))]
    true, predicted = cm.sum(axis=1), cm.sum(axis=0)
    keep = _top(true + predicted, MAX_BAR_CLASSES)
    groups = {"true": true[keep].tolist(), "predicted": predicted[keep].tolist()}
    return _grouped_bars(path, [labels[i] for i in keep], groups,
                         f"True vs predicted label counts — {split}{_shown(len(keep), len(cm))}\n{run.title}",
                         "examples", "{:,.0f}")


_PLOTS: list[tuple[str, Callable[[RunView, Path], Path | None]]] = [
    ("loss.png", _plot_loss),
    ("loss_epochs.png", _plot_loss_epochs),
    ("accuracy.png", _plot_accuracy),
    ("prf.png", _plot_prf),
    ("confusion_test.png", _plot_confusion),
    ("per_class_f1.png", _plot_per_class_f1),
    ("label_distribution.png", _plot_label_distribution),
]


def method_plots(run: RunView) -> list[tuple[str, Callable[[RunView, Path], Path | None]]]:
    """The plots the run's method registers whose data file the run has, as (filename, plot) pairs."""
    from .. import methods

    folder = Run(run.path)
    return [(p.filename, lambda r, path, p=p: p.draw(folder, path, r.title, _figure))
            for p in methods.plots_of(run.method) if folder.file(p.needs).is_file()]


def plot_run(run_dir: str | os.PathLike, failures: list[str] | None = None) -> list[Path]:
    """Write the run's PNG plots into ``run_dir/plots/``; return the files written.

    A plot whose data is missing is skipped; a failing plot is logged, skipped and, when ``failures`` is given,
    appended to it as ``"<file>: <error>"``. Either way an older file of that name is removed: the folder never shows
    a plot of data the run no longer has.
    """
    run = load_view(run_dir)
    out = Run(run.path).plots_dir
    out.mkdir(exist_ok=True)
    written = []
    for filename, plot in [*_PLOTS, *method_plots(run)]:
        try:
            result = plot(run, out / filename)
        except Exception as exc:  # noqa: BLE001 - one bad plot must not stop the others
            log.warning("skipping %s for %s: %s", filename, run.path, exc)
            if failures is not None:
                failures.append(f"{filename}: {first_line(exc, with_type=True)}")
            result = None
        if result is not None:
            written.append(result)
        else:
            (out / filename).unlink(missing_ok=True)
    return written
