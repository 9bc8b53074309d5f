"""The method registry and the :class:`Method` base class with every hook's default (plain LoRA behaviour)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import NewsloraError

_METHODS: dict[str, "Method"] = {}
_SECTIONS: dict[str, tuple[int, type]] = {}


@dataclass(frozen=True)
class MethodPlot:
    """A plot a method adds to its runs' ``plots/`` folder, drawn from one of its own files."""

    filename: str  # the PNG's name in plots/
    needs: str  # the run-folder file it is drawn from: no such file, no plot
    # draw(run, png path, title, figure) -> the PNG, or None when the data holds nothing to draw; ``run`` is the
    # :class:`newslora.run.Run`, ``figure(width, height)`` a (Figure, Axes) pair in the report's style, to be
    # saved with ``fig.savefig(path, bbox_inches="tight")``
    draw: Callable[..., Path | None]


class Method:
    """One fine-tuning method. Subclasses override what differs; the defaults are plain LoRA's. Hooks get the
    recipe (:class:`newslora.config.Recipe`) and the run folder (:class:`newslora.run.Run`); neither module is
    imported here, since the recipe model is built from the sections the methods register."""

    name: str = ""
    display: str = ""  # how model cards name it
    order: int = 100  # position in the list of choices (``method=``)
    section: str = "lora"  # the recipe section holding the rank (and the method's own settings)
    rank_attr: str = "r"
    rank_factor: int = 1  # rank limit = this x the narrowest targeted layer's width (budget.auto_fit)
    param_prefixes: tuple[str, ...] = ("lora_",)  # names of the adapter's parameters inside a wrapped module
    constant_params: tuple[str, ...] = ()  # parameters PEFT marks trainable that are constants (not counted)
    keeps_best_checkpoint: bool = True  # load the best validation checkpoint at the end of training
    head_rank_pattern: bool = True  # head.type=lora: the head's dense layer gets rank head.r through rank_pattern
    artifacts: tuple[str, ...] = ()  # the files and folders it writes into a run folder (names relative to it)
    plots: tuple[MethodPlot, ...] = ()  # the plots it adds to the report of its runs

    # ------------------------------------------------------------------ rank

    @property
    def rank_key(self) -> str:
        return f"{self.section}.{self.rank_attr}"

    def get_rank(self, recipe) -> int:
        return getattr(getattr(recipe, self.section), self.rank_attr)

    def set_rank(self, recipe, r: int) -> None:
        setattr(getattr(recipe, self.section), self.rank_attr, int(r))

    def min_rank(self, recipe) -> tuple[int, str]:
        """The smallest rank ``budget.auto_fit`` may choose, and why (empty: no reason beyond rank >= 1)."""
        return 1, ""

    # ------------------------------------------------------------------ recipe and model

    def check_recipe(self, recipe) -> None:
        """Rules that combine the method with other sections (one NewsloraError line)."""

    def check_schedule(self, recipe, total_steps: int) -> None:
        """Checks that need the run's optimizer-step count (before the run folder exists)."""

    def peft_config(self, recipe, common: dict, total_steps: int | None, for_count: bool):
        """The PEFT config. ``common``: target_modules, modules_to_save, task_type (and the head's rank_pattern).
        ``for_count``: built on the meta device for counting, so no data-dependent initialisation."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training hooks

    def optimizer(self, model, recipe):
        """An optimizer for the Trainer, or None for the Trainer's own (``train.optimizer``)."""
        return None

    def callbacks(self, run, total_steps: int) -> list:
        return []

    def before_train(self, model, run, resuming: bool) -> None:
        """Called once the adapter is attached, before the first step."""

    def after_train(self, model, run, global_step: int, callbacks: list) -> dict | None:
        """Called when training ends; a returned mapping is recorded in run.json under the method's name."""
        return None

    def save_adapter(self, model, run) -> None:
        """PEFT ``save_pretrained`` into the run's adapter folder."""
        with warnings.catch_warnings():  # a module pruned to rank 0 (AdaLoRA) has empty tensors: PEFT warns
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            model.save_pretrained(run.adapter_dir)


def register(method: Method) -> Method:
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (a method defined for a while, as tests do)."""
    _METHODS.pop(name, None)


def register_section(name: str, order: int):
    """Class decorator: a recipe section (a :class:`newslora.sections.Section` model) that a method brings, e.g.
    ``adalora``; ``order`` places it among the recipe's sections."""

    def add(cls: type) -> type:
        _SECTIONS[name] = (order, cls)
        return cls

    return add


def get(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise NewsloraError(f"method={name!r} is not valid; choose one of: {', '.join(names())}") from None


def all_methods() -> list[Method]:
    return sorted(_METHODS.values(), key=lambda m: (m.order, m.name))


def names() -> tuple[str, ...]:
    return tuple(m.name for m in all_methods())


def sections() -> list[tuple[str, type]]:
    """(name, section model) of every method's recipe section, in recipe order."""
    return [(n, cls) for n, (_, cls) in sorted(_SECTIONS.items(), key=lambda kv: kv[1][0])]


def plots_of(name: str | None) -> tuple[MethodPlot, ...]:
    """The plots method ``name`` adds; none for a name not registered (a run from another version)."""
    method = _METHODS.get(name or "")
    return method.plots if method else ()


def artifacts() -> dict[str, str]:
    """{run-folder file name: the method that writes it} over every registered method."""
    return {a: m.name for m in all_methods() for a in m.artifacts}


def param_prefixes() -> tuple[str, ...]:
    return tuple(sorted({p for m in _METHODS.values() for p in m.param_prefixes}))


def constant_param_names() -> tuple[str, ...]:
    return tuple(sorted({p for m in _METHODS.values() for p in m.constant_params}))
