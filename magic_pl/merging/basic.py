"""Weight averaging and Task Arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._common import prepare, tmean, tsum


def weight_average(taus: Sequence[Tensor], *, name: str = "") -> Tensor:
    """``mean_k tau_k``: the task vector of the uniform weight average of the experts (model soups,
    Wortsman et al. 2022). No options."""
    return tmean(prepare(taus, name))


def task_arithmetic(taus: Sequence[Tensor], *, name: str = "", scale: float = 0.3) -> Tensor:
    """``scale * sum_k tau_k`` (Task Arithmetic, Ilharco et al., ICLR 2023).

    Args:
        scale: the coefficient lambda (default 0.3, the usual choice for 8 ViT tasks; the paper selects lambda on
            held-out validation data). The summed vector, not the mean, is scaled (as in the paper and the MAGIC
            reference code).
    """
    return tsum(prepare(taus, name)).mul_(float(scale))
