"""VeRA: shared frozen random projections, trained per-layer scaling vectors (section ``vera``)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, positive, register, register_section


@register_section("vera", order=2)
@dataclass
class VeraSection:
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0

    def check(self):
        positive("vera.r", self.r)


class Vera(Method):
    name, display, order = "vera", "VeRA", 6
    section = "vera"
    rank_factor = 4  # the shared random projections may exceed the layer width (the paper: r=1024 on base)
    param_prefixes = ("vera_",)
    head_rank_pattern = False  # the head's dense layer gets the method's own rank

    def peft_config(self, recipe, common, total_steps, for_count):
        from peft import VeraConfig

        v = recipe.vera
        return VeraConfig(r=v.r, d_initial=v.d_initial, vera_dropout=v.dropout, save_projection=True,
                          bias=recipe.lora.bias, **common)


register(Vera())
