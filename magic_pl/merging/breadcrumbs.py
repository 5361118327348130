"""Model Breadcrumbs: mask the smallest and the largest-magnitude entries, then Task Arithmetic
(Davari & Belilovsky, ECCV 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import check_fraction, count_of, kth_smallest, prepare


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


def breadcrumbs(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    beta: float = 0.85,
    gamma: float = 0.993,
    scale: float = 0.3,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
    Masks", ECCV 2024): per tensor (the paper's per-layer masks), drop each tau_k's bottom ``beta`` fraction by
    magnitude (noise) and its top ``1 - gamma`` fraction (outliers), then ``scale * sum_k``.

    Defaults: beta = 0.85 (85% smallest masked) and gamma = 0.993 (top 0.7% masked), the paper's recommended
    setting (its reference hyper-parameter search starts from keep 15%, drop top 0.6%); scale = 0.3, Task
    Arithmetic's coefficient (the paper tunes alpha on validation data). The reference code masks each row of a
    matrix separately; this implementation masks per tensor, the per-layer rule the paper states.
    """
    beta = check_fraction(beta, "beta")
    gamma = check_fraction(gamma, "gamma")
    if gamma < beta:
        raise ValueError(f"breadcrumbs: gamma={gamma} must be >= beta={beta} (keep the band between them)")
    ts = prepare(taus, name)
    acc = torch.zeros_like(ts[0])
    for t in ts:
        acc.add_(torch.where(breadcrumbs_mask(t, beta, gamma), t, torch.zeros((), dtype=t.dtype, device=t.device)))
    return acc.mul_(float(scale))
