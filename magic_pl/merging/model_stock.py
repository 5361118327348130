"""Model Stock: the average of the task vectors, pulled towards the base by their angle (Jang et al., ECCV 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ._common import prepare, tmean
from .method import merge_method


def mean_pairwise_cosine(taus: Sequence[Tensor]) -> float:
    """Mean over the K(K-1)/2 pairs of ``cos(tau_i, tau_j)`` of the flattened tensors (a zero tensor counts as 0).

    Pairwise dot products, no ``[K, ...]`` stack: memory stays at the K inputs.
    """
    flat = [t.reshape(-1) for t in taus]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    total, pairs = 0.0, 0
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            pairs += 1
            if norms[i] > 0.0 and norms[j] > 0.0:
                c = float(torch.dot(flat[i], flat[j])) / (norms[i] * norms[j])
                total += min(1.0, max(-1.0, c))
    return total / pairs


def _two_or_more(k: int, options: Mapping[str, Any]) -> Optional[str]:
    if k < 2:
        return f"model_stock needs at least two task vectors (their angle sets the ratio), got K = {k}"
    return None


@merge_method(
    name="model_stock",
    paper="Jang et al., ECCV 2024, arXiv 2403.19522",
    min_tasks=2,
    task_rule=_two_or_more,
)
def model_stock(taus: Sequence[Tensor], *, name: str = "") -> Tensor:
    """Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024), per tensor:
    ``tau_m = t * mean_k tau_k`` with ``t = K cos / (1 + (K - 1) cos)`` and ``cos`` the mean pairwise cosine of
    that tensor's K task vectors (the paper's per-layer ratio for K models at a common angle). No options.

    As MergeKit 0.1.5's ``model_stock`` (per tensor, ``filter_wise=False``): where ``1 + (K - 1) cos`` is within 1e-6 of
    0 the ratio is undefined and ``t = 0`` (keep the base). MergeKit clamps the norm product at 1e-6 where this
    counts only an exactly zero task vector as orthogonal; FusionBench 0.2.33 averages the pairwise *angles* instead
    of the cosines for K > 2. Needs K >= 2.
    """
    ts = prepare(taus, name)
    k = len(ts)
    if k < 2:
        where = f" for {name!r}" if name else ""
        raise ValueError(f"model_stock needs at least two task vectors (their angle sets the ratio), "
                         f"got K = {k}{where}")
    cos = mean_pairwise_cosine(ts)
    denom = 1.0 + (k - 1) * cos
    ratio = 0.0 if abs(denom) < 1e-6 else k * cos / denom
    return tmean(ts).mul_(ratio)
