"""Experiment tracking (``train.report_to``) through the Trainer's own TensorBoard and MLflow integrations.

The Trainer's callbacks log every training and evaluation log as it happens: ``TensorBoardCallback`` into
``<run folder>/tensorboard`` and ``MLflowCallback`` into an MLflow run it starts (its environment variables apply:
``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_RUN_ID``, ``MLFLOW_TAGS``, ...). What they lack is added here:

- the MLflow store: ``train.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store next to
  the run folder (``runs/mlflow.db``, artifacts in ``runs/mlartifacts``);
- the experiment ``newslora`` unless ``MLFLOW_EXPERIMENT_NAME`` names another;
- on the MLflow run: the resolved recipe as ``recipe.*`` parameters, the budget breakdown, the per-epoch training
  means, the final validation and test metrics (``final_validation_*``, ``final_test_*``), the run folder's
  plots, workbook and small files as artifacts, and the tag ``newslora.run_dir`` (the run folder's absolute path);
- ``newslora search``: one parent run per study, each trial a nested run under it (:func:`study_run`).
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from .errors import NewsloraError
from .trainer import TrainHook

EXPERIMENT = "newslora"
STORE = "mlflow.db"  # the embedded store, beside the run folders
ARTIFACTS = "mlartifacts"
TENSORBOARD = "tensorboard"  # in the run folder
RUN_DIR_TAG = "newslora.run_dir"
STUDY_TAG = "newslora.study"
# the run folder's files logged as MLflow artifacts (besides plots/): small, and what a reader compares runs by
ARTIFACT_FILES = ("recipe.yaml", "run.json", "eval.json", "metrics_steps.csv", "metrics_epochs.csv", "metrics.xlsx")
NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # report_to entry -> the module it imports


def check(t) -> None:
    """Refuse, before anything is written, a ``train.report_to`` whose library is not installed, and a
    ``train.tracking_uri`` that nothing would use (``t``: the recipe's train section)."""
    missing = [NEEDS[r] for r in dict.fromkeys(t.report_to) if importlib.util.find_spec(NEEDS[r]) is None]
    if missing:
        raise NewsloraError(f"train.report_to={list(t.report_to)} needs {' and '.join(missing)}, not installed: "
                            "pip install 'newslora[tracking]' (or drop it from train.report_to)")
    if t.tracking_uri and "mlflow" not in t.report_to:
        raise NewsloraError(f"train.tracking_uri={t.tracking_uri} is set but train.report_to has no mlflow: add it "
                            "(train.report_to=[mlflow]) or drop train.tracking_uri")


def trainer_report_to(report_to: list[str]) -> list[str] | str:
    """``TrainingArguments.report_to``: the integrations asked for (each once), or ``"none"``."""
    return list(dict.fromkeys(report_to)) or "none"


def tracking_uri(configured: str | None, home: Path) -> str:
    """The MLflow store: ``train.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in ``home``."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(home).resolve() / STORE}"


def use_store(uri: str, home: Path) -> None:
    """Point MLflow at ``uri`` and its experiment (created with its artifacts in ``home/mlartifacts`` when the
    store is the embedded default, whose own default would be ``./mlruns`` under the working directory)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    if mlflow.get_experiment_by_name(name) is None:
        local = uri == f"sqlite:///{Path(home).resolve() / STORE}"
        try:
            mlflow.create_experiment(name, artifact_location=(Path(home) / ARTIFACTS).resolve().as_uri() if local
                                     else None)
        except mlflow.exceptions.MlflowException:  # created by another process meanwhile
            if mlflow.get_experiment_by_name(name) is None:
                raise
    mlflow.set_experiment(name)


@contextmanager
def tensorboard_dir(run_dir: Path, report_to: list[str]):
    """Around the Trainer's construction: its ``TensorBoardCallback`` writes into ``<run folder>/tensorboard``
    (it reads ``TENSORBOARD_LOGGING_DIR`` when it is built); the variable is restored after the block."""
    if "tensorboard" not in report_to:
        yield
        return
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(run_dir) / TENSORBOARD)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = before


