"""Hyper-parameter search: Optuna (seeded TPE + a pruner) over any recipe key, under the parameter budget.

One study = one folder (``studies/<study>`` by default)::

    study.db            SQLite storage (default; any Optuna storage URL works with --storage)
    base.yaml           the base recipe every trial starts from;  space.yaml: the search space
    trials/<number>/    each trial's run folder (recipe.yaml, eval.json, ...) and trial.json
    trials.csv/.xlsx    one row per trial: number, state, value, params, trainable, duration, run dir
    best.yaml           the best trial's recipe, ready to run (``newslora train --config best.yaml``)
    test.json           the best trial evaluated once on the base recipe's test data
    *.png               optimisation history, parameter importances, parallel coordinates
    summary.json

Rules: trials see the validation split only (the test set is neither read nor evaluated during the search);
an over-budget trial is rejected on the meta device before any training (state PRUNED, ``trainable`` recorded);
``--trials N`` is the total of the study, so running the same command again continues an interrupted study.

Space file::

    pruner: median            # median | successive_halving | hyperband | threshold | none, or {type: ..., kwargs}
    sampler: {n_startup_trials: 3}   # TPESampler keyword arguments
    seed: 0                   # sampler seed (default: the base recipe's train.seed)
    baseline: true            # first trial = the base recipe's own values (when the space can express them)
    params:
      train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-2}
      lora.r: {type: int, low: 2, high: 16}
      lora.target_modules: {type: categorical, choices: [[query, value], [query, key, value]]}
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import socket
import sys
import time
import traceback
import types
import typing
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe, load_recipe, read_yaml_mapping, recipe_from_dict, unknown_key_message
from .errors import NewsloraError
from .run import Run, write_json

OPTION_KEYS = ("pruner", "sampler", "seed", "baseline")
KINDS = {"loguniform": "float", "log_uniform": "float", "uniform": "float", "float": "float", "int": "int",
         "categorical": "categorical", "choice": "categorical"}
SPEC_FIELDS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
PRUNERS = ("median", "successive_halving", "hyperband", "threshold", "none")
MAX_FAILS_IN_A_ROW = 3


# ----------------------------------------------------------------------------- the space


@dataclass
class Param:
    """One searched recipe key. Categorical choices that Optuna cannot store (lists, mappings) are stored as
    their YAML text (``[query, value]``) and mapped back to the value."""

    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)  # recipe values
    labels: list = field(default_factory=list)  # what Optuna stores

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return self.decode(trial.suggest_categorical(self.key, self.labels))

    def decode(self, stored):
        """The recipe value of an Optuna parameter value."""
        if self.kind == "categorical":
            return copy.deepcopy(self.choices[self.labels.index(stored)])
        return int(stored) if self.kind == "int" else float(stored)

    def encode(self, value):
        """The Optuna value of a recipe value, or ``None`` when this parameter cannot take it."""
        if self.kind == "categorical":
            return self.labels[self.choices.index(value)] if value in self.choices else None
        if value is None or isinstance(value, bool) or not self.low <= value <= self.high:
            return None
        if self.kind == "int" and (value - self.low) % int(self.step or 1):
            return None
        if self.kind == "float" and self.step and not math.isclose(((value - self.low) / self.step) % 1, 0, abs_tol=1e-9):
            return None
        return value


@dataclass
class Space:
    params: list[Param]
    pruner: Any = "median"
    sampler: dict = field(default_factory=dict)
    seed: int | None = None
    baseline: bool = True
    raw: dict = field(default_factory=dict)  # the file as given (copied into the study folder)
    source: str = "search space"

    def suggest(self, trial) -> dict:
        return {p.key: p.suggest(trial) for p in self.params}

    def decode(self, stored: dict) -> dict:
        by_key = {p.key: p for p in self.params}
        return {k: by_key[k].decode(v) if k in by_key else v for k, v in stored.items()}

    def encode(self, recipe_dict: dict) -> dict | None:
        """Optuna params that reproduce the recipe's own values, or None when the space cannot express them."""
        out = {}
        for p in self.params:
            v = p.encode(_get(recipe_dict, p.key))
            if v is None and not (p.kind == "categorical" and _get(recipe_dict, p.key) is None and None in p.choices):
                return None
            out[p.key] = v
        return out


