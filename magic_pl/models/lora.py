"""PEFT LoRA adapters: task vectors ``B @ A * scale`` as dense deltas of the base, merged and calibrated; output as a
merged dense model or, for linear merges with WSC, as one LoRA adapter.

The on-disk PEFT format is read directly (the ``peft`` package is not needed): ``adapter_config.json`` (``r``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``fan_in_fan_out``, ``task_type``) and
``adapter_model.safetensors`` (or ``adapter_model.bin``) with keys ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` (``lora_embedding_A`` / ``lora_embedding_B`` for embeddings); other tensors (``modules_to_save``,
trained biases) are full replacement values of ``base_model.model.<module>.<name>``. Following PEFT's
``get_delta_weight`` (Hu et al., LoRA, ICLR 2022; Kalajdzievski, rsLoRA, 2023):

- Linear: ``delta = B @ A * s`` (transposed when ``fan_in_fan_out``, GPT-2 ``Conv1D``);
- Embedding: ``delta = (B @ A).T * s`` with ``A: [r, num_embeddings]``, ``B: [dim, r]``;
- Conv: 1x1 kernels ``(B[:, :, 0, 0] @ A[:, :, 0, 0])[..., None, None] * s``; larger kernels
  ``conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3) * s``;
- ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; per-module ``rank_pattern`` /
  ``alpha_pattern`` override ``r`` / ``lora_alpha``.

DoRA (``use_dora``) is rejected: its magnitude vector makes the update depend on the base non-additively.

Low-rank output (:func:`merge_lora_lowrank`): a linear merge ``tau_m = sum_k c_k s_k B_k A_k`` (weight average
``c_k = 1/K``, task arithmetic ``c_k = lambda``) is the LoRA ``B_m = [c_1 s_1 B_1 | ... | c_K s_K B_K]``,
``A_m = [A_1; ...; A_K]`` of rank ``sum_k r_k``, and WSC scales the rows of the stored weight,
``diag(lambda) B_m A_m``: ``B' = diag(lambda) B_m`` (``A' = A_m diag(lambda)`` where the stored weight is the
transpose: ``fan_in_fan_out`` and embeddings). The rank is kept, so the output is again a PEFT adapter
(:func:`save_lora_adapter`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magic_pl.models._hf import dtype_kwargs, from_pretrained_checked
from magic_pl.models.base import (
    MergeSetup,
    ModelAdapter,
    default_task_names,
    find_tied_keys,
)
from magic_pl.models.io import copy_support_files, save_pretrained_atomic
from magic_pl.output import OutputLocation
from magic_pl.statedict import (
    CheckpointError,
    KeyedMapping,
    StateDict,
    all_finite,
    apply_delta,
    ensure_finite,
    is_mergeable,
    load_state_dict,
    tensor_dtype,
    tensor_shape,
    tensor_task_vector,
)

if TYPE_CHECKING:
    from magic_pl.merging.method import Linear

__all__ = [
    "LoRAModule",
    "LoRACheckpoint",
    "LoRATaskVector",
    "LoRAAdapter",
    "LowRankDelta",
    "merge_lora_lowrank",
    "save_lora_adapter",
    "lora_delta",
]

PathLike = Union[str, os.PathLike]
_PREFIX = "base_model.model."
_LORA_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?"
    r"(?:\.weight)?$"
)
_UNSUPPORTED = ("lora_magnitude_vector", "lora_E", "lora_ranknum")
_TASK_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


@dataclass
class LoRAModule:
    """One adapted module: ``delta = lora_delta(self)`` has the shape of ``<module>.weight`` in the base.

    Attributes:
        module: module path in the base model (``model.layers.0.self_attn.q_proj``).
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        A, B: the LoRA factors as stored (``lora_A``/``lora_B`` weights, or the embedding parameters).
        scale: ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
        fan_in_fan_out: the base stores the weight transposed (``Conv1D``); linear only.
    """

    module: str
    kind: str
    A: Tensor
    B: Tensor
    scale: float
    fan_in_fan_out: bool = False

    @property
    def key(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def transposed(self) -> bool:
        """The stored weight is ``(B @ A).T``: its rows index ``A``'s columns (embeddings, ``fan_in_fan_out``)."""
        return self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out)


