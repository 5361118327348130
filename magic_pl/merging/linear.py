"""Linear merge: a weighted sum of the task vectors (MergeKit's ``linear``; a weighted model soup)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Optional

from torch import Tensor

from ._common import prepare
from .method import Linear, merge_method
from .options import Bounded, Flag, PerTask


def _weights(weights: float | Sequence[float], k: int) -> list[float]:
    """One weight per task: a scalar repeated K times, or the K given."""
    return [float(weights)] * k if isinstance(weights, numbers.Real) else [float(w) for w in weights]


def _one_weight_per_task(k: int, options: Mapping[str, Any]) -> Optional[str]:
    w = options["weights"]
    if not isinstance(w, numbers.Real) and len(w) != k:
        return f"linear: {len(w)} weights for K = {k} task vectors (give one per task, or one number)"
    if options["normalize"] and sum(_weights(w, k)) == 0.0:
        return "linear: the weights sum to 0, so normalize=True cannot divide by their sum"
    return None


def _combination(k: int, options: Mapping[str, Any]) -> Linear:
    w = _weights(options["weights"], k)
    return Linear(tuple(w), sum(w) if options["normalize"] else 1.0)


@merge_method(
    name="linear",
    paper="Goddard et al., EMNLP 2024 Industry, arXiv 2403.13257 (MergeKit's linear); Wortsman et al., ICML 2022",
    task_rule=_one_weight_per_task,
    row_separable=True,
    linear=_combination,
)
def linear(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    weights: Annotated[float | Sequence[float], PerTask(Bounded())] = 1.0,
    normalize: Annotated[bool, Flag()] = True,
) -> Tensor:
    """``tau_m = sum_k w_k tau_k / (sum_k w_k if normalize else 1)``: MergeKit 0.1.5's ``linear`` merge in task-vector
    space. With normalised weights it equals MergeKit's ``linear`` on full weights, ``theta0 + tau_m``, since the
    weights then sum to 1; equal weights with ``normalize`` give :func:`~magic_pl.merging.basic.weight_average`, bit for
    bit.

    Args:
        weights: one weight per task, or one number for all (default 1.0 each, MergeKit's default ``weight``).
        normalize: divide by the sum of the weights (default ``True``, MergeKit's default).
    """
    ts = prepare(taus, name)
    w = _weights(weights, len(ts))
    message = _one_weight_per_task(len(ts), {"weights": weights, "normalize": normalize})
    if message:
        raise ValueError(message + (f" (key {name!r})" if name else ""))
    # task by task in order, as MergeKit's sum over models; a weight of 1 multiplies exactly
    acc = ts[0] * w[0]
    for t, wk in zip(ts[1:], w[1:]):
        acc.add_(t, alpha=wk)
    return acc.div_(sum(w)) if normalize else acc
