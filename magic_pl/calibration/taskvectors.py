"""A task vector computed on access, so FSC and WSC can stream K experts without holding K task vectors.

``tau_k[key] = expert_k[key] - base[key]`` in float32 over the base's floating-point keys (DESIGN.md 2), read one key
at a time from any mapping (a :class:`~magic_pl.statedict.LazyStateDict` reads only that tensor from disk).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["LazyTaskVector"]


def _is_float_key(sd: Mapping[str, Tensor], key: str) -> bool:
    dtype_of = getattr(sd, "dtype", None)
    dtype = dtype_of(key) if callable(dtype_of) else sd[key].dtype
    return dtype.is_floating_point


class LazyTaskVector(Mapping[str, Tensor]):
    """Read-only mapping ``key -> finetuned[key] - base[key]`` (float32), computed when indexed.

    Args:
        finetuned: the expert's state dict (any mapping).
        base: the base state dict (any mapping); its floating keys are this mapping's keys.
    """

    def __init__(self, finetuned: Mapping[str, Tensor], base: Mapping[str, Tensor]):
        self.finetuned = finetuned
        self.base = base
        self._keys = [k for k in base if _is_float_key(base, k)]
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        try:
            ft = self.finetuned[key]
        except KeyError:
            raise KeyError(f"the fine-tuned checkpoint lacks key {key!r} of the base") from None
        b = self.base[key]
        if ft.shape != b.shape:
            raise ValueError(f"shape mismatch for {key!r}: base {tuple(b.shape)} vs fine-tuned {tuple(ft.shape)}")
        return ft.to(torch.float32) - b.to(device=ft.device, dtype=torch.float32)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