def lora_delta(m: LoRAModule, *, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Tensor:
    """The dense weight delta of one LoRA module (PEFT's ``get_delta_weight``), in ``dtype`` (float32 default)."""
    A = m.A.to(device=device, dtype=dtype)
    B = m.B.to(device=device, dtype=dtype)
    if m.kind == "conv":
        if A.shape[2:] == (1, 1) and B.shape[2:] == (1, 1):
            delta = (B[:, :, 0, 0] @ A[:, :, 0, 0])[:, :, None, None]
        else:
            delta = F.conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3)
    else:
        delta = B @ A
        if m.transposed:
            delta = delta.T
    return delta * m.scale


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first pattern matching the module path as a suffix (regex)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


class LoRACheckpoint:
    """One PEFT LoRA adapter directory, read without ``peft``.

    Args:
        path: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` / ``.bin``).
        trust_pickle: read an ``adapter_model.bin`` with full pickle (only for files you trust); default ``False``.

    Attributes:
        config: the parsed ``adapter_config.json``.
        modules: weight key (``<module>.weight``) -> :class:`LoRAModule`.
        full: base key -> full replacement tensor (``modules_to_save``, trained biases).
    """

    def __init__(self, path: PathLike, *, trust_pickle: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"LoRA adapter {self.path} not found")
        cfg_file = self.path / "adapter_config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{self.path} is not a PEFT adapter directory (no adapter_config.json)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except ValueError as err:
            raise CheckpointError(f"cannot parse {cfg_file}: {err}") from err
        ptype = str(self.config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{self.path}: peft_type {ptype!r} is not supported (only LORA)")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.path}: DoRA adapters (use_dora) are not supported: their update is not "
                                  "an additive low-rank delta")
        weights = next((self.path / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                        if (self.path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{self.path} holds no adapter_model.safetensors or adapter_model.bin")
        sd = load_state_dict(weights, trust_pickle=trust_pickle)
        self.weights_file = weights
        self.modules: dict[str, LoRAModule] = {}
        self.full: dict[str, Tensor] = {}
        parts: dict[str, dict[str, Tensor]] = {}
        for key in sd:
            if any(u in key for u in _UNSUPPORTED):
                raise CheckpointError(
                    f"{weights}: tensor {key!r} belongs to an unsupported LoRA variant (DoRA/AdaLoRA)"
                )
            local = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_RE.match(local)
            if m:
                parts.setdefault(m.group("module"), {})[m.group("which")] = sd[key]
            else:
                self.full[local.replace(".modules_to_save.", ".")] = sd[key]
        r_default = int(self.config.get("r", 8))
        alpha_default = float(self.config.get("lora_alpha", r_default))
        rslora = bool(self.config.get("use_rslora", False))
        fifo = bool(self.config.get("fan_in_fan_out", False))
        for module, p in parts.items():
            if "lora_A" in p or "lora_B" in p:
                if set(p) != {"lora_A", "lora_B"}:
                    raise CheckpointError(f"{weights}: module {module!r} has {sorted(p)}, needs lora_A and lora_B")
                A, B = p["lora_A"], p["lora_B"]
                kind = "conv" if A.dim() == 4 else "linear"
            else:
                if set(p) != {"lora_embedding_A", "lora_embedding_B"}:
                    raise CheckpointError(f"{weights}: module {module!r} has {sorted(p)}, needs both embedding factors")
                A, B = p["lora_embedding_A"], p["lora_embedding_B"]
                kind = "embedding"
            r = int(_pattern_value(self.config.get("rank_pattern") or {}, module, r_default))
            alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, alpha_default))
            if A.shape[0] != r or B.shape[1] != r:
                raise CheckpointError(
                    f"{weights}: module {module!r} has rank {A.shape[0]} (A {tuple(A.shape)}, B {tuple(B.shape)}) but "
                    f"the config says r={r}"
                )
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            self.modules[f"{module}.weight"] = LoRAModule(module, kind, A, B, scale, fifo and kind == "linear")

    @property
    def task_type(self) -> Optional[str]:
        return self.config.get("task_type")

    @property
    def base_model_name_or_path(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    def touched_keys(self) -> list[str]:
        """Base keys this adapter changes (LoRA weights and full replacements)."""
        return list(self.modules) + [k for k in self.full if k not in self.modules]

    def delta(self, key: str, base: Optional[Tensor] = None, *, check_finite: bool = True) -> Tensor:
        """Dense float32 delta for ``key``: the LoRA delta, ``full - base`` for replaced tensors (``base`` needed),
        or zeros (``base`` needed for the shape). NaN/Inf is refused (naming the adapter file and key) unless
        ``check_finite=False``."""
        where = f"adapter {self.weights_file}"
        if key in self.modules:
            out = lora_delta(self.modules[key])
            if check_finite and not all_finite(out):
                m = self.modules[key]
                ensure_finite(m.A, f"{m.module} lora_A", where)
                ensure_finite(m.B, f"{m.module} lora_B", where)
                ensure_finite(out, key, f"{where} (B @ A * {m.scale:g} overflows)")
            return out
        if key in self.full:
            if base is None:
                raise ValueError(f"the base tensor is needed for the replaced tensor {key!r}")
            return tensor_task_vector(self.full[key], base, key, name=where, check_finite=check_finite)
        if base is None:
            raise KeyError(key)
        return torch.zeros(base.shape, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"LoRACheckpoint({self.path}, {len(self.modules)} LoRA modules, {len(self.full)} full tensors)"


class LoRATaskVector(KeyedMapping):
    """The task vector of one adapter over ``keys``: LoRA deltas, full replacements minus the base, zeros elsewhere;
    float32, computed on access."""

    def __init__(self, adapter: LoRACheckpoint, base: StateDict, keys: Sequence[str], name: str = "adapter"):
        self.adapter, self.base, self.name = adapter, base, name
        self._set_keys(keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._set:
            raise KeyError(key)
        b = self.base[key]
        out = self.adapter.delta(key, b)
        if tuple(out.shape) != tuple(b.shape):
            raise CheckpointError(
                f"{self.name}: delta for {key!r} has shape {tuple(out.shape)}, the base weight {tuple(b.shape)}"
            )
        return out


class _ExpertView(Mapping[str, Tensor]):
    """``base + tau`` over every base key (tau absent -> the base tensor): the expert as a state dict."""

    def __init__(self, base: StateDict, tau: Mapping[str, Tensor]):
        self.base, self.tau = base, tau

    def __getitem__(self, key: str) -> Tensor:
        b = self.base[key]
        if key in self.tau and is_mergeable(b):
            return apply_delta(b, self.tau[key], key=key, name="expert")
        return b

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, key: str) -> torch.Size:
        return tensor_shape(self.base, key)

    def dtype(self, key: str) -> torch.dtype:
        return tensor_dtype(self.base, key)


class LoRAAdapter(ModelAdapter):
    """PEFT LoRA adapters of one base -> :class:`~magic_pl.models.base.MergeSetup` with the whole base model as the
    body and exact LoRA task vectors over the modules the adapters touch.

    Args:
        base: the base model directory (the adapters' ``base_model_name_or_path``).
        adapters: PEFT adapter directories, one per task.
        task_names: one name per adapter (default: the directory names).
        auto_class: ``transformers`` auto class of the base (default: from the adapters' ``task_type``,
            ``CAUSAL_LM`` -> ``AutoModelForCausalLM``; ``AutoModel`` when unset).
        dtype: dtype of the base (default ``"float32"``).
        trust_pickle: read ``adapter_model.bin`` files with full pickle (only for files you trust); default
            ``False``. The base is loaded by ``transformers``' ``from_pretrained``, which applies its own rules.
    """

    def __init__(self, base: str, adapters: list[str], task_names: Optional[list[str]] = None,
                 auto_class: Optional[str] = None, dtype: Optional[str] = "float32", trust_pickle: bool = False):
        if not adapters:
            raise ValueError("need at least one LoRA adapter")
        self.base_path = str(base)
        self.adapter_paths = [str(a) for a in adapters]
        self.task_names = default_task_names(self.adapter_paths, task_names)
        self.auto_class = auto_class
        self.dtype = dtype
        self.trust_pickle = trust_pickle
        self.checkpoints: list[LoRACheckpoint] = []

    def _auto(self) -> Any:
        import transformers

        if self.auto_class is not None:
            name = self.auto_class
        else:
            types = {c.task_type for c in self.checkpoints}
            if len(types) > 1:
                raise CheckpointError(f"adapters disagree on task_type: {sorted(map(str, types))}; pass auto_class=")
            name = _TASK_AUTO_CLASS.get(str(next(iter(types))).upper() if types and None not in types else "",
                                        "AutoModel")
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ValueError(f"unknown transformers auto class {name!r}")
        return cls

    def setup(self) -> MergeSetup:
        self.checkpoints = [LoRACheckpoint(p, trust_pickle=self.trust_pickle) for p in self.adapter_paths]
        auto = self._auto()
        kwargs = dtype_kwargs(self.dtype)
        model = from_pretrained_checked(auto, self.base_path, name=f"base {self.base_path}", **kwargs)
        tied = find_tied_keys(model)
        base_state = {k: v.detach() for k, v in model.state_dict().items() if k not in tied}
        # LoRA task vectors do not read the base (B @ A alone), so the base, already in memory, is checked here
        for key, value in base_state.items():
            ensure_finite(value, key, f"base {self.base_path}")
        touched_modules: list[str] = []
        for ckpt, task in zip(self.checkpoints, self.task_names):
            for key in ckpt.touched_keys():
                if key in tied:
                    raise CheckpointError(
                        f"adapter {task!r} ({ckpt.path}) changes {key!r}, which the base ties to {tied[key]!r}: "
                        "merging it densely would change both; untie the weights (tie_word_embeddings=False) first"
                    )
                if key not in base_state:
                    near = [k for k in base_state if k.endswith(key.split(".", 1)[-1])][:3]
                    raise CheckpointError(
                        f"adapter {task!r} ({ckpt.path}) targets {key!r}, which the base model "
                        f"({type(model).__name__}) does not have" + (f"; similar keys: {near}" if near else "")
                    )
                b = base_state[key]
                delta_shape = tuple(lora_delta(ckpt.modules[key]).shape) if key in ckpt.modules else tuple(
                    ckpt.full[key].shape)
                if delta_shape != tuple(b.shape):
                    raise CheckpointError(
                        f"adapter {task!r} ({ckpt.path}): {key!r} update has shape {delta_shape}, the base "
                        f"{tuple(b.shape)}"
                    )
                module = key.rpartition(".")[0]
                if module not in touched_modules:
                    touched_modules.append(module)
        owned = set(touched_modules)
        keys = [k for k, v in base_state.items() if is_mergeable(v) and k.rpartition(".")[0] in owned]
        tvs = [LoRATaskVector(c, base_state, keys, name=f"adapter {t!r}") for c, t in zip(self.checkpoints,
                                                                                           self.task_names)]
        experts = [_ExpertView(base_state, tv) for tv in tvs]
        model.eval()
        return MergeSetup(
            base=model, experts=experts, task_names=list(self.task_names), heads=None, tied=tied, adapter=self,
            exact_task_vectors=tvs,
            metadata={"family": "lora", "base": self.base_path, "adapters": list(self.adapter_paths),
                      "experts": list(self.adapter_paths),
                      "touched_modules": touched_modules},
        )

    def task_model(self, setup: MergeSetup, body: nn.Module, task: str) -> nn.Module:
        return body

    def save(self, setup: MergeSetup, body: nn.Module, path: PathLike, **options: Any) -> Path:
        """The merged, calibrated **dense** model via ``save_pretrained`` (atomic, base support files copied). For a
        LoRA output use :func:`merge_lora_lowrank` and :func:`save_lora_adapter`."""
        max_shard_size = options.pop("max_shard_size", "5GB")
        overwrite = bool(options.pop("overwrite", False))
        if options:
            raise TypeError(f"unknown save option(s) for LoRA: {sorted(options)}")
        support = self.base_path if Path(self.base_path).is_dir() else None
        return save_pretrained_atomic(body, path, support_from=support, max_shard_size=max_shard_size,
                                      overwrite=overwrite, inputs=[self.base_path, *self.adapter_paths])


# --------------------------------------------------------------------------------------------------------------------
# Low-rank merging
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LowRankDelta:
    """A merged (and calibrated) update kept as LoRA factors plus full replacement tensors.

    Attributes:
        modules: weight key -> :class:`LoRAModule` with ``scale = 1`` (all coefficients folded into ``B``).
        full: base key -> full new value (``modules_to_save`` / biases: base + calibrated merged delta).
        scales: weight key -> WSC row scales applied (empty without WSC).
    """

    modules: dict[str, LoRAModule]
    full: dict[str, Tensor] = field(default_factory=dict)
    scales: dict[str, Tensor] = field(default_factory=dict)

    def dense(self, base: StateDict) -> dict[str, Tensor]:
        """``tau`` as dense float32 tensors (LoRA deltas and ``full - base``), for checks and dense models."""
        out = {k: lora_delta(m) for k, m in self.modules.items()}
        out.update({k: v.float() - base[k].float() for k, v in self.full.items()})
        return out


def merge_lora_lowrank(
    setup: MergeSetup,
    merge_method: str = "task_arithmetic",
    *,
    scale: float = 0.3,
    calibration: Any = "wsc",
    sensitive: Optional[Collection[str]] = None,
    wsc: Optional[bool] = None,
    method: Optional[str] = None,
    **wsc_options: Any,
) -> LowRankDelta:
    """Merge LoRA adapters without densifying the result: ``tau_m`` as concatenated factors, the calibration's weight
    steps as row scales.

    Args:
        setup: a :class:`LoRAAdapter` setup.
        merge_method: a linear merge (``MergeMethod.linear``: ``"task_arithmetic"``, ``c_k = scale``;
            ``"weight_average"``, ``c_k = 1/K``; ...), whose result is exactly low-rank, with its default options
            (``scale`` aside). Others (TIES, TSV-M, ...) need the dense path.
        scale: the method's ``scale`` when it has one (task arithmetic's lambda, default 0.3 as
            :func:`magic_pl.merging.basic.task_arithmetic`); ignored otherwise.
        calibration: a calibration setting (:func:`~magic_pl.calibration.settings.resolve_setting`; default
            ``"wsc"``) whose data-free weight steps are applied per tensor
            (:func:`~magic_pl.calibration.settings.apply_weight_steps`). On an adapted tensor a step must change it
            by row scales only (WSC's): they go into ``B`` (or ``A`` for transposed weights), so the rank is kept.
        sensitive: the magnitude-sensitive set of the steps (see
            :func:`magic_pl.calibration.weight_space_calibration`).
        wsc, method, **wsc_options: deprecated spellings: ``wsc=True/False`` is ``calibration="wsc"``/``"none"``,
            ``method`` is ``merge_method``; ``wsc_options`` (``include``, ``exclude``, ``eps``, ``variant``) are
            keyword options of :func:`~magic_pl.calibration.weight_space_calibration`, which then is the one step.

    Returns:
        A :class:`LowRankDelta` (write it with :func:`save_lora_adapter`).
    """
    from magic_pl.calibration.settings import apply_weight_steps, resolve_setting
    from magic_pl.merging import METHODS, get_method, validate_merge_options

    if method is not None:
        warnings.warn("merge_lora_lowrank(method=...) is deprecated; use merge_method=", DeprecationWarning,
                      stacklevel=2)
        merge_method = method
    if wsc is not None or wsc_options:
        warnings.warn("merge_lora_lowrank(wsc=..., **wsc_options) is deprecated; use calibration= (a setting)",
                      DeprecationWarning, stacklevel=2)
        calibration = "none" if wsc is False else calibration
    steps: Sequence[Any] = resolve_setting(calibration).weight_steps
    if wsc_options and steps:
        steps = [_KeywordWSC(wsc_options)]
    spec = get_method(merge_method)
    if spec.linear is None:
        linear = ", ".join(n for n, m in METHODS.items() if m.linear is not None)
        raise ValueError(
            f"low-rank merging supports the linear methods ({linear}), not {merge_method!r}: "
            "use the dense path (setup.task_vectors() + magic_pl.merging.merge) for other methods"
        )
    options = validate_merge_options(merge_method, {"scale": scale} if "scale" in spec.options else {}, driver=False)
    ckpts: list[LoRACheckpoint] = getattr(setup.adapter, "checkpoints", [])
    if not isinstance(setup.adapter, LoRAAdapter) or len(ckpts) != len(setup.task_names):
        raise ValueError("merge_lora_lowrank needs a setup built by LoRAAdapter.setup()")
    K = len(ckpts)
    combination = spec.linear_weights(K, options)
    coeffs = combination.coefficients
    base = setup.base_state()
    tvs = setup.task_vectors()
    out = LowRankDelta(modules={})
    lora_keys = [k for k in tvs[0] if any(k in c.modules for c in ckpts)]
    full_keys = [k for k in tvs[0] if any(k in c.full for c in ckpts) and k not in lora_keys]
    for key in lora_keys:
        tasks = [k for k, c in enumerate(ckpts) if key in c.modules]
        parts = [ckpts[k].modules[key] for k in tasks]
        if any(key in c.full for c in ckpts):
            raise CheckpointError(
                f"{key!r} is both LoRA-adapted and fully replaced across adapters; use the dense path"
            )
        kinds = {(p.kind, p.fan_in_fan_out) for p in parts}
        if len(kinds) != 1:
            raise CheckpointError(f"adapters disagree on the layer type of {key!r}: {sorted(kinds)}")
        first = parts[0]
        # Concatenating along the rank sums the per-adapter deltas (for kxk conv LoRA too: A is kxk, B 1x1).
        A = torch.cat([p.A.float() for p in parts], dim=0)
        B = torch.cat([p.B.float() * (coeffs[k] * p.scale) for k, p in zip(tasks, parts)], dim=1)
        merged = LoRAModule(first.module, first.kind, A, B, 1.0, first.fan_in_fan_out)
        if steps:
            cal, scales = apply_weight_steps(steps, {key: lora_delta(merged)}, [{key: tv[key]} for tv in tvs],
                                             sensitive)
            if key in cal and key not in scales:
                raise ValueError(f"merge_lora_lowrank: calibration {calibration!r} changes {key!r} by more than row "
                                 "scales, which a low-rank delta cannot keep; use the dense path")
            if key in scales:
                lam = scales[key]
                if merged.transposed:
                    merged.A = merged.A * lam[None, :]
                else:
                    view = (-1,) + (1,) * (merged.B.dim() - 1)
                    merged.B = merged.B * lam.reshape(view)
                out.scales[key] = lam
        out.modules[key] = merged
    for key in full_keys:
        taus = [tv[key] for tv in tvs]
        d = _combine(taus, combination)
        if steps:
            d = apply_weight_steps(steps, {key: d}, [{key: t} for t in taus], sensitive)[0].get(key, d)
        out.full[key] = apply_delta(base[key], d, key=key)
    return out


@dataclass(frozen=True)
class _KeywordWSC:
    """WSC with :func:`~magic_pl.calibration.weight_space_calibration`'s keyword options (the deprecated
    ``wsc_options``: key patterns no setting step takes)."""

    options: Mapping[str, Any]

    def apply(self, merged_tv: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
              sensitive: Optional[Collection[str]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        from magic_pl.calibration.wsc import weight_space_calibration

        calibrated, scales = weight_space_calibration(merged_tv, task_vectors, sensitive, return_scales=True,
                                                      **self.options)
        return {k: calibrated[k] for k in scales}, scales


def _combine(taus: Sequence[Tensor], combination: Linear) -> Tensor:
    """``sum_k w_k tau_k / divisor`` of dense tensors. Equal weights sum first and multiply once, as the linear
    methods do (task arithmetic: ``sum * scale``; weight average: ``sum * 1 / K``, the same bits as ``sum / K``)."""
    w, divisor = combination.weights, combination.divisor
    total = sum(taus) * w[0] if len(set(w)) == 1 else sum(t * wk for t, wk in zip(taus, w))
    return total / divisor if divisor != 1.0 else total


def save_lora_adapter(delta: LowRankDelta, path: PathLike, *, template: Optional[PathLike] = None,
                      base_model_name_or_path: Optional[str] = None, overwrite: bool = False,
                      inputs: Sequence[PathLike] = ()) -> Path:
    """Write ``delta`` as a PEFT LoRA adapter directory (atomic): ``adapter_config.json`` +
    ``adapter_model.safetensors``.

    Ranks may differ per module (``rank_pattern``); every module's ``lora_alpha`` equals its rank (``alpha_pattern``),
    so PEFT's scale is 1 and the stored ``B`` carries all coefficients. ``template``: an input adapter directory whose
    config fields (``task_type``, ``target_modules``, ...) are kept, and whose README is copied. ``path`` is replaced
    only when empty, a previous magic-pl output, or with ``overwrite``; ``inputs`` (and ``template``) may not lie
    inside it.
    """
    from safetensors.torch import save_file

    out = OutputLocation(path, overwrite=overwrite,
                         inputs=[*inputs, *([template] if template is not None else [])]).check()
    cfg: dict[str, Any] = {}
    if template is not None:
        cfg = json.loads((Path(template) / "adapter_config.json").read_text())
    if not delta.modules and not delta.full:
        raise ValueError("nothing to save: the low-rank delta is empty")
    ranks = {m.module: m.rank for m in delta.modules.values()}
    r = max(ranks.values()) if ranks else int(cfg.get("r", 8))
    tensors: dict[str, Tensor] = {}
    for m in delta.modules.values():
        if m.kind == "embedding":
            tensors[f"{_PREFIX}{m.module}.lora_embedding_A"] = m.A.contiguous()
            tensors[f"{_PREFIX}{m.module}.lora_embedding_B"] = m.B.contiguous()
        else:
            tensors[f"{_PREFIX}{m.module}.lora_A.weight"] = m.A.contiguous()
            tensors[f"{_PREFIX}{m.module}.lora_B.weight"] = m.B.contiguous()
    for key, value in delta.full.items():
        tensors[f"{_PREFIX}{key}"] = value.contiguous()
    lora_modules = {m.module for m in delta.modules.values()}
    full_modules = {k.rpartition(".")[0] for k in delta.full}
    modules_to_save = sorted({m.rpartition(".")[2] for m in full_modules - lora_modules}) or None
    bias_mode = "none"
    if full_modules & lora_modules:
        if not all(k.endswith("bias") for k in delta.full if k.rpartition(".")[0] in lora_modules):
            raise ValueError(
                "full tensors of LoRA-adapted modules other than biases cannot be stored in a PEFT adapter"
            )
        bias_mode = "lora_only"
    cfg.update({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {re.escape(mod): rk for mod, rk in ranks.items() if rk != r},
        "alpha_pattern": {re.escape(mod): rk for mod, rk in ranks.items() if rk != r},
        "target_modules": sorted({mod.rpartition(".")[2] for mod in ranks}) or cfg.get("target_modules"),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in delta.modules.values()),
        "modules_to_save": modules_to_save,
        "lora_dropout": float(cfg.get("lora_dropout", 0.0)),
        "bias": bias_mode,
        "inference_mode": True,
    })
    if base_model_name_or_path is not None:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    with out:
        tmp = out.stage()
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if template is not None:
            copy_support_files(template, tmp)
        out.commit({"content": "PEFT LoRA adapter"})
    return out.path