def load_space(space: str | Path | dict, base: Recipe | None = None) -> Space:
    """Parse and validate a space (a YAML file or a mapping) against the recipe schema and ``base``'s values.

    Every problem is one :class:`NewsloraError` line naming the file and the key.
    """
    where = "search space"
    if not isinstance(space, dict):
        where = str(space)
        space = read_yaml_mapping(space, "search space", "--space", "configs/search-space.yaml")
    raw = copy.deepcopy(space)
    space = dict(space)
    opts = {k: space.pop(k) for k in OPTION_KEYS if k in space}
    params_node = space.pop("params") if "params" in space else space
    if "params" in raw and space:
        raise NewsloraError(f"{where}: unknown option(s) {sorted(space)}; top-level options are "
                            f"{', '.join(OPTION_KEYS)}, and the distributions go under params:")
    if not isinstance(params_node, dict) or not params_node:
        raise NewsloraError(f"{where}: no parameters to search; add e.g. params: {{train.lr: {{type: loguniform, "
                            "low: 1.0e-5, high: 1.0e-2}}")
    base = base or Recipe()
    base_dict = base.to_dict()
    params = [_parse_param(key, spec, where, base_dict) for key, spec in _flatten_space(params_node, where)]
    pruner = opts.get("pruner", "median")
    _pruner_spec(pruner, where)  # validate now
    sampler = opts.get("sampler") or {}
    if not isinstance(sampler, dict):
        raise NewsloraError(f"{where}: sampler must be a mapping of TPESampler arguments, e.g. {{n_startup_trials: 5}}")
    seed = opts.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise NewsloraError(f"{where}: seed must be an integer, got {seed!r}")
    baseline = opts.get("baseline", True)
    if not isinstance(baseline, bool):
        raise NewsloraError(f"{where}: baseline must be true or false, got {baseline!r}")
    return Space(params, pruner, sampler, seed, baseline, raw, where)


def _flatten_space(node: dict, where: str, prefix: str = ""):
    """(key, spec) pairs from dotted keys (``lora.r: {...}``) or nested sections (``lora: {r: {...}}``)."""
    for key, spec in node.items():
        full = f"{prefix}{key}"
        is_section = False
        with contextlib.suppress(NewsloraError):
            is_section = dataclasses.is_dataclass(field_type(full, where))
        if is_section and isinstance(spec, dict) and "type" not in spec:
            yield from _flatten_space(spec, where, full + ".")
        else:
            yield full, spec


