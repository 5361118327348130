"""Hugging Face classifiers (BERT/RoBERTa/... sequence classification, ViT image classification): the encoder body
(``model.base_model``) is merged, each expert's classifier head is kept per task.

The base is the pretrained encoder directory (``AutoModel`` layout, or any checkpoint of the same architecture); the
body is built as the classifier class's own ``base_model`` (so RoBERTa/ViT classifiers' pooler-free encoders match
the experts key for key). Experts are ``save_pretrained`` directories of ``AutoModelForSequenceClassification``
(or ``auto_class``) with their own ``num_labels``; safetensors experts are read lazily.

A task's runnable model is the expert's classifier class with its encoder attribute pointing at the shared (merged)
body, so ``transformers``' own forward (pooling, dropout, head) runs unchanged.

Saved layout (:meth:`HFClassifierAdapter.save`), written atomically: ``out/<task>/`` per task, an ordinary
``save_pretrained`` directory (config with that task's labels, weights, the expert's tokenizer / processor files)
that ``AutoModelForSequenceClassification.from_pretrained`` loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from magic_pl.models._hf import (
    check_config,
    dtype_kwargs,
    expert_body_state,
    from_pretrained_checked,
    has_meta,
    load_config,
    meta_from_config,
    quiet_transformers,
)
from magic_pl.models.base import MergeSetup, ModelAdapter, default_task_names, find_tied_keys
from magic_pl.models.io import copy_support_files
from magic_pl.output import OutputLocation, child_path
from magic_pl.statedict import CheckpointError, load_state_dict, tensor_shape

__all__ = ["HFClassifierAdapter", "SequenceClassificationAdapter", "ImageClassificationAdapter"]

PathLike = Union[str, os.PathLike]


def _auto_class(name: str) -> Any:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"unknown transformers auto class {name!r} (e.g. AutoModelForSequenceClassification)")
    return cls


class HFClassifierAdapter(ModelAdapter):
    """Hugging Face classifier checkpoints -> :class:`~magic_pl.models.base.MergeSetup` (encoder merged, heads kept).

    Args:
        base: the pretrained encoder directory (or hub id).
        experts: fine-tuned classifier directories, one per task.
        task_names: one name per expert (default: the directory names).
        auto_class: the ``transformers`` auto class of the experts (default
            ``"AutoModelForSequenceClassification"``; ``"AutoModelForImageClassification"`` for ViT,
            ``"AutoModelForTokenClassification"``, ...).
        dtype: dtype of the base body (default ``"float32"``; ``"auto"`` keeps the checkpoint's).
        trust_pickle: read the experts' torch weight files (``pytorch_model.bin``) with full pickle, only for files
            you trust (default ``False``: ``weights_only=True``). ``from_pretrained`` (the base, and experts whose
            keys need ``transformers``' conversions) applies ``transformers``' own loading rules.
    """

    def __init__(self, base: str, experts: list[str], task_names: Optional[list[str]] = None,
                 auto_class: str = "AutoModelForSequenceClassification", dtype: Optional[str] = "float32",
                 trust_pickle: bool = False):
        if not experts:
            raise ValueError("need at least one expert model")
        self.base_path = str(base)
        self.expert_paths = [str(e) for e in experts]
        self.task_names = default_task_names(self.expert_paths, task_names)
        self.auto_class = auto_class
        self.dtype = dtype
        self.trust_pickle = trust_pickle
        self._configs: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------------------------
    def setup(self) -> MergeSetup:
        auto = _auto_class(self.auto_class)
        base_cfg = load_config(self.base_path)
        kwargs = dtype_kwargs(self.dtype)
        # Load the base into the classifier class so the body is exactly the classifier's encoder (e.g. RoBERTa and
        # ViT classifiers have no pooler). Head tensors are freshly initialised there and discarded.
        skeleton = meta_from_config(auto, base_cfg)
        prefix = skeleton.base_model_prefix
        head_names = [n for n, _ in skeleton.named_children() if n != prefix]
        full = from_pretrained_checked(auto, self.base_path, name=f"base {self.base_path}",
                                       allow_missing=tuple(f"{h}." for h in head_names), **kwargs)
        body = getattr(full, prefix)
        del full
        body.eval()
        tied = find_tied_keys(body)
        expected = {k: v.shape for k, v in body.state_dict().items() if k not in tied}
        experts, heads = [], {}
        for path, task in zip(self.expert_paths, self.task_names):
            name = f"expert {task!r}"
            cfg = load_config(path)
            check_config(base_cfg, cfg, f"{name} ({path})")
            self._configs[task] = cfg

            def materialize(path: str = path, name: str = name):
                m = from_pretrained_checked(auto, path, name=name)
                return {k: v for k, v in getattr(m, prefix).state_dict().items()}

            experts.append(expert_body_state(path, expected, prefixes=(f"{prefix}.", ""), name=name,
                                             materialize=materialize, trust_pickle=self.trust_pickle))
            heads[task] = self._load_head(auto, path, cfg, prefix, name)
        setup = MergeSetup(
            base=body, experts=experts, task_names=list(self.task_names), heads=heads, tied=tied, adapter=self,
            metadata={"family": "hf_classifier", "auto_class": self.auto_class, "base": self.base_path,
                      "experts": list(self.expert_paths), "body_prefix": prefix,
                      "model_type": getattr(base_cfg, "model_type", None)},
        )
        setup.validate()
        return setup

    def _load_head(self, auto: Any, path: str, cfg: Any, prefix: str, name: str) -> nn.ModuleDict:
        """The expert's non-encoder children (classifier, dropout, pre-classifier ...) with their weights."""
        skeleton = meta_from_config(auto, cfg)
        children = {n: m for n, m in skeleton.named_children() if n != prefix}
        head = nn.ModuleDict(children)
        expected = {k: v.shape for k, v in head.state_dict().items()}
        sd = load_state_dict(path, trust_pickle=self.trust_pickle)
        on_disk = {k: k for k in sd if not k.startswith(prefix + ".")}
        if set(expected) <= set(on_disk):
            for k in expected:
                if tuple(tensor_shape(sd, k)) != tuple(expected[k]):
                    raise CheckpointError(
                        f"{name}: head tensor {k!r} has shape {tuple(tensor_shape(sd, k))}, config expects "
                        f"{tuple(expected[k])} (num_labels={getattr(cfg, 'num_labels', '?')})"
                    )
            state = {k: sd[k] for k in expected}
        else:  # keys renamed on load: go through from_pretrained
            full = from_pretrained_checked(auto, path, name=name)
            state = {k: v for k, v in full.state_dict().items() if not k.startswith(prefix + ".")}
        head.to_empty(device="cpu")
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{name}: classifier head does not load: {err}") from err
        leftover = has_meta(head)
        if leftover:
            raise CheckpointError(f"{name}: head tensors {leftover[:5]} have no values")
        return head.eval()

    # ----------------------------------------------------------------------------------------------------------------
    def task_model(self, setup: MergeSetup, body: nn.Module, task: str) -> nn.Module:
        """The expert's classifier class with ``body`` as its encoder and the task's head (shared, not copied)."""
        auto = _auto_class(self.auto_class)
        cfg = self._configs.get(task) or load_config(self.expert_paths[self.task_names.index(task)])
        model = meta_from_config(auto, cfg)
        prefix = model.base_model_prefix
        setattr(model, prefix, body)
        for n, m in setup.heads[task].items():
            setattr(model, n, m)
        leftover = has_meta(model)
        if leftover:
            raise CheckpointError(f"task model {task!r}: tensors {leftover[:5]} were not provided by body or head")
        return model.eval()

    def save(self, setup: MergeSetup, body: nn.Module, path: PathLike, **options: Any) -> Path:
        """One ``save_pretrained`` directory per task under ``path`` (atomic as a whole); support files (tokenizer,
        processor) copied from each expert directory, else from the base."""
        max_shard_size = options.pop("max_shard_size", "5GB")
        overwrite = bool(options.pop("overwrite", False))
        if options:
            raise TypeError(f"unknown save option(s) for HF classifiers: {sorted(options)}")
        out = OutputLocation(path, overwrite=overwrite, inputs=[self.base_path, *self.expert_paths]).check()
        with out:
            tmp = out.stage()
            for task, expert in zip(setup.task_names, self.expert_paths):
                model = self.task_model(setup, body, task)
                task_dir = child_path(tmp, task)
                with quiet_transformers():
                    model.save_pretrained(task_dir, max_shard_size=max_shard_size, safe_serialization=True)
                for source in (expert, self.base_path):
                    if Path(source).is_dir():
                        copy_support_files(source, task_dir)
            out_dir = out.commit({"content": "HF classifiers, one save_pretrained directory per task",
                                  "tasks": list(setup.task_names)})
        return out_dir


class SequenceClassificationAdapter(HFClassifierAdapter):
    """:class:`HFClassifierAdapter` for ``AutoModelForSequenceClassification`` experts (BERT, RoBERTa, ...)."""

    def __init__(self, base: str, experts: list[str], task_names: Optional[list[str]] = None,
                 dtype: Optional[str] = "float32", trust_pickle: bool = False):
        super().__init__(base, experts, task_names, auto_class="AutoModelForSequenceClassification", dtype=dtype,
                         trust_pickle=trust_pickle)


class ImageClassificationAdapter(HFClassifierAdapter):
    """:class:`HFClassifierAdapter` for ``AutoModelForImageClassification`` experts (ViT, ...)."""

    def __init__(self, base: str, experts: list[str], task_names: Optional[list[str]] = None,
                 dtype: Optional[str] = "float32", trust_pickle: bool = False):
        super().__init__(base, experts, task_names, auto_class="AutoModelForImageClassification", dtype=dtype,
                         trust_pickle=trust_pickle)
