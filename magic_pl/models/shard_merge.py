"""Merge straight into an FSDP2-sharded model: no process ever holds the whole base, an expert or the merged model.

:func:`merge_into_shards` takes a body whose parameters were created on the meta device and then sharded with
``fully_shard`` (a *skeleton*: :meth:`~magic_pl.models.base.ModelAdapter.sharded_setup`), allocates each rank's
shards, and fills them key by key with ``theta0 + tau_m`` from the checkpoints on disk
(:class:`~magic_pl.models.streaming.KeyMerger`, the arithmetic of :func:`~magic_pl.models.streaming.stream_merge`,
with the setting's row-separable weight steps):

- a row-separable method (task arithmetic, ...) reads and merges only the rows of this rank's shard, so each rank
  reads about 1/N of every checkpoint;
- any other per-tensor method (TIES' per-tensor trim, TSV-M's SVD, ...) needs the whole tensor: each rank merges it,
  one key at a time, and keeps its rows.

Peak memory per rank: its shards of the body, plus one key's base, K task vectors and merged tensor (whole, or the
shard's rows). The per-module magnitudes the report shows (the experts' and the merge's task-vector norms) are
summed over the shards with one all-reduce, so they equal one process's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor, nn

from magic_pl.calibration.sharding import is_sharded, local_box, sum_over_shards
from magic_pl.models.streaming import KeyMerger, KeyMergeStats, MergeRequest
from magic_pl.statedict import StateDict, apply_delta, is_mergeable

__all__ = ["ShardMergeReport", "merge_into_shards"]


@dataclass
class ShardMergeReport:
    """What :func:`merge_into_shards` did (the same on every rank).

    Attributes:
        expert_sq: per task, the squared norm of its task vector per key.
        merged_sq: the squared norm of the merged task vector (before the weight steps) per key.
        wsc_scales: mean row scale of the weight steps per key they scaled.
        merged, copied: keys merged / copied from the base (integer buffers).
        rows_read: fraction of the floating checkpoint rows this rank read (about 1/N for a row-separable method).
        seconds: wall time.
    """

    expert_sq: list[dict[str, float]] = field(default_factory=list)
    merged_sq: dict[str, float] = field(default_factory=dict)
    wsc_scales: dict[str, float] = field(default_factory=dict)
    merged: int = 0
    copied: int = 0
    rows_read: float = 0.0
    seconds: float = 0.0


def _shard_rows(t: Tensor) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``t``'s first dimension that this rank holds (all of them for an ordinary tensor)."""
    if t.dim() == 0:
        return 0, 1
    if not is_sharded(t):
        return 0, int(t.shape[0])
    shape, offset = local_box(t)
    if any(o for o in offset[1:]) or tuple(shape[1:]) != tuple(t.shape[1:]):
        raise ValueError(f"a tensor sharded along dimension > 0 (global {tuple(t.shape)}, local {tuple(shape)}) "
                         "cannot be filled row by row; FSDP2 shards dimension 0")
    return int(offset[0]), int(offset[0]) + int(shape[0])


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_sharded(t) else t


