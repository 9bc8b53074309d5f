"""A study's results: the trials table (CSV, xlsx), the best recipe, the best trial's single test evaluation,
Optuna's plots and summary.json."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..config import Recipe, recipe_from_dict, set_key
from ..errors import first_line
from ..outputs import write_file_atomic, write_json
from ..run import Run
from .runner import stderr_console
from .space import Space
from .storage import open_storage, shown


@dataclass
class SearchResult:
    study_name: str
    output: Path
    storage: str
    n_trials: int  # trials in the study, all states
    states: dict  # {"COMPLETE": 5, "PRUNED": 1, ...}
    best_trial: int | None
    best_value: float | None
    baseline_trial: int | None
    baseline_value: float | None
    best_recipe: Path | None
    test: dict | None  # the best trial's test metrics (None: no test data)
    plots: list[Path]
    notes: list[str]


def trials_frame(study, space: Space | None = None):
    """One row per trial. Custom rather than ``study.trials_dataframe()``, whose columns are ``params_<key>`` and
    ``user_attrs_<key>`` with datetimes: this table has the recipe keys as columns, the trainable count and a note."""
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    keys = [p.key for p in space.params] if space else []
    keys += sorted({k for t in trials for k in t.params} - set(keys))
    # RetryHeartbeatStaleTrialCallback's retries: retry_history ends with the trial each one replaces
    retry_of = {t.number: t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    retried = {old: new for new, old in retry_of.items()}
    rows = []
    for t in trials:
        note = t.user_attrs.get("reason", "")
        if not note and t.number in retried:  # failed by the heartbeat: its process died
            note = f"its worker stopped (no heartbeat); retried as trial {retried[t.number]}"
        elif not note and t.number in retry_of:
            note = f"retry of trial {retry_of[t.number]}"
        rows.append({"number": t.number, "state": t.state.name,
                     "value": t.value if t.values is not None else None,
                     **{k: t.params.get(k) for k in keys},
                     "trainable": t.user_attrs.get("trainable"),
                     "duration_s": round(t.duration.total_seconds(), 2) if t.duration else None,
                     "run_dir": t.user_attrs.get("run_dir"),
                     "baseline": bool(t.user_attrs.get("baseline", False)),
                     "note": note})
    return pd.DataFrame(rows, columns=["number", "state", "value", *keys, "trainable", "duration_s", "run_dir",
                                       "baseline", "note"])


def _write_xlsx(df, path: Path) -> None:
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    import pandas as pd

    def write(tmp: Path) -> None:
        with pd.ExcelWriter(tmp, engine="openpyxl") as xw:
            df.to_excel(xw, sheet_name="trials", index=False)
            ws = xw.sheets["trials"]
            for cell in ws[1]:
                cell.font = Font(bold=True)
            for i, col in enumerate(df.columns, 1):
                width = max([len(str(col))] + [len(str(v)) for v in df[col].tolist()])
                ws.column_dimensions[get_column_letter(i)].width = min(60, width + 2)
            ws.freeze_panes = "A2"

    write_file_atomic(path, write)


def write_results(study_name: str, storage_url: str, out: Path, base: Recipe, space: Space,
                  final: bool = True) -> SearchResult:
    """trials.csv/.xlsx, best.yaml, plots, the best trial's test metrics (once), summary.json."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    con, notes, plots = stderr_console(), [], []
    df = trials_frame(study, space)
    write_file_atomic(out / "trials.csv", lambda tmp: df.to_csv(tmp, index=False))
    _write_xlsx(df, out / "trials.xlsx")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    best_path = test = None
    if best is not None:
        best_path = out / "best.yaml"
        recipe = best_recipe(base, space, best.params, f"{study_name}-best")
        header = (f"# best trial {best.number} of study {study_name}: validation {base.train.metric} "
                  f"{best.value:.6f}\n# run it: newslora train --config {_rel(best_path)}\n")
        write_file_atomic(best_path, lambda tmp: tmp.write_text(header + recipe.to_yaml()))
    else:
        notes.append("no completed trial yet: no best.yaml")
    if final:
        plots, plot_notes = write_plots(study, out)
        notes += plot_notes
        if best is not None:
            test = evaluate_best_on_test(study, best, base, out, notes)
    counts = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    result = SearchResult(study_name, out, shown(storage_url), len(study.get_trials(deepcopy=False)), counts,
                          best.number if best else None, best.value if best else None,
                          baseline.number if baseline else None, baseline.value if baseline else None,
                          best_path, test, plots, notes)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
    summary["plots"] = [str(p) for p in plots]
    summary["metric"] = base.train.metric
    write_json(out / "summary.json", summary)
    from rich.markup import escape

    for n in notes:
        con.print(f"[yellow]note: {escape(n)}[/yellow]", highlight=False)
    return result


def best_recipe(base: Recipe, space: Space, stored_params: dict, name: str) -> Recipe:
    """The base recipe with the trial's values: data.test as in the base, so it is ready to train and test."""
    d = base.to_dict()
    for key, value in space.decode(stored_params).items():
        set_key(d, key, value)
    d["name"] = name
    return recipe_from_dict(d)


