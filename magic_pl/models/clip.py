"""CLIP image encoders with zero-shot heads: the standard 8-task model-merging benchmark protocol.

The body is the vision tower with its projection (``transformers.CLIPVisionModelWithProjection``: ``vision_model`` +
``visual_projection``; outputs ``image_embeds``), merged and calibrated. Each task's head is a frozen zero-shot
classifier built from the class names and prompt templates with the base model's text tower
(:func:`~magic_pl.models.heads.zeroshot_weights`; benchmark tables in :mod:`magic_pl.models.clip_tasks`), as in
Ilharco et al. (ICLR 2023), whose experts fine-tune only the image encoder.

Experts may be ``CLIPModel`` directories (the text tower is ignored), ``CLIPVisionModelWithProjection`` directories,
or ``CLIPVisionModel`` directories (no projection: the base's projection is used, i.e. a zero task vector there).

Saved (:meth:`CLIPAdapter.save`, atomic): a full ``CLIPModel`` ``save_pretrained`` directory (calibrated vision tower,
the base's text tower, processor / tokenizer files copied), plus ``zeroshot_heads.safetensors`` (``<task>.weight``,
``<task>.bias``) and ``zeroshot_heads.json`` (tasks, class names, templates). A vision-only base is saved as
``CLIPVisionModelWithProjection``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.models._hf import (
    check_config,
    dtype_kwargs,
    expert_body_state,
    from_pretrained_checked,
    load_config,
    quiet_transformers,
)
from magic_pl.models.base import MergeSetup, ModelAdapter, default_task_names, find_tied_keys
from magic_pl.models.clip_tasks import load_classnames, task_prompts
from magic_pl.models.heads import TaskModel, ZeroShotHead, zeroshot_weights
from magic_pl.models.io import save_pretrained_atomic
from magic_pl.statedict import CheckpointError, StateDict, load_state_dict, tensor_dtype, tensor_shape

__all__ = ["CLIPAdapter", "load_zeroshot_heads"]

PathLike = Union[str, os.PathLike]
_VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                  "patch_size", "num_channels")


class _WithFallback(Mapping[str, Tensor]):
    """``primary`` where it has the key, else ``fallback`` (a CLIPVisionModel expert has no projection)."""

    def __init__(self, primary: StateDict, fallback: StateDict, keys: list[str]):
        self.primary, self.fallback, self._keys = primary, fallback, list(keys)

    def _src(self, key: str) -> StateDict:
        if key in self.primary:
            return self.primary
        if key in self._keys:
            return self.fallback
        raise KeyError(key)

    def __getitem__(self, key: str) -> Tensor:
        return self._src(key)[key]

    def shape(self, key: str) -> torch.Size:
        return tensor_shape(self._src(key), key)

    def dtype(self, key: str) -> torch.dtype:
        return tensor_dtype(self._src(key), key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", config)


class CLIPAdapter(ModelAdapter):
    """CLIP checkpoints -> :class:`~magic_pl.models.base.MergeSetup`: vision tower merged, zero-shot heads per task.

    Args:
        base: the pretrained CLIP directory (``CLIPModel``; or ``CLIPVisionModelWithProjection`` with ``heads_file``).
        experts: fine-tuned image encoders, one per task (see the module docstring for accepted layouts).
        task_names: task of each expert; benchmark names (``sun397``, ``stanford-cars``/``cars``, ``resisc45``,
            ``eurosat``, ``svhn``, ``gtsrb``, ``mnist``, ``dtd``) get their class names and templates from
            :mod:`~magic_pl.models.clip_tasks`. Default: the expert directory names.
        classnames: task -> class names (label order), overriding or extending the benchmark tables.
        classnames_files: task -> file with one class name per line (SUN397's ``ClassName.txt`` is understood).
        templates: task -> prompt templates (``str.format`` patterns with ``{}``).
        tokenizer: tokenizer directory (default: ``base``).
        heads_file: precomputed zero-shot heads (``zeroshot_heads.safetensors`` as written by :meth:`save`); skips
            the text tower.
        dtype: dtype of the vision body (default ``"float32"``).
        text_batch_size: prompts per text-tower batch when building heads (default 256).
        trust_pickle: read the experts' torch weight files (``pytorch_model.bin``) with full pickle, only for files
            you trust (default ``False``: ``weights_only=True``). ``from_pretrained`` (the base, and experts whose
            keys need ``transformers``' conversions) applies ``transformers``' own loading rules.
    """

    def __init__(
        self,
        base: str,
        experts: list[str],
        task_names: Optional[list[str]] = None,
        classnames: Optional[dict[str, list[str]]] = None,
        classnames_files: Optional[dict[str, str]] = None,
        templates: Optional[dict[str, list[str]]] = None,
        tokenizer: Optional[str] = None,
        heads_file: Optional[str] = None,
        dtype: Optional[str] = "float32",
        text_batch_size: int = 256,
        trust_pickle: bool = False,
    ):
        if not experts:
            raise ValueError("need at least one expert model")
        self.base_path = str(base)
        self.expert_paths = [str(e) for e in experts]
        self.task_names = default_task_names(self.expert_paths, task_names)
        self.classnames = {k: list(v) for k, v in (classnames or {}).items()}
        for task, file in (classnames_files or {}).items():
            self.classnames[task] = load_classnames(file)
        self.templates = {k: list(v) for k, v in (templates or {}).items()}
        self.tokenizer_path = tokenizer
        self.heads_file = heads_file
        self.dtype = dtype
        self.text_batch_size = text_batch_size
        self.trust_pickle = trust_pickle
        self._is_full_clip = True
        self.prompts: dict[str, dict[str, list[str]]] = {}

    # ----------------------------------------------------------------------------------------------------------------
    def _build_body(self, clip: nn.Module) -> nn.Module:
        """``CLIPVisionModelWithProjection`` whose submodules are ``clip``'s vision tower and projection."""
        from transformers import CLIPVisionModelWithProjection

        if isinstance(clip, CLIPVisionModelWithProjection):
            return clip
        vcfg = clip.config.vision_config
        vcfg.projection_dim = clip.config.projection_dim
        with quiet_transformers(), torch.device("meta"):
            body = CLIPVisionModelWithProjection(vcfg)
        body.vision_model = clip.vision_model
        body.visual_projection = clip.visual_projection
        return body

    def _heads(self, clip: Optional[nn.Module]) -> dict[str, nn.Module]:
        if self.heads_file is not None:
            return load_zeroshot_heads(self.heads_file, self.task_names)
        if clip is None:
            raise ValueError("a vision-only base has no text tower: pass heads_file= with precomputed zero-shot heads")
        from transformers import AutoTokenizer

        tok_path = self.tokenizer_path or self.base_path
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(tok_path)
        except Exception as err:
            raise CheckpointError(f"cannot load the CLIP tokenizer from {tok_path}: {err}") from err
        heads = {}
        for task in self.task_names:
            names, templates = task_prompts(task, self.classnames.get(task), self.templates.get(task))
            self.prompts[task] = {"classnames": names, "templates": templates}
            weight = zeroshot_weights(clip, tokenizer, names, templates, batch_size=self.text_batch_size)
            heads[task] = ZeroShotHead(weight).eval()
        return heads

    def setup(self) -> MergeSetup:
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        base_cfg = load_config(self.base_path)
        kwargs = dtype_kwargs(self.dtype)
        self._is_full_clip = getattr(base_cfg, "model_type", None) == "clip"
        if self._is_full_clip:
            clip = from_pretrained_checked(CLIPModel, self.base_path, name=f"base {self.base_path}", **kwargs)
            body = self._build_body(clip)
        else:
            clip = None
            body = from_pretrained_checked(CLIPVisionModelWithProjection, self.base_path,
                                           name=f"base {self.base_path}", **kwargs)
        heads = self._heads(clip)
        del clip  # the text tower is not needed any more
        body.eval()
        tied = find_tied_keys(body)
        base_state = {k: v.detach() for k, v in body.state_dict().items() if k not in tied}
        expected = {k: v.shape for k, v in base_state.items()}
        experts = []
        for path, task in zip(self.expert_paths, self.task_names):
            name = f"expert {task!r}"
            check_config(_vision_config(base_cfg), _vision_config(load_config(path)), f"{name} ({path})",
                         fields=_VISION_FIELDS)

            def materialize(path: str = path, name: str = name):
                cfg = load_config(path)
                m = from_pretrained_checked(CLIPVisionModelWithProjection, path, name=name,
                                            projection_dim=getattr(base_cfg, "projection_dim", None) or
                                            getattr(cfg, "projection_dim", 512))
                return m.state_dict()

            # CLIPModel / CLIPVisionModelWithProjection keys; transformers 5 writes CLIPVisionModel without the
            # "vision_model." level.
            view = expert_body_state(path, expected, prefixes=("", ("", "vision_model.")), name=name,
                                     materialize=materialize,
                                     optional=("visual_projection.weight",), trust_pickle=self.trust_pickle)
            if "visual_projection.weight" not in view:
                view = _WithFallback(view, base_state, list(expected))
            experts.append(view)
        setup = MergeSetup(
            base=body, experts=experts, task_names=list(self.task_names), heads=heads, tied=tied, adapter=self,
            metadata={"family": "clip", "base": self.base_path, "experts": list(self.expert_paths),
                      "prompts": self.prompts},
        )
        setup.validate()
        return setup

    # ----------------------------------------------------------------------------------------------------------------
    def task_model(self, setup: MergeSetup, body: nn.Module, task: str) -> nn.Module:
        """``ZeroShotHead(body(pixel_values=...).image_embeds)``."""
        return TaskModel(body, setup.heads[task], output="image_embeds")

    def save(self, setup: MergeSetup, body: nn.Module, path: PathLike, **options: Any) -> Path:
        """Full CLIP directory with the calibrated vision tower + zero-shot heads; see the module docstring."""
        from safetensors.torch import save as st_save
        from transformers import CLIPModel

        from magic_pl.output import OutputLocation

        max_shard_size = options.pop("max_shard_size", "5GB")
        overwrite = bool(options.pop("overwrite", False))
        if options:
            raise TypeError(f"unknown save option(s) for CLIP: {sorted(options)}")
        inputs = [self.base_path, *self.expert_paths]
        OutputLocation(path, overwrite=overwrite, inputs=inputs).check()  # before the base is loaded again
        heads = {}
        for task in setup.task_names:
            for k, v in setup.heads[task].state_dict().items():
                heads[f"{task}.{k}"] = v.detach().cpu().contiguous()
        extra = {
            "zeroshot_heads.safetensors": st_save(heads, metadata={"format": "pt"}),
            "zeroshot_heads.json": json.dumps(
                {"tasks": list(setup.task_names), "prompts": setup.metadata.get("prompts", {})}, indent=2) + "\n",
        }
        support = self.base_path if Path(self.base_path).is_dir() else None
        if not self._is_full_clip:
            return save_pretrained_atomic(body, path, support_from=support, max_shard_size=max_shard_size,
                                          extra_files=extra, overwrite=overwrite, inputs=inputs)
        clip = from_pretrained_checked(CLIPModel, self.base_path, name=f"base {self.base_path}",
                                       **dtype_kwargs(next(body.parameters()).dtype))
        with torch.no_grad():
            clip.vision_model.load_state_dict(body.vision_model.state_dict(), strict=True)
            clip.visual_projection.load_state_dict(body.visual_projection.state_dict(), strict=True)
        return save_pretrained_atomic(clip, path, support_from=support, max_shard_size=max_shard_size,
                                      extra_files=extra, overwrite=overwrite, inputs=inputs)


def load_zeroshot_heads(path: PathLike, tasks: Optional[list[str]] = None) -> dict[str, ZeroShotHead]:
    """Zero-shot heads from a ``zeroshot_heads.safetensors`` file (``<task>.weight`` / ``<task>.bias``), or from a
    directory written by :meth:`CLIPAdapter.save`. ``tasks``: which to return (all by default; missing -> error)."""
    path = Path(path)
    if path.is_dir():
        path = path / "zeroshot_heads.safetensors"
    sd = load_state_dict(path)
    available = sorted({k.rsplit(".", 1)[0] for k in sd})
    tasks = list(tasks) if tasks is not None else available
    out = {}
    for task in tasks:
        if f"{task}.weight" not in sd:
            raise CheckpointError(f"{path} has no zero-shot head for task {task!r}; it has {available}")
        bias = sd[f"{task}.bias"] if f"{task}.bias" in sd else None
        out[task] = ZeroShotHead(sd[f"{task}.weight"], bias).eval()
    return out