@torch.no_grad()
def merge_into_shards(model: nn.Module, base_sd: StateDict, expert_sds: Sequence[StateDict], request: MergeRequest, *,
                      tied: Mapping[str, str], device: Union[str, torch.device] = "cpu", bn_stats: str = "average",
                      seed: int = 0, chunk_bytes: Union[int, str] = "256MB") -> ShardMergeReport:
    """Allocate the shards of a sharded skeleton ``model`` on ``device`` and fill them with the merge.

    Args:
        model: the body, ``fully_shard``-ed with its parameters on the meta device; buffers real (computed at
            construction, e.g. rotary frequencies) unless the checkpoint holds them.
        base_sd, expert_sds: the base and the K experts, keyed like ``model.state_dict()`` without the ``tied``
            aliases, read one key (or row block) at a time.
        request: the checked merge request (:func:`~magic_pl.models.streaming.merge_request`).
        tied: alias -> canonical key; aliases share the canonical parameter and are not read.
        device: where the shards live and the arithmetic runs (the rank's device).
        bn_stats, seed, chunk_bytes: as in :class:`~magic_pl.models.streaming.KeyMerger`.

    Returns:
        A :class:`ShardMergeReport`; the norms in it are summed over the shards (collective: every rank of the
        model's mesh calls this, in the same order).
    """
    start = time.perf_counter()
    device = torch.device(device)
    # to_empty reallocates every tensor, buffers too: keep the buffers the constructor computed
    buffers = {k: b.detach().clone() for k, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).get_buffer(attr).copy_(value)
    merger = KeyMerger(base_sd, expert_sds, request, bn_stats=bn_stats, seed=seed, device=device,
                       chunk_bytes=chunk_bytes)
    report = ShardMergeReport(expert_sq=[{} for _ in expert_sds])
    state = model.state_dict(keep_vars=True)
    keys = [k for k in state if k not in tied]
    missing = [k for k in keys if k not in base_sd and k not in buffers]  # buffers: those the constructor made
    if missing:
        raise KeyError(f"the base checkpoint lacks {missing[:5]}, which the model has")
    merged_keys: list[str] = []
    like: list[Tensor] = []
    values: list[float] = []
    read = total = 0
    for key in keys:
        if key not in base_sd:
            continue  # a buffer the constructor computed and the checkpoint does not hold
        target = state[key]
        local = _local(target)
        lo, hi = _shard_rows(target)
        if not is_mergeable(target):
            full = base_sd[key]
            local.copy_(full[lo:hi] if full.dim() else full)
            report.copied += 1
            continue
        stats = KeyMergeStats(track_norms=True)
        sq = [0.0] * len(expert_sds)
        whole = False
        for s, bc, taus, merged in merger.rows(key, tuple(target.shape), target.dtype, stats, row_range=(lo, hi)):
            first = 0 if s is None else s
            n = bc.shape[0] if bc.dim() else 1
            read += n
            whole = whole or (s is None and (lo, hi) != (0, n))  # every rank merged all rows of this key
            # the rows of this block that the shard holds, in block coordinates
            a, b = max(lo, first) - first, min(hi, first + n) - first
            if b <= a:
                continue
            rows = slice(a, b) if bc.dim() else ...
            bc, merged, taus = bc[rows], merged[rows], [t[rows] for t in taus]
            value = apply_delta(bc, merged, key=key, name="merged model", out_dtype=target.dtype)
            if local.dim():
                local[first + a - lo:first + b - lo].copy_(value)
            else:
                local.copy_(value)
            for j, t in enumerate(taus):
                sq[j] += float(t.double().pow(2).sum())
            del bc, taus, merged, value
        total += int(target.shape[0]) if target.dim() else 1
        merged_keys.append(key)
        like.append(target)
        # the merge's norm and the weight steps' scale sum cover the rows merged here: all of them for a
        # whole-tensor merge, which only the shard starting at row 0 then counts
        counts = not whole or lo == 0
        values.extend([*sq, stats.merged_sq if counts else 0.0, stats.scale_sum if counts else 0.0])
    # one all-reduce: each rank summed its own rows
    width = len(expert_sds) + 2
    flat = torch.tensor(values, dtype=torch.float64).view(-1, width)
    flat = sum_over_shards(flat, like) if like else flat
    for i, key in enumerate(merged_keys):
        row = flat[i].tolist()
        for j in range(len(expert_sds)):
            report.expert_sq[j][key] = row[j]
        report.merged_sq[key] = row[-2]
        if request.setting.uses_wsc and row[-1]:
            report.wsc_scales[key] = row[-1] / (int(state[key].shape[0]) if state[key].dim() else 1)
    report.merged = len(merged_keys)
    report.rows_read = read / max(total, 1)
    report.seconds = time.perf_counter() - start
    return report

