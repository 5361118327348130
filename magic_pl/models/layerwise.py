"""Layer-by-layer merge + FSC ("sequential onloading"): calibrate models larger than memory, one block at a time.

:func:`layerwise_fsc` never holds a model. It keeps the calibration samples' hidden states (one ``[batch, tokens,
hidden]`` tensor per calibration batch, plus the attention mask and position embeddings the model computed for it) and
walks the model in *segments*: the stem (everything before the first block, e.g. ``embed_tokens``), each block
(a decoder layer), and the head (the modules after the last block, e.g. ``norm`` and ``lm_head``). For each segment it

1. reads the segment's base and expert tensors one key at a time and merges them
   (:class:`~magic_pl.models.streaming.KeyMerger`, the arithmetic of :func:`~magic_pl.models.streaming.stream_merge`,
   with the setting's row-separable weight steps), keeping the base, the K task vectors and the merged tensors of
   this segment only (each task vector is computed once, from one read of each expert);
2. runs the merged segment on the stored hidden states under a
   :class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator` whose units are the segment's modules, named as in the
   whole model: the same statistic, units, options (norm, statistic, granularity, gate, sensitive cap) and fold as
   whole-model FSC, because the calibrator *is* whole-model FSC's;
3. folds xi into the segment (float32 arithmetic) and writes its tensors into the output shards in the checkpoint's
   dtype;
4. advances the hidden states through the segment and releases it.

FSC's task feature ``dh(z; tau_k) = f_l(z; theta0 + tau_k) - f_l(z; theta0)`` is taken at the input ``z`` that module
``l`` receives in the **merged** model (docs/method.md, FSC), so only the merged stream has to be carried; the experts'
own activations never enter the statistic.

Modes (``mode``, default: the setting's FSC mode, ``"parallel"``):

- ``"parallel"`` (the paper's): the next segment starts from the *uncalibrated* merged outputs, so every module is
  measured on the uncalibrated merged model: the coefficients equal whole-model FSC's.
- ``"sequential"``: the next segment starts from the *calibrated* outputs, and inside a segment the calibrator's own
  sequential rounds calibrate each module after those before it; with ``tol=0`` this is exactly whole-model
  sequential FSC (every module measured with all modules executed before it calibrated), at the cost of up to one
  round per module of a segment instead of per module of the model.

Memory: one segment's base, K task vectors and merged tensors (K + 2 segment copies in the compute dtype, float32 by
default) plus the hidden states, whatever the number of blocks. The largest segment can be the stem or the head
(a vocabulary-sized embedding / ``lm_head``).

Architectures are described by a :class:`BlockPlan` (where the blocks are, which modules follow them);
:data:`BLOCK_PLANS` holds the Llama family (Llama, Mistral, Qwen2/3, ...: ``*ForCausalLM`` with ``model.layers``),
BERT sequence classifiers, ViT image classifiers (``ViTForImageClassification``) and CLIP vision towers
(``CLIPVisionModel``, ``CLIPVisionModelWithProjection``). The stem is run by the model's own ``forward`` up to the
first block, so the attention mask and rotary position embeddings are exactly those of the whole model; the head
slices the first token where the model's ``forward`` does (:attr:`BlockPlan.pool`). Checkpoint keys are matched to
the model's by ``transformers``' own loading renames (transformers 5 loads ViT's ``encoder.layer.N...`` as
``layers.N...``), and the output keeps the base's key names. Other models: use the whole-model path
(:func:`~magic_pl.models.streaming.streaming_fsc` or ``MagicModule``).

Classifiers whose heads differ per task (``body_of``): only the encoder they share (the classifier's ``base_model``,
e.g. ``bert``) is merged and calibrated, from a base that may be an ``AutoModel`` directory and experts that hold it
under the prefix; the heads are never merged, and FSC's statistic does not involve them (every unit is in the body),
so the body's xi are those of calibrating the whole classifiers.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl._memory import trim_heap
from magic_pl.calibration.dsc import Batches, call_with_batch, task_batches
from magic_pl.calibration.fsc import FSC_MODES, CalibrationDataError, CalibrationResult
from magic_pl.calibration.modules import find_units, fold_kind, primary_tensor
from magic_pl.models.base import find_tied_keys, parameters_on_meta
from magic_pl.models.io import ShardedSafetensorsWriter, copy_support_files
from magic_pl.models.streaming import (
    KeyMerger,
    KeyMergeStats,
    _config_dict,
    check_configs,
    check_headers,
    merge_request,
    open_checkpoint,
    resolve_device,
)
from magic_pl.statedict import CheckpointError, apply_delta, is_mergeable, tensor_dtype, tensor_shape

__all__ = ["BLOCK_PLANS", "BlockPlan", "LayerwiseReport", "block_plan", "layerwise_fsc"]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockPlan:
    """How to walk one architecture block by block.

    Attributes:
        family: a name for reports and errors.
        model_types: the ``config.model_type`` values it serves.
        auto_class: the ``transformers`` auto class that builds the model from its config.
        blocks: qualified name of the ``nn.ModuleList`` of blocks; each is called as the model calls it, with the
            arguments the model's own ``forward`` passed to the first block (attention mask, position embeddings, ...).
        head: the modules after the last block, applied one after another to its output (inference mode: dropout
            between them is the identity). Trailing modules that own only a tied alias are not run (their output
            feeds no calibrated module).
        architectures: ``config.architectures`` class names it serves (empty: any of ``auto_class``).
        pool: the head module that receives the first token ``hidden[:, 0]`` (the class token) instead of the whole
            sequence, where the model's ``forward`` slices it (ViT's ``classifier``, CLIP's ``post_layernorm``); the
            head modules after it take its output. Default ``None``: no slicing (BERT's pooler slices itself).
    """

    family: str
    model_types: tuple[str, ...]
    auto_class: str
    blocks: str
    head: tuple[str, ...]
    architectures: tuple[str, ...] = ()
    pool: Optional[str] = None

    def __post_init__(self) -> None:
        if self.pool is not None and self.pool not in self.head:
            raise ValueError(f"BlockPlan {self.family}: pool {self.pool!r} is not a head module {self.head}")

    def serves(self, config: Any) -> bool:
        """True for a config of this plan's model types and architectures."""
        if getattr(config, "model_type", None) not in self.model_types:
            return False
        archs = tuple(getattr(config, "architectures", None) or ())
        return not self.architectures or not archs or any(a in self.architectures for a in archs)

    def body(self, prefix: str) -> "BlockPlan":
        """The plan of the submodule ``prefix`` (a classifier's shared encoder, e.g. ``"bert"``): names relative to
        it, the head cut to the modules inside it (BERT's pooler, ViT's final layernorm; the classifier is left out).
        A ``ValueError`` when the blocks are not inside it."""
        if not _under(self.blocks, prefix) or self.blocks == prefix:
            raise ValueError(f"layer-by-layer FSC ({self.family}): the blocks {self.blocks!r} are not inside the "
                             f"body {prefix!r}; use the whole-model path")
        cut = len(prefix) + 1
        head = tuple(h[cut:] for h in self.head if _under(h, prefix) and h != prefix)
        pool = self.pool[cut:] if self.pool is not None and _under(self.pool, prefix) else None
        return BlockPlan(f"{self.family} body", self.model_types, self.auto_class, self.blocks[cut:], head,
                         self.architectures, pool)


#: The plans :func:`block_plan` chooses from, in order (extend to add an architecture). Where transformers versions
#: name the modules differently, one plan per naming, newest first: the first whose modules the built model has is used.
BLOCK_PLANS: list[BlockPlan] = [
    BlockPlan("llama", ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "helium"),
              "AutoModelForCausalLM", "model.layers", ("model.norm", "lm_head")),
    BlockPlan("bert-sequence-classification", ("bert",), "AutoModelForSequenceClassification", "bert.encoder.layer",
              ("bert.pooler", "classifier"), ("BertForSequenceClassification",)),
    # ViTForImageClassification: classifier(layernorm(blocks(...))[:, 0]); transformers 5 names the blocks
    # vit.layers (checkpoints keep vit.encoder.layer.N..., renamed on load), transformers 4 vit.encoder.layer
    BlockPlan("vit-image-classification", ("vit",), "AutoModelForImageClassification", "vit.layers",
              ("vit.layernorm", "classifier"), ("ViTForImageClassification",), pool="classifier"),
    BlockPlan("vit-image-classification", ("vit",), "AutoModelForImageClassification", "vit.encoder.layer",
              ("vit.layernorm", "classifier"), ("ViTForImageClassification",), pool="classifier"),
    # CLIP vision towers: pre_layrnorm runs in the stem; the pooled output is post_layernorm(last_hidden[:, 0])
    # (then visual_projection). transformers 5's CLIPVisionModel has no vision_model level (its checkpoints' prefix
    # is dropped on load); transformers 4's has
    BlockPlan("clip-vision", ("clip_vision_model",), "CLIPVisionModel", "encoder.layers", ("post_layernorm",),
              ("CLIPVisionModel",), pool="post_layernorm"),
    BlockPlan("clip-vision", ("clip_vision_model",), "CLIPVisionModel", "vision_model.encoder.layers",
              ("vision_model.post_layernorm",), ("CLIPVisionModel",), pool="vision_model.post_layernorm"),
    BlockPlan("clip-vision-projection", ("clip_vision_model",), "CLIPVisionModelWithProjection",
              "vision_model.encoder.layers", ("vision_model.post_layernorm", "visual_projection"),
              ("CLIPVisionModelWithProjection",), pool="vision_model.post_layernorm"),
]


