"""SLERP of two task vectors (or two models), row by row: each output row is interpolated on its own sphere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Optional

import torch
from torch import Tensor

from ._common import prepare
from .method import merge_method
from .options import Fraction, Interval, OneOf


def slerp_rows(a: Tensor, b: Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), one output row at a time, in float32.

    Rows are the leading axis (``[out, -1]`` views; a 1-D tensor is ``out`` rows of one entry, a scalar one row). Per
    row with angle ``theta`` between ``a_i`` and ``b_i``: ``sin((1 - t) theta) / sin(theta) a_i + sin(t theta) /
    sin(theta) b_i``. Linear interpolation ``(1 - t) a_i + t b_i`` where the rows are near-colinear or antipodal
    (``|cos theta| > dot_threshold``) and where either row's norm is ``<= eps`` (no direction to rotate along).
    """
    shape = a.shape
    x = a.reshape(shape[0], -1) if a.dim() > 0 else a.reshape(1, 1)
    y = b.reshape(x.shape)
    if x.shape[1] == 0:
        return torch.zeros_like(a)
    na = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    degenerate = (na <= eps) | (nb <= eps)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    # Normalise before multiplying (no overflow of the raw dot), as MergeKit does.
    dot = ((x / torch.where(degenerate, one, na)) * (y / torch.where(degenerate, one, nb))).sum(dim=1, keepdim=True)
    dot = dot.clamp(-1.0, 1.0)
    linear = degenerate | (dot.abs() > dot_threshold)
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))  # no 0/0 on the unselected branch
    sin_theta = torch.where(linear, one, torch.sin(theta))
    coef_a = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, torch.full_like(dot, t), torch.sin(t * theta) / sin_theta)
    return (coef_a * x + coef_b * y).reshape(shape)


def _two_endpoints(k: int, options: Mapping[str, Any]) -> Optional[str]:
    """K = 2 task vectors (``space="task"``); K = 1 (base -> expert) or 2 (expert -> expert) models (``"weights"``)."""
    space = options["space"]
    if space == "task" and k != 2:
        return f"slerp interpolates two task vectors (space='task'), got K = {k}"
    if space == "weights" and k not in (1, 2):
        return f"slerp interpolates two models (space='weights': base and one expert, or two experts), got K = {k}"
    return None


@merge_method(
    name="slerp",
    paper="Shoemake, SIGGRAPH 1985 (spherical interpolation, applied row by row as MergeKit 0.1.5 does)",
    min_tasks=1,
    max_tasks=2,
    task_rule=_two_endpoints,
    needs_base=lambda options: options["space"] == "weights",
)
def slerp(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    base: Tensor | None = None,
    t: Fraction = 0.5,
    space: Annotated[str, OneOf(("task", "weights"))] = "task",
    dot_threshold: Fraction = 0.9995,
    eps: Annotated[float, Interval(0.0, 1.0, high_open=True)] = 1e-8,
) -> Tensor:
    """SLERP merge (Shoemake 1985, as model merging uses it): row-by-row spherical interpolation, see
    :func:`slerp_rows`. Defaults: ``t = 0.5`` (the midpoint, the MAGIC reference code's rule), ``dot_threshold =
    0.9995`` and ``eps = 1e-8`` (the linear fallback of MergeKit 0.1.5 and FusionBench 0.2.33).

    Args:
        t: interpolation weight of the second endpoint, in [0, 1].
        space: ``"task"`` (default): interpolate the two task vectors ``tau_1 -> tau_2`` (K must be 2).
            ``"weights"``: interpolate full weights and return the result minus the base, as MergeKit 0.1.5's
            ``slerp`` does (its ``base_model`` is the t = 0 endpoint): with K = 2 the endpoints are the two experts
            ``theta0 + tau_1 -> theta0 + tau_2`` (a MergeKit recipe whose ``base_model`` is the first expert); with
            K = 1 they are the base and the expert ``theta0 -> theta0 + tau_1`` (a recipe whose ``base_model`` is
            the pretrained model). Needs ``base`` (the drivers pass it: ``merge(..., base=...)`` or
            :func:`~magic_pl.merging.merge_models`).
        base: the base model's tensor (context from the drivers, not an option).

    K > 2 is refused: Multi-SLERP/NuSLERP generalisations are different methods. Differences from MergeKit: a row
    whose norm is ``<= eps`` takes the linear rule here (MergeKit rotates it against an unnormalised dot), and MergeKit
    also accepts a per-layer list of ``t`` values, which here is one value per call.
    """
    ts = prepare(taus, name)
    where = f" for {name!r}" if name else ""
    if space == "task":
        if len(ts) != 2:
            raise ValueError(f"slerp interpolates two task vectors (space='task'), got K = {len(ts)}{where}")
        return slerp_rows(ts[0], ts[1], float(t), dot_threshold=dot_threshold, eps=eps)
    if space != "weights":
        raise ValueError(f"slerp: unknown space={space!r}; valid: 'task', 'weights'")
    if base is None:
        raise ValueError(f"slerp(space='weights') needs the base model's tensor{where}: pass base=")
    b = base.to(device=ts[0].device, dtype=torch.float32)
    if b.shape != ts[0].shape:
        raise ValueError(f"slerp: base shape {tuple(b.shape)} differs from the task vectors' "
                         f"{tuple(ts[0].shape)}{where}")
    if len(ts) == 1:
        v0, v1 = b, b + ts[0]
    elif len(ts) == 2:
        v0, v1 = b + ts[0], b + ts[1]
    else:
        raise ValueError(f"slerp(space='weights') interpolates two models (base and one expert, or two experts), "
                         f"got K = {len(ts)}{where}")
    return slerp_rows(v0, v1, float(t), dot_threshold=dot_threshold, eps=eps).sub_(b)