def flat_params(data: dict, prefix: str) -> dict:
    """A nested mapping as ``prefix.a.b: str(value)`` parameters (MLflow params are strings)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key))
        else:
            out[key] = str(v)
    return out


def numbers(data: dict, prefix: str) -> dict:
    """The numeric leaves of a nested mapping as ``prefix_a_b: value`` metrics."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}_{k}".replace("/", "_").replace(" ", "_")
        if isinstance(v, dict):
            out.update(numbers(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class EpochMeans(TrainerCallback):
    """Each epoch's exact training means (``epoch_train_loss``/``epoch_train_accuracy``), which ``TrainTally`` puts
    in the log history without a log call, into the active MLflow run."""

    def on_epoch_end(self, args, state, control, **kwargs):
        import mlflow

        last = state.log_history[-1] if state.log_history else {}
        if state.is_world_process_zero and "epoch_train_loss" in last and mlflow.active_run() is not None:
            mlflow.log_metrics({k: last[k] for k in ("epoch_train_loss", "epoch_train_accuracy")},
                               step=state.global_step)


class Tracker(TrainHook):
    """``train.report_to``: TensorBoard needs nothing beyond the Trainer's callback (:func:`tensorboard_dir`). For
    MLflow this hook starts the run before the Trainer is built -- nested under an active run (a search's study),
    or the run ``MLFLOW_RUN_ID`` names -- so the Trainer's ``MLflowCallback`` logs into it and leaves ending it to
    this hook; it logs the recipe, budget and run-folder tag at once, and once the run folder is complete the final
    metrics and the artifacts. ``MLFLOW_RUN_ID`` and ``MLFLOW_NESTED_RUN`` are read here and hidden from the
    callback until the run ends (with them set it would start a run of its own). ``resuming``: a ``--resume`` of the
    run folder reattaches to the latest MLflow run tagged with it, so one folder is one MLflow run; the steps logged
    between the last checkpoint and the stop are logged again, at the same step numbers."""

    HIDDEN = ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN")

    def __init__(self, recipe, run, breakdown, resuming: bool = False):
        self.recipe, self.run = recipe, run
        self.mlflow = "mlflow" in recipe.train.report_to and run.writes
        self.run_id: str | None = None
        self.hidden: dict = {}
        if not self.mlflow:
            return
        import mlflow

        parent = mlflow.active_run()
        if parent is None:  # a search trial runs under its study's run, in the study's store
            use_store(tracking_uri(recipe.train.tracking_uri, run.path.parent), run.path.parent)
        self.hidden = {k: os.environ.pop(k) for k in self.HIDDEN if k in os.environ}
        try:
            nested = parent is not None or self.hidden.get("MLFLOW_NESTED_RUN", "").lower() in ("1", "true", "yes")
            run_id = self.hidden.get("MLFLOW_RUN_ID") or (tagged_run(run.path) if resuming and parent is None
                                                          else None)
            active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run.path.name, nested=nested,
                                      tags={RUN_DIR_TAG: str(run.path.resolve())})
        except BaseException:
            self.restore_env()
            raise
        self.run_id = active.info.run_id
        try:
            if run_id is not None and mlflow.get_run(run_id).data.params:
                # a run with parameters already (a resumed folder's): the callback would log the TrainingArguments
                # again, and MLflow refuses a parameter whose value changed (a run resumed on another machine)
                self.hidden["MLFLOW_MAX_LOG_PARAMS"] = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
                os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
            else:  # a new run, or an empty one MLFLOW_RUN_ID names (e.g. made by an orchestrator)
                b = breakdown
                mlflow.log_params({**flat_params(recipe.to_dict(), "recipe"),
                                   **{f"budget.adapter.{m}": str(n) for m, n in b.by_module.items()}})
                mlflow.log_metrics({"budget_trainable": b.total, "budget_head": b.head, "budget_adapter": b.adapter,
                                    "budget_max_params": b.budget, "budget_used": b.total / b.budget}, step=0)
        except BaseException:
            self.end("FAILED")
            raise

    def configure(self, trainer_cls, kwargs):
        if self.mlflow:
            kwargs["callbacks"] = [*kwargs["callbacks"], EpochMeans()]
        return trainer_cls

    def finish(self, result):
        if self.run_id is None:
            return result
        import mlflow

        try:
            for split, m in result.eval.items():
                mlflow.log_metrics(numbers(m, f"final_{split}"))
            for name in ARTIFACT_FILES:
                if self.run.file(name).is_file():
                    mlflow.log_artifact(str(self.run.file(name)))
            if self.run.plots_dir.is_dir():
                mlflow.log_artifacts(str(self.run.plots_dir), artifact_path=self.run.PLOTS)
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")
        return result

    def abort(self, outcome: str) -> None:
        """Training stopped by an exception: the MLflow run ends as killed (Ctrl-C, SIGTERM) or failed."""
        if self.run_id is not None:
            self.end("KILLED" if outcome in ("interrupted", "terminated") else "FAILED")

    def end(self, status: str) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        self.run_id = None
        self.restore_env()

    def restore_env(self) -> None:
        """The MLflow variables this hook hid or set, as they were before the run."""
        for key, value in self.hidden.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.hidden = {}


def tagged_run(run_dir: Path) -> str | None:
    """The id of the latest MLflow run of the current experiment tagged with ``run_dir``; None if there is none."""
    import mlflow

    exp = mlflow.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    found = mlflow.MlflowClient().search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = "
                                              f"{quoted(str(Path(run_dir).resolve()))}", max_results=1,
                                              order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter (which has no escapes): single quotes, or double
    quotes around a value that holds a single quote."""
    if "'" in value and '"' in value:
        raise NewsloraError(f"MLflow cannot search for {value!r} (it holds both quote characters): rename it")
    return f'"{value}"' if "'" in value else f"'{value}'"


def study_parent(report_to: list[str], configured_uri: str | None, study: str, output: Path) -> str | None:
    """The id of the study's parent MLflow run, found by its tag or created (``newslora search`` creates it once
    before its workers start); None without ``mlflow`` in ``report_to``. The store is the trials' own
    (``train.tracking_uri``, ``$MLFLOW_TRACKING_URI``, else ``<output>/mlflow.db``)."""
    if "mlflow" not in report_to:
        return None
    import mlflow

    output = Path(output)
    use_store(tracking_uri(configured_uri, output), output)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = {quoted(study)}",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(exp.experiment_id, run_name=f"study {study}",
                            tags={STUDY_TAG: study, RUN_DIR_TAG: str(output.resolve())})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def study_run(report_to: list[str], configured_uri: str | None, study: str, output: Path):
    """Around one search trial: the study's parent MLflow run is active, so the trial's run (:class:`Tracker`)
    is nested under it."""
    parent = study_parent(report_to, configured_uri, study, output)
    if parent is None:
        yield
        return
    import mlflow

    mlflow.start_run(run_id=parent)
    try:
        yield
    finally:
        while mlflow.active_run() is not None:  # the study's run, and a trial's if it stopped without ending it
            mlflow.end_run()
