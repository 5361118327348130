"""Which modules FSC calibrates, how their outputs are read, and the runtime wrapper for non-foldable modules.

docs/method.md, FSC: the calibrated modules are every leaf module that owns parameters (Linear, Conv, norms, Embedding,
BatchNorm, ...) and composite modules whose parameters cannot be separated (``nn.MultiheadAttention``) as one unit;
the children of such a unit are not calibrated separately. A non-leaf module that owns parameters directly next to
parameterised children (timm's ``VisionTransformer`` root owning ``cls_token``/``pos_embed``, HF CLIP's embeddings
owning ``class_embedding``) is not a unit: its children are, and its own tensors keep their merged values (the
calibration report lists them as ``uncalibrated``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "AFFINE_MODULE_TYPES",
    "AFFINE_CLASS_NAMES",
    "INSEPARABLE_MODULE_TYPES",
    "CalibratedModule",
    "CalibrationUnit",
    "calibrate_output",
    "feature_dim",
    "find_units",
    "fold_kind",
    "is_linear_in_params",
    "primary_tensor",
    "replace_submodule",
]

#: Composite modules calibrated as one unit (their parameters cannot be separated; docs/method.md, FSC). Extend to
#: add more.
INSEPARABLE_MODULE_TYPES: list[type] = [nn.MultiheadAttention]

#: Module types whose output is affine in their own parameters, so ``f(theta0 + xi * tau)`` equals
#: ``f0 + xi * (fm - f0)`` and the calibration folds into the weights (docs/method.md, FSC). Extend to add more.
AFFINE_MODULE_TYPES: list[type] = [
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
]
if hasattr(nn, "RMSNorm"):
    AFFINE_MODULE_TYPES.append(nn.RMSNorm)

#: Affine modules recognised by class name (third-party classes we do not import): any class whose name ends with
#: one of these suffixes (``LlamaRMSNorm``, ``T5LayerNorm``, timm ``LayerNorm2d``, transformers' GPT-2 ``Conv1D``,
#: timm ``LayerScale``, which multiplies by its ``gamma``).
AFFINE_CLASS_NAMES: tuple[str, ...] = ("RMSNorm", "LayerNorm", "LayerNorm2d", "Conv1D", "LayerScale", "LayerScale2d")

#: Module types whose feature dimension is dim 1 (channels-first outputs); all others use the last dim.
_CHANNEL_FIRST_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


@dataclass
class CalibrationUnit:
    """One calibrated module: its qualified name, the module, and the state it is computed from.

    ``tensors`` maps local names (as ``functional_call`` expects, e.g. ``"weight"`` or ``"out_proj.weight"``) to
    full state-dict keys; it holds the unit's floating parameters and its floating buffers that appear in the state
    dict (BatchNorm running statistics).
    """

    name: str
    module: nn.Module
    tensors: dict[str, str] = field(default_factory=dict)
    feature_dim: int = -1
    linear: bool = False

    @property
    def keys(self) -> list[str]:
        return list(self.tensors.values())


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and getattr(module, "running_mean", None) is not None


#: ``forward`` methods of torch modules whose output is *linear* in their parameters (not merely affine), so that
#: ``f(z; theta0 + tau) - f(z; theta0) = f(z; tau)``: FSC then computes the task feature directly from ``tau``, which
#: avoids the cancellation of subtracting two nearly equal outputs (it matters in bf16). Subclasses that override
#: ``forward`` are not trusted and take the general path.
_LINEAR_FORWARDS = {
    cls.forward
    for cls in (
        nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
        nn.ConvTranspose3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm),
    )
}


def is_linear_in_params(module: nn.Module) -> bool:
    """True when the module's output is linear in its parameters (see ``_LINEAR_FORWARDS``)."""
    if type(module).forward not in _LINEAR_FORWARDS:
        return False
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return False  # renormalises its weight in place
    return True


def feature_dim(module: nn.Module) -> int:
    """Dimension the FSC norm is taken over: 1 for Conv/BatchNorm/InstanceNorm/GroupNorm outputs, else -1."""
    return 1 if isinstance(module, _CHANNEL_FIRST_TYPES) else -1


