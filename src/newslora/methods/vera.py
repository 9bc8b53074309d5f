"""VeRA: shared frozen random projections, trained per-layer scaling vectors (section ``vera``)."""
from __future__ import annotations

from pydantic import Field

from ..sections import Float, Int, Section
from .base import Method, register, register_section


@register_section("vera", order=2)
class VeraSection(Section):
    """VeRA's own options (method=vera); targets, layers and bias are the ``lora`` section's."""

    r: Int = Field(256, gt=0)
    """rank of the shared frozen random projections (may exceed the layer width, up to 4x)"""
    d_initial: Float = 0.1
    """initial value of the trained scaling vector d"""
    dropout: Float = Field(0.0, ge=0, lt=1)
    """dropout on VeRA's input (instead of lora.dropout)"""


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
