"""Imports every module of :mod:`magic_pl.merging`, so each ``@merge_method`` registers itself on import: a new method
file needs no line anywhere else. The methods shipped here come first, in the order front doors list them (simple to
elaborate, per-tensor before data-based); any other module follows in name order."""

from __future__ import annotations

import importlib
import pkgutil

_LISTED_FIRST = ("basic", "ties", "dare", "breadcrumbs", "consensus", "svd", "slerp", "model_stock", "della", "wudi",
                 "regmean")


def import_all() -> None:
    package = __name__.rpartition(".")[0]
    found = sorted(m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__))
    for name in (*_LISTED_FIRST, *(n for n in found if n not in _LISTED_FIRST and not n.startswith("_"))):
        importlib.import_module(f"{package}.{name}")


import_all()