def _key(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def _unit_tensors(name: str, module: nn.Module, state_keys: Optional[set[str]]) -> dict[str, str]:
    tensors: dict[str, str] = {}
    for local, p in module.named_parameters():
        if p.dtype.is_floating_point:
            tensors[local] = _key(name, local)
    for local, b in module.named_buffers():
        full = _key(name, local)
        if b is not None and b.dtype.is_floating_point and (state_keys is None or full in state_keys):
            tensors[local] = full
    return tensors


def find_units(
    model: nn.Module, modules: Optional[Sequence[str]] = None, *, state_keys: Optional[set[str]] = None
) -> list[CalibrationUnit]:
    """The calibrated modules of ``model`` in registration order (docs/method.md, FSC).

    Args:
        model: the (merged) model.
        modules: explicit module names to calibrate instead of the automatic choice (each one a unit with all its
            tensors, recursively).
        state_keys: the model's persistent state-dict keys (buffers outside it, i.e. non-persistent, are ignored).
    """
    if state_keys is None:
        state_keys = set(model.state_dict().keys())
    units: list[CalibrationUnit] = []
    if modules is not None:
        named = dict(model.named_modules())
        for name in modules:
            if name not in named:
                raise KeyError(f"module {name!r} given in modules= is not a submodule of {type(model).__name__}")
            mod = named[name]
            units.append(
                CalibrationUnit(
                    name, mod, _unit_tensors(name, mod, state_keys), feature_dim(mod), is_linear_in_params(mod)
                )
            )
        return [u for u in units if u.tensors]
    inseparable = tuple(INSEPARABLE_MODULE_TYPES)
    covered: list[str] = []
    for name, mod in model.named_modules():
        if any((name == c or name.startswith(c + ".")) if c else True for c in covered):
            continue
        if isinstance(mod, inseparable):
            tensors = _unit_tensors(name, mod, state_keys)
            if tensors:
                units.append(CalibrationUnit(name, mod, tensors, -1))
            covered.append(name)
            continue
        owns = any(True for _ in mod.parameters(recurse=False)) or _has_running_stats(mod)
        if not owns:
            continue
        if any(True for child in mod.children() for _ in child.parameters()):
            continue  # direct tensors next to parameterised children: the children are the units
        tensors = _unit_tensors(name, mod, state_keys)
        if tensors:
            units.append(CalibrationUnit(name, mod, tensors, feature_dim(mod), is_linear_in_params(mod)))
    return units


def fold_kind(module: nn.Module) -> str:
    """How a calibrated module folds: ``"affine"`` (parameters theta0 + xi * tau_m), ``"batchnorm"`` (the eval-mode
    rewrite of docs/method.md, FSC) or ``"runtime"`` (wrapped in :class:`CalibratedModule`)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        if _has_running_stats(module) and module.track_running_stats:
            return "batchnorm"
        return "affine"  # InstanceNorm / BN without tracked statistics: y = w * xhat + b
    if isinstance(module, tuple(AFFINE_MODULE_TYPES)):
        return "affine"
    cls = type(module).__name__
    if any(cls.endswith(s) for s in AFFINE_CLASS_NAMES):
        return "affine"
    return "runtime"


def logits_of(output: Any) -> Tensor:
    """Logits from a model output: the tensor itself, or its ``.logits`` field (Hugging Face outputs)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TypeError(f"cannot find logits in a {type(output).__name__}")
    return logits


def primary_tensor(output: Any) -> Optional[Tensor]:
    """The feature tensor of a module output: the tensor itself, or the first tensor of a tuple/list/dict."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = primary_tensor(item)
            if found is not None:
                return found
    return None


def calibrate_output(f0: Any, fm: Any, xi: float) -> Any:
    """``f0 + xi * (fm - f0)`` for every floating tensor of a (possibly nested) module output, computed in float32
    and cast back; non-floating leaves are taken from ``fm``."""
    if isinstance(fm, Tensor):
        if not fm.dtype.is_floating_point or not isinstance(f0, Tensor):
            return fm
        if fm.dtype in (torch.float32, torch.float64):
            return f0 + xi * (fm - f0)
        return (f0.float() + xi * (fm.float() - f0.float())).to(fm.dtype)
    if isinstance(fm, Mapping):
        out = copy.copy(fm)
        for k in fm:
            out[k] = calibrate_output(f0[k], fm[k], xi)
        return out
    if isinstance(fm, tuple):
        items = [calibrate_output(a, b, xi) for a, b in zip(f0, fm)]
        return type(fm)(*items) if hasattr(fm, "_fields") else tuple(items)
    if isinstance(fm, list):
        return [calibrate_output(a, b, xi) for a, b in zip(f0, fm)]
    return fm


def _buffer_name(local: str) -> str:
    return "base__" + local.replace(".", "__")


class CalibratedModule(nn.Module):
    """Runtime calibration of a module whose output is not affine in its parameters (docs/method.md, FSC).

    Computes ``f(z; theta0) + xi * (f(z; theta_m) - f(z; theta0))``: the wrapped module runs twice per call, once with
    its merged parameters and once with the base parameters of this module only (held here as buffers, so ``.to()``
    moves them and ``state_dict()`` saves them).

    Args:
        module: the merged module (kept as ``self.module``).
        base_state: local tensor name -> base tensor for the module's calibrated tensors.
        xi: the calibration coefficient.
    """

    def __init__(self, module: nn.Module, base_state: Mapping[str, Tensor], xi: float):
        super().__init__()
        self.module = module
        self._locals = list(base_state)
        for local, t in base_state.items():
            self.register_buffer(_buffer_name(local), t.detach().clone())
        self.register_buffer("xi", torch.tensor(float(xi), dtype=torch.float32))

    def base_state(self) -> dict[str, Tensor]:
        return {local: getattr(self, _buffer_name(local)) for local in self._locals}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        fm = self.module(*args, **kwargs)
        f0 = functional_call(self.module, self.base_state(), args, kwargs)
        return calibrate_output(f0, fm, float(self.xi))

    def extra_repr(self) -> str:
        return f"xi={float(self.xi):.6g}"


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model`` (the root itself cannot be replaced)."""
    if not name:
        raise ValueError(
            f"cannot replace the root module ({type(model).__name__}) in place; put it inside a container module"
        )
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prediction_tensor(output: Any) -> Tensor:
    """The prediction of a model output where a probe needs one: its logits (:func:`logits_of`) when it has them,
    else its first tensor (:func:`primary_tensor`)."""
    if isinstance(output, Tensor) or isinstance(getattr(output, "logits", None), Tensor) or (
            isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor)):
        return logits_of(output)
    found = primary_tensor(output)
    if found is None:
        raise TypeError(f"cannot find a prediction tensor in a model output of type {type(output).__name__}")
    return found
