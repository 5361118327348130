"""One conversion of results to JSON values, for every report magic-pl writes (calibration reports, benchmark
results, settings): JSON has no NaN or infinity, no tensors and no paths."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["jsonable"]


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: mappings (keys as strings), sequences and sets as lists, NaN as ``None`` and
    infinities as ``"inf"`` / ``"-inf"``, tensors and arrays as (nested) lists, 0-d ones and numpy scalars as numbers,
    paths as strings, objects with ``to_dict()`` as their dict, anything else as its ``repr``."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if callable(getattr(obj, "tolist", None)):  # torch tensors, numpy arrays and scalars
        return jsonable(obj.tolist())
    if callable(getattr(obj, "to_dict", None)):
        return jsonable(obj.to_dict())
    return repr(obj)
