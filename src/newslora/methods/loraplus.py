"""LoRA+: plain LoRA weights, trained with a larger learning rate for B than for A (``lora.loraplus_lr_ratio``)
through PEFT's ``create_loraplus_optimizer``."""
from __future__ import annotations

from .base import register
from .lora import Lora


class LoraPlus(Lora):
    name, display, order = "loraplus", "LoRA+", 5

    def optimizer(self, model, recipe):
        import torch
        from peft.optimizers import create_loraplus_optimizer

        opt_cls = torch.optim.SGD if recipe.train.optimizer == "sgd" else torch.optim.AdamW
        return create_loraplus_optimizer(model=model, optimizer_cls=opt_cls, lr=recipe.train.lr,
                                         loraplus_lr_ratio=recipe.lora.loraplus_lr_ratio,
                                         weight_decay=recipe.train.weight_decay)


register(LoraPlus())
