"""The adapter interface: a user's checkpoints -> (base body, expert bodies, per-task heads) for merging and
calibration.

Every model family (timm, Hugging Face CLIP / classifiers / causal LMs, LoRA) has a :class:`ModelAdapter` whose
:meth:`~ModelAdapter.setup` returns a :class:`MergeSetup`:

- ``base``: the pretrained *body* as an ``nn.Module`` (the part that is merged and calibrated), in eval mode;
- ``experts``: one state dict per task, keyed exactly like ``base.state_dict()`` (minus tied aliases), usually lazy
  (:class:`~magic_pl.statedict.LazyStateDict` views: reading one key reads one tensor);
- ``heads``: per-task modules that are *not* merged (classifier heads, zero-shot heads), or ``None`` (causal LMs);
- ``tied``: alias key -> canonical key for parameters shared inside the body (tied input/output embeddings). Aliases
  are left out of the experts and task vectors; the merged model keeps them tied.

Task vectors: ``tau_k = theta_k - theta0`` over floating-point entries only, computed on access by
:class:`~magic_pl.statedict.LazyTaskVector` (re-exported here), so merging K experts holds about one model in memory;
NaN/Inf in the base or an expert is refused as each key is computed, naming the file and key.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.statedict import (
    CheckpointError,
    LazyTaskVector,
    RenamedView,
    StateDict,
    apply_delta,
    best_prefix,
    is_mergeable,
    key_prefixes,
    shape_error,
    tensor_dtype,
    tensor_file,
    tensor_shape,
    validate_experts,
)

__all__ = [
    "MergeSetup",
    "ModelAdapter",
    "LazyTaskVector",
    "PrefixView",
    "KeyView",
    "body_view",
    "find_tied_keys",
    "tensor_shape",
    "tensor_dtype",
    "check_experts",
    "shape_error",
]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------------------------
# Lazy mapping views (shape/dtype/file forwarded through the tensor-source protocol of magic_pl.statedict)
# --------------------------------------------------------------------------------------------------------------------
class PrefixView(RenamedView):
    """The entries of ``source`` under ``prefix`` with the prefix removed (``"bert.x.w"`` -> ``"x.w"``); lazy.

    Args:
        source: any state dict (a :class:`~magic_pl.statedict.LazyStateDict` stays lazy).
        prefix: key prefix including its trailing dot, e.g. ``"bert."``; ``""`` keeps every key.
        add: a prefix prepended to every exposed key instead (``"" -> "model."``); default ``""``.
    """

    def __init__(self, source: StateDict, prefix: str, add: str = ""):
        super().__init__(source, {add + k[len(prefix):]: k for k in source.keys() if k.startswith(prefix)})
        self.prefix, self.add = prefix, add

    def __repr__(self) -> str:
        return f"PrefixView({self.prefix!r} of {self.source!r})"


class KeyView(RenamedView):
    """The entries of ``source`` restricted to ``keys`` (in that order); lazy. Other keys raise ``KeyError``."""

    def __init__(self, source: StateDict, keys: Sequence[str]):
        super().__init__(source, {k: k for k in keys})


# --------------------------------------------------------------------------------------------------------------------
# Tied parameters and validation
# --------------------------------------------------------------------------------------------------------------------
def body_view(sd: Mapping[str, Tensor], keys: Sequence[str], prefix: Optional[str], what: str,
              backbone_path: str = "") -> Mapping[str, Tensor]:
    """``sd`` as a lazy view keyed by ``keys`` (a module's state-dict keys) after removing ``prefix``; the rest of
    ``sd`` (a classifier head, other submodules) is left out. ``None`` finds the prefix: none, the module's attribute
    path ``backbone_path``, or the one- or two-part key prefix (``bert.``, ``roberta.``, ``vit.``, ``model.``,
    ``model.backbone.``, ...) under which ``sd`` holds most of ``keys``. A key of ``keys`` that ``sd`` lacks there is
    a :class:`~magic_pl.statedict.CheckpointError` naming ``what``, the prefixes tried and the missing keys."""
    candidates = [prefix] if prefix is not None else [
        "", f"{backbone_path}." if backbone_path else "", *key_prefixes(sd.keys(), depth=2)]
    found, _ = best_prefix(keys, list(sd.keys()), candidates)
    best = PrefixView(sd, found) if found else sd
    present = [k for k in keys if k in best]
    missing = [k for k in keys if k not in best]
    if missing:
        hint = f" with key prefix {prefix!r}" if prefix is not None else " (tried prefixes '', " + ", ".join(
            repr(c) for c in candidates[:8] if c) + ("..." if len(candidates) > 8 else "") + ")"
        raise CheckpointError(f"{what} lacks {len(missing)} key(s) of the model{hint}, e.g. {missing[:5]}")
    return KeyView(best, present)


def find_tied_keys(module: nn.Module) -> dict[str, str]:
    """Alias -> canonical key for state-dict entries that share storage (tied weights, e.g. ``lm_head.weight`` and
    ``model.embed_tokens.weight`` under ``tie_word_embeddings``). The canonical key is the first in state-dict order."""
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, t in module.state_dict(keep_vars=True).items():
        if t is None or t.numel() == 0:
            continue
        if t.device.type == "meta":  # no storage: only the same tensor object is the same weight
            ident: tuple = ("meta", id(t))
        else:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    return tied


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no initialisation cost) while buffers stay
    real: rotary ``inv_freq`` and the like are computed at construction and are not in the checkpoint."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def check_experts(base: StateDict, experts: Sequence[StateDict], names: Sequence[str], *,
                  check_finite: bool = False) -> None:
    """:func:`~magic_pl.statedict.validate_experts` with header-only checks by default.

    ``check_finite`` defaults to ``False`` here: it would read every expert tensor once more, and the task vectors
    built from these experts refuse NaN/Inf as each key is computed.
    """
    validate_experts(base, experts, names=names, check_finite=check_finite)


# --------------------------------------------------------------------------------------------------------------------
# The setup and the adapter interface
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class MergeSetup:
    """Everything merging and calibration need, built by a :class:`ModelAdapter`.

    Attributes:
        base: pretrained body module (eval mode). Its ``state_dict()`` keys (minus ``tied`` aliases) are the merge keys.
        experts: per-task body state dicts keyed like ``base`` (minus aliases); often lazy.
        task_names: one name per expert (unique).
        heads: per-task head modules (not merged), or ``None`` when the whole model is merged.
        tied: alias key -> canonical key inside ``base``; aliases are not merged and stay tied.
        adapter: the adapter that built this setup (used by :meth:`task_model` and :meth:`save`).
        metadata: free-form facts about the sources (paths, configs) for reports.
        exact_task_vectors: task vectors to use instead of ``expert - base`` (LoRA: ``B @ A * scale`` exactly, over
            the keys the adapters touch); default ``None``.
        base_source: the base body's tensors read lazily from its checkpoint, keyed like ``base`` without the tied
            aliases; set by :meth:`ModelAdapter.sharded_setup`, whose ``base`` is a skeleton with its parameters on
            the meta device. :meth:`base_state` then returns it. Default ``None``: ``base`` holds the weights.
    """

    base: nn.Module
    experts: list[StateDict]
    task_names: list[str]
    heads: Optional[dict[str, nn.Module]] = None
    tied: dict[str, str] = field(default_factory=dict)
    adapter: Optional["ModelAdapter"] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    exact_task_vectors: Optional[list[Mapping[str, Tensor]]] = None
    base_source: Optional[StateDict] = None

    def __post_init__(self) -> None:
        from magic_pl.output import check_task_names

        if len(self.experts) != len(self.task_names):
            raise ValueError(f"{len(self.experts)} experts but {len(self.task_names)} task names")
        self.task_names = check_task_names(self.task_names)
        if self.heads is not None:
            missing = [t for t in self.task_names if t not in self.heads]
            if missing:
                raise ValueError(f"no head for task(s) {missing}; heads exist for {sorted(self.heads)}")

    # -- state ------------------------------------------------------------------------------------------------------
    def base_state(self) -> dict[str, Tensor]:
        """The base body's state dict without tied aliases (detached; shares storage with ``base``), or
        :attr:`base_source` when the body is a skeleton."""
        if self.base_source is not None:
            return self.base_source  # type: ignore[return-value]
        return {k: v.detach() for k, v in self.base.state_dict().items() if k not in self.tied}

    def task_vectors(self, *, device: Optional[Union[str, torch.device]] = None) -> list[Mapping[str, Tensor]]:
        """One lazy task vector per expert (float32, computed on access; tied aliases left out)."""
        if self.exact_task_vectors is not None:
            return list(self.exact_task_vectors)
        base = self.base_state()
        return [LazyTaskVector(e, base, device=device, name=self._expert_label(i), base_name=self._base_label())
                for i, e in enumerate(self.experts)]

    def _expert_label(self, i: int) -> str:
        """``expert '<task>'``, plus the expert's path from the metadata when its tensors do not name their file."""
        label = f"expert {self.task_names[i]!r}"
        paths = self.metadata.get("experts") or []
        expert = self.experts[i]
        first = next(iter(expert), None)
        path = paths[i] if i < len(paths) and isinstance(paths[i], (str, os.PathLike)) else None
        if path and (first is None or tensor_file(expert, first) is None):
            label += f" ({path})"
        return label

    def _base_label(self) -> str:
        base = self.metadata.get("base")  # a path, or an in-memory source (never printed: a repr of every tensor)
        return f"base ({base})" if isinstance(base, (str, os.PathLike)) and base else "base"

    def fsc_modules(self, model: Optional[nn.Module] = None) -> Optional[list[str]]:
        """Module names to give ``FeatureSpaceCalibrator(modules=...)``, or ``None`` for its automatic choice.

        Restricts the automatic units to those whose tensors are all in the task vectors, leaving out units that own
        a tied alias (e.g. ``lm_head`` under ``tie_word_embeddings``: the shared weight is calibrated once, by the
        canonical owner ``embed_tokens``, and stays foldable into an ordinary checkpoint) and units no task vector
        covers (LoRA adapters touch a subset of modules).
        """
        from magic_pl.calibration.modules import find_units

        model = self.base if model is None else model
        keys = set(self.task_vectors()[0].keys())
        units = find_units(model)
        names = [u.name for u in units if not any(k in self.tied for k in u.keys) and all(k in keys for k in u.keys)]
        return None if len(names) == len(units) else names

    def validate(self, *, check_finite: bool = False) -> None:
        """Raise :class:`~magic_pl.statedict.CheckpointError` naming the expert and key on any key/shape/dtype
        mismatch between the experts and the base body (and NaN/Inf when ``check_finite``: one more read of every
        tensor; by default the task vectors refuse NaN/Inf as they are computed)."""
        check_experts(self.base_state(), self.experts, [self._expert_label(i) for i in range(len(self.experts))],
                      check_finite=check_finite)

    # -- models -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_model(self, merged_tv: Mapping[str, Tensor], *, scale: float = 1.0) -> nn.Module:
        """A copy of the base body with ``theta0 + scale * tau`` loaded (:func:`~magic_pl.statedict.apply_delta`:
        float64 tensors computed in float64, others in float32, each cast back to its dtype; NaN/Inf refused).

        Keys absent from ``merged_tv`` (integer buffers, untouched tensors) keep the base values; tied aliases stay
        tied (they share the canonical parameter). Raises :class:`CheckpointError` for unknown keys or shapes.
        """
        model = copy.deepcopy(self.base)
        params = dict(model.state_dict(keep_vars=True))
        unknown = [k for k in merged_tv if k not in params or k in self.tied]
        if unknown:
            raise CheckpointError(f"merged task vector has keys the base body lacks, e.g. {unknown[:5]}")
        for key, tau in merged_tv.items():
            target = params[key]
            if not is_mergeable(target):
                continue
            if tuple(tau.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"merged task vector shape {tuple(tau.shape)} does not match base {tuple(target.shape)} for {key!r}"
                )
            target.data.copy_(apply_delta(target.detach(), tau, scale, key=key))
        model.eval()
        return model

    def task_model(self, task: str, body: Optional[nn.Module] = None) -> nn.Module:
        """A runnable model for ``task``: ``body`` (default: the base) followed by the task's head. The body is shared,
        not copied."""
        if task not in self.task_names:
            raise KeyError(f"unknown task {task!r}; tasks: {self.task_names}")
        body = self.base if body is None else body
        if self.adapter is None:
            if self.heads is None:
                return body
            from magic_pl.models.heads import TaskModel

            return TaskModel(body, self.heads[task])
        return self.adapter.task_model(self, body, task)

    def multitask_model(self, body: Optional[nn.Module] = None) -> nn.Module:
        """One module over all tasks: ``forward(*inputs, task=name)`` returns that task's logits."""
        from magic_pl.models.heads import MultiTaskModel

        body = self.base if body is None else body
        return MultiTaskModel({t: self.task_model(t, body) for t in self.task_names})

    def save(self, body: nn.Module, path: PathLike, **options: Any) -> Path:
        """Save the calibrated ``body`` (with the heads) in the format the checkpoints came in (see the adapter)."""
        if self.adapter is None:
            raise ValueError("this MergeSetup has no adapter to save with")
        return self.adapter.save(self, body, path, **options)


class ModelAdapter(ABC):
    """Turns a model family's checkpoints into a :class:`MergeSetup` and saves calibrated models in their format.

    Subclasses take plain typed constructor arguments (paths, model names) so they can be built from YAML configs
    (jsonargparse ``class_path`` / ``init_args``).
    """

    @abstractmethod
    def setup(self) -> MergeSetup:
        """Load the base body, open the experts (lazily where the format allows) and build the heads."""

    @abstractmethod
    def save(self, setup: MergeSetup, body: nn.Module, path: PathLike, **options: Any) -> Path:
        """Write ``body`` (plus heads) to ``path`` atomically, in the source format. Returns ``path``."""

    def sharded_setup(self) -> Optional[MergeSetup]:
        """A :class:`MergeSetup` for merging straight into shards
        (:func:`~magic_pl.models.shard_merge.merge_into_shards`): ``base`` built with its parameters on the meta
        device (no memory), the base tensors read lazily (:attr:`MergeSetup.base_source`), the experts opened lazily.
        ``None`` (the default) when the family has none: the body is then merged whole on every process and sharded
        afterwards."""
        return None

    def task_model(self, setup: MergeSetup, body: nn.Module, task: str) -> nn.Module:
        """Runnable model for one task (default: body then head, see :class:`~magic_pl.models.heads.TaskModel`)."""
        from magic_pl.models.heads import TaskModel

        if setup.heads is None:
            return body
        return TaskModel(body, setup.heads[task])


_CHECKPOINT_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _stem(path: PathLike) -> str:
    stem = Path(path).name
    for suffix in _CHECKPOINT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def expert_names(path: PathLike) -> list[str]:
    """The names an expert checkpoint carries: its file or directory name without the checkpoint suffix, and the
    ``finetuning_task`` of a Hugging Face ``config.json`` beside its weights when one is set."""
    path = Path(path)
    names = [_stem(path)] if _stem(path) else []
    config = (path if path.is_dir() else path.parent) / "config.json"
    if config.is_file():
        try:
            task = json.loads(config.read_text()).get("finetuning_task")
        except (OSError, ValueError, AttributeError):
            task = None
        if isinstance(task, str) and task and task not in names:
            names.append(task)
    return names


def check_pairing(paths: Sequence[Any], task_names: Sequence[str]) -> None:
    """Refuse experts listed in another order than their tasks: an expert whose own name (:func:`expert_names`) is the
    name of a *different* task would silently calibrate and save under the wrong task. In-memory experts carry no
    name and pass."""
    index = {t: i for i, t in enumerate(task_names)}
    for i, p in enumerate(paths):
        if not isinstance(p, (str, os.PathLike)):
            continue
        for name in expert_names(p):
            j = index.get(name)
            if j is not None and j != i:
                raise ValueError(
                    f"expert {i} ({p}) is named {name!r} but is paired with task {task_names[i]!r}, while task "
                    f"{name!r} is number {j}: experts pair with task names by position; reorder the experts or the "
                    "task names"
                )


def default_task_names(paths: Sequence[PathLike], task_names: Optional[Sequence[str]], *,
                       reserved: Sequence[str] = ()) -> list[str]:
    """``task_names`` if given (checked against the number of experts and their pairing, :func:`check_pairing`), else
    unique names from the expert paths; either way checked to be safe as file names
    (:func:`~magic_pl.output.check_task_names`, with the adapter's ``reserved`` file names)."""
    from magic_pl.output import check_task_names

    if task_names is not None:
        if len(task_names) != len(paths):
            raise ValueError(f"{len(task_names)} task names given for {len(paths)} experts")
        names = check_task_names(task_names, reserved=reserved)
        check_pairing(paths, names)
        return names
    names = []
    for p in paths:
        stem = (_stem(p) if isinstance(p, (str, os.PathLike)) else "") or "task"
        name, i = stem, 1
        while name in names:
            i += 1
            name = f"{stem}_{i}"
        names.append(name)
    return check_task_names(names, reserved=reserved)
