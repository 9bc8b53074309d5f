"""The building blocks of recipe sections: the strict pydantic base model and the value types of recipe keys.

Every section of a recipe (``model``, ``train``, the methods' own sections, ...) is a :class:`Section`: unknown keys
are refused, numbers must be finite, and values keep their kind. The value types below allow exactly what YAML
and ``key=value`` overrides produce for a right value and nothing more:

- :data:`Float`: an int or float, or text YAML reads as a string but that is a number (``3e-4`` has no dot);
- :data:`Int`: an int, or a whole float (``1.0e6``);
- :data:`Str`: text, or a number written where text is expected (``name: 2024``); booleans are refused, since
  YAML reads ``yes``/``no``/``on``/``off`` as booleans;
- :func:`List`: a list, or one scalar standing for a list of one (``lora.target_modules=query``).
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


class Section(BaseModel):
    """A recipe section: strict kinds, no unknown keys, finite numbers; attribute docstrings document the keys
    (they become the JSON Schema's descriptions)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True,
                              validate_default=False)


def _number_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _text(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _listify(value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value


Float = Annotated[float, BeforeValidator(_number_text)]
Int = Annotated[int, BeforeValidator(_whole)]
Str = Annotated[str, BeforeValidator(_text)]


def List(item) -> Any:  # noqa: N802 - reads as a type in annotations: List(Str)
    """A list of ``item``; a lone scalar is a list of one."""
    return Annotated[list[item], BeforeValidator(_listify)]
