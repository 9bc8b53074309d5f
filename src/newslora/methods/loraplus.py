"""LoRA+: plain LoRA weights, trained with a larger learning rate for B than for A (``loraplus.ratio``) through
PEFT's ``create_loraplus_optimizer``. Rank, scale and targets are the ``lora`` section's."""
from __future__ import annotations

from pydantic import Field

from ..sections import Float, Section
from .base import register, register_section
from .lora import Lora


@register_section("loraplus", order=3)
class LoraPlusSection(Section):
    """LoRA+'s own option (method=loraplus)."""

    ratio: Float = Field(16.0, gt=0)
    """learning-rate ratio lr(B) / lr(A) (the paper's lambda; 16 is its default)"""


class LoraPlus(Lora):
    name, display, order = "loraplus", "LoRA+", 5

    def optimizer(self, model, recipe):
        import torch
        from peft.optimizers import create_loraplus_optimizer

        opt_cls = torch.optim.SGD if recipe.train.optimizer == "sgd" else torch.optim.AdamW
        return create_loraplus_optimizer(model=model, optimizer_cls=opt_cls, lr=recipe.train.lr,
                                         loraplus_lr_ratio=recipe.loraplus.ratio,
                                         weight_decay=recipe.train.weight_decay)


register(LoraPlus())
