"""Fine-tuning methods: one module per method, each registering itself (as PEFT registers its tuners).

A method module defines what only that method knows -- its recipe section (if it has its own), the key of its
rank, how to build its PEFT config, how its trainable parameters are counted, its optimizer, callback and
saving hooks, and the files it writes into a run folder and the plots it draws from them (``artifacts``,
``plots``) -- and calls :func:`register`. Every module of this package is imported here, so adding a method is
adding one file; nothing else in newslora names a method.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (Method, MethodPlot, all_methods, artifacts, constant_param_names, get, names, param_prefixes,
                   plots_of, register, register_section, sections, unregister)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MethodPlot", "all_methods", "artifacts", "constant_param_names", "get", "names",
           "param_prefixes", "plots_of", "register", "register_section", "sections", "unregister"]