def field_type(key: str, where: str = "search space"):
    """The type of a recipe key such as ``lora.r``; an unknown key is one clear error line."""
    cls, parts = Recipe, str(key).split(".")
    tp = Recipe
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise NewsloraError(f"{where}: {key}: {'.'.join(parts[:i])} is not a recipe section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise NewsloraError(f"{where}: {unknown_key_message('.'.join(parts[:i + 1]), part, names)}")
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    return tp


def _parse_param(key: str, spec, where: str, base_dict: dict) -> Param:
    tp = field_type(key, where)
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f"{key}.{f.name}" for f in dataclasses.fields(tp))
        raise NewsloraError(f"{where}: {key} is a recipe section; search its keys instead ({keys})")
    if key == "name" or key == "data.test":
        raise NewsloraError(f"{where}: {key} cannot be searched (the search sets it for every trial)")
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise NewsloraError(f"{where}: {key}: give a distribution, e.g. {{type: loguniform, low: 1.0e-5, high: 1.0e-2}}, "
                            f"{{type: int, low: 2, high: 16}} or {{type: categorical, choices: [...]}}")
    kind = KINDS.get(str(spec["type"]).lower())
    if kind is None:
        raise NewsloraError(f"{where}: {key}: unknown distribution type {spec['type']!r}; choose one of: "
                            f"{', '.join(KINDS)}")
    extra = set(spec) - SPEC_FIELDS[kind]
    if extra:
        raise NewsloraError(f"{where}: {key}: unknown field(s) {sorted(extra)} for type {spec['type']}; valid: "
                            f"{', '.join(sorted(SPEC_FIELDS[kind]))}")
    check = lambda value, what: _check_value(base_dict, key, value, f"{where}: {key}: {what}")  # noqa: E731
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise NewsloraError(f"{where}: {key}: categorical needs a non-empty list of choices")
        choices = [check(c, f"choice {c!r}") for c in choices]
        scalar = all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)
        labels = list(choices) if scalar else [_label(c) for c in choices]
        if len(set(map(repr, labels))) != len(labels):
            raise NewsloraError(f"{where}: {key}: duplicate choices {choices}")
        return Param(key, "categorical", choices=choices, labels=labels)
    field_tp = _base_type(tp)
    if field_tp not in (int, float):
        raise NewsloraError(f"{where}: {key} is not numeric; use {{type: categorical, choices: [...]}}")
    if field_tp is int and kind == "float":
        raise NewsloraError(f"{where}: {key} is an integer key; use {{type: int, low: ..., high: ...}} "
                            "(add log: true for a log scale)")
    bounds = {}
    for b in ("low", "high"):
        if b not in spec:
            raise NewsloraError(f"{where}: {key}: {spec['type']} needs low and high")
        bounds[b] = _number(spec[b], f"{where}: {key}: {b}")
    low, high = bounds["low"], bounds["high"]
    if kind == "int" and (low != int(low) or high != int(high)):
        raise NewsloraError(f"{where}: {key}: int bounds must be whole numbers, got low={low}, high={high}")
    log = bool(spec.get("log", str(spec["type"]).lower() in ("loguniform", "log_uniform")))
    step = _number(spec["step"], f"{where}: {key}: step") if spec.get("step") is not None else None
    if not low < high:
        raise NewsloraError(f"{where}: {key}: low={low} must be < high={high}")
    if log and low <= 0:
        raise NewsloraError(f"{where}: {key}: a log scale needs low > 0, got {low}")
    if log and step not in (None, 1):
        raise NewsloraError(f"{where}: {key}: step cannot be combined with a log scale")
    if step is not None and step <= 0:
        raise NewsloraError(f"{where}: {key}: step must be > 0")
    if kind == "int":
        low, high = int(low), int(high)
    check(low, f"low={low}")
    check(high, f"high={high}")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _label(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _number(value, what: str) -> float:
    if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NewsloraError(f"{what} must be a number, got {value!r}")
    return value


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _check_value(base_dict: dict, key: str, value, what: str):
    """The value as the recipe stores it; NewsloraError when the base recipe with this value is invalid."""
    d = copy.deepcopy(base_dict)
    _set(d, key, value)
    try:
        r = recipe_from_dict(d)
    except NewsloraError as e:
        raise NewsloraError(f"{what}: {e}") from None
    return _get(r.to_dict(), key)


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _set(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def _pruner_spec(spec, where: str = "search space") -> tuple[str, dict]:
    if isinstance(spec, str) or spec is None:
        name, kwargs = (spec or "none"), {}
    elif isinstance(spec, dict) and "type" in spec:
        kwargs = dict(spec)
        name = str(kwargs.pop("type"))
    else:
        raise NewsloraError(f"{where}: pruner must be a name ({', '.join(PRUNERS)}) or {{type: name, ...arguments}}")
    name = name.lower().replace("-", "_")
    if name not in PRUNERS:
        raise NewsloraError(f"{where}: unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")
    return name, kwargs


def make_pruner(spec, where: str = "search space"):
    import optuna

    name, kwargs = _pruner_spec(spec, where)
    if name == "median":
        kwargs = {"n_startup_trials": 3, "n_warmup_steps": 0, **kwargs}  # optuna's 5 startup trials: too many here
    cls = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
           "none": optuna.pruners.NopPruner}[name]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise NewsloraError(f"{where}: pruner {name}: {e}") from None


def make_sampler(space: Space, seed: int | None):
    import optuna

    try:
        return optuna.samplers.TPESampler(seed=seed, **{"constant_liar": True, **space.sampler})
    except (TypeError, ValueError) as e:
        raise NewsloraError(f"{space.source}: sampler: {e}") from None


# ----------------------------------------------------------------------------- trials


def trial_recipe(base_dict: dict, params: dict, name: str) -> Recipe:
    """The recipe of one trial: base + sampled values, with the test set switched off."""
    d = copy.deepcopy(base_dict)
    for key, value in params.items():
        _set(d, key, value)
    d["name"] = name
    d["data"]["test"] = None
    d["data"]["source"] = _train_only_source(d["data"]["source"])
    return recipe_from_dict(d)


def _train_only_source(source: str) -> str:
    """A data folder holds train and test files: point trials at the train file so the test file is never read."""
    path = Path(source).expanduser()
    if path.is_dir():
        from .data import find_split_file

        return str(find_split_file(path, "train"))
    return source


def make_pruning_callback(trial, metric: str):
    """A TrainerCallback reporting ``eval_<metric>`` to the trial at each evaluation; raises TrialPruned."""
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


def open_storage(url: str):
    import optuna

    if url.startswith("sqlite"):  # several processes on one file: wait for the lock instead of failing
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 300}})
    return url


