"""Sharded weights (torch FSDP2 ``fully_shard``: parameters held as ``DTensor`` shards) in the calibration core.

FSC measures through forward hooks, and inside a sharded block's forward every module holds its full, all-gathered
weights, so the statistics need nothing special. Writing the weights does:

- :func:`reshard` first: FSDP2 leaves the root module's parameters (embedding, final norm, an LM head) unsharded
  after a forward, and a fold written into those temporary full tensors would be thrown away at the next reshard.
- Every tensor is then folded on its local shard (:func:`local_part`), against the matching slice of the base
  tensor theta0 and of a per-channel xi (:func:`local_channels`); no rank ever gathers a full tensor.
- Whatever is summed over a tensor's entries (a norm, "does it differ from the base?") is summed over its shards with
  :func:`sum_over_shards` (one all-reduce over the ranks that hold the shards).

Everything here is a no-op for ordinary tensors and models, and needs no initialised process group unless a tensor is
actually sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["is_sharded", "local_box", "local_part", "local_channels", "reshard", "sum_over_shards"]


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support has no sharded tensors
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a distributed tensor (an FSDP2 parameter, or any ``DTensor``)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_box(t: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local shape, global offset)`` of this rank's shard of the DTensor ``t``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)


def local_part(t: Tensor, full: Tensor) -> tuple[Tensor, Tensor]:
    """``(this rank's shard of t, the matching block of full)``; ``(t, full)`` for an ordinary tensor.

    ``full`` is a tensor of ``t``'s global shape (e.g. the base tensor theta0). The shard is the DTensor's local tensor
    itself, so writing into it in place writes the sharded parameter.
    """
    if not is_sharded(t):
        return t, full
    if tuple(full.shape) != tuple(t.shape):
        raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot pair with a sharded tensor of global shape "
                         f"{tuple(t.shape)}")
    shape, offset = local_box(t)
    block = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return t.to_local(), block


def local_channels(xi: Tensor, t: Tensor, axis: int) -> Tensor:
    """The entries of a per-channel ``xi`` (one per index of ``t``'s ``axis``) that this rank's shard of ``t`` holds;
    ``xi`` itself for an ordinary tensor."""
    if not is_sharded(t):
        return xi
    shape, offset = local_box(t)
    return xi[offset[axis]:offset[axis] + shape[axis]]


def reshard(model: nn.Module) -> None:
    """Put every FSDP2-managed parameter of ``model`` back into its sharded form (FSDP2 keeps the root's parameters
    unsharded after a forward); a no-op for a model that is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _shard_group(like: Tensor) -> Any:
    """The process group over which ``like``'s shards are spread (its mesh dimension with a ``Shard`` placement);
    ``None`` when it is replicated everywhere."""
    dims = [i for i, p in enumerate(like.placements) if p.is_shard()]
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(f"a tensor sharded over {len(dims)} mesh dimensions is not supported (FSDP2 shards over one)")
    return like.device_mesh.get_group(dims[0])


def sum_over_shards(values: Tensor, like: Sequence[Tensor], *, op: str = "sum") -> Tensor:
    """``values`` (one entry per tensor of ``like``, computed on each rank's shards) reduced over the shards
    (``op``: ``"sum"`` or ``"max"``), in one all-reduce; entries of ordinary tensors are left as they are.

    Every sharded tensor of ``like`` must be spread over the same ranks (one FSDP2 mesh). Collective: every rank that
    holds a shard calls it with its own values, in the same order.
    """
    import torch.distributed as dist

    sharded = [i for i, t in enumerate(like) if is_sharded(t)]
    if not sharded:
        return values
    groups = {id(g): g for g in (_shard_group(like[i]) for i in sharded) if g is not None}
    if not groups:  # replicated everywhere: every rank already holds the whole tensor
        return values
    if len(groups) > 1:
        raise ValueError("the sharded tensors are spread over different process groups")
    group = next(iter(groups.values()))
    index = torch.tensor(sharded, dtype=torch.long)
    part = values.index_select(0, index).clone()
    dist.all_reduce(part, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    out = values.clone()
    out[index] = part
    return out