def _candidate_plans(config: Any, body_of: Optional[str] = None) -> list[BlockPlan]:
    """The plans that may serve ``config`` (see :func:`block_plan`), in order; a ``ValueError`` when none does."""
    what = f"model_type {getattr(config, 'model_type', None)!r}"
    archs = getattr(config, "architectures", None)
    if archs:
        what += f" ({', '.join(archs)})"
    if body_of is None:
        plans = [p for p in BLOCK_PLANS if p.serves(config)]
    else:  # the base is often an AutoModel directory: its architectures name the encoder, not the classifier
        plans = [p for p in BLOCK_PLANS
                 if p.auto_class == body_of and getattr(config, "model_type", None) in p.model_types]
        what = f"the body of {body_of} models of {what}"
    if not plans:
        known = ", ".join(dict.fromkeys(f"{p.family} ({', '.join(p.model_types)}; {p.auto_class})"
                                        for p in BLOCK_PLANS))
        raise ValueError(f"layer-by-layer FSC has no block plan for {what}; known: {known}. Use the whole-model path "
                         "(magic_pl.models.streaming_fsc on the loaded merged model, or MagicModule), or add a "
                         "BlockPlan to magic_pl.models.layerwise.BLOCK_PLANS")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise ValueError(f"layer-by-layer FSC: {what} mixes layer types {sorted(set(layer_types))}, whose blocks take "
                         "different attention masks; use the whole-model path (streaming_fsc or MagicModule)")
    return plans