def evaluate_best_on_test(study, best, base: Recipe, out: Path, notes: list[str]) -> dict | None:
    """The best trial on the base recipe's test data: once per best trial (kept in test.json)."""
    path = out / "test.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("trial") == best.number:
            return old
    from ..data import load_splits
    from ..evaluate import classification_metrics
    from ..predict import load_classifier

    splits = load_splits(base.data)
    if splits.test is None:
        notes.append("the base recipe has no test data (data.test): the best trial was not tested")
        return None
    run_dir = out / best.user_attrs["run_dir"]
    if not Run(run_dir).is_finished():  # a shared storage: the trial ran on another machine
        notes.append(f"the best trial's run folder {run_dir} is not on this machine: test it where it ran "
                     "(newslora evaluate RUN_DIR --data TEST_FILE)")
        return None
    clf = load_classifier(run_dir)
    probs = clf.predict_proba(splits.test["text"].tolist(), batch_size=base.train.eval_batch_size)
    m = classification_metrics(splits.test["label"].to_numpy(), probs.argmax(-1), splits.label_names)
    record = {"trial": best.number, "run_dir": best.user_attrs["run_dir"], "data": base.data.test or base.data.source,
              "validation": {base.train.metric: best.value}, "test": m,
              "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(path, record)
    study.set_user_attr("test", {"trial": best.number, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
    return record


def write_plots(study, out: Path) -> tuple[list[Path], list[str]]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [k for k in {k for t in complete for k in t.params}
               if len({json.dumps(t.params.get(k), default=str) for t in complete}) > 1]
    files, notes = [], []
    plt.rcParams.update({"font.size": 10})

    def save(name: str, draw, size):
        path = out / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(*size)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            files.append(path)
        except Exception as e:
            path.unlink(missing_ok=True)
            notes.append(f"{name}.png skipped: {first_line(e, with_type=True)}")
        finally:
            plt.close("all")

    if not complete:
        return files, ["no completed trial: no plots"]
    target = f"validation {study.user_attrs.get('metric', 'metric')}"
    save("optimization_history", lambda: _history(ovm, study, target), (9, 5))
    if len(complete) >= 2 and varying:
        save("param_importances", lambda: _importances(ovm, study, target),
             (9, max(3.5, 1.5 + 0.6 * len(varying))))
    else:
        (out / "param_importances.png").unlink(missing_ok=True)
        notes.append("param_importances.png skipped: needs at least 2 completed trials whose parameters differ")
    n_params = len({k for t in complete for k in t.params})
    save("parallel_coordinate", lambda: _parallel(ovm, study, target), (max(10, 2.6 * (n_params + 1)), 6))
    return files, notes


def _history(ovm, study, target: str):
    from matplotlib.ticker import MaxNLocator

    ax = ovm.plot_optimization_history(study, target_name=target)
    ax.set_title(f"Optimisation history: study {study.study_name}", pad=12)
    ax.set_xlabel("trial")
    ax.set_ylabel(target)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax


def _importances(ovm, study, target: str):
    ax = ovm.plot_param_importances(study, target_name=target)
    ax.set_title(f"Parameter importances (fANOVA): study {study.study_name}", loc="left", pad=12)
    ax.set_xlabel(f"importance for {target}")
    ax.set_ylabel("")
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    return ax


def _parallel(ovm, study, target: str):
    from matplotlib.collections import LineCollection

    ax = ovm.plot_parallel_coordinate(study, target_name=target)
    ax.set_title(f"Parallel coordinates (completed trials): study {study.study_name}", pad=22)
    for lines in ax.collections:  # optuna's Blues draws the worst trial white on the grey background
        if isinstance(lines, LineCollection):
            lines.set_cmap("viridis")
            lines.set_linewidth(2.2)
    for label in ax.get_xticklabels():
        label.set_fontsize(9)
        label.set_rotation(0)
        label.set_horizontalalignment("center")
    return ax


def print_summary(res: SearchResult, metric: str, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    states = ", ".join(f"{n.lower()} {c}" for n, c in res.states.items() if c)
    console.print(f"study {res.study_name}: {res.n_trials} trials ({states})", highlight=False)
    if res.baseline_trial is not None:
        console.print(f"baseline (trial {res.baseline_trial}): validation {metric} {res.baseline_value:.4f}",
                      highlight=False)
    if res.best_trial is not None:
        console.print(f"best (trial {res.best_trial}): validation {metric} {res.best_value:.4f}", highlight=False)
    if res.test:
        t = res.test["test"]
        console.print(f"best trial on test: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f} (n={t['n']})",
                      highlight=False)
    if res.best_recipe:
        console.print(f"best recipe: {_rel(res.best_recipe)}", highlight=False)
    console.print(f"study folder: {_rel(res.output)}  (storage {res.storage})", highlight=False)


def _rel(p: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(p).relative_to(Path.cwd()))
    return str(p)
