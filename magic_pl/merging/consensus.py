"""Consensus merging with TALL masks (Wang et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from ._common import prepare, tsum
from .method import merge_method
from .options import AtLeast, Integer, PerTask, Scale


def tall_masks(taus: Sequence[Tensor], tall_lambda: float | Sequence[float] = 0.4) -> list[Tensor]:
    """TALL masks ``m_k = |tau_k| > lambda_k * |tau_MTL - tau_k|`` with ``tau_MTL = sum_k tau_k``.

    Strict ``>`` as in the reference code (tall_masks/src/utils/tallmask_utils.py), so a task with ``tau_k = 0`` is
    never active. ``tall_lambda`` is one value or K values (one per task).
    """
    ts = prepare(taus)
    lams = [float(tall_lambda)] * len(ts) if isinstance(tall_lambda, (int, float)) else [float(x) for x in tall_lambda]
    if len(lams) != len(ts):
        raise ValueError(f"consensus: {len(lams)} tall_lambda values for {len(ts)} task vectors")
    mtl = tsum(ts)
    return [t.abs() > lam * (mtl - t).abs() for t, lam in zip(ts, lams)]


@merge_method(
    name="consensus",
    paper="Wang et al., ICML 2024, arXiv 2405.07813",
    # elementwise (masks, votes and the sum): any block of rows gives the same bits
    row_separable=True,
)
def consensus(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    tall_lambda: Annotated[float | Sequence[float], PerTask(AtLeast(0.0))] = 0.4,
    min_tasks: Annotated[int, Integer(1)] = 2,
    scale: Scale = 0.3,
) -> Tensor:
    """Consensus Task Arithmetic (Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression", ICML 2024): keep the entries of ``tau_MTL = sum_k tau_k`` where at least ``min_tasks`` TALL masks are
    active, result ``scale * mask * tau_MTL``.

    Defaults: min_tasks = 2 (the paper's k = 2: drops "selfish" and "catastrophic" weights); tall_lambda = 0.4, the
    middle of the paper's per-task validation grid {0.2, ..., 0.6} (the paper selects it per task on validation
    data); scale = 0.3, Task Arithmetic's coefficient (the paper tunes alpha on validation data).
    """
    ts = prepare(taus, name)
    masks = tall_masks(ts, tall_lambda)
    votes = torch.zeros(ts[0].shape, dtype=torch.int32, device=ts[0].device)
    for m in masks:
        votes += m
    mtl = tsum(ts)
    keep = votes >= int(min_tasks)
    return torch.where(keep, mtl, torch.zeros((), dtype=mtl.dtype, device=mtl.device)).mul_(float(scale))
