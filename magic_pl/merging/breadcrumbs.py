"""Model Breadcrumbs: mask the smallest and the largest-magnitude entries, then Task Arithmetic
(Davari & Belilovsky, ECCV 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ._common import check_fraction, prepare
from .method import merge_method
from .options import Fraction, Scale
from .steps import breadcrumbs_mask, masked_sum


def _band_rule(options: Mapping[str, Any]) -> None:
    if options["gamma"] < options["beta"]:
        raise ValueError(
            f"merge method 'breadcrumbs': gamma={options['gamma']} must be >= beta={options['beta']} "
            "(the kept band lies between them)"
        )


@merge_method(
    name="breadcrumbs",
    paper="Davari & Belilovsky, ECCV 2024, arXiv 2312.06795",
    check=_band_rule,
    steps=(breadcrumbs_mask, masked_sum),
)
def breadcrumbs(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    beta: Fraction = 0.85,
    gamma: Fraction = 0.993,
    scale: Scale = 0.3,
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
    # one mask alive at a time
    return masked_sum(ts, (breadcrumbs_mask(t, beta, gamma) for t in ts)).mul_(float(scale))
