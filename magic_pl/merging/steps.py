"""Shared steps of the sparsify-then-combine merges (TIES, DARE, Breadcrumbs, DELLA), one function each.

Sparsify (one task vector at a time): :func:`top_magnitude_mask` (TIES' trim), :func:`dare_drop` (DARE's random drop
and rescale), :func:`breadcrumbs_mask` (Breadcrumbs' magnitude band), :func:`magprune` (DELLA's magnitude-ranked
drop). Combine (the K slices of one parameter): :func:`masked_sum`, :func:`elect_sign` (sign consensus) and
:func:`disjoint_mean` (the mean over the tasks that agree with the elected sign).

Every step accumulates in task order from zeros, with no ``[K, ...]`` float stack: memory stays near the K inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Optional

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------------------------------
# Sparsify
# --------------------------------------------------------------------------------------------------------------------
def count_of(fraction: float, n: int) -> int:
    """``round(fraction * n)``, clipped to [0, n]."""
    return min(n, max(0, int(round(fraction * n))))


def ties_keep_count(density: float, n: int) -> int:
    """Entries TIES keeps out of ``n``: ``int(density * n) + 1``, at most ``n`` (all of them for density 1).

    This is the TIES authors' reference rule (``k = int(d * density)``, then ``abs >= kthvalue(d - k)``, which keeps
    ``k + 1`` distinct magnitudes), also FusionBench 0.2.33's. MergeKit 0.1.5 keeps ``max(1, int(density * n))``.
    """
    if n == 0:
        return 0
    if density >= 1.0:
        return n
    return min(n, int(density * n) + 1)


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest (1-based) entry of a flat tensor, as a 0-d tensor (``torch.kthvalue``; no size limit)."""
    return torch.kthvalue(values, k).values


def top_magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Boolean mask of the :func:`ties_keep_count` (``int(density * numel) + 1``) largest-magnitude entries.

    Entries tied with the threshold are kept too, as in the TIES reference code (``abs >= kth value``).
    """
    n = tau.numel()
    keep = ties_keep_count(density, n) if density > 0 else 0
    if keep == 0 or n == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    if keep >= n:
        return torch.ones_like(tau, dtype=torch.bool)
    mag = tau.abs()
    threshold = kth_smallest(mag.reshape(-1), n - keep + 1)
    return mag >= threshold


def dare_drop(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Zero each entry independently with probability ``p`` and rescale the survivors by ``1 / (1 - p)``.

    Unbiased: ``E[dare_drop(tau)] = tau``.
    """
    keep = torch.rand(tau.shape, generator=generator, device=tau.device, dtype=torch.float32) >= p
    return torch.where(keep, tau / (1.0 - p), torch.zeros((), dtype=tau.dtype, device=tau.device))


def breadcrumbs_mask(tau: Tensor, beta: float, gamma: float) -> Tensor:
    """Keep the entries whose magnitude rank lies between the ``beta`` and ``gamma`` quantiles of the tensor.

    Drops the ``round(beta * n)`` smallest and the ``round((1 - gamma) * n)`` largest magnitudes (entries tied with a
    boundary value are dropped with it).
    """
    n = tau.numel()
    n_low, n_high = count_of(beta, n), count_of(1.0 - gamma, n)
    if n == 0 or n_low + n_high >= n:
        return torch.zeros_like(tau, dtype=torch.bool)
    mag = tau.abs()
    flat = mag.reshape(-1)
    mask = torch.ones_like(tau, dtype=torch.bool)
    if n_low > 0:
        mask &= mag > kth_smallest(flat, n_low)
    if n_high > 0:
        mask &= mag < kth_smallest(flat, n - n_high + 1)
    return mask


