"""Hyper-parameter search: Optuna (seeded TPE + a pruner) over any recipe key, under the parameter budget.

One study = one folder (``studies/<study>`` by default)::

    study.db            SQLite storage (default; --storage postgresql://... shares one study between machines)
    base.yaml           the base recipe every trial starts from;  space.yaml: the search space
    trials/<number>/    each trial's run folder (recipe.yaml, eval.json, ...) and trial.json
    trials.csv/.xlsx    one row per trial: number, state, value, params, trainable, duration, run dir
    best.yaml           the best trial's recipe, ready to run (``newslora train --config best.yaml``)
    test.json           the best trial evaluated once on the base recipe's test data
    *.png               optimisation history, parameter importances, parallel coordinates
    summary.json

Rules: trials see the validation split only (the test set is neither read nor evaluated during the search);
an over-budget trial is rejected on the meta device before any training (state PRUNED, ``trainable`` recorded);
``--trials N`` is the total of the study, so running the same command again continues an interrupted study;
processes on several machines running the same search on one PostgreSQL storage together run exactly N trials,
a dead worker's trial is retried (``storage.py``).

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
from importlib import import_module

# name -> submodule; imported on first use, so that reading a constant of one submodule (the CLI's pruner list) does not
# load the training stack the others import
_EXPORTS = {"SearchResult": "results", "best_recipe": "results", "print_summary": "results", "trials_frame": "results",
            "write_results": "results", "Job": "runner", "make_pruning_callback": "runner", "run_worker": "runner",
            "trial_recipe": "runner", "Param": "space", "Space": "space", "field_type": "space", "load_space": "space",
            "make_pruner": "space", "make_sampler": "space", "open_storage": "storage", "storage_url": "storage",
            "study_lock": "storage", "search": "study"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
