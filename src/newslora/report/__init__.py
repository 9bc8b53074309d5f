"""Reporting stage: plots, Excel workbook, cross-run comparison and model card.

Everything here reads a *run folder* through :class:`newslora.run.Run` (recipe, run.json, metric CSVs, eval.json,
the AdaLoRA rank log). One module per output: ``plots``, ``workbook``, ``compare``, ``card``.

Any of these may be missing or partial (interrupted / single-evaluation runs);
each output degrades gracefully instead of failing.
"""
from __future__ import annotations

import logging
import os

from ..errors import first_line
from .card import adapter_card, write_model_card
from .compare import compare_runs
from .plots import plot_run
from .workbook import write_workbook

__all__ = ["plot_run", "write_workbook", "compare_runs", "write_model_card", "adapter_card", "finalize_run"]

log = logging.getLogger(__name__)


def finalize_run(run_dir: str | os.PathLike) -> list[str]:
    """Plots + workbook at the end of training; never raises: returns what failed (one line each, empty when all was
    written) and logs a warning for each."""
    failures: list[str] = []
    try:
        plot_run(run_dir, failures)
    except Exception as exc:  # noqa: BLE001
        failures.append(f"plots: {first_line(exc, with_type=True)}")
    try:
        write_workbook(run_dir)
    except Exception as exc:  # noqa: BLE001
        failures.append(f"metrics.xlsx: {first_line(exc, with_type=True)}")
    for failure in failures:
        log.warning("finalize_run: %s failed for %s", failure, run_dir)
    return failures