def _rows(t: Tensor) -> Tensor:
    """The ``[rows, -1]`` view MagPrune ranks within: a scalar or 1-D tensor is one row, a matrix its rows, a conv
    weight ``[out, in * kh * kw]``."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def magprune_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """Keep probabilities of MagPrune, per row: ``density - epsilon + 2 epsilon (rank - 1) / (n - 1)`` where ``rank``
    (1 = smallest magnitude) orders the row's ``n`` magnitudes; so the row's mean keep rate is ``density`` and the
    largest entries are the likeliest to survive. Returned in the ``[rows, -1]`` layout of :func:`_rows`."""
    x = _rows(tau)
    n = x.shape[1]
    order = torch.argsort(x.abs(), dim=1, descending=False)
    ranks = torch.empty_like(x)
    ranks.scatter_(1, order, torch.arange(1, n + 1, dtype=x.dtype, device=x.device).expand_as(x).contiguous())
    if n > 1:
        rank_norm = ((ranks - 1.0) / float(n - 1)).clamp(0, 1)
    else:
        rank_norm = torch.zeros_like(x)
    return (density - epsilon) + rank_norm * 2 * epsilon


def magprune(tau: Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: str = "l1") -> Tensor:
    """MagPrune one task vector: keep each entry with its :func:`magprune_keep_probabilities` probability, then
    rescale the survivors. ``rescale``: ``"l1"`` multiplies by ``||tau||_1 / ||kept||_1`` (MergeKit 0.1.5's ``della``;
    skipped when either is below 1e-7), ``"inverse"`` divides each survivor by its keep probability (the paper's
    ``1 / (1 - p_i)``: unbiased), ``"none"`` leaves them. ``density >= 1`` returns ``tau`` unchanged."""
    if density >= 1.0:
        return tau
    probs = magprune_keep_probabilities(tau, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    x = _rows(tau)
    kept = x * mask
    if rescale == "inverse":
        kept = kept / probs
    elif rescale == "l1":
        before, after = x.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    elif rescale != "none":
        raise ValueError(f"della: unknown rescale={rescale!r}; valid: 'l1', 'inverse', 'none'")
    return kept.reshape(tau.shape)


# --------------------------------------------------------------------------------------------------------------------
# Combine
# --------------------------------------------------------------------------------------------------------------------
def masked_sum(taus: Sequence[Tensor], masks: Optional[Iterable[Tensor]] = None) -> Tensor:
    """``sum_k where(mask_k, tau_k, 0)`` (``sum_k tau_k`` without masks), accumulated in task order from zeros.

    ``masks`` may be a generator: then one mask is alive at a time (Breadcrumbs).
    """
    zero = torch.zeros((), dtype=taus[0].dtype, device=taus[0].device)
    total = torch.zeros_like(taus[0])
    for t, m in zip(taus, masks if masks is not None else repeat(None)):
        total += t if m is None else torch.where(m, t, zero)
    return total


def elect_sign(taus: Sequence[Tensor], masks: Optional[Sequence[Tensor]] = None, *, zero: str = "majority") -> Tensor:
    """Sign consensus: per entry the sign of :func:`masked_sum`, as ``+1``/``-1`` (float32).

    ``zero`` decides an entry whose sum is exactly 0: ``"majority"`` gives it the majority sign of the tensor's
    elected signs (the TIES reference code's rule; 0 if they balance), ``"plus"`` gives it ``+1`` (MergeKit's DELLA).
    """
    total = masked_sum(taus, masks)
    if zero == "plus":
        return torch.where(total >= 0, 1.0, -1.0)
    elected = torch.sign(total)
    del total
    tied = elected == 0
    if bool(tied.any()):
        elected[tied] = torch.sign(elected.sum())
    return elected


def disjoint_mean(taus: Sequence[Tensor], elected: Tensor, masks: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Per entry, the mean over the tasks whose (masked) entry is nonzero and has the ``elected`` sign; 0 where no
    task agrees (TIES' disjoint merge, DELLA's fuse)."""
    zero = torch.zeros((), dtype=taus[0].dtype, device=taus[0].device)
    merged = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for t, m in zip(taus, masks if masks is not None else repeat(None)):
        agree = (torch.sign(t) == elected) & (t != 0)
        if m is not None:
            agree &= m
        merged += torch.where(agree, t, zero)
        count += agree
    return merged.div_(count.clamp_(min=1.0))
