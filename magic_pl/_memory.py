"""Process memory hygiene for passes over models larger than memory (glibc only; no-ops elsewhere).

Tensors of a few MB are allocated and freed by the thousand while a big model streams through (one key, one row
block, one module's weights per sample). glibc serves allocations above its *dynamic* mmap threshold with ``mmap``
and returns them on free, but every such free raises the threshold to that size (up to 32 MB), so later tensors of the
same size come from the heap, where freed blocks stay resident and fragment: the resident set then grows with the
number of tensors touched although nothing is held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Optional

__all__ = ["trim_heap", "release_large_allocations"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_LIBC: Any = None


def _libc() -> Optional[Any]:
    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (``malloc_trim(0)``)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def release_large_allocations(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more (default 1 MiB) with its own ``mmap``, returned to the
    OS when freed, for the rest of the process (fixes glibc's mmap threshold, which otherwise climbs to 32 MB). Costs
    a page-fault pass per large tensor; used by the paths that stream models larger than memory. Returns whether it
    took effect."""
    lib = _libc()
    return bool(lib is not None and lib.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
