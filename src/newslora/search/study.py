"""The study's lifecycle: create or continue it (same base recipe and direction), enqueue the baseline, fail
trials a crashed process left running, start the workers, and write the results (also when interrupted)."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import yaml

from .. import tracking
from ..config import Recipe
from ..errors import NewsloraError
from ..outputs import write_file_atomic
from ..trainer import resolve_precision
from .results import SearchResult, write_results
from .runner import Job, check_heartbeat, counted, run_processes, run_worker, stderr_console, trial_recipe
from .space import Space, load_space, pruner_spec
from .storage import HEARTBEAT_S, open_storage, shown, study_lock
from .storage import storage_url as storage_url_of


def search(recipe: Recipe, space: str | Path | dict | Space, n_trials: int, workers: int = 1,
           storage: str | None = None, study_name: str | None = None, output: str | Path | None = None,
           pruner: str | None = None, seed: int | None = None, heartbeat: int = HEARTBEAT_S) -> SearchResult:
    """Run (or continue) a study until it holds ``n_trials`` trials, then write the study folder.

    Several processes (on several machines, with a PostgreSQL ``storage``) may run the same search at once: together
    they run exactly ``n_trials``; a trial whose process dies is retried after ``3 * heartbeat`` seconds."""
    import optuna

    if n_trials < 1:
        raise NewsloraError(f"--trials {n_trials}: give a total of at least 1 trial")
    if workers < 1:
        raise NewsloraError(f"--workers {workers}: give at least 1")
    if heartbeat < 1:
        raise NewsloraError(f"--heartbeat {heartbeat}: give a whole number of seconds, at least 1")
    tracking.check(recipe.train)  # before any trial starts
    space = space if isinstance(space, Space) else load_space(space, recipe)
    if pruner is not None:
        pruner_spec(pruner, "--pruner")
        space.pruner = pruner
    study_name = study_name or recipe.name
    if not study_name or "/" in study_name:
        raise NewsloraError(f"--study {study_name!r}: use a plain name such as 'minilm-lr'")
    out = (Path(output) if output is not None else Path("studies") / study_name).resolve()
    storage_url = storage_url_of(storage) if storage else f"sqlite:///{out / 'study.db'}"
    seed = seed if seed is not None else (space.seed if space.seed is not None else recipe.train.seed)
    base = recipe.to_dict()
    direction = "minimize" if recipe.train.metric == "loss" else "maximize"

    # everything cheap that can fail, before any trial: trial recipe, data (train/validation only), labels
    from ..data import load_splits

    probe = trial_recipe(base, {}, f"{study_name}-t0")
    # the data's own checks before any trial; its classes are what every trial's budget counts, as budget and train
    # count them (data.label_set's order)
    label_names = load_splits(probe.data).label_names

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
    db = open_storage(storage_url)  # a bad URL or an unreachable server: nothing written
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=study_name, storage=db, direction=direction, load_if_exists=True)
    _check_same_study(study, base, space, direction, shown(storage_url))
    con = stderr_console()
    existing = study.get_trials(deepcopy=False)
    if not existing:
        study.set_user_attr("base_recipe", yaml.safe_dump(_comparable(base), sort_keys=True))
        study.set_user_attr("space", json.dumps(space.raw, default=str))
        study.set_user_attr("metric", recipe.train.metric)
    else:
        con.print(f"continuing study {study_name!r}: {len(existing)} trials so far")
    with study_lock(db, study_name):  # processes starting together enqueue one baseline
        check_heartbeat(study, heartbeat)  # early; every claim checks it again
        existing = study.get_trials(deepcopy=False)
        # the baseline (the base recipe's own values) runs once; again only if it was interrupted
        if space.baseline and not any(t.user_attrs.get("baseline") and (counted(t) or t.state.name == "WAITING")
                                      for t in existing):
            enc = space.encode(base)
            if enc is not None:
                study.enqueue_trial(enc, user_attrs={"baseline": True})
            elif not existing:
                con.print("[yellow]note: the space cannot express the base recipe's values; no baseline "
                          "trial[/yellow]")
    write_file_atomic(out / "base.yaml", lambda tmp: tmp.write_text(recipe.to_yaml()))
    # train.report_to=[mlflow]: the study's MLflow run, created once here; each trial's run is nested under it
    tracking.study_parent(recipe.train.report_to, recipe.train.tracking_uri, study_name, out)
    write_file_atomic(out / "space.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(space.raw, sort_keys=False)))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers) if workers > 1 else None
    worker_base = trial_base(base, threads)
    jobs = [Job(study_name, storage_url, str(out), worker_base, space.raw, n_trials, label_names, seed,
                space.pruner, w, threads, heartbeat) for w in range(workers)]
    try:
        if workers == 1:
            run_worker(jobs[0])
        else:
            run_processes(jobs)
    except BaseException:  # Ctrl-C or an error: the table and best recipe still show what finished
        with contextlib.suppress(Exception):
            write_results(study_name, storage_url, out, recipe, space, final=False)
        raise
    return write_results(study_name, storage_url, out, recipe, space)


def trial_base(base: dict, threads: int | None) -> dict:
    """The base recipe the workers of this machine train from: ``train.precision: auto`` decided here, once, at the
    workers' thread count, so that workers measuring the CPU while the others train cannot give one study's trials
    different precisions."""
    if base.get("train", {}).get("precision", "auto") != "auto":
        return base
    out = copy.deepcopy(base)
    out["train"]["precision"] = resolve_precision("auto", base["train"].get("threads") or threads)
    return out


def _comparable(base: dict) -> dict:
    d = copy.deepcopy(base)
    d.pop("name", None)
    d["train"].pop("threads", None)
    return d


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix.count(".") < 1:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_study(study, base: dict, space: Space, direction: str, url: str) -> None:
    if not study.get_trials(deepcopy=False) and "base_recipe" not in study.user_attrs:
        return
    if study.direction.name.lower() != direction:
        raise NewsloraError(f"study {study.study_name!r} in {url} was created to {study.direction.name.lower()}; "
                            f"this recipe's train.metric needs {direction}: use another --study")
    old = study.user_attrs.get("base_recipe")
    if old is not None:
        before, now = _flat(yaml.safe_load(old)), _flat(_comparable(base))
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            raise NewsloraError(f"study {study.study_name!r} was started from a different base recipe (differs in "
                                f"{', '.join(diff[:6])}); continue it with the same --config and overrides, or start "
                                f"a new one with --study NAME")
    old_space = study.user_attrs.get("space")
    if old_space is not None and json.loads(old_space) != json.loads(json.dumps(space.raw, default=str)):
        stderr_console().print("[yellow]note: the search space changed since this study started; earlier trials keep "
                         "their old parameters[/yellow]")