def block_plan(config: Any, body_of: Optional[str] = None) -> BlockPlan:
    """The :class:`BlockPlan` for a ``transformers`` config, or a ``ValueError`` saying to use the whole-model path.

    ``body_of``: a classifier auto class (``"AutoModelForSequenceClassification"``, ...) whose shared body is wanted;
    the plan is then chosen by that class and the model type, whatever ``config.architectures`` says (default
    ``None``: the whole model, chosen by model type and architectures).

    Models whose blocks need different arguments (``config.layer_types`` mixing sliding-window and full attention)
    are refused: the plan passes every block the first block's arguments.
    """
    return _candidate_plans(config, body_of)[0]


def _skeleton(config: Any, plan: BlockPlan, device: torch.device) -> nn.Module:
    """The model built from ``config`` with meta parameters and real buffers (on ``device``), in eval mode."""
    import transformers

    auto = getattr(transformers, plan.auto_class)
    build = getattr(auto, "from_config", None) or auto._from_config  # an auto class, or a model class (CLIP)
    with parameters_on_meta():
        model = build(config)
    model.eval()
    if hasattr(model, "config"):
        model.config.use_cache = False  # no KV cache is built or handed to the blocks
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type != "meta":
                module._buffers[name] = b.to(device)
    return model


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _fits(model: nn.Module, plan: BlockPlan) -> bool:
    named = dict(model.named_modules())
    return isinstance(named.get(plan.blocks), nn.ModuleList) and all(h in named for h in plan.head)


def _build(config: Any, plans: Sequence[BlockPlan], device: torch.device, body: bool
           ) -> tuple[nn.Module, nn.Module, BlockPlan, str]:
    """``(full skeleton, model walked, plan, body prefix)`` for the first of ``plans`` whose modules the built model
    has (plans of one architecture differ by transformers version); the model walked is the full one, or with
    ``body`` its ``base_model`` (prefix ``""`` without). None fitting: the first plan, for :func:`_segments`' error."""
    built: dict[str, nn.Module] = {}
    chosen: Optional[tuple[nn.Module, nn.Module, BlockPlan, str]] = None
    for plan in plans:
        if plan.auto_class not in built:
            built[plan.auto_class] = _skeleton(config, plan, device)
        full = built[plan.auto_class]
        prefix = full.base_model_prefix if body else ""
        if body and not isinstance(getattr(full, prefix, None), nn.Module):
            raise ValueError(f"layer-by-layer FSC ({plan.family}): {type(full).__name__} has no body {prefix!r}")
        candidate = (full, full.get_submodule(prefix), plan.body(prefix) if body else plan, prefix)
        if _fits(candidate[1], candidate[2]):
            return candidate
        chosen = chosen or candidate
    assert chosen is not None
    return chosen


def _key_namer(full: nn.Module, body: str = "") -> Callable[[str], Optional[str]]:
    """On-disk key -> the model's key (with ``body``, e.g. ``"bert"``: the key inside that submodule), by
    ``transformers``' own loading rules: its key renamings (transformers 5 loads ViT's
    ``encoder.layer.N.attention.attention.query`` as ``layers.N.attention.q_proj``, and CLIPVisionModel's keys
    without ``vision_model.``) and the base model prefix added or stripped. ``None``: not a key of the model (a head,
    a tensor the model lacks), or one a tensor conversion (fusing, splitting) consumes, which no key-by-key read
    can follow."""
    state = full.state_dict(keep_vars=True)
    prefix = getattr(full, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoints hold the module names, up to the base model prefix
        rename_source_key = None
    if rename_source_key is not None:
        conversions = get_model_conversion_mapping(full)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]

    def model_key(key: str) -> Optional[str]:
        if rename_source_key is None:
            if key in state:
                return key
            if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in state:
                return key[len(prefix) + 1:]
            return f"{prefix}.{key}" if prefix and f"{prefix}.{key}" in state else None
        new, converted = rename_source_key(key, renamings, converters, prefix, state)
        if new not in state and key in state:  # as transformers does: a module name renamed away is kept
            new, converted = rename_source_key(key, [], [], prefix, state)
        return new if new in state and converted is None else None

    def name(key: str) -> Optional[str]:
        found = model_key(key)
        if found is None or not body:
            return found
        return found[len(body) + 1:] if found.startswith(body + ".") else None

    return name


def _disk_names(sd: Any, name: Callable[[str], Optional[str]], keys: Collection[str]
                ) -> tuple[dict[str, str], list[str]]:
    """``(model key -> on-disk key for the model keys in keys, the other on-disk keys)``."""
    names: dict[str, str] = {}
    rest: list[str] = []
    for key in sd.keys():
        found = name(key)
        if found is not None and found in keys and found not in names:
            names[found] = key
        else:
            rest.append(key)
    return names, rest


def _keyed(sd: Any, names: Mapping[str, str], rest: Sequence[str], what: str) -> Any:
    """``sd`` under the model's keys (``names``) plus the on-disk keys ``rest``; ``sd`` itself when that changes
    nothing (its row-block reads stay available)."""
    if all(k == v for k, v in names.items()) and len(names) + len(rest) == len(sd):
        return sd
    clash = [k for k in rest if k in names]
    if clash:
        raise CheckpointError(f"{what}: on-disk keys {clash[:5]} are also the model's names of other keys "
                              f"({[names[k] for k in clash[:5]]}); the checkpoint mixes two key layouts")
    from magic_pl.statedict import RenamedView

    return RenamedView(sd, {**names, **{k: k for k in rest}})


# --------------------------------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Segment:
    """One unit of work: the modules (qualified name -> module) and the state keys it holds (tied aliases out)."""

    name: str
    kind: str  # "stem", "block" or "head"
    modules: dict[str, nn.Module]
    keys: list[str]


class _Stop(Exception):
    """Raised by the catcher at the first block: the stem has run."""