def counted(trial) -> bool:
    """Trials that count towards --trials: all but those cut short by Ctrl-C or a crash (a failed trial that
    reported its failure has a ``reason``; an interrupted one is marked ``interrupted``)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.WAITING:
        return False
    if trial.state == TrialState.FAIL:
        return "reason" in trial.user_attrs and not trial.user_attrs.get("interrupted")
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialises 'count the trials, then ask for one' between local worker processes."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _claim(study, job: Job):
    with _file_lock(Path(job.output) / ".claim.lock"):
        if sum(counted(t) for t in study.get_trials(deepcopy=False)) >= job.n_trials:
            return None
        trial = study.ask()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("worker", job.worker)
    return trial


def _console():
    from rich.console import Console

    return Console(stderr=True)


def run_worker(job: Job) -> int:
    """Claim and run trials until the study holds ``job.n_trials`` counted trials; returns how many ran here."""
    import optuna

    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial's outcome is printed below
    space = load_space(job.space, recipe_from_dict(copy.deepcopy(job.base)))
    storage = open_storage(job.storage)
    study = optuna.load_study(study_name=job.study_name, storage=storage, pruner=make_pruner(job.pruner))
    # a seed per worker and per continuation: parallel workers and a resumed study do not replay the same draws
    seed = None if job.seed is None else job.seed + 7919 * job.worker + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(space, seed)
    ran = fails = 0
    while (trial := _claim(study, job)) is not None:
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

    from . import train as train_mod
    from .model import count_trainable

    con = _console()
    out = Path(job.output)
    run_dir = out / "trials" / str(trial.number)
    run = Run(run_dir)
    trial.set_user_attr("run_dir", f"trials/{trial.number}")
    if run_dir.exists():  # left by an earlier study of the same name whose storage was deleted
        con.print(f"[yellow]trial {trial.number}: removing stale folder {run_dir}[/yellow]")
        shutil.rmtree(run_dir)
    t0 = time.time()

    def finish(state, value=None, reason=None, recipe=None):
        if reason:
            trial.set_user_attr("reason", reason)
        run_dir.mkdir(parents=True, exist_ok=True)
        if recipe is not None and not run.file(Run.RECIPE).exists():
            run.write_recipe(recipe)
        info = {"number": trial.number, "study": job.study_name, "state": state.name, "value": value,
                "params": trial.params, "trainable": trial.user_attrs.get("trainable"), "reason": reason,
                "duration_s": round(time.time() - t0, 3)}
        run.write_trial(info)
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)
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
    try:
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
        _mark_run(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        return finish(TrialState.FAIL, reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
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
        _console().print(f"[bold red]worker {job.worker}: error:[/bold red] {e}", highlight=False)
        sys.exit(2)


# ----------------------------------------------------------------------------- the study


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


def search(recipe: Recipe, space: str | Path | dict | Space, n_trials: int, workers: int = 1,
           storage: str | None = None, study_name: str | None = None, output: str | Path | None = None,
           pruner: str | None = None, seed: int | None = None) -> SearchResult:
    """Run (or continue) a study until it holds ``n_trials`` trials, then write the study folder."""
    import optuna

    if n_trials < 1:
        raise NewsloraError(f"--trials {n_trials}: give a total of at least 1 trial")
    if workers < 1:
        raise NewsloraError(f"--workers {workers}: give at least 1")
    space = space if isinstance(space, Space) else load_space(space, recipe)
    if pruner is not None:
        _pruner_spec(pruner, "--pruner")
        space.pruner = pruner
    study_name = study_name or recipe.name
    if not study_name or "/" in study_name:
        raise NewsloraError(f"--study {study_name!r}: use a plain name such as 'minilm-lr'")
    out = (Path(output) if output is not None else Path("studies") / study_name).resolve()
    storage_url = storage or f"sqlite:///{out / 'study.db'}"
    seed = seed if seed is not None else (space.seed if space.seed is not None else recipe.train.seed)
    base = recipe.to_dict()
    direction = "minimize" if recipe.train.metric == "loss" else "maximize"

    # everything cheap that can fail, before any trial: trial recipe, data (train/validation only), labels
    from .data import load_splits

    probe = trial_recipe(base, {}, f"{study_name}-t0")
    label_names = load_splits(probe.data).label_names

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url), direction=direction,
                                    load_if_exists=True)
    except Exception as e:  # a bad URL, an unreachable server
        raise NewsloraError(f"cannot open study storage {storage_url}: {str(e).splitlines()[0]}") from None
    _check_same_study(study, base, space, direction, storage_url)
    con = _console()
    existing = study.get_trials(deepcopy=False)
    if not existing:
        study.set_user_attr("base_recipe", yaml.safe_dump(_comparable(base), sort_keys=True))
        study.set_user_attr("space", json.dumps(space.raw, default=str))
        study.set_user_attr("metric", recipe.train.metric)
    else:
        con.print(f"continuing study {study_name!r}: {len(existing)} trials so far")
    _fail_stale_trials(study)
    existing = study.get_trials(deepcopy=False)
    # the baseline (the base recipe's own values) runs once; again only if it was interrupted
    if space.baseline and not any(t.user_attrs.get("baseline") and (counted(t) or t.state.name == "WAITING")
                                  for t in existing):
        enc = space.encode(base)
        if enc is not None:
            study.enqueue_trial(enc, user_attrs={"baseline": True})
        elif not existing:
            con.print("[yellow]note: the space cannot express the base recipe's values; no baseline trial[/yellow]")
    (out / "base.yaml").write_text(recipe.to_yaml())
    (out / "space.yaml").write_text(yaml.safe_dump(space.raw, sort_keys=False))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers) if workers > 1 else None
    jobs = [Job(study_name, storage_url, str(out), base, space.raw, n_trials, label_names, seed, space.pruner, w,
                threads) for w in range(workers)]
    try:
        if workers == 1:
            run_worker(jobs[0])
        else:
            _run_processes(jobs)
    except BaseException:  # Ctrl-C or an error: the table and best recipe still show what finished
        with contextlib.suppress(Exception):
            write_results(study_name, storage_url, out, recipe, space, final=False)
        raise
    return write_results(study_name, storage_url, out, recipe, space)


def _run_processes(jobs: list[Job]) -> None:
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
        _console().print("[yellow]note: the search space changed since this study started; earlier trials keep "
                         "their old parameters[/yellow]")


def _fail_stale_trials(study) -> None:
    """Trials left RUNNING by a crashed or killed process on this machine are failed (and not counted)."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid is not None and not _alive(pid):
            _console().print(f"[yellow]trial {t.number}: its process ended without reporting; marked failed[/yellow]")
            study.tell(t.number, state=TrialState.FAIL)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- results


