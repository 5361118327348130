"""Value rules for merge-method options, in one place: each option name has one checker, and a few methods check
combinations (breadcrumbs' band, DELLA's probability window). Pure Python: nothing here reads a tensor.

:func:`magic_pl.merging.validate_merge_options` (registry) applies these rules after refusing unknown option names.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

#: Largest accepted ``|scale|``: a merge coefficient beyond it is a typo (e.g. 30 for 0.3 would already be suspect,
#: 1e4 surely is), and would amplify a task vector far past anything a method's paper uses.
SCALE_LIMIT = 1e3
#: Most optimisation steps WUDI accepts (the reference uses 300-400 per matrix).
MAX_STEPS = 100_000

#: Values of the string-valued options.
SLERP_SPACES = ("task", "weights")
DELLA_RESCALES = ("l1", "inverse", "none")


def _fail(method: str, option: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"merge method {method!r}: option {option}={value!r} {rule}")


def _real(method: str, option: str, value: Any) -> float:
    """A finite real number (bools refused: ``density=True`` is a mistake, not 1.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(method, option, value, "must be a real number")
    v = float(value)
    if not math.isfinite(v):
        raise _fail(method, option, value, "must be finite")
    return v


def _integer(method: str, option: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(method, option, value, "must be an integer")
    v = int(value)
    if v < low or (high is not None and v > high):
        raise _fail(method, option, value, f"must lie in [{low}, {high if high is not None else 'inf'}]")
    return v


def _interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[..., float]:
    def check(method: str, option: str, value: Any) -> float:
        v = _real(method, option, value)
        if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
            lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
            raise _fail(method, option, value, f"must lie in {lo}{low:g}, {high:g}{hi}")
        return v

    return check


def _optional(check: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(method: str, option: str, value: Any) -> Any:
        return None if value is None else check(method, option, value)

    return wrapped


def _choice(choices: Sequence[str]) -> Callable[..., str]:
    def check(method: str, option: str, value: Any) -> str:
        if value not in choices:
            raise _fail(method, option, value, f"must be one of {', '.join(map(repr, choices))}")
        return value

    return check


def _scale(method: str, option: str, value: Any) -> float:
    v = _real(method, option, value)
    if abs(v) > SCALE_LIMIT:
        raise _fail(method, option, value, f"is out of range (|{option}| <= {SCALE_LIMIT:g})")
    return v


def _bool(method: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(method, option, value, "must be True or False")
    return value


def _regex(method: str, option: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(method, option, value, "must be a regex string or None")
    try:
        re.compile(value)
    except re.error as err:
        raise _fail(method, option, value, f"is not a valid regex ({err})") from None
    return value


def _nonneg_values(method: str, option: str, value: Any) -> Any:
    """One finite value >= 0, or a sequence of them (one per task)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Real, Sequence)):
        raise _fail(method, option, value, "must be a number >= 0 or a sequence of them (one per task)")
    values = [value] if isinstance(value, numbers.Real) else list(value)
    if not values:
        raise _fail(method, option, value, "must not be empty")
    out = [_real(method, option, v) for v in values]
    if any(v < 0 for v in out):
        raise _fail(method, option, value, "must be >= 0")
    return out[0] if isinstance(value, numbers.Real) else out


def _seed(method: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(method, option, value, "must be an integer")
    return int(value)


def _device(method: str, option: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise _fail(method, option, value, f"is not a torch device ({err})") from None
    return value


_fraction = _interval(0.0, 1.0)

#: option name -> checker ``(method, option, value) -> normalised value``. Every option of every method is here.
RULES: dict[str, Callable[[str, str, Any], Any]] = {
    "scale": _scale,
    "density": _interval(0.0, 1.0, low_open=True),
    "p": _interval(0.0, 1.0, high_open=True),
    "beta": _fraction,
    "gamma": _fraction,
    "tall_lambda": _nonneg_values,
    "min_tasks": lambda m, o, v: _integer(m, o, v, 1),
    "rank_fraction": _optional(_interval(0.0, 1.0, low_open=True)),
    "common_fraction": _fraction,
    "matrix_exclude": _regex,
    "thresholds": _optional(_nonneg_values),
    "global_topk": _bool,
    "seed": _seed,
    "t": _fraction,
    "space": _choice(SLERP_SPACES),
    "dot_threshold": _fraction,
    "eps": _interval(0.0, 1.0, high_open=True),
    "epsilon": _interval(0.0, 0.5, high_open=True),
    "rescale": _choice(DELLA_RESCALES),
    "steps": lambda m, o, v: _integer(m, o, v, 0, MAX_STEPS),
    "lr": _interval(0.0, 1.0, low_open=True),
    "device": _device,
    "then": lambda m, o, v: _choice(_dare_then())(m, o, v),
}


def _dare_then() -> tuple[str, ...]:
    from .dare import DARE_THEN

    return tuple(DARE_THEN)


def check_option(method: str, option: str, value: Any) -> Any:
    """Validate one option value; returns it normalised (numbers as ``float``/``int``)."""
    rule = RULES.get(option)
    if rule is None:  # a method option without a rule is a bug in this package, not in the caller's input
        raise RuntimeError(f"merge method {method!r}: option {option!r} has no validation rule")
    return rule(method, option, value)


def check_combination(method: str, options: Mapping[str, Any]) -> None:
    """Rules that involve several options of one method (``options``: the method's defaults updated by the caller's)."""
    if method == "breadcrumbs" and options["gamma"] < options["beta"]:
        raise ValueError(
            f"merge method 'breadcrumbs': gamma={options['gamma']} must be >= beta={options['beta']} "
            "(the kept band lies between them)"
        )
    if method == "della" and options["density"] < 1.0:
        d, e = options["density"], options["epsilon"]
        if not (d - e > 0.0 and d + e < 1.0):
            raise ValueError(
                f"merge method 'della': keep probabilities density +/- epsilon = [{d - e:g}, {d + e:g}] must lie "
                "in (0, 1); lower epsilon or move density"
            )
