"""Budget engine: the exact trainable-parameter table of a recipe, computed on the meta device (no weights)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from .config import Recipe, load_recipe
from .model import Breakdown, count_trainable


@dataclass
class BudgetReport:
    recipe: Recipe
    breakdown: Breakdown

    @property
    def fits(self) -> bool:
        return self.breakdown.fits

    def to_json(self) -> dict:
        return {"name": self.recipe.name, "method": self.recipe.method, "backbone": self.recipe.model.backbone,
                **self.breakdown.to_dict()}

    def print(self, console) -> None:
        b = self.breakdown
        t = Table(title=f"{self.recipe.name}: {self.recipe.method} on {self.recipe.model.backbone}")
        t.add_column("group")
        t.add_column("trainable", justify="right")
        for mod, n in b.by_module.items():
            t.add_row(f"adapter: {mod}", f"{n:,}")
        for layer, n in b.by_layer.items():
            if layer != "head":
                t.add_row(f"  layer {layer}", f"{n:,}", style="dim")
        t.add_row("classification head", f"{b.head:,}")
        t.add_row("total", f"{b.total:,}", style="bold")
        verdict = "fits" if b.fits else "OVER BUDGET"
        t.add_row("budget", f"{b.budget:,} ({100 * b.total / b.budget:.1f}%, {verdict})",
                  style="green" if b.fits else "bold red")
        console.print(t)


def budget_report(config: str | Path | None = None, overrides=()) -> BudgetReport:
    recipe = load_recipe(config, overrides)
    return BudgetReport(recipe, count_trainable(recipe))
