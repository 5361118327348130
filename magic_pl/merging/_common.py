"""Shared helpers for the per-tensor merge methods: input checks, sums, matrix views, seeds (the sparsify and
combine steps are in :mod:`magic_pl.merging.steps`)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from magic_pl.statedict import CheckpointError

#: 2-D tensors whose name matches this regex are *not* treated as matrices by the SVD methods (tsv_m, iso_c,
#: iso_cts): embedding tables and CLIP's text projection are averaged instead. 4-D conv weights are always matrices.
DEFAULT_MATRIX_EXCLUDE = r"embed|text_projection|(^|\.)wte\.|(^|\.)wpe\."


class MergeError(ValueError):
    """A merge method could not produce a usable tensor for a key (non-finite result, failed linear algebra)."""


def prepare(taus: Sequence[Tensor], name: str = "") -> list[Tensor]:
    """Check the K slices of one parameter and return them as float32 (no copy when already float32).

    Raises :class:`~magic_pl.statedict.CheckpointError` naming the key for K = 0, a non-tensor, a non-float tensor
    or differing shapes. Callers must not modify the returned tensors in place (they may alias the inputs).
    """
    where = f" for {name!r}" if name else ""
    if isinstance(taus, Tensor) or not isinstance(taus, Sequence):
        raise CheckpointError(f"expected a sequence of K task-vector tensors{where}, got {type(taus).__name__}")
    if len(taus) == 0:
        raise CheckpointError(f"need at least one task vector (K >= 1){where}, got none")
    out = []
    for i, t in enumerate(taus):
        if not isinstance(t, Tensor):
            raise CheckpointError(f"task vector {i}{where} is a {type(t).__name__}, not a tensor")
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"task vector {i}{where} has dtype {t.dtype}; merge methods need float tensors")
        out.append(t if t.dtype == torch.float32 else t.to(torch.float32))
    shapes = [tuple(t.shape) for t in out]
    if any(s != shapes[0] for s in shapes):
        raise CheckpointError(f"task vectors disagree in shape{where}: {shapes}")
    return out


def tsum(taus: Sequence[Tensor]) -> Tensor:
    """Sum of the slices in float32, accumulated in order (deterministic, no K-fold stack)."""
    acc = taus[0].clone()
    for t in taus[1:]:
        acc.add_(t)
    return acc


def tmean(taus: Sequence[Tensor]) -> Tensor:
    """Mean of the slices in float32."""
    return tsum(taus).div_(len(taus))


def check_fraction(value: float, option: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """Validate that ``value`` lies in [0, 1] (ends optionally open) and return it as a float."""
    v = float(value)
    lo_ok = v > 0.0 if low_open else v >= 0.0
    hi_ok = v < 1.0 if high_open else v <= 1.0
    if not (lo_ok and hi_ok):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"option {option}={value!r} must lie in {lo}0, 1{hi}")
    return v


def derive_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed derived from (seed, parameter name, task index): stable across runs, machines and key order."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, name: str, index: int, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, name, index))
    return gen


def as_matrix(t: Tensor, name: str, matrix_exclude: str | None) -> Tensor | None:
    """The 2-D view used by the SVD methods, or ``None`` when the tensor is merged by the mean instead.

    2-D tensors are matrices unless their name matches ``matrix_exclude`` (embedding tables); 4-D conv weights
    ``[out, in, kh, kw]`` are viewed as ``[out, in * kh * kw]``; everything else (biases, norms, 3-D position
    embeddings, scalars) is not a matrix.
    """
    if t.dim() == 4:
        return t.reshape(t.shape[0], -1)
    if t.dim() == 2 and min(t.shape) > 0:
        if matrix_exclude and re.search(matrix_exclude, name):
            return None
        return t
    return None


def svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``m = U diag(S) Vh``, returned in float32.

    LAPACK's float32 divide-and-conquer SVD can fail to converge on matrices with many (numerically) repeated
    singular values, e.g. Iso-CTS's residuals after the common subspace is projected out (seen on ViT-B/32-sized
    random task vectors). On that error the SVD is redone in float64 (deterministically: same input, same path).
    """
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
        return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def polar(a: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``a = P S Q^T``: the nearest matrix with orthonormal columns (or rows)."""
    p, _, qh = svd(a)
    return p @ qh
