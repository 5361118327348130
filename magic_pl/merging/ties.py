"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ._common import check_fraction, prepare, ties_keep_count, top_magnitude_mask


def ties(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    density: float = 0.2,
    scale: float = 1.0,
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    """TIES-Merging of one tensor (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", 2023).

    1. Trim: keep each tau_k's ``density`` fraction of largest-magnitude entries (paper: top-k with k = 20%), the rest
       set to 0. The count is the TIES authors' reference rule, ``int(density * n) + 1`` out of ``n`` entries (their
       ``kthvalue`` threshold with ``>=``; FusionBench 0.2.33 keeps the same; MergeKit 0.1.5 keeps ``int(density * n)``),
       plus any entry tied with the threshold. Per tensor by default; ``merge(..., global_topk=True)`` computes one threshold per task over all
       tensors, as the paper's code does, and passes it here as ``thresholds``.
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
    # Loop over the K slices with running accumulators (no [K, ...] float stacks): memory ~ K bool masks.
    zero = torch.zeros((), dtype=torch.float32, device=ts[0].device)
    total = torch.zeros_like(ts[0])
    for t, m in zip(ts, masks):
        total += torch.where(m, t, zero)
    elected = torch.sign(total)
    del total
    tied = elected == 0
    if bool(tied.any()):
        elected[tied] = torch.sign(elected.sum())
    merged = torch.zeros_like(ts[0])
    count = torch.zeros_like(ts[0])
    for t, m in zip(ts, masks):
        agree = m & (torch.sign(t) == elected) & (t != 0)
        merged += torch.where(agree, t, zero)
        count += agree
    merged.div_(count.clamp_(min=1.0))
    return merged.mul_(float(scale))


def global_magnitude_thresholds(
    task_vectors: Sequence[Mapping[str, Tensor]], keys: Iterable[str], density: float = 0.2
) -> list[float]:
    """Per-task magnitude threshold keeping the ``density`` fraction of largest entries over all ``keys`` together.

    The global variant of TIES's trim step (the paper's code flattens the whole model); the count kept is
    :func:`~magic_pl.merging._common.ties_keep_count` of the total size. Holds one task's magnitudes
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
