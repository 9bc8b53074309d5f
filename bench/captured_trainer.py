"""For the benches that time parts of a step: the Trainer newslora would train a recipe with, built and not trained."""
from __future__ import annotations

from pathlib import Path


def newslora_trainer(overrides: list[str], run_dir: Path):
    """``newslora.train.setup`` on the recipe of ``overrides`` (data tokenized, model and adapter built, budget
    checked): its Trainer, not trained."""
    from newslora.config import load_recipe
    from newslora.train import setup

    return setup(load_recipe(None, overrides), run_dir).trainer
