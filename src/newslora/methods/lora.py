"""LoRA and its variants that differ only in PEFT ``LoraConfig`` flags: DoRA (weight-decomposed) and rsLoRA
(rank-stabilised scaling). The ``lora`` section also holds what every method shares: target modules, layers,
alpha, dropout and bias."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import NewsloraError
from .base import Method, positive, register, register_section


@register_section("lora", order=0)
@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    layers: list[int] | None = None  # transform only these encoder layers (default: all)
    bias: Literal["none", "all", "lora_only"] = "none"
    loraplus_lr_ratio: float = 16.0  # LoRA+: lr(B) = ratio * lr(A); used by method=loraplus

    def check(self):
        positive("lora.r", self.r)
        positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise NewsloraError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise NewsloraError("lora.target_modules is empty: name at least one module, e.g. [query, value]")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise NewsloraError(f"lora.layers={self.layers}: give non-negative layer indices, or null for all layers")
        positive("lora.loraplus_lr_ratio", self.loraplus_lr_ratio)


class Lora(Method):
    name, display, order = "lora", "LoRA", 0
    use_dora = use_rslora = False

    def init_weights(self, for_count: bool):
        return True

    def peft_config(self, recipe, common, total_steps, for_count):
        from peft import LoraConfig

        lo = recipe.lora
        return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias=lo.bias, use_dora=self.use_dora,
                          use_rslora=self.use_rslora, init_lora_weights=self.init_weights(for_count), **common)


class Dora(Lora):
    name, display, order = "dora", "DoRA", 2
    use_dora = True


class RsLora(Lora):
    name, display, order = "rslora", "rsLoRA", 3
    use_rslora = True


register(Lora())
register(Dora())
register(RsLora())
