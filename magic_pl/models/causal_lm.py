"""Causal language models (Llama family and other ``AutoModelForCausalLM`` architectures): the whole model is merged.

Tied input/output embeddings (``tie_word_embeddings``: ``lm_head.weight`` shares ``model.embed_tokens.weight``) are
merged once, under the canonical key; the alias is left out of the experts and task vectors, so the merged and
calibrated model keeps them tied, and ``save_pretrained`` writes them once, as ``transformers`` does. Experts whose
vocabulary, size or tying differ from the base fail with a message naming the config field or key.

The model is held in memory (about one model plus the lazily read expert tensors of one key at a time). For models
larger than memory, merge + WSC with :func:`magic_pl.models.streaming.stream_merge`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from magic_pl.models._hf import (
    check_config,
    dtype_kwargs,
    expert_body_state,
    from_pretrained_checked,
    load_config,
    resolve_dtype,
)
from magic_pl.models.base import (
    KeyView,
    MergeSetup,
    ModelAdapter,
    default_task_names,
    find_tied_keys,
    parameters_on_meta,
)
from magic_pl.models.io import save_pretrained_atomic
from magic_pl.statedict import CheckpointError, load_state_dict

__all__ = ["CausalLMAdapter"]

PathLike = Union[str, os.PathLike]


class CausalLMAdapter(ModelAdapter):
    """Hugging Face causal LMs -> :class:`~magic_pl.models.base.MergeSetup` with the whole model as the body.

    Args:
        base: the pretrained model directory (or hub id, when a network is available).
        experts: fine-tuned model directories of the same architecture (``save_pretrained`` layout; safetensors
            experts are read lazily, tensor by tensor).
        task_names: one name per expert (default: the directory names).
        dtype: the dtype the base is loaded in: ``"float32"`` (default, exact arithmetic for calibration),
            ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's).
        max_shard_size: largest safetensors shard when saving (default ``"5GB"``, as ``transformers``).
        trust_pickle: read the experts' torch weight files (``pytorch_model.bin``) with full pickle, only for files
            you trust (default ``False``: ``weights_only=True``). ``from_pretrained`` (the base, and experts whose
            keys need ``transformers``' conversions) applies ``transformers``' own loading rules.
    """

    def __init__(self, base: str, experts: list[str], task_names: Optional[list[str]] = None,
                 dtype: Optional[str] = "float32", max_shard_size: str = "5GB", trust_pickle: bool = False):
        if not experts:
            raise ValueError("need at least one expert model")
        self.base_path = str(base)
        self.expert_paths = [str(e) for e in experts]
        self.task_names = default_task_names(self.expert_paths, task_names)
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.trust_pickle = trust_pickle

    def load_base(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs = dtype_kwargs(self.dtype)
        return from_pretrained_checked(AutoModelForCausalLM, self.base_path, name=f"base {self.base_path}", **kwargs)

    def setup(self) -> MergeSetup:
        model = self.load_base()
        return self._setup(model, load_config(self.base_path))

    def sharded_setup(self) -> MergeSetup:
        """The setup for a merge into shards: the model built from the base's config with its parameters on the meta
        device (in the adapter's ``dtype``; ``"auto"``: the config's), the base tensors read lazily."""
        from transformers import AutoModelForCausalLM

        base_cfg = load_config(self.base_path)
        dtype = resolve_dtype(self.dtype)
        if not isinstance(dtype, torch.dtype):  # "auto": the checkpoint's own dtype, as from_pretrained takes it
            dtype = getattr(base_cfg, "dtype", None) or getattr(base_cfg, "torch_dtype", None) or torch.float32
            dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(base_cfg, **dtype_kwargs(dtype))
        model.eval()
        return self._setup(model, base_cfg, lazy_base=True)

    def _setup(self, model: nn.Module, base_cfg: Any, *, lazy_base: bool = False) -> MergeSetup:
        from transformers import AutoModelForCausalLM

        tied = find_tied_keys(model)
        expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
        base_source = None
        if lazy_base:
            def load_whole():
                m = self.load_base()
                return {k: v for k, v in m.state_dict().items()}

            name = f"base {self.base_path}"
            base_source = KeyView(expert_body_state(self.base_path, expected, prefixes=("",), name=name,
                                                    materialize=load_whole, trust_pickle=self.trust_pickle,
                                                    backend="pread"),
                                  list(expected))
        experts = []
        for path, task in zip(self.expert_paths, self.task_names):
            name = f"expert {task!r}"
            check_config(base_cfg, load_config(path), f"{name} ({path})")

            def materialize(path: str = path, name: str = name):
                m = from_pretrained_checked(AutoModelForCausalLM, path, name=name)
                return {k: v for k, v in m.state_dict().items()}

            # a skeleton's model may not fit one process: read with pread, so read pages do not stay resident
            view = expert_body_state(path, expected, prefixes=("",), name=name, materialize=materialize,
                                     trust_pickle=self.trust_pickle, backend="pread" if lazy_base else "mmap")
            self._check_tied_on_disk(path, tied, name, trust_pickle=self.trust_pickle)
            experts.append(view)
        setup = MergeSetup(
            base=model, experts=experts, task_names=list(self.task_names), heads=None, tied=tied, adapter=self,
            metadata={"family": "causal_lm", "base": self.base_path, "experts": list(self.expert_paths),
                      "model_type": getattr(base_cfg, "model_type", None)},
            base_source=base_source,
        )
        setup.validate()
        return setup

    @staticmethod
    def _check_tied_on_disk(path: str, tied: dict[str, str], name: str, *, trust_pickle: bool = False) -> None:
        """An expert that stores a tied alias must store the same tensor under both names."""
        if not tied:
            return
        sd = load_state_dict(path, trust_pickle=trust_pickle)
        for alias, canonical in tied.items():
            if alias in sd and canonical in sd:
                a, c = sd[alias], sd[canonical]
                if a.shape != c.shape or not torch.equal(a, c):
                    raise CheckpointError(
                        f"{name} ({path}): {alias!r} differs from {canonical!r}, but the base ties them "
                        "(tie_word_embeddings): tied and untied models cannot be merged key for key"
                    )

    def task_model(self, setup: MergeSetup, body: nn.Module, task: str) -> nn.Module:
        return body

    def save_streamed(self, setup: MergeSetup, body: nn.Module, template: nn.Module, path: Optional[PathLike], *,
                      max_shard_size: Optional[str] = None, dtype: Optional[str] = None, overwrite: bool = False,
                      **options: Any) -> Optional[Path]:
        """Write a sharded ``body`` (FSDP2) in ``save_pretrained``'s layout without ever holding it whole: each tensor
        is gathered in turn (collective: every rank calls this, in the same order) and global rank 0 writes it into
        the safetensors shards, in ``dtype`` (default: as held), then the config (``template``'s, the unsharded
        skeleton's), the generation config and the base's tokenizer files. Rank 0 returns ``path``; the others
        write nothing and return ``None``. The options are :meth:`save`'s."""
        import torch.distributed as dist

        from magic_pl.calibration.sharding import is_sharded
        from magic_pl.models.io import ShardedSafetensorsWriter, copy_support_files
        from magic_pl.output import OutputLocation
        from magic_pl.statedict import validate_state_dict

        if options:
            raise TypeError(f"unknown save option(s) for causal LMs: {sorted(options)}")
        target = resolve_dtype(dtype)
        state = body.state_dict(keep_vars=True)
        keys = [k for k in state if k not in setup.tied]  # save_pretrained writes a tied weight once
        write = not dist.is_initialized() or dist.get_rank() == 0
        if write and path is None:
            raise ValueError("save_streamed needs a path on rank 0")
        location = (OutputLocation(path, overwrite=overwrite, inputs=[self.base_path, *self.expert_paths]).check()
                    if write else contextlib.nullcontext())
        with location as out:  # a failed or interrupted write leaves nothing behind (the location aborts)
            writer = None
            if out is not None:
                plan = [(k, tuple(state[k].shape), target if isinstance(target, torch.dtype) else state[k].dtype)
                        for k in keys]
                writer = ShardedSafetensorsWriter(out.stage(), plan,
                                                  max_shard_size=max_shard_size or self.max_shard_size)
            try:
                for key in keys:
                    t = state[key].detach()
                    full = t.full_tensor() if is_sharded(t) else t  # one tensor at a time, on every rank
                    if writer is not None:
                        full = full.cpu()
                        validate_state_dict({key: full}, name="the calibrated model")  # no NaN/Inf is ever written
                        writer.write(key, full.to(target) if isinstance(target, torch.dtype) else full)
                    del full
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            if out is None:
                return None
            writer.close()
            tmp = out.stage()
            config = copy.deepcopy(template.config)
            # what the weights on disk are, as save_pretrained records it
            config.dtype = target if isinstance(target, torch.dtype) else next(template.parameters()).dtype
            config.save_pretrained(tmp)
            generation = getattr(template, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(tmp)
            if Path(self.base_path).is_dir():
                copy_support_files(self.base_path, tmp)
            return out.commit({"content": f"{type(template).__name__}.save_pretrained (gathered tensor by tensor)"})

    def save(self, setup: MergeSetup, body: nn.Module, path: PathLike, *, max_shard_size: Optional[str] = None,
             dtype: Optional[str] = None, overwrite: bool = False, **options: Any) -> Path:
        """``save_pretrained`` (safetensors, sharded above ``max_shard_size``) into ``path`` atomically, with the
        base's tokenizer and other support files copied. ``dtype``: cast before saving (e.g. ``"bfloat16"`` to match
        a bf16 source); default: as held. ``path`` is replaced only when empty, a previous magic-pl output, or with
        ``overwrite``."""
        if options:
            raise TypeError(f"unknown save option(s) for causal LMs: {sorted(options)}")
        tied_before = find_tied_keys(body)
        missing = [a for a in setup.tied if a not in tied_before]
        if missing:
            raise CheckpointError(f"tied weights {missing} were untied in the calibrated model; re-tie before saving")
        target = resolve_dtype(dtype)
        if isinstance(target, torch.dtype) and next(body.parameters()).dtype != target:
            body = copy.deepcopy(body).to(target)  # a copy: the caller's model keeps its dtype
        support = self.base_path if Path(self.base_path).is_dir() else None
        return save_pretrained_atomic(body, path, support_from=support,
                                      max_shard_size=max_shard_size or self.max_shard_size, overwrite=overwrite,
                                      inputs=[self.base_path, *self.expert_paths])
