"""One comparison table of several runs: Markdown, self-contained HTML (with each run's key plots) and xlsx."""
from __future__ import annotations

import base64
import html
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from openpyxl import Workbook

from .. import methods
from ..outputs import check_folder_place, write_file_atomic
from ..run import Run
from .common import KEY_PLOTS, RunView, format_value, get_key, load_view, write_text_atomic
from .plots import method_plots, plot_run
from .workbook import autofit, write_table


COMPARE_COLUMNS = ["name", "method", "modules", "rank", "trainable", "budget", "val_accuracy",
                   "test_accuracy", "val_macro_f1", "test_macro_f1", "train_time_s",
                   "samples_per_s", "status", "path"]
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;font-size:.9rem;margin:1rem 0}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th{background:#f2f2f2}td.t{text-align:left}tr:nth-child(even){background:#fafafa}
section{margin-top:2.5rem;border-top:1px solid #ddd}code{font-size:.85rem;color:#555}
.plots{display:flex;flex-wrap:wrap;gap:.75rem}.plots img{max-width:48%;height:auto;border:1px solid #eee}
"""


def _compare_row(run: RunView) -> dict[str, Any]:
    info, recipe = run.info, run.recipe
    trainable = info.get("trainable") or {}
    modules = info.get("target_modules") or get_key(recipe, "lora.target_modules") or []
    rank = info.get("rank")  # the rank training counted: lora.r, adalora.init_r, vera.r, ...
    if rank is None and run.method in methods.names():
        rank = get_key(recipe, methods.get(run.method).rank_key)
    val, test = run.split("validation") or {}, run.split("test") or {}
    return {
        "name": run.name, "method": run.method,
        "modules": ",".join(modules) if isinstance(modules, list) else modules,
        "rank": rank, "trainable": trainable.get("total"),
        "budget": trainable.get("budget", get_key(recipe, "budget.max_params")),
        "val_accuracy": val.get("accuracy"), "test_accuracy": test.get("accuracy"),
        "val_macro_f1": val.get("macro_f1"), "test_macro_f1": test.get("macro_f1"),
        "train_time_s": info.get("train_runtime_s"),
        "samples_per_s": info.get("train_samples_per_second"), "status": run.status, "path": str(run.path),
    }


def _markdown(rows: list[dict]) -> str:
    lines = [
        "# newslora run comparison", "",
        f"{len(rows)} run(s), sorted by validation accuracy (best first).", "",
        "| " + " | ".join(COMPARE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in COMPARE_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(format_value(r[c]).replace("|", "\\|") for c in COMPARE_COLUMNS) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def _run_plots(run: RunView) -> list[Path]:
    plots = Run(run.path).plots_dir
    wanted = [*KEY_PLOTS, *(name for name, _ in method_plots(run))]
    if not all((plots / name).is_file() for name in wanted):
        plot_run(run.path)
    return [plots / name for name in wanted if (plots / name).is_file()]


def _html(runs: list[RunView], rows: list[dict]) -> str:
    esc = html.escape
    numeric = {"rank", "trainable", "budget", "val_accuracy", "test_accuracy", "val_macro_f1",
               "test_macro_f1", "train_time_s", "samples_per_s"}
    head = "".join(f"<th>{esc(c)}</th>" for c in COMPARE_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f'<td{"" if c in numeric else " class=t"}>{esc(format_value(r[c]))}</td>'
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
    check_folder_place(output_dir, "report.md, report.html and report.xlsx")
    for path in paths:
        Run.open(path, need="any")  # every folder checked before anything is written
    runs = [load_view(p) for p in paths]
    pairs = sorted(zip(runs, map(_compare_row, runs)),
                   key=lambda rr: (rr[1]["val_accuracy"] is None, -(rr[1]["val_accuracy"] or 0)))
    runs, rows = [r for r, _ in pairs], [row for _, row in pairs]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wb = Workbook()
    wb.active.title = "comparison"
    write_table(wb.active, COMPARE_COLUMNS, ([r[c] for c in COMPARE_COLUMNS] for r in rows))
    autofit(wb)
    return {
        "md": write_text_atomic(out / "report.md", _markdown(rows)),
        "html": write_text_atomic(out / "report.html", _html(runs, rows)),
        "xlsx": write_file_atomic(out / "report.xlsx", lambda p: wb.save(p)),
    }
