"""Sharding a merged body across processes with torch FSDP2 under Lightning's ``ModelParallelStrategy``.

``ModelParallelStrategy`` builds a 2-D device mesh ``("data_parallel", "tensor_parallel")``, splits the data over the
``data_parallel`` dimension only, and leaves parallelising the model to ``LightningModule.configure_model``. magic-pl
shards the body over the ``tensor_parallel`` dimension (:func:`shard_mesh`; with ``data_parallel_size > 1`` as HSDP:
replicated over ``data_parallel``, sharded within): the ranks of one shard group then receive the same samples in the
same order, which FSDP needs (every forward all-gathers each block's weights, a collective), and the FSC statistics
count each sample once by letting one rank per shard group contribute (:func:`contributes_statistics`). With the
strategy's defaults on one machine (``data_parallel_size = 1``, ``tensor_parallel_size`` = the processes) every rank
holds 1/N of the body and sees every calibration sample.

The body is sharded per repeated block (:func:`repeated_blocks`: the members of every ``ModuleList``/``Sequential`` of
two or more blocks of one class: a transformer's layers, a ViT's blocks), then as a whole, so that the root's own
modules (embedding, final norm, an LM head) form the last group.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

__all__ = ["check_strategy", "shard_mesh", "contributes_statistics", "repeated_blocks", "shard_model",
           "is_fully_sharded", "full_state_dict", "data_parallel_size", "sharded_parameter_numel"]


def _model_parallel(strategy: Any) -> bool:
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:
        return False
    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(strategy: Any) -> None:
    """Refuse Lightning's ``FSDPStrategy`` (FSDP1, GPUs only) with the way out: it wraps the whole LightningModule
    itself, flattening the body's parameters, which the calibration's per-module hooks and fold cannot read; magic-pl
    shards with FSDP2 through ``ModelParallelStrategy``, on GPUs and on CPU."""
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:
        return
    if isinstance(strategy, FSDPStrategy):
        raise ValueError("FSDPStrategy (FSDP1) is not supported: magic-pl shards with FSDP2; use --trainer.strategy "
                         "'{class_path: lightning.pytorch.strategies.ModelParallelStrategy}' (GPUs or CPU)")


def shard_mesh(strategy: Any) -> Optional[Any]:
    """The device mesh to shard the body over for ``strategy``: ``None`` unless it is a ``ModelParallelStrategy``;
    its ``tensor_parallel`` dimension (1-D: plain FSDP) when ``data_parallel_size`` is 1, else the whole 2-D mesh
    (HSDP: replicated over ``data_parallel``, sharded over ``tensor_parallel``)."""
    if not _model_parallel(strategy):
        return None
    mesh = strategy.device_mesh
    return mesh["tensor_parallel"] if mesh["data_parallel"].size() == 1 else mesh


def contributes_statistics(strategy: Any) -> bool:
    """Whether this process's FSC statistics enter the sum over processes: always, except under a sharded body,
    where only the first rank of each shard group counts the samples that the whole group runs."""
    if not _model_parallel(strategy):
        return True
    return strategy.device_mesh["tensor_parallel"].get_local_rank() == 0


def data_parallel_size(trainer: Any) -> int:
    """Processes over which the trainer splits the data (its distributed sampler's replicas): the world size under
    DDP, the ``data_parallel`` size under ``ModelParallelStrategy``; 1 without a trainer."""
    if trainer is None:
        return 1
    try:
        kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
    except RuntimeError:  # a mesh not built yet
        kwargs = None
    if isinstance(kwargs, dict) and "num_replicas" in kwargs:
        return int(kwargs["num_replicas"])
    return int(trainer.world_size)


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: members of every ``nn.ModuleList`` / ``nn.Sequential`` holding two or more
    modules of one class with parameters (transformer layers, ViT blocks), outermost first; a block's own inner lists
    are left to their block."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in inside or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [c for c in module.children() if _owns_parameters(c)]
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        blocks.extend(children)
        for child in children:
            inside.update(id(m) for m in child.modules())
    return blocks


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is already an FSDP2 module (``fully_shard`` applied to it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh: Any) -> int:
    """Apply FSDP2's ``fully_shard`` to every repeated block of ``model``, then to ``model`` itself (the root group:
    whatever no block holds), over ``mesh``; returns the number of blocks. In place."""
    from torch.distributed.fsdp import fully_shard

    blocks = repeated_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a sharded ``model`` on CPU, on global rank 0 (every other rank gets ``{}``).

    Collective: every rank of the model's mesh must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_parameter_numel(model: nn.Module) -> tuple[int, int]:
    """``(entries this rank holds, entries of the whole model)`` over ``model``'s parameters."""
    from magic_pl.calibration.sharding import is_sharded

    local = total = 0
    for p in model.parameters():
        local += (p.to_local() if is_sharded(p) else p).numel()
        total += p.numel()
    return local, total

