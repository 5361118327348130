"""Hugging Face classifiers (BERT/RoBERTa/... sequence classification, ViT image classification): the encoder body
(``model.base_model``) is merged, each expert's classifier head is kept per task.

The base is the pretrained encoder directory (``AutoModel`` layout, or any checkpoint of the same architecture); the
body is built as the classifier class's own ``base_model`` (so RoBERTa/ViT classifiers' pooler-free encoders match
the experts key for key). Experts are ``save_pretrained`` directories of ``AutoModelForSequenceClassification``
(or ``auto_class``) with their own ``num_labels``; safetensors experts are read lazily.

A task's runnable model is the expert's classifier class with its encoder attribute pointing at the shared (merged)
body, so ``transformers``' own forward (pooling, dropout, head) runs unchanged.

Saved layouts (:meth:`HFClassifierAdapter.save`), written atomically:

- ``layout="per_task"`` (default): ``out/<task>/`` per task, an ordinary ``save_pretrained`` directory (config with
  that task's labels, weights, the expert's tokenizer / processor files) that
  ``AutoModelForSequenceClassification.from_pretrained`` loads; K copies of the body.
- ``layout="shared"``: the merged body once, ``out/`` (``save_pretrained`` of the encoder, ``AutoModel`` loads it,
  with the tokenizer / processor), and per task ``out/heads/<task>/`` with the expert's ``config.json`` (its labels)
  and ``model.safetensors`` (the head's tensors under the expert's key names). :func:`load_classifier` (or
  ``from_pretrained(out, config=AutoConfig.from_pretrained(out/heads/<task>))`` then the head's tensors) gives the
  task's classifier.
"""

from __future__ import annotations

import copy
import json
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
    has_meta,
    load_config,
    meta_from_config,
    quiet_transformers,
    resolve_dtype,
)
from magic_pl.models.base import MergeSetup, ModelAdapter, default_task_names, find_tied_keys
from magic_pl.models.io import copy_support_files, save_pretrained_atomic
from magic_pl.output import OutputLocation, child_path
from magic_pl.statedict import CheckpointError, load_state_dict, tensor_shape

__all__ = ["HFClassifierAdapter", "SequenceClassificationAdapter", "ImageClassificationAdapter", "load_classifier",
           "LAYOUTS"]