def trials_frame(study, space: Space | None = None):
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    keys = [p.key for p in space.params] if space else []
    keys += sorted({k for t in trials for k in t.params} - set(keys))
    rows = []
    for t in trials:
        rows.append({"number": t.number, "state": t.state.name,
                     "value": t.value if t.values is not None else None,
                     **{k: t.params.get(k) for k in keys},
                     "trainable": t.user_attrs.get("trainable"),
                     "duration_s": round(t.duration.total_seconds(), 2) if t.duration else None,
                     "run_dir": t.user_attrs.get("run_dir"),
                     "baseline": bool(t.user_attrs.get("baseline", False)),
                     "note": t.user_attrs.get("reason", "")})
    return pd.DataFrame(rows, columns=["number", "state", "value", *keys, "trainable", "duration_s", "run_dir",
                                       "baseline", "note"])


def _write_xlsx(df, path: Path) -> None:
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    tmp = path.with_name(path.stem + ".tmp.xlsx")
    with __import__("pandas").ExcelWriter(tmp, engine="openpyxl") as xw:
        df.to_excel(xw, sheet_name="trials", index=False)
        ws = xw.sheets["trials"]
        for cell in ws[1]:
            cell.font = Font(bold=True)
        for i, col in enumerate(df.columns, 1):
            width = max([len(str(col))] + [len(str(v)) for v in df[col].tolist()])
            ws.column_dimensions[get_column_letter(i)].width = min(60, width + 2)
        ws.freeze_panes = "A2"
    tmp.replace(path)


def write_results(study_name: str, storage_url: str, out: Path, base: Recipe, space: Space,
                  final: bool = True) -> SearchResult:
    """trials.csv/.xlsx, best.yaml, plots, the best trial's test metrics (once), summary.json."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    con, notes, plots = _console(), [], []
    df = trials_frame(study, space)
    df.to_csv(out / "trials.csv", index=False)
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
        best_path.write_text(header + recipe.to_yaml())
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
    result = SearchResult(study_name, out, storage_url, len(study.get_trials(deepcopy=False)), counts,
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
        _set(d, key, value)
    d["name"] = name
    return recipe_from_dict(d)


def evaluate_best_on_test(study, best, base: Recipe, out: Path, notes: list[str]) -> dict | None:
    """The best trial on the base recipe's test data: once per best trial (kept in test.json)."""
    path = out / "test.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("trial") == best.number:
            return old
    from .data import load_splits
    from .evaluate import classification_metrics
    from .predict import load_classifier

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
    import optuna
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
            notes.append(f"{name}.png skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
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
