"""Weight averaging and Task Arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._common import prepare, tmean, tsum
from .method import Linear, merge_method
from .options import Scale


@merge_method(
    name="weight_average",
    paper="Wortsman et al., ICML 2022 (model soups), arXiv 2203.05482",
    row_separable=True,
    linear=lambda k, options: Linear((1.0,) * k, float(k)),
)
def weight_average(taus: Sequence[Tensor], *, name: str = "") -> Tensor:
    """``mean_k tau_k``: the task vector of the uniform weight average of the experts (model soups,
    Wortsman et al. 2022). No options."""
    return tmean(prepare(taus, name))


@merge_method(
    name="task_arithmetic",
    paper="Ilharco et al., ICLR 2023, arXiv 2212.04089",
    row_separable=True,
    linear=lambda k, options: Linear((float(options["scale"]),) * k),
)
def task_arithmetic(taus: Sequence[Tensor], *, name: str = "", scale: Scale = 0.3) -> Tensor:
    """``scale * sum_k tau_k`` (Task Arithmetic, Ilharco et al., ICLR 2023).

    Args:
        scale: the coefficient lambda (default 0.3, the usual choice for 8 ViT tasks; the paper selects lambda on
            held-out validation data). The summed vector, not the mean, is scaled (as in the paper and the MAGIC
            reference code).
    """
    return tsum(prepare(taus, name)).mul_(float(scale))