#: How :meth:`HFClassifierAdapter.save` writes the tasks (see the module docstring).
LAYOUTS = ("per_task", "shared")

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
        layout: how :meth:`save` writes the tasks: ``"per_task"`` (default; one full classifier directory per task)
            or ``"shared"`` (the body once plus per-task heads); see the module docstring.
    """

    def __init__(self, base: str, experts: list[str], task_names: Optional[list[str]] = None,
                 auto_class: str = "AutoModelForSequenceClassification", dtype: Optional[str] = "float32",
                 trust_pickle: bool = False, layout: str = "per_task"):
        if not experts:
            raise ValueError("need at least one expert model")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
        self.layout = layout
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
        """Write the tasks' classifiers under ``path`` (atomic as a whole) in ``layout`` (default: the adapter's).

        Options: ``layout`` (``"per_task"`` / ``"shared"``), ``dtype`` (cast a copy before writing, e.g.
        ``"bfloat16"``; default: as held), ``support_from`` (the directory whose tokenizer / processor files are
        copied; default each expert's, else the base's), ``max_shard_size`` (``"5GB"``), ``overwrite``.
        """
        max_shard_size = options.pop("max_shard_size", "5GB")
        overwrite = bool(options.pop("overwrite", False))
        layout = options.pop("layout", self.layout)
        dtype = options.pop("dtype", None)
        support_from = options.pop("support_from", None)
        if options:
            raise TypeError(f"unknown save option(s) for HF classifiers: {sorted(options)}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
        target = resolve_dtype(dtype)
        heads = dict(setup.heads or {})
        if isinstance(target, torch.dtype):  # copies: the caller's model keeps its dtype
            body = copy.deepcopy(body).to(target)
            heads = {t: copy.deepcopy(h).to(target) for t, h in heads.items()}
        cast = MergeSetup(base=setup.base, experts=setup.experts, task_names=setup.task_names, heads=heads,
                          tied=setup.tied, adapter=self, metadata=setup.metadata)
        inputs = [self.base_path, *self.expert_paths, *([support_from] if support_from else [])]
        if layout == "shared":
            return self._save_shared(cast, body, path, support_from, max_shard_size, overwrite, inputs)
        out = OutputLocation(path, overwrite=overwrite, inputs=inputs).check()
        with out:
            tmp = out.stage()
            for task, expert in zip(setup.task_names, self.expert_paths):
                model = self.task_model(cast, body, task)
                task_dir = child_path(tmp, task)
                with quiet_transformers():
                    model.save_pretrained(task_dir, max_shard_size=max_shard_size, safe_serialization=True)
                for source in ([support_from] if support_from else [expert, self.base_path]):
                    if Path(source).is_dir():
                        copy_support_files(source, task_dir)
            out_dir = out.commit({"content": "HF classifiers, one save_pretrained directory per task",
                                  "tasks": list(setup.task_names)})
        return out_dir

    def _save_shared(self, setup: MergeSetup, body: nn.Module, path: PathLike, support_from: Optional[str],
                     max_shard_size: str, overwrite: bool, inputs: list[str]) -> Path:
        """The body once (``save_pretrained``) plus ``heads/<task>/{config.json, model.safetensors}``."""
        from safetensors.torch import save as safetensors_bytes

        extra: dict[str, Union[str, bytes]] = {}
        for task in setup.task_names:
            cfg = self._configs.get(task) or load_config(self.expert_paths[self.task_names.index(task)])
            state = {f"{child}.{k}": v.detach().cpu().contiguous()
                     for child, module in setup.heads[task].items() for k, v in module.state_dict().items()}
            doc = json.loads(cfg.to_json_string())
            for key in ("dtype", "torch_dtype"):  # the head's config says what the shared body holds
                if key in doc:
                    doc[key] = str(next(body.parameters()).dtype).replace("torch.", "")
            extra[f"heads/{task}/config.json"] = json.dumps(doc, indent=2, sort_keys=True) + "\n"
            extra[f"heads/{task}/model.safetensors"] = safetensors_bytes(state, metadata={"format": "pt"})
        extra["heads/tasks.json"] = json.dumps({"tasks": list(setup.task_names), "auto_class": self.auto_class},
                                               indent=2) + "\n"
        source = support_from or (self.base_path if Path(self.base_path).is_dir() else None)
        if source is None:
            source = next((e for e in self.expert_paths if Path(e).is_dir()), None)
        with quiet_transformers():
            return save_pretrained_atomic(body, path, support_from=source, max_shard_size=max_shard_size,
                                          extra_files=extra, overwrite=overwrite, inputs=inputs)


def load_classifier(path: PathLike, task: str, **kwargs: Any) -> nn.Module:
    """Task ``task``'s classifier from a ``layout="shared"`` output: the shared body loaded into the expert's
    classifier class (its config from ``path/heads/<task>``), then the head's tensors. ``kwargs`` go to
    ``from_pretrained`` (e.g. ``dtype``). Every tensor is checked to come from the files: none is left at its random
    initialisation."""
    import transformers
    from safetensors.torch import load_file

    root = Path(path)
    head_dir = child_path(root, "heads", task)
    if not (head_dir / "config.json").is_file():
        raise CheckpointError(f"{root} has no head for task {task!r} (no {head_dir / 'config.json'}); tasks: "
                              f"{sorted(p.name for p in (root / 'heads').iterdir() if p.is_dir())}")
    meta = json.loads((root / "heads" / "tasks.json").read_text())
    auto = getattr(transformers, meta.get("auto_class", "AutoModelForSequenceClassification"))
    config = transformers.AutoConfig.from_pretrained(head_dir)
    with quiet_transformers():
        model = auto.from_pretrained(root, config=config, **kwargs)
    head = load_file(head_dir / "model.safetensors")
    expected = {k for k in model.state_dict() if not k.startswith(model.base_model_prefix + ".")}
    if set(head) != expected:
        raise CheckpointError(f"{head_dir / 'model.safetensors'} holds {sorted(head)}, the classifier expects "
                              f"{sorted(expected)}")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in head.items()}, strict=False)
    return model.eval()


class SequenceClassificationAdapter(HFClassifierAdapter):
    """:class:`HFClassifierAdapter` for ``AutoModelForSequenceClassification`` experts (BERT, RoBERTa, ...)."""

    def __init__(self, base: str, experts: list[str], task_names: Optional[list[str]] = None,
                 dtype: Optional[str] = "float32", trust_pickle: bool = False, layout: str = "per_task"):
        super().__init__(base, experts, task_names, auto_class="AutoModelForSequenceClassification", dtype=dtype,
                         trust_pickle=trust_pickle, layout=layout)


class ImageClassificationAdapter(HFClassifierAdapter):
    """:class:`HFClassifierAdapter` for ``AutoModelForImageClassification`` experts (ViT, ...)."""

    def __init__(self, base: str, experts: list[str], task_names: Optional[list[str]] = None,
                 dtype: Optional[str] = "float32", trust_pickle: bool = False, layout: str = "per_task"):
        super().__init__(base, experts, task_names, auto_class="AutoModelForImageClassification", dtype=dtype,
                         trust_pickle=trust_pickle, layout=layout)
