"""Reusable value rules for merge-method options. Pure Python: nothing here reads a tensor.

A method declares each option's rule next to its parameter, ``density: Annotated[float, Interval(0, 1,
low_open=True)] = 0.2`` (or one of the aliases below), and :func:`~magic_pl.merging.method.merge_method` reads it
from the signature. A rule is called as ``rule(method, option, value)``: it returns the value normalised (numbers as
``float``/``int``) or raises ``ValueError`` naming the method, the option and the value.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import torch

#: Largest accepted ``|scale|``: a merge coefficient beyond it is a typo (e.g. 30 for 0.3 would already be suspect,
#: 1e4 surely is), and would amplify a task vector far past anything a method's paper uses.
SCALE_LIMIT = 1e3


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


class Rule:
    """A check of one option value: ``rule(method, option, value) -> normalised value``."""

    def __call__(self, method: str, option: str, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Rule):
    """A finite real number in ``[low, high]`` (either end optionally open)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __call__(self, method: str, option: str, value: Any) -> float:
        v = _real(method, option, value)
        if (v <= self.low if self.low_open else v < self.low) or (v >= self.high if self.high_open else v > self.high):
            lo, hi = ("(" if self.low_open else "["), (")" if self.high_open else "]")
            raise _fail(method, option, value, f"must lie in {lo}{self.low:g}, {self.high:g}{hi}")
        return v


@dataclass(frozen=True)
class Bounded(Rule):
    """A finite real number with ``|value| <= limit`` (merge coefficients: default :data:`SCALE_LIMIT`)."""

    limit: float = SCALE_LIMIT

    def __call__(self, method: str, option: str, value: Any) -> float:
        v = _real(method, option, value)
        if abs(v) > self.limit:
            raise _fail(method, option, value, f"is out of range (|{option}| <= {self.limit:g})")
        return v


@dataclass(frozen=True)
class AtLeast(Rule):
    """A finite real number ``>= low``."""

    low: float

    def __call__(self, method: str, option: str, value: Any) -> float:
        v = _real(method, option, value)
        if v < self.low:
            raise _fail(method, option, value, f"must be >= {self.low:g}")
        return v


@dataclass(frozen=True)
class Integer(Rule):
    """An integer (bools refused) in ``[low, high]``; ``None`` leaves that end open."""

    low: Optional[int] = None
    high: Optional[int] = None

    def __call__(self, method: str, option: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(method, option, value, "must be an integer")
        v = int(value)
        if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            lo = self.low if self.low is not None else "-inf"
            hi = self.high if self.high is not None else "inf"
            raise _fail(method, option, value, f"must lie in [{lo}, {hi}]")
        return v


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a few values (string options such as SLERP's ``space``)."""

    choices: tuple[Any, ...]

    def __call__(self, method: str, option: str, value: Any) -> Any:
        if value not in self.choices:
            raise _fail(method, option, value, f"must be one of {', '.join(map(repr, self.choices))}")
        return value


@dataclass(frozen=True)
class Flag(Rule):
    """``True`` or ``False`` (no truthy stand-ins)."""

    def __call__(self, method: str, option: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _fail(method, option, value, "must be True or False")
        return value


@dataclass(frozen=True)
class Maybe(Rule):
    """``None``, or a value of ``rule``."""

    rule: Rule

    def __call__(self, method: str, option: str, value: Any) -> Any:
        return None if value is None else self.rule(method, option, value)


@dataclass(frozen=True)
class PerTask(Rule):
    """One number or a non-empty sequence of them (one per task), each checked by ``rule`` (an error names the
    element); a sequence comes back as a list."""

    rule: Rule

    def __call__(self, method: str, option: str, value: Any) -> Any:
        if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Real, Sequence)):
            raise _fail(method, option, value, "must be a number or a sequence of numbers (one per task)")
        if isinstance(value, numbers.Real):
            return self.rule(method, option, value)
        if not value:
            raise _fail(method, option, value, "must not be empty")
        return [self.rule(method, option, v) for v in value]


@dataclass(frozen=True)
class Regex(Rule):
    """A regular expression string, or ``None``."""

    def __call__(self, method: str, option: str, value: Any) -> Optional[str]:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _fail(method, option, value, "must be a regex string or None")
        try:
            re.compile(value)
        except re.error as err:
            raise _fail(method, option, value, f"is not a valid regex ({err})") from None
        return value


@dataclass(frozen=True)
class Device(Rule):
    """A ``torch.device`` or a string naming one, or ``None``."""

    def __call__(self, method: str, option: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            torch.device(value)
        except (RuntimeError, TypeError) as err:
            raise _fail(method, option, value, f"is not a torch device ({err})") from None
        return value


@dataclass(frozen=True)
class Names(Rule):
    """A list of strings (module names), or ``None``."""

    def __call__(self, method: str, option: str, value: Any) -> Optional[list[str]]:
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
                not all(isinstance(v, str) for v in value):
            raise _fail(method, option, value, "must be a list of module names")
        return list(value)


# Aliases for the options many methods share.
#: A merge coefficient (lambda), ``|scale| <= 1000``.
Scale = Annotated[float, Bounded()]
#: A fraction in [0, 1].
Fraction = Annotated[float, Interval(0.0, 1.0)]
#: A keep fraction in (0, 1].
Density = Annotated[float, Interval(0.0, 1.0, low_open=True)]
#: A seed for the random masks (any integer).
Seed = Annotated[int, Integer()]
#: A regex of 2-D parameter names that are not treated as matrices, or ``None``.
MatrixExclude = Annotated[Optional[str], Regex()]
