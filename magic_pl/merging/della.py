"""DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election and disjoint merge
(Deep et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import generator_for, prepare


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


def della(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    density: float = 0.5,
    epsilon: float = 0.15,
    rescale: str = "l1",
    scale: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """DELLA-Merging (Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling", 2024), per tensor:

    1. Drop (MagPrune, :func:`magprune`): within each row, entries are ranked by magnitude and kept with
       probability rising linearly from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), then
       rescaled. Row-wise ranking is the paper's best variant and MergeKit's.
    2. Elect: per entry the sign of the sum of the pruned task vectors (a zero sum elects +, as MergeKit does).
    3. Fuse: the mean over the tasks whose pruned entry has the elected sign (0 if none), times ``scale`` (lambda).

    This is MergeKit 0.1.5's ``della`` with every model's ``weight`` 1 and ``normalize: true``: with the same
    ``torch`` random stream its tensors are equal (see benchmarks/bench_vs_peers.py). Masks are drawn from a
    ``torch.Generator`` seeded from (seed, parameter name, task index), like DARE's.

    Defaults: ``density = 0.5`` (mean keep rate; the paper tunes the drop rate per merge, MergeKit's default 1.0
    prunes nothing), ``epsilon = 0.15`` (MergeKit's default window), ``rescale = "l1"`` (MergeKit's; ``"inverse"``
    is the ``1 / (1 - p_i)`` rule the paper states), ``scale = 1.0`` (the paper's constant lambda, MergeKit's
    default). MergeKit ranks 3-D and 4-D tensors along dim 1; here conv weights are ranked per output row of their
    ``[out, -1]`` view. DARE-TIES remains ``dare`` with ``then="ties"``.
    """
    ts = prepare(taus, name)
    pruned = [magprune(t, float(density), float(epsilon), generator_for(seed, name, k, t.device), rescale)
              for k, t in enumerate(ts)]
    total = torch.zeros_like(ts[0])
    for p in pruned:
        total += p
    elected = torch.where(total >= 0, 1.0, -1.0)
    del total
    merged = torch.zeros_like(ts[0])
    count = torch.zeros_like(ts[0])
    for p in pruned:
        agree = torch.sign(p) == elected
        merged += torch.where(agree, p, torch.zeros((), dtype=p.dtype, device=p.device))
        count += agree
    count[count == 0] = 1.0
    return merged.div_(count).mul_(float(scale))