class _Catcher(nn.Module):
    """Stands in for the first block while the model's own ``forward`` runs the stem: records the block's input and
    arguments, then stops the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: Optional[tuple[Tensor, tuple, dict]] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.captured = (hidden, rest, kwargs)
        raise _Stop


class _SegmentRoot(nn.Module):
    """A segment's modules registered under their qualified names (so FSC's units, state keys and sensitive names are
    the whole model's), run by ``run``. The full model is never registered here: its other parameters are meta."""

    def __init__(self, modules: Mapping[str, nn.Module], run: Callable[..., Any]):
        super().__init__()
        for name, module in modules.items():
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, module)
        self._run = run
        self.eval()  # the containers are new modules (training mode by default); the segment runs for inference

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)


def _segments(model: nn.Module, plan: BlockPlan, tied: Mapping[str, str]) -> list[_Segment]:
    """Stem, blocks and head of ``model``, with every non-alias state key in exactly one of them."""
    named = dict(model.named_modules())
    if plan.blocks not in named or not isinstance(named[plan.blocks], nn.ModuleList):
        raise ValueError(f"layer-by-layer FSC ({plan.family}): {type(model).__name__} has no block list "
                         f"{plan.blocks!r}; use the whole-model path")
    blocks = named[plan.blocks]
    keys = [k for k in model.state_dict(keep_vars=True) if k not in tied]
    missing = [h for h in plan.head if h not in named]
    if missing:
        raise ValueError(f"layer-by-layer FSC ({plan.family}): {type(model).__name__} has no module(s) {missing}; "
                         "use the whole-model path")
    block_names = [f"{plan.blocks}.{i}" for i in range(len(blocks))]
    taken: set[str] = set()

    def keys_under(prefix: str) -> list[str]:
        out = [k for k in keys if _under(k, prefix) and k not in taken]
        taken.update(out)
        return out

    body = [_Segment(n, "block", {n: blocks[i]}, keys_under(n)) for i, n in enumerate(block_names)]
    head_modules = {h: named[h] for h in plan.head}
    head_keys = [k for h in plan.head for k in keys_under(h)]
    # the stem: the owners of every remaining key, collapsed to the top-most (a module and its children once)
    rest = [k for k in keys if k not in taken]
    owners: list[str] = []
    for k in rest:
        owner = k.rpartition(".")[0]
        if not any(_under(owner, o) for o in owners):
            owners = [o for o in owners if not _under(o, owner)] + [owner]
    if "" in owners:
        raise ValueError(f"layer-by-layer FSC ({plan.family}): the root of {type(model).__name__} owns tensors "
                         f"{[k for k in rest if '.' not in k]}; use the whole-model path")
    stem = _Segment("stem", "stem", {o: named[o] for o in owners}, rest)
    return [stem, *body, _Segment("head", "head", head_modules, head_keys)]


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, local = key.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), local


def _set_tensor(model: nn.Module, key: str, value: Tensor) -> Tensor:
    """Put ``value`` at ``key`` (a parameter stays a parameter, without gradient); returns the object now held."""
    module, local = _owner(model, key)
    if local in module._parameters:
        held = nn.Parameter(value, requires_grad=False)
        module._parameters[local] = held
        return held
    if local in module._buffers:
        module._buffers[local] = value
        return value
    raise KeyError(f"{key!r} is neither a parameter nor a buffer of the model")


def _get_tensor(model: nn.Module, key: str) -> Tensor:
    module, local = _owner(model, key)
    t = module._parameters.get(local)
    return module._buffers[local] if t is None else t.detach()


