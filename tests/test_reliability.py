"""What must not pass silently and is not a one-line refusal: a diverged training fails its run, one run folder is
trained by one process at a time, an interrupted export leaves no temp folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from transformers import TrainerCallback


class NanAfter(TrainerCallback):
    """From optimizer step ``at`` on, the model's embeddings are NaN (a forward hook): a diverged model."""

    def __init__(self, at: int):
        self.at, self.hook = at, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= self.at and self.hook is None:
            embeddings = next(m for name, m in model.named_modules() if name.endswith("embeddings"))
            self.hook = embeddings.register_forward_hook(lambda m, i, out: out * float("nan"))


def test_non_finite_loss_fails_the_run_at_its_first_occurrence(tmp_path):
    from newslora.config import load_recipe
    from newslora.train import train
    from newslora.trainer import NonFiniteLoss

    recipe = load_recipe(None, tiny_overrides(**{"data.max_train_samples": 96, "train.logging_steps": 1,
                                                 "train.eval_steps": "null", "train.batch_size": 16}))
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match="step 2: the loss is nan"):
        train(recipe, run_dir=run, extra_callbacks=[NanAfter(1)])
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["attempts"][-1]["steps"] == 2
    assert info["error"].startswith("NonFiniteLoss: training stopped at step 2: the loss is nan")
    assert not (run / "adapter").exists() and not (run / "eval.json").exists()
    assert not list(run.glob("checkpoints/checkpoint-*"))  # nothing NaN saved to resume from
