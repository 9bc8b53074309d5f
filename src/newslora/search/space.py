"""The search-space language: a YAML file (or mapping) of distributions over recipe keys, validated against the
recipe schema and the base recipe's values before any trial runs, plus the pruner and sampler it names."""
from __future__ import annotations

import contextlib
import copy
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import (Recipe, is_section, key_type, read_yaml_mapping, recipe_from_dict, section_keys, set_key,
                      unknown_key_message)
from ..errors import NewsloraError


OPTION_KEYS = ("pruner", "sampler", "seed", "baseline")
KINDS = {"loguniform": "float", "log_uniform": "float", "uniform": "float", "float": "float", "int": "int",
         "categorical": "categorical", "choice": "categorical"}
SPEC_FIELDS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
PRUNERS = ("median", "successive_halving", "hyperband", "threshold", "none")


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
            given = get_key(recipe_dict, p.key)
            v = p.encode(given)
            if v is None and not (p.kind == "categorical" and given is None and None in p.choices):
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
    pruner_spec(pruner, where)  # validate now
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
        section = False
        with contextlib.suppress(NewsloraError):
            section = is_section(field_type(full, where))
        if section and isinstance(spec, dict) and "type" not in spec:
            yield from _flatten_space(spec, where, full + ".")
        else:
            yield full, spec


def field_type(key: str, where: str = "search space"):
    """The type of a recipe key such as ``lora.r``; an unknown key is one clear error line."""
    cls, parts = Recipe, str(key).split(".")
    tp = Recipe
    for i, part in enumerate(parts):
        if not is_section(cls):
            raise NewsloraError(f"{where}: {key}: {'.'.join(parts[:i])} is not a recipe section")
        names = section_keys(cls)
        if part not in names:
            raise NewsloraError(f"{where}: {unknown_key_message('.'.join(parts[:i + 1]), part, names)}")
        tp = key_type(cls, part)
        cls = tp
    return tp


def _parse_param(key: str, spec, where: str, base_dict: dict) -> Param:
    tp = field_type(key, where)
    if is_section(tp):
        keys = ", ".join(f"{key}.{name}" for name in section_keys(tp))
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
    if not math.isfinite(value):
        raise NewsloraError(f"{what}={value} is not a finite number; give a real bound")
    return value


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _check_value(base_dict: dict, key: str, value, what: str):
    """The value as the recipe stores it; NewsloraError when the base recipe with this value is invalid."""
    d = copy.deepcopy(base_dict)
    set_key(d, key, value)
    try:
        r = recipe_from_dict(d)
    except NewsloraError as e:
        raise NewsloraError(f"{what}: {e}") from None
    return get_key(r.to_dict(), key)


def get_key(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def pruner_spec(spec, where: str = "search space") -> tuple[str, dict]:
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

    name, kwargs = pruner_spec(spec, where)
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