def _release(model: nn.Module, keys: Sequence[str]) -> None:
    """Back to meta: the segment's memory is freed (and any later use of it fails loudly)."""
    for key in keys:
        t = _get_tensor(model, key)
        _set_tensor(model, key, torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class _Residency:
    """The bytes of segment tensors held (base, task vectors, merged), counted from when they are stored until they
    are freed (``weakref.finalize``): the layer path's memory claim, measured rather than assumed."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def hold(self, t: Tensor) -> Tensor:
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.live -= n


# --------------------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LayerwiseReport:
    """What :func:`layerwise_fsc` did.

    Attributes:
        output: the written directory.
        calibration: the :class:`~magic_pl.calibration.fsc.CalibrationResult` over all segments (``coefficients``:
            xi per module; ``wsc_scales``: mean WSC row scale per tensor with a weight step).
        family: the :class:`BlockPlan` used; mode: ``"parallel"`` or ``"sequential"``.
        segments: stem + blocks + head; tensors: tensors written; merged: floating tensors merged; copied:
            non-floating tensors copied from the base.
        device, dtype: where and in which dtype segments were computed.
        seconds: wall time; segment_seconds: per segment; phase_seconds: summed over segments, reading and merging
            (``merge``), the samples' statistics, fold and hidden-state advance (``samples``), writing (``write``).
        peak_segment_bytes: the most bytes of segment tensors (base, task vectors, merged) held at once.
        max_segment_bytes: the largest segment's tensors in the compute dtype (one copy); model_bytes: the whole
            model's floating tensors in the compute dtype.
        leaked_bytes: segment bytes still held after a segment was released (0 unless something kept a reference).
        shards: the output shard files.
    """

    output: str
    calibration: CalibrationResult
    family: str
    mode: str
    segments: int = 0
    tensors: int = 0
    merged: int = 0
    copied: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    seconds: float = 0.0
    segment_seconds: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=lambda: {"merge": 0.0, "samples": 0.0, "write": 0.0})
    peak_segment_bytes: int = 0
    max_segment_bytes: int = 0
    model_bytes: int = 0
    leaked_bytes: int = 0
    shards: list[str] = field(default_factory=list)

    @property
    def coefficients(self) -> dict[str, float]:
        """Module name -> xi."""
        return self.calibration.coefficients

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["calibration"] = self.calibration.to_dict()
        return out


def _resolve_dtype(dtype: Optional[Union[str, torch.dtype]]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (float32, bfloat16, ...), got {dtype!r}")
    return dtype


def layerwise_fsc(
    base: PathLike,
    experts: Sequence[PathLike],
    task_samples: Batches,
    output: PathLike,
    *,
    merge_method: str = "task_arithmetic",
    merge_options: Optional[Mapping[str, Any]] = None,
    calibration: Any = "fsc",
    mode: Optional[str] = None,
    sensitive: Optional[Union[str, PathLike, Collection[str]]] = None,
    modules: Optional[Sequence[str]] = None,
    task_names: Optional[Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = "auto",
    dtype: Optional[Union[str, torch.dtype]] = None,
    tol: float = 1e-4,
    max_rounds: Optional[int] = None,
    bn_stats: str = "average",
    seed: int = 0,
    max_shard_size: Union[int, str] = "5GB",
    chunk_bytes: Union[int, str] = "256MB",
    copy_support: bool = True,
    check_config: bool = True,
    drop_page_cache: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    body_of: Optional[str] = None,
) -> LayerwiseReport:
    """Merge K experts of one Hugging Face base and calibrate the merge with FSC one block at a time, writing a
    ``save_pretrained``-loadable directory; memory is one block's tensors (x K + 2) plus the samples' hidden states.

    Args:
        base: the base model directory (``config.json`` + safetensors, sharded or not).
        experts: the K expert directories (same architecture and keys).
        task_samples: unlabelled calibration batches per task, as the whole model takes them
            (:data:`~magic_pl.calibration.dsc.Batches`: ``{task_index: [batch, ...]}`` or ``(task_index, batch)``
            pairs; a batch is ``input_ids``, a tuple of positional inputs or a dict such as ``{"input_ids": ...,
            "attention_mask": ...}``); every task needs at least one. Moved to ``device``.
        output: the output directory (written to a temporary directory and renamed into place, replaced only when
            empty, a previous magic-pl output, or with ``overwrite``).
        merge_method, merge_options: a merge method of :data:`magic_pl.merging.MERGE_METHODS` and its options
            (default task arithmetic with its defaults); it must merge tensor by tensor (no ``global_topk``).
        calibration: a calibration setting with a feature step (default ``"fsc"``; ``"dsc"`` and other settings
            whose weight steps are row-separable also work: the weight steps run on each key as it is merged).
        mode: ``"parallel"`` or ``"sequential"`` (default ``None``: the setting's FSC mode, the paper's parallel).
        sensitive: a given magnitude-sensitive set (names or a ranking JSON); needed by settings that detect one.
        modules: explicit modules to calibrate, by qualified name (default: FSC's automatic units, tied aliases out,
            as :func:`~magic_pl.models.streaming.streaming_fsc`).
        task_names: names of the tasks, for errors and the report.
        device: where segments run (default ``"auto"``: CUDA when available).
        dtype: the compute dtype of the segments (default ``None``: float32, so statistics and the fold are float32
            even for bf16 checkpoints; the output keeps each tensor's checkpoint dtype).
        tol, max_rounds: sequential mode's stopping rule inside a segment (as
            :class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator`; default 1e-4 and one round per module of the
            segment; ``tol=0`` is exact).
        bn_stats, seed: as in :func:`magic_pl.merging.merge`.
        max_shard_size: output shard size (default ``"5GB"``, as ``transformers``).
        chunk_bytes: working-set bound per row block of row-separable methods and weight steps (default ``"256MB"``).
        copy_support: copy the base directory's config / tokenizer / generation files (default ``True``).
        check_config: compare ``config.json`` architecture fields of base and experts (default ``True``).
        drop_page_cache: ask the kernel to drop read pages from the page cache (default ``False``).
        overwrite: replace an existing ``output`` that magic-pl did not write (default ``False``).
        progress: print one line per segment (default ``False``).
        body_of: the ``transformers`` auto class of classifier experts whose heads differ per task
            (``"AutoModelForSequenceClassification"``, ``"AutoModelForImageClassification"``): merge and calibrate
            only the encoder they share (the classifier's ``base_model``, e.g. ``bert``, with BERT's pooler; xi keyed
            inside it, e.g. ``encoder.layer.0.output.dense``). The base and the experts may hold it under the prefix
            (``bert.``) or bare (an ``AutoModel`` directory); their other tensors (heads, a pooler or MLM head the
            body lacks) are neither read nor written. The output is the body alone: its keys without the prefix and a
            ``config.json`` naming its class, as the body's ``save_pretrained`` writes them. Default ``None``: the
            whole model, every tensor of the base written.

    Returns:
        A :class:`LayerwiseReport` (``report.coefficients``: xi per module).

    Raises:
        ValueError: an architecture without a :class:`BlockPlan` (use the whole-model path), a setting without a
            feature step, a module that cannot be folded into weights.
        CalibrationDataError: a task without samples, or non-finite features (nothing is written).
    """
    from transformers import AutoConfig

    from magic_pl.output import OutputLocation

    t0 = time.perf_counter()
    request = merge_request(merge_method, merge_options, calibration, sensitive, caller="layerwise_fsc",
                            feature=True)
    setting = request.setting
    if not setting.uses_data:
        raise ValueError(f"layerwise_fsc: calibration {setting.to_string()!r} has no feature step; merge with "
                         "stream_merge instead")
    if setting.feature_step.name != "fsc":
        raise ValueError(f"layerwise_fsc: calibration {setting.to_string()!r}: its feature step "
                         f"{setting.feature_step.name!r} is not FSC; use its own path")
    if mode is not None:
        if mode not in FSC_MODES:
            raise ValueError(f"unknown FSC mode {mode!r}; choose one of {FSC_MODES}")
        from dataclasses import replace

        from magic_pl.calibration.settings import CalibrationSetting

        steps = [replace(s, mode=mode) if s.kind == "feature" else s for s in setting.steps]
        setting = CalibrationSetting(steps, sensitive=setting.sensitive, alpha=setting.alpha)
    fsc_mode = setting.fsc_options()["mode"]
    if not experts:
        raise CheckpointError("need at least one expert, got none")
    base_dir = Path(base) if Path(base).is_dir() else Path(base).parent
    if _config_dict(base) is None:
        raise CheckpointError(f"base {base}: layer-by-layer FSC needs the model's config.json next to its weights")
    cdtype = _resolve_dtype(dtype)
    names = [f"expert {i} ({p})" for i, p in enumerate(experts)]
    if check_config:
        check_configs(base, experts, names)
    config = AutoConfig.from_pretrained(base_dir)
    plans = _candidate_plans(config, body_of)  # an unsupported architecture fails here, before the output is touched
    dev = resolve_device(device)
    out_loc = OutputLocation(output, overwrite=overwrite, inputs=[base, *experts]).check()
    with out_loc:
        full, model, plan, body = _build(config, plans, dev, body_of is not None)
        segments = _segments(model, plan, find_tied_keys(model))
        opened = [open_checkpoint(p, drop_page_cache=drop_page_cache) for p in (base, *experts)]
        try:
            seg_keys = {k for seg in segments for k in seg.keys}
            name = _key_namer(full, body)
            base_names, rest = _disk_names(opened[0], name, seg_keys)
            for seg in segments:
                absent = [k for k in seg.keys if k not in base_names]
                if absent:
                    raise CheckpointError(f"base {base}: the {plan.family} model built from its config.json has "
                                          f"{absent[:5]} (segment {seg.name!r}), which its weights lack (or hold "
                                          "only through a tensor conversion of transformers' loading)")
            # with a body, the rest (heads, tensors the body lacks) is neither merged nor written
            extra = [] if body else rest
            base_sd = _keyed(opened[0], base_names, extra, f"base {base}")
            expert_sds = []
            for label, sd in zip(names, opened[1:]):
                e_names, e_rest = _disk_names(sd, name, seg_keys)
                expert_sds.append(_keyed(sd, e_names, [] if body else e_rest, label))
            check_headers(base_sd, expert_sds, names)  # an expert's missing or extra keys, shapes, dtypes
            # the base's key names (a body's without its prefix, as the body's save_pretrained writes them)
            out_names = {k: v[len(body) + 1:] if body and v.startswith(body + ".") else v
                         for k, v in base_names.items()}
            if modules is not None:
                unknown = [m for m in modules if not any(_under(m, o) for s in segments for o in s.modules)]
                if unknown:
                    raise KeyError(f"modules {unknown} are in no segment of the {plan.family} model")
            batches = [(k, _to_device(b, dev)) for k, b in task_batches(task_samples)]
            if not batches:
                raise CalibrationDataError("layerwise_fsc has no calibration batches: give unlabelled batches of "
                                           "every task")
            runner = _Runner(model, plan, segments, request, base_sd, expert_sds, setting, dev, cdtype,
                             bn_stats=bn_stats, seed=seed, chunk_bytes=chunk_bytes, modules=modules,
                             task_names=task_names, mode=fsc_mode, tol=tol, max_rounds=max_rounds, progress=progress,
                             out_names=out_names)
            disk_plan = [(out_names.get(k, k), tuple(tensor_shape(base_sd, k)), tensor_dtype(base_sd, k))
                         for k in base_sd.keys()]
            tmp = out_loc.stage()
            writer = ShardedSafetensorsWriter(tmp, disk_plan, max_shard_size=max_shard_size)
            try:
                report = runner.run(batches, writer, extra)
            except BaseException:
                writer.abort()
                raise
            writer.close()
        finally:
            for sd in opened:
                close = getattr(sd, "close", None)
                if close is not None:
                    close()
        report.output = str(output)
        report.shards = [p.name for p in writer.shard_files]
        report.tensors = len(disk_plan)
        if body:  # the body's own config, as its save_pretrained writes it (before the base's is copied)
            body_config = AutoConfig.from_pretrained(base_dir)
            body_config.architectures = [type(model).__name__]
            body_config.save_pretrained(tmp)
        if copy_support:
            copy_support_files(base_dir, tmp)
        out_loc.commit({"content": "layerwise_fsc", "method": request.method, "method_options": request.options,
                        "calibration": setting.to_string(), "mode": fsc_mode, "base": str(base),
                        "experts": [str(e) for e in experts], **({"body": body} if body else {})})
    report.seconds = time.perf_counter() - t0
    return report


class _Runner:
    """The segment loop of :func:`layerwise_fsc` (its state: the skeleton, the hidden states, the residency count)."""

    def __init__(self, model: nn.Module, plan: BlockPlan, segments: list[_Segment], request: Any, base_sd: Any,
                 expert_sds: Sequence[Any], setting: Any, device: torch.device, dtype: torch.dtype, *, bn_stats: str,
                 seed: int, chunk_bytes: Union[int, str], modules: Optional[Sequence[str]],
                 task_names: Optional[Sequence[str]], mode: str, tol: float, max_rounds: Optional[int],
                 progress: bool, out_names: Optional[Mapping[str, str]] = None):
        self.model, self.plan, self.segments = model, plan, segments
        self.out_names = dict(out_names or {})  # model key -> the key written (default: the same)
        self.base_sd, self.expert_sds, self.setting = base_sd, list(expert_sds), setting
        self.merger = KeyMerger(base_sd, expert_sds, request, bn_stats=bn_stats, seed=seed, device=device,
                                chunk_bytes=chunk_bytes)
        self.sensitive = request.sensitive
        self.device, self.dtype = device, dtype
        self.modules, self.task_names, self.mode = modules, task_names, mode
        self.tol, self.max_rounds, self.progress = tol, max_rounds, progress
        self.residency = _Residency()
        self.wsc_scales: dict[str, float] = {}
        self.blocks: nn.ModuleList = model.get_submodule(plan.blocks)

    # --- loading ----------------------------------------------------------------------------------------------------
    def load(self, seg: _Segment, report: LayerwiseReport) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Merge the segment's keys into the skeleton (compute dtype, on the device); returns its base tensors and
        K task vectors (compute dtype), each computed once."""
        K = len(self.expert_sds)
        hold = self.residency.hold
        base: dict[str, Tensor] = {}
        taus: list[dict[str, Tensor]] = [{} for _ in range(K)]
        for key in seg.keys:
            shape, dtype = tuple(tensor_shape(self.base_sd, key)), tensor_dtype(self.base_sd, key)
            if not is_mergeable(dtype):
                hold(_set_tensor(self.model, key, self.base_sd[key].to(self.device)))
                report.copied += 1
                continue
            stats = KeyMergeStats()
            full: Optional[list[Tensor]] = None  # base, K task vectors, merged (row blocks of a chunked key)
            for start, bc, key_taus, merged_tau in self.merger.rows(key, shape, dtype, stats):
                parts = [bc.to(self.dtype), *(t.to(self.dtype) for t in key_taus),
                         apply_delta(bc, merged_tau, key=key, name="merged model", out_dtype=self.dtype)]
                key_taus.clear()
                if start is None:
                    full = parts
                    continue
                if full is None:
                    full = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in parts]
                for dst, src in zip(full, parts):
                    dst[start:start + src.shape[0]] = src
                del parts
            assert full is not None
            base[key] = hold(full[0])
            for k in range(K):
                taus[k][key] = hold(full[1 + k])
            hold(_set_tensor(self.model, key, full[-1]))
            del full
            if self.setting.uses_wsc and stats.scale_sum:
                self.wsc_scales[key] = stats.scale_sum / stats.rows
            report.merged += 1
        return base, taus

    # --- running ----------------------------------------------------------------------------------------------------
    def _stem_run(self, collect: Optional[list]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Tensor:
            first, catcher = self.blocks[0], _Catcher()
            self.blocks[0] = catcher
            try:
                self.model(*args, **kwargs)
            except _Stop:
                pass
            else:
                raise RuntimeError(f"{type(self.model).__name__} did not reach its first block {self.plan.blocks}.0")
            finally:
                self.blocks[0] = first
            assert catcher.captured is not None
            if collect is not None:
                collect.append(catcher.captured)
            return catcher.captured[0]

        return run

    def _block_run(self, block: nn.Module, collect: Optional[list]) -> Callable[..., Any]:
        def run(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = primary_tensor(block(hidden, *args, **kwargs))
            if out is None:
                raise RuntimeError(f"block {type(block).__name__} returned no tensor")
            if collect is not None:
                collect.append(out)
            return out

        return run

    def _head_run(self, chain: Mapping[str, nn.Module]) -> Callable[..., Any]:
        def run(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = hidden
            for name, module in chain.items():
                if name == self.plan.pool:  # the class token, as the model's forward slices it
                    out = out[:, 0]
                out = primary_tensor(module(out))
            return out

        return run

    def _root(self, seg: _Segment, collect: Optional[list]) -> _SegmentRoot:
        if seg.kind == "stem":
            run = self._stem_run(collect)
        elif seg.kind == "block":
            run = self._block_run(next(iter(seg.modules.values())), collect)
        else:
            order = list(seg.modules)
            held = [name for name in order if any(_under(k, name) for k in seg.keys)]
            # trailing modules without tensors of their own (lm_head holding only a tied alias) feed nothing
            # calibrated; parameter-free ones before (OLMo's non-affine final norm) simply run
            chain_names = order[:order.index(held[-1]) + 1] if held else []
            aliased = [n for n in chain_names if n not in held and any(
                t.device.type == "meta" for t in (*seg.modules[n].parameters(), *seg.modules[n].buffers()))]
            if aliased:
                raise ValueError(f"layer-by-layer FSC ({self.plan.family}): head module(s) {aliased} hold only "
                                 "tied aliases but feed later head modules; use the whole-model path")
            run = self._head_run({n: seg.modules[n] for n in chain_names})
            return _SegmentRoot({n: seg.modules[n] for n in chain_names}, run)
        return _SegmentRoot(seg.modules, run)

    @staticmethod
    def _call(root: nn.Module, seg: _Segment, item: tuple[int, Any, tuple, dict]) -> Any:
        k, x, args, kwargs = item
        if seg.kind == "stem":
            return call_with_batch(root, x)
        return root(x, *args, **kwargs)

    def _advance(self, seg: _Segment, items: list, collected: list) -> list:
        """The next segment's inputs from this one's outputs (stem: the captured first-block call)."""
        if seg.kind == "stem":
            return [(k, h, args, kwargs) for (k, _x, _a, _kw), (h, args, kwargs) in zip(items, collected)]
        return [(k, out, args, kwargs) for (k, _x, args, kwargs), out in zip(items, collected)]

    def calibrate(self, seg: _Segment, items: list, base: dict[str, Tensor], taus: list[dict[str, Tensor]]
                  ) -> tuple[Optional[CalibrationResult], list]:
        """FSC on one segment; returns its result (``None`` without units) and the next segment's inputs."""
        collected: list = []
        parallel = self.mode == "parallel"
        root = self._root(seg, collected if parallel else None)
        names = None
        if self.modules is not None:
            present = dict(root.named_modules())
            names = [m for m in self.modules if m in present]
        units = find_units(root, names)
        if not units:
            for item in items:
                self._call(root, seg, item)
            return None, self._advance(seg, items, collected) if seg.kind != "head" else []
        unfoldable = [u.name for u in units if fold_kind(u.module) == "runtime"]
        if unfoldable:
            raise ValueError(f"layer-by-layer FSC: module(s) {unfoldable} cannot be folded into weights (they would "
                             "need a runtime wrapper, which a plain checkpoint cannot hold); use the whole-model path")
        calibrator = self.setting.feature_calibrator(base, root, taus, self.sensitive, modules=[u.name for u in units],
                                                     task_names=self.task_names)
        calibrator.tol, calibrator.max_rounds = float(self.tol), self.max_rounds
        for k, x, args, kwargs in items:
            if seg.kind == "stem":
                call_with_batch(calibrator.update, x, k)
            else:
                calibrator.update(k, x, *args, **kwargs)
        # float32 fold (float64 only for a float64 compute dtype): no whole-tensor float64 temporaries
        result = calibrator.fold(dtype=torch.float64 if self.dtype == torch.float64 else torch.float32)
        del calibrator
        if result.wrapped:
            raise ValueError(f"layer-by-layer FSC: module(s) {result.wrapped} were wrapped, not folded; use the "
                             "whole-model path")
        if seg.kind == "head":
            return result, []
        if not parallel:  # the next segment starts from the calibrated outputs
            root = self._root(seg, collected)
            with torch.no_grad():
                for item in items:
                    self._call(root, seg, item)
        return result, self._advance(seg, items, collected)

    def run(self, batches: list[tuple[int, Any]], writer: ShardedSafetensorsWriter, extra: Sequence[str]
            ) -> LayerwiseReport:
        report = LayerwiseReport(output="", calibration=CalibrationResult(), family=self.plan.family, mode=self.mode,
                                 segments=len(self.segments), device=str(self.device),
                                 dtype=str(self.dtype).removeprefix("torch."))
        esize = torch.empty((), dtype=self.dtype).element_size()
        sizes = {seg.name: sum(tensor_shape(self.base_sd, k).numel() for k in seg.keys
                               if is_mergeable(tensor_dtype(self.base_sd, k))) * esize for seg in self.segments}
        report.max_segment_bytes = max(sizes.values())
        report.model_bytes = sum(sizes.values())
        results: list[CalibrationResult] = []
        items: list = [(k, b, (), {}) for k, b in batches]
        for i, seg in enumerate(self.segments):
            t0 = time.perf_counter()
            base, taus = self.load(seg, report)
            t1 = time.perf_counter()
            with torch.no_grad():
                result, items_next = self.calibrate(seg, items, base, taus)
            t2 = time.perf_counter()
            del base, taus
            if result is not None:
                results.append(result)
            for key in seg.keys:
                t = _get_tensor(self.model, key)
                writer.write(self.out_names.get(key, key), t.to(tensor_dtype(self.base_sd, key)).cpu())
            report.phase_seconds["merge"] += t1 - t0
            report.phase_seconds["samples"] += t2 - t1
            report.phase_seconds["write"] += time.perf_counter() - t2
            _release(self.model, seg.keys)
            trim_heap()
            items = items_next
            report.leaked_bytes = max(report.leaked_bytes, self.residency.live)
            report.segment_seconds[seg.name] = time.perf_counter() - t0
            if self.progress:
                print(f"[layerwise_fsc] {i + 1}/{len(self.segments)} {seg.name}: "
                      f"{report.segment_seconds[seg.name]:.1f}s", flush=True)
        uncalibrated = []
        for key in extra:  # on disk but in no segment (e.g. a checkpoint's own extra buffers): merged, not calibrated
            shape, dtype = tuple(tensor_shape(self.base_sd, key)), tensor_dtype(self.base_sd, key)
            if not is_mergeable(dtype):
                writer.write(key, self.base_sd[key].to(dtype))
                report.copied += 1
                continue
            for start, bc, key_taus, merged_tau in self.merger.rows(key, shape, dtype, KeyMergeStats()):
                key_taus.clear()
                writer.write(key, apply_delta(bc, merged_tau, key=key, out_dtype=dtype).cpu(), row_offset=start or 0)
            report.merged += 1
            uncalibrated.append(key)
        report.peak_segment_bytes = self.residency.peak
        report.calibration = self._combine(results, uncalibrated)
        return report

    def _combine(self, results: Sequence[CalibrationResult], uncalibrated: list[str]) -> CalibrationResult:
        """One result for the whole model from the segments' (units are disjoint, so their fields concatenate)."""
        opts = self.setting.fsc_options()
        total = CalibrationResult(mode=self.mode, norm=opts["norm"], statistic=opts["statistic"],
                                  granularity=opts["granularity"], gate=opts["gate"], uncalibrated=list(uncalibrated))
        for r in results:
            total.coefficients.update(r.coefficients)
            total.task_ratios.update(r.task_ratios)
            total.channel_coefficients.update(r.channel_coefficients)
            for name in ("folded", "wrapped", "unchanged", "uncalibrated", "sensitive"):
                getattr(total, name).extend(getattr(r, name))
            total.rounds = max(total.rounds, r.rounds)
            total.samples_per_task = list(r.samples_per_task)
        out = self.setting.result(total)
        out.wsc_scales = dict(self.wsc_scales)
        return out
