"""LoRA and its variants that differ only in PEFT ``LoraConfig`` flags: DoRA (weight-decomposed) and rsLoRA
(rank-stabilised scaling). The ``lora`` section also holds what every method shares: target modules, layers,
dropout and bias."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..sections import Float, Int, List, Section, Str
from .base import Method, register, register_section


@register_section("lora", order=0)
class LoraSection(Section):
    """LoRA's rank and scale, and what every method shares: the targeted modules and layers, dropout and bias."""

    r: Int = Field(8, gt=0)
    """rank of LoRA's update B @ A (method=lora, dora, rslora, pissa, loraplus)"""
    alpha: Float = Field(16.0, gt=0)
    """LoRA's scale numerator: the update is scaled by alpha / r (rsLoRA: alpha / sqrt(r))"""
    dropout: Float = Field(0.1, ge=0, lt=1)
    """dropout on the adapter's input (every method but VeRA, which has vera.dropout)"""
    target_modules: List(Str) = Field(default_factory=lambda: ["query", "value"], min_length=1,
                                        examples=[["query", "value"]])
    """modules the adapter wraps: names inside each layer (query, value) or the neutral q, k, v, o, ffn_in, ffn_out"""
    layers: List(Int) | None = Field(None, min_length=1, examples=[[8, 9, 10, 11]])
    """transform only these encoder layers (0-based); null: all layers"""
    bias: Literal["none", "all", "lora_only"] = "none"
    """which biases train (every method)"""

    @model_validator(mode="after")
    def _layers_not_negative(self):
        if self.layers is not None and min(self.layers) < 0:
            raise ValueError(f"lora.layers={self.layers}: give non-negative layer indices, or null for all layers")
        return self


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
