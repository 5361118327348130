"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Optional

import numpy as np
import torch
from torch import Tensor

from ._common import check_fraction, prepare
from .method import merge_method
from .options import AtLeast, Density, Flag, Maybe, PerTask, Scale
from .steps import disjoint_mean, elect_sign, ties_keep_count, top_magnitude_mask


def _global_topk(task_vectors: Sequence[Mapping[str, Tensor]], keys: list[str], options: dict[str, Any], *,
                 global_topk: Annotated[bool, Flag()] = False) -> dict[str, Any]:
    """``merge(..., global_topk=True)``: one magnitude threshold per task over all ``keys`` together (the paper's code
    flattens the whole model), given to every per-tensor call as ``thresholds``."""
    if global_topk:
        thresholds = global_magnitude_thresholds(task_vectors, keys, options.get("density", 0.2))
        options = {**options, "thresholds": thresholds}
    return options


def _one_threshold_rule(options: Mapping[str, Any]) -> None:
    if options.get("global_topk") and options["thresholds"] is not None:
        raise ValueError("ties: pass either global_topk=True or thresholds, not both")


@merge_method(
    name="ties",
    paper="Yadav et al., NeurIPS 2023, arXiv 2306.01708",
    prepass=_global_topk,
    check=_one_threshold_rule,
    steps=(top_magnitude_mask, elect_sign, disjoint_mean),
)
def ties(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    density: Density = 0.2,
    scale: Scale = 1.0,
    thresholds: Annotated[Optional[Sequence[float]], Maybe(PerTask(AtLeast(0.0)))] = None,
) -> Tensor:
    """TIES-Merging of one tensor (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", 2023).

    1. Trim: keep each tau_k's ``density`` fraction of largest-magnitude entries (paper: top-k with k = 20%), the rest
       set to 0. The count is the TIES authors' reference rule, ``int(density * n) + 1`` out of ``n`` entries (their
       ``kthvalue`` threshold with ``>=``; FusionBench 0.2.33 keeps the same; MergeKit 0.1.5 keeps
       ``int(density * n)``), plus any entry tied with the threshold. Per tensor by default;
       ``merge(..., global_topk=True)`` computes one threshold per task over all tensors, as the paper's code does, and
       passes it here as ``thresholds``.
    2. Elect: the sign of ``sum_k trimmed_k`` per entry; an entry whose sum is exactly 0 takes the majority sign of the
       tensor's elected signs (the reference code's rule; there over the whole model).
    3. Disjoint merge: the mean over the tasks whose trimmed entry is nonzero and has the elected sign (0 if none).

    Result ``scale * merged``; ``scale`` = lambda = 1.0, the paper's default without validation data.

    Args:
        density: fraction of entries kept per task in (0, 1] (paper default 0.2). Ignored when ``thresholds`` is set.
        scale: lambda (paper default 1.0).
        thresholds: per-task magnitude thresholds (keep ``|tau_k| >= thresholds[k]``), K values.
    """
    ts = prepare(taus, name)
    if thresholds is None:
        density = check_fraction(density, "density", low_open=True)
        masks = [top_magnitude_mask(t, density) for t in ts]
    else:
        if len(thresholds) != len(ts):
            raise ValueError(f"ties: {len(thresholds)} thresholds for {len(ts)} task vectors (key {name!r})")
        masks = [t.abs() >= float(th) for t, th in zip(ts, thresholds)]
    # Running accumulators over the K slices (no [K, ...] float stacks): memory ~ K bool masks.
    elected = elect_sign(ts, masks, zero="majority")
    return disjoint_mean(ts, elected, masks).mul_(float(scale))


def global_magnitude_thresholds(
    task_vectors: Sequence[Mapping[str, Tensor]], keys: Iterable[str], density: float = 0.2
) -> list[float]:
    """Per-task magnitude threshold keeping the ``density`` fraction of largest entries over all ``keys`` together.

    The global variant of TIES's trim step (the paper's code flattens the whole model); the count kept is
    :func:`~magic_pl.merging.steps.ties_keep_count` of the total size. Holds one task's magnitudes
    at a time (one float32 model; numpy's in-place partition, no index tensor).
    """
    density = check_fraction(density, "density", low_open=True)
    keys = list(keys)
    thresholds = []
    for tv in task_vectors:
        sizes = [int(np.prod(tv.shape(k))) if callable(getattr(tv, "shape", None)) else tv[k].numel() for k in keys]
        total = sum(sizes)
        if total == 0:
            thresholds.append(0.0)
            continue
        buf = np.empty(total, dtype=np.float32)
        pos = 0
        for key, size in zip(keys, sizes):
            buf[pos : pos + size] = tv[key].detach().to(torch.float32).abs().reshape(-1).cpu().numpy()
            pos += size
        keep = ties_keep_count(density, total)
        kth = total - keep  # 0-based index of the smallest kept magnitude
        buf.partition(kth)
        thresholds.append(float(buf[kth]))
        del buf
    return thresholds
