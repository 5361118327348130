"""A task vector computed on access, so FSC and WSC can stream K experts without holding K task vectors.

``tau_k[key] = expert_k[key] - base[key]`` in float32 over the base's floating-point keys, read one key at a time from
any mapping (a :class:`~magic_pl.statedict.LazyStateDict` reads only that tensor from disk). The one implementation
is :class:`magic_pl.statedict.LazyTaskVector` (NaN/Inf refused as each key is computed); this module re-exports it
for the calibration package.
"""

from __future__ import annotations

from magic_pl.statedict import LazyTaskVector

__all__ = ["LazyTaskVector"]
