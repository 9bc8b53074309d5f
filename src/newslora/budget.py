"""Budget engine: the exact trainable-parameter table of a recipe, computed on the meta device (no weights)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from .config import Recipe, load_recipe
from .data import label_set
from .errors import NewsloraError
from .model import Breakdown, check_budget, count_trainable, get_rank, rank_key


@dataclass
class BudgetReport:
    recipe: Recipe
    breakdown: Breakdown
    label_names: list[str]

    @property
    def fits(self) -> bool:
        return self.breakdown.fits

    @property
    def rank(self) -> dict:
        """``{"lora.r": 8}`` (``adalora.init_r`` / ``vera.r`` for those methods): the value counted, after auto_fit."""
        fit = self.breakdown.fit
        return {rank_key(self.recipe.method): fit["chosen"] if fit else get_rank(self.recipe)}

    def to_json(self) -> dict:
        return {"name": self.recipe.name, "method": self.recipe.method, "backbone": self.recipe.model.backbone,
                "rank": self.rank, "head_type": self.recipe.head.type, "num_labels": len(self.label_names),
                **self.breakdown.to_dict(), "trainable_share": round(self.breakdown.total / self.breakdown.params, 8)}

    def refusal(self) -> str | None:
        """The over-budget error line with its fix (None when the recipe fits)."""
        try:
            check_budget(self.breakdown, self.recipe)
        except NewsloraError as e:
            return str(e)
        return None

    def print(self, console) -> None:
        b = self.breakdown
        (key, r), = self.rank.items()
        t = Table(title=f"{self.recipe.name}: {self.recipe.method} ({key}={r}, head.type={self.recipe.head.type}) "
                        f"on {self.recipe.model.backbone}")
        t.add_column("group")
        t.add_column("trainable", justify="right")
        for mod, n in b.by_module.items():
            t.add_row(f"adapter: {mod}", f"{n:,}")
        for layer, n in b.by_layer.items():
            if layer != "head":
                t.add_row(f"  layer {layer}", f"{n:,}", style="dim")
        t.add_row("adapter total", f"{b.adapter:,}")
        t.add_row("classification head", f"{b.head:,}")
        t.add_row(f"total ({len(self.label_names)} classes)", f"{b.total:,}", style="bold")
        if b.params:
            t.add_row("share of all parameters", f"{100 * b.total / b.params:.3f}% of {b.params:,}")
        verdict = "fits" if b.fits else "OVER BUDGET"
        t.add_row("budget", f"{b.budget:,} ({100 * b.total / b.budget:.1f}%, {verdict})",
                  style="green" if b.fits else "bold red")
        console.print(t)
        if b.fit:
            f = b.fit
            why = ("capped at the rank limit of the targeted modules" if f["capped"] else
                   f"{f['chosen'] + 1} would need {f['next_trainable']:,}")
            console.print(f"budget.auto_fit: {f['key']} {f['requested']} -> {f['chosen']} ({why})", highlight=False)


def budget_report(config: str | Path | None = None, overrides=()) -> BudgetReport:
    """The trainable count of a recipe for the label set its data resolves to (:func:`newslora.data.label_set`:
    the same classes ``train`` counts), on the meta device."""
    recipe = load_recipe(config, overrides)
    names = label_set(recipe.data)
    return BudgetReport(recipe, count_trainable(recipe, names), names)
