"""Name helpers shared by WSC and FSC: regex key filters and the sensitive-set membership rule.

A *sensitive set* (docs/method.md) may name parameter tensors (``blocks.0.attn.qkv.weight``, what
:func:`~magic_pl.calibration.sensitivity.detect_sensitive_layers` returns) or modules (``blocks.0.attn.qkv``); both
spellings work for WSC (per tensor) and FSC (per module).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Optional, Union

Patterns = Union[str, Sequence[str], None]


def compile_patterns(patterns: Patterns) -> list[re.Pattern[str]]:
    """Compile one regex or a sequence of regexes (``None`` -> empty list). Matching uses ``re.search``."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"invalid key pattern {p!r}: {err}") from err
    return out


def matches_any(key: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    return any(p.search(key) for p in patterns)


def module_of(key: str) -> str:
    """``"a.b.weight" -> "a.b"``; a top-level key belongs to the root module ``""``."""
    return key.rpartition(".")[0]


def tensor_is_sensitive(key: str, sensitive: Optional[Collection[str]]) -> bool:
    """A tensor is sensitive if its own key or its owning module's name is in ``sensitive``."""
    if not sensitive:
        return False
    return key in sensitive or module_of(key) in sensitive


def module_is_sensitive(name: str, tensor_keys: Iterable[str], sensitive: Optional[Collection[str]]) -> bool:
    """A module is sensitive if its name, or the key of any tensor it owns, is in ``sensitive``."""
    if not sensitive:
        return False
    return name in sensitive or any(k in sensitive for k in tensor_keys)
