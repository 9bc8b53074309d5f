"""Trial execution: one trial = one budget check on the meta device, then one training run (``newslora.train``)
with a pruning callback, recorded in the trial's run folder; workers claim trials until the study is full."""
from __future__ import annotations

import copy
import os
import shutil
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import Recipe, recipe_from_dict, set_key
from ..errors import NewsloraError, first_line
from ..run import Run
from .space import Space, load_space, make_pruner, make_sampler
from .storage import GRACE_FACTOR, HEARTBEAT_S, open_storage, study_lock


MAX_FAILS_IN_A_ROW = 3


def trial_recipe(base_dict: dict, params: dict, name: str) -> Recipe:
    """The recipe of one trial: base + sampled values, with the test set switched off."""
    d = copy.deepcopy(base_dict)
    for key, value in params.items():
        set_key(d, key, value)
    d["name"] = name
    d["data"]["test"] = None
    d["data"]["source"] = _train_only_source(d["data"]["source"])
    return recipe_from_dict(d)


def _train_only_source(source: str) -> str:
    """A data folder holds train and test files: point trials at the train file so the test file is never read."""
    path = Path(source).expanduser()
    if path.is_dir():
        from ..data import find_split_file

        return str(find_split_file(path, "train"))
    return source


def make_pruning_callback(trial, metric: str):
    """A TrainerCallback reporting ``eval_<metric>`` to the trial at each evaluation; raises TrialPruned.

    Custom: Optuna's own ``TransformersPruningCallback`` lives in the separate optuna-integration package (not a
    dependency); this is the same few lines, plus the history the ``loss`` metric's value is taken from."""
    import optuna
    from transformers import TrainerCallback

    class PruningCallback(TrainerCallback):
        def __init__(self):
            self.key = f"eval_{metric}"
            self.history: list[tuple[int, float]] = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not metrics or self.key not in metrics:
                return
            value = float(metrics[self.key])
            self.history.append((state.global_step, value))
            trial.report(value, state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {state.global_step} ({self.key}={value:.4f})")

    return PruningCallback()


@dataclass
class Job:
    """Everything a worker process needs (plain data: it crosses a spawn boundary)."""

    study_name: str
    storage: str
    output: str
    base: dict
    space: dict
    n_trials: int
    label_names: list
    seed: int | None
    pruner: Any
    worker: int = 0
    threads: int | None = None
    heartbeat: int = HEARTBEAT_S


def counted(trial) -> bool:
    """Trials that count towards --trials: all but those cut short by Ctrl-C or a dead worker (a failed trial that
    reported its failure has a ``reason``; an interrupted one is marked ``interrupted``; a worker that died leaves
    its trial without either, failed by the heartbeat and retried). Running trials count: they will finish."""
    from optuna.trial import TrialState

    if trial.state == TrialState.WAITING:
        return False
    if trial.state == TrialState.FAIL:
        return "reason" in trial.user_attrs and not trial.user_attrs.get("interrupted")
    return True


def check_heartbeat(study, heartbeat: int) -> None:
    """Workers of one study beat at one interval: a worker whose interval is shorter than another's would fail that
    worker's live trials as stale. Refused while trials with another interval are running (or were left running by
    a worker that died: only a worker with their interval fails those)."""
    from optuna.trial import TrialState

    others = sorted({t.user_attrs["heartbeat"] for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                     if t.user_attrs.get("heartbeat", heartbeat) != heartbeat})
    if others:
        shown = ", ".join(str(h) for h in others)
        fix = f"use --heartbeat {others[0]}" if len(others) == 1 else "let them end first"
        raise NewsloraError(f"--heartbeat {heartbeat}: study {study.study_name!r} has trials running (or left running "
                            f"by a worker that died) with --heartbeat {shown}; a worker with a shorter interval fails "
                            f"the others' live trials as stale: {fix}")


def _claim(study, storage, job: Job):
    """A trial for this worker, or None with the number of trials still running elsewhere (with a heartbeat).

    Custom rather than Optuna's MaxTrialsCallback: that callback stops a worker only after its trial finished, so
    K parallel workers overshoot --trials by up to K-1. Here failing stale trials (whose retries are enqueued),
    counting and ``study.ask()`` (which takes a waiting trial first) run under one lock on the study, held in the
    storage (see ``storage.study_lock``), so workers on any machine never claim more than --trials."""
    import optuna
    from optuna.trial import TrialState

    with study_lock(storage, job.study_name):
        check_heartbeat(study, job.heartbeat)  # before failing any trial as stale by this worker's interval
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # failed, with their retries enqueued by the storage's callback
        trials = study.get_trials(deepcopy=False)
        if sum(counted(t) for t in trials) >= job.n_trials:
            return None, sum(t.state == TrialState.RUNNING and "heartbeat" in t.user_attrs for t in trials)
        with warnings.catch_warnings():  # Optuna notes that heartbeats are meant for study.optimize: beats below
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        storage.record_heartbeat(trial._trial_id)  # from now on a dead worker's trial goes stale
        trial.set_user_attr("heartbeat", job.heartbeat)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("worker", job.worker)
    return trial, 0


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def run_worker(job: Job) -> int:
    """Claim and run trials until the study holds ``job.n_trials`` counted trials; returns how many ran here."""
    import optuna
    # the thread Study.optimize runs beside each trial; ask/tell trials start it themselves
    from optuna.storages._heartbeat import get_heartbeat_thread

    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial's outcome is printed below
    space = load_space(job.space, recipe_from_dict(copy.deepcopy(job.base)))
    storage = open_storage(job.storage, heartbeat=job.heartbeat)
    study = optuna.load_study(study_name=job.study_name, storage=storage, pruner=make_pruner(job.pruner))
    # a seed per worker and per continuation: parallel workers and a resumed study do not replay the same draws
    seed = None if job.seed is None else job.seed + 7919 * job.worker + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(space, seed)
    ran = fails = 0
    waited = False
    while True:
        trial, running = _claim(study, storage, job)
        if trial is None:
            if not running:
                break
            # the study is full only if those trials finish: wait, to retry any whose worker died
            if not waited:
                stderr_console().print(f"worker {job.worker}: waiting for {running} trial(s) running elsewhere",
                                 highlight=False)
                waited = True
            time.sleep(min(job.heartbeat, 5))
            continue
        waited = False
        with get_heartbeat_thread(trial._trial_id, storage):
            state = _run_trial(study, trial, job, space)
        ran += 1
        fails = fails + 1 if state == "FAIL" else 0
        if fails >= MAX_FAILS_IN_A_ROW:
            raise NewsloraError(f"{fails} trials in a row failed (see {job.output}/trials/*/error.txt); stopping "
                                "the search")
    return ran


def _run_trial(study, trial, job: Job, space: Space) -> str:
    import optuna
    from optuna.trial import TrialState

    from rich.markup import escape

    from .. import tracking
    from .. import train as train_mod
    from ..model import count_trainable

    con = stderr_console()
    out = Path(job.output)
    run_dir = out / "trials" / str(trial.number)
    run = Run(run_dir)
    trial.set_user_attr("run_dir", f"trials/{trial.number}")
    if run_dir.exists():  # left by an earlier study of the same name whose storage was deleted
        con.print(f"[yellow]trial {trial.number}: removing stale folder {run_dir}[/yellow]")
        shutil.rmtree(run_dir)
    t0 = time.time()

    def finish(state, value=None, reason=None, recipe=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        if recipe is not None and not run.file(Run.RECIPE).exists():
            run.write_recipe(recipe)
        info = {"number": trial.number, "study": job.study_name, "state": state.name, "value": value,
                "params": trial.params, "trainable": trial.user_attrs.get("trainable"), "reason": reason,
                "duration_s": round(time.time() - t0, 3)}
        run.write_trial(info)
        try:
            if reason:
                trial.set_user_attr("reason", reason)
            if state == TrialState.COMPLETE:
                study.tell(trial, value)
            else:
                study.tell(trial, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # its heartbeat lapsed: failed, and its retry counts
            con.print(f"[yellow]trial {trial.number}: another worker failed it (no heartbeat for "
                      f"{GRACE_FACTOR * job.heartbeat} s) and enqueued a retry; its result is not recorded[/yellow]")
            run.write_trial({**info, "state": "LAPSED", "reason": "failed by another worker (heartbeat lapsed); "
                             "its retry counts instead"})
            return "LAPSED"
        tag, word = {"COMPLETE": ("green", "complete"), "PRUNED": ("yellow", "pruned"), "FAIL": ("red", "failed")}[
            state.name]
        shown = f" validation {job.base['train']['metric']}={value:.4f}" if value is not None else ""
        con.print(f"[{tag}]trial {trial.number} {word}[/{tag}]{shown}"
                  f"{escape(' - ' + reason) if reason else ''}  params: {escape(_short(trial.params))}",
                  highlight=False)
        return state.name

    try:
        params = space.suggest(trial)
        recipe = trial_recipe(job.base, params, f"{job.study_name}-t{trial.number}")
        b = count_trainable(recipe, job.label_names)
    except NewsloraError as e:
        return finish(TrialState.FAIL, reason=f"invalid recipe: {e}")
    trial.set_user_attr("trainable", b.total)
    if not b.fits:
        return finish(TrialState.PRUNED, recipe=recipe,
                      reason=f"over budget: {b.total:,} trainable > budget.max_params={b.budget:,} (not trained)")
    metric = recipe.train.metric
    callback = make_pruning_callback(trial, metric)
    try:  # with train.report_to=[mlflow], the trial's MLflow run is nested under the study's
        with tracking.study_run(recipe.train.report_to, recipe.train.tracking_uri, job.study_name, out):
            res = train_mod.train(recipe, run_dir=run_dir, extra_callbacks=[callback], evaluate_test=False)
    except optuna.TrialPruned as e:
        _mark_run(run_dir, "pruned", pruned=str(e))
        return finish(TrialState.PRUNED, reason=str(e))
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        finish(TrialState.FAIL, reason="interrupted")
        raise
    except NewsloraError as e:
        _mark_run(run_dir, "failed", error=str(e))
        return finish(TrialState.FAIL, reason=str(e), recipe=recipe)
    except Exception as e:  # one broken trial must not end the study
        run_dir.mkdir(parents=True, exist_ok=True)
        run.write_error(traceback.format_exc())
        _mark_run(run_dir, "failed", error=first_line(e, with_type=True))
        return finish(TrialState.FAIL, reason=first_line(e, None, with_type=True),
                      recipe=recipe)
    if metric == "loss":
        values = [v for _, v in callback.history]
        value = min(values) if values else float("nan")
    else:
        value = float(res.eval["validation"][metric])
    return finish(TrialState.COMPLETE, value=value)


def _mark_run(run_dir: Path, status: str, **extra) -> None:
    """Record a trial that stopped early in its run folder; its checkpoints are of no further use."""
    Run(run_dir).mark_stopped(status, datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra)


def _short(params: dict) -> str:
    return ", ".join(f"{k}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in params.items())


def _worker_main(job: Job) -> None:  # entry point of a spawned worker process
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        run_worker(job)
    except KeyboardInterrupt:
        sys.exit(130)
    except NewsloraError as e:
        stderr_console().print(f"[bold red]worker {job.worker}: error:[/bold red] {e}", highlight=False)
        sys.exit(2)


def run_processes(jobs: list[Job]) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(job,), name=f"newslora-search-{job.worker}") for job in jobs]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them record their trials
        for p in procs:
            p.join(timeout=60)
        raise
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode]
    if any(code == 130 for _, code in bad):
        raise KeyboardInterrupt
    if bad:
        raise NewsloraError(f"search worker(s) failed: {', '.join(f'{n} (exit {c})' for n, c in bad)}")
