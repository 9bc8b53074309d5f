"""For the benches that time parts of a step: the Trainer newslora would train a recipe with, built and not trained."""
from __future__ import annotations

from pathlib import Path


def newslora_trainer(overrides: list[str], run_dir: Path):
    """Runs ``newslora.train.train`` on the recipe of ``overrides`` up to the point where its Trainer exists (data
    tokenized, model and adapter built, budget checked) and returns that Trainer instead of training."""
    from newslora.config import load_recipe
    from newslora.train import NewsloraTrainer, train

    class Captured(Exception):
        def __init__(self, trainer):
            self.trainer = trainer

    def capture(**kwargs):
        raise Captured(NewsloraTrainer(**kwargs))

    try:
        train(load_recipe(None, overrides), run_dir=run_dir, trainer_factory=capture)
    except Captured as c:
        return c.trainer
    raise RuntimeError("newslora.train.train returned without building its Trainer")
