"""Reporting stage: plots, Excel workbook, cross-run comparison and model card.

Everything here reads a *run folder* through :class:`newslora.run.Run` (recipe, run.json, metric CSVs, eval.json,
the AdaLoRA rank log). One module per output: ``plots``, ``workbook``, ``compare``, ``card``.

Any of these may be missing or partial (interrupted / single-evaluation runs);
each output degrades gracefully instead of failing.
"""
from __future__ import annotations

import logging
import os

from .card import adapter_card, write_model_card
from .compare import compare_runs
from .plots import plot_run
from .workbook import write_workbook

__all__ = ["plot_run", "write_workbook", "compare_runs", "write_model_card", "adapter_card", "finalize_run"]

log = logging.getLogger(__name__)


def finalize_run(run_dir: str | os.PathLike) -> None:
    """Plots + workbook at the end of training; never raises, logs a warning instead."""
    for stage in (plot_run, write_workbook):
        try:
            stage(run_dir)
        except Exception as exc:  # noqa: BLE001
            log.warning("finalize_run: %s failed for %s: %s", stage.__name__, run_dir, exc)
