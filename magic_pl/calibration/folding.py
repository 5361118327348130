"""Folding FSC coefficients into weights: ``f0 + xi * (fm - f0)`` as one ordinary module (docs/method.md, FSC).

- Affine modules (Linear, Conv, Embedding, LayerNorm/RMSNorm/GroupNorm affine parts, ...): parameters become
  ``theta0 + xi * (theta_m - theta0)``.
- BatchNorm with running statistics (eval mode): ``y = a x + b`` with ``a = w / sqrt(var + eps)`` and
  ``b = bias - mean * a``. The calibrated ``a_c = a0 + xi (am - a0)``, ``b_c = b0 + xi (bm - b0)`` are written back
  keeping the merged statistics: ``weight = a_c sqrt(var_m + eps)``, ``bias = b_c + mean_m a_c``. Without affine
  parameters the statistics carry it instead (``var = 1 / a_c^2 - eps``, ``mean = -b_c / a_c``) when ``a_c > 0``.
- Everything else is wrapped in :class:`~magic_pl.calibration.modules.CalibratedModule`.

A per-channel ``xi`` (a ``[C]`` tensor) folds the same way row by row: it broadcasts along each tensor's output
channel axis (dim 0; the last dim for ``nn.Embedding``, whose output channels are its columns) and elementwise through
the BatchNorm rewrite. Folding arithmetic runs in float64 by default and is cast back to each tensor's dtype;
:func:`fold_unit` takes ``dtype=torch.float32`` to fold big affine tensors without whole-tensor float64 temporaries
(in place when the tensor is float32 itself). BatchNorm's per-channel rewrite always runs in float64.

Sharded weights (FSDP2 ``DTensor`` parameters, :mod:`magic_pl.calibration.sharding`) fold on each rank's local shard,
against the matching block of theta0 and of a per-channel xi: the same arithmetic entry by entry, so the result is the
one-process fold exactly. Reshard the model first (:func:`~magic_pl.calibration.sharding.reshard`). A sharded module
that cannot fold is refused: a runtime wrapper would hold the full base tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.calibration.modules import CalibratedModule, CalibrationUnit, fold_kind, replace_submodule
from magic_pl.calibration.sharding import is_sharded, local_channels, local_part

__all__ = ["batchnorm_affine", "fold_batchnorm", "fold_unit"]


def batchnorm_affine(
    weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y = a x + b`` (float64): ``a = w / sqrt(var + eps)``, ``b = bias - mean * a``."""
    inv = (var.double() + eps).rsqrt()
    a = inv * (weight.double() if weight is not None else 1.0)
    b = (bias.double() if bias is not None else 0.0) - mean.double() * a
    return a, b


def fold_batchnorm(base: Mapping[str, Tensor], merged: Mapping[str, Tensor], eps: float,
                   xi: Union[float, Tensor]) -> dict[str, Tensor]:
    """Calibrated BatchNorm tensors (float64) for eval mode; keys ``weight``/``bias``/``running_mean``/``running_var``.

    ``base`` and ``merged`` hold ``running_mean``, ``running_var`` and, when affine, ``weight`` and ``bias``. With
    affine parameters the merged statistics are kept and ``weight``/``bias`` absorb the calibration; without them
    the statistics are rewritten, which needs ``a_c > 0`` (else :class:`ValueError`).
    """
    a0, b0 = batchnorm_affine(base.get("weight"), base.get("bias"), base["running_mean"], base["running_var"], eps)
    am, bm = batchnorm_affine(
        merged.get("weight"), merged.get("bias"), merged["running_mean"], merged["running_var"], eps
    )
    if isinstance(xi, Tensor):
        xi = xi.to(device=a0.device, dtype=torch.float64)
    ac = a0 + xi * (am - a0)
    bc = b0 + xi * (bm - b0)
    mean_m, var_m = merged["running_mean"].double(), merged["running_var"].double()
    if "weight" in merged and merged["weight"] is not None:
        out = {"weight": ac * (var_m + eps).sqrt(), "running_mean": mean_m, "running_var": var_m}
        out["bias"] = bc + mean_m * ac
        return out
    var_c = ac.pow(-2) - eps
    if not bool((ac > 0).all()) or not bool((var_c >= 0).all()):
        raise ValueError("BatchNorm without affine parameters cannot absorb this calibration in its statistics")
    return {"running_mean": -bc / ac, "running_var": var_c}


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    out = dict(module.named_parameters())
    out.update({k: v for k, v in module.named_buffers() if v is not None})
    return out


def _channel_axis(t: Tensor, module: nn.Module) -> int:
    """The output-channel axis of ``t`` (the last for ``nn.Embedding``, whose output channels are its columns)."""
    if t.dim() == 0:
        raise ValueError("a per-channel coefficient cannot apply to a scalar tensor")
    return t.dim() - 1 if isinstance(module, nn.Embedding) else 0


def _local_unit(current: Mapping[str, Tensor], base: Mapping[str, Tensor], names: Sequence[str],
                xi: Union[float, Tensor], module: nn.Module
                ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Union[float, Tensor]]]:
    """Per tensor of ``names``: the tensor to write (its local shard when sharded), the matching block of theta0 and
    the matching entries of a per-channel ``xi``.

    FSDP2 shards parameters, not buffers: an unsharded tensor shaped like a sharded one of the same unit (BatchNorm's
    running statistics next to its weight) is cut to the same block, so the unit's tensors stay aligned entry by
    entry."""
    ref = next((current[n] for n in names if is_sharded(current[n])), None)
    tensors, theta0, coeffs = {}, {}, {}
    for n in names:
        t = current[n]
        like = t if is_sharded(t) or ref is None or tuple(t.shape) != tuple(ref.shape) else ref
        coeffs[n] = local_channels(xi, like, _channel_axis(t, module)) if isinstance(xi, Tensor) else xi
        if like is t:
            tensors[n], theta0[n] = local_part(t, base[n])
        else:
            _, theta0[n] = local_part(like, base[n])
            _, tensors[n] = local_part(like, t)  # a view: writing it writes the buffer's block
    return tensors, theta0, coeffs


@torch.no_grad()
def _channel_view(xi: Tensor, t: Tensor, module: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
    """``xi [C]`` shaped to broadcast along ``t``'s output-channel axis, in ``dtype``."""
    axis = _channel_axis(t, module)
    if t.shape[axis] != xi.numel():
        raise ValueError(f"per-channel coefficient of length {xi.numel()} does not match axis {axis} of a tensor of "
                         f"shape {tuple(t.shape)}")
    shape = [1] * t.dim()
    shape[axis] = -1
    return xi.to(device=t.device, dtype=dtype).reshape(shape)


def fold_unit(model: nn.Module, unit: CalibrationUnit, base: Mapping[str, Tensor], xi: Union[float, Tensor], *,
              force_wrap: bool = False, dtype: torch.dtype = torch.float64) -> str:
    """Apply ``xi`` to one unit of ``model`` in place.

    Args:
        model: the merged model (needed to swap a wrapped unit in).
        unit: the calibrated unit.
        base: local tensor name -> base tensor (theta0) for the unit's tensors.
        xi: the coefficient, or a ``[C]`` tensor of per-output-channel coefficients (foldable modules only).
        force_wrap: wrap even a foldable module (used when a tensor is shared with another unit).
        dtype: the arithmetic dtype of an affine fold ``theta0 + xi (theta_m - theta0)`` (default float64, exact to
            the last bit of a float32 weight). ``torch.float32`` folds float32 tensors in place, with no temporary
            beyond the base tensor, and lower-precision ones through one float32 copy.

    Returns:
        ``"unchanged"`` (xi == 1), ``"folded"`` or ``"wrapped"``.
    """
    per_channel = isinstance(xi, Tensor)
    if (bool((xi == 1.0).all()) if per_channel else xi == 1.0):
        return "unchanged"
    module = unit.module
    kind = "runtime" if force_wrap else fold_kind(module)
    if per_channel and kind not in ("affine", "batchnorm"):
        raise ValueError(f"module {unit.name!r} cannot take a per-channel coefficient (it is not foldable)")
    current = _tensors(module)
    sharded = any(is_sharded(current[n]) for n in unit.tensors)
    if kind == "affine":
        tensors, blocks, coeffs = _local_unit(current, base, list(unit.tensors), xi, module)
        for local in unit.tensors:
            t = tensors[local]
            theta0 = blocks[local].to(device=t.device, dtype=dtype)
            x = _channel_view(coeffs[local], t, module, dtype) if per_channel else xi
            if t.dtype == dtype:
                t.sub_(theta0).mul_(x).add_(theta0)  # the same arithmetic, in place
            else:
                t.copy_((theta0 + x * (t.to(dtype) - theta0)).to(t.dtype))
            del theta0
        return "folded"
    if kind == "batchnorm":
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if n in unit.tensors]
        m, blocks, coeffs = _local_unit(current, base, names, xi, module)
        b = {n: blocks[n].to(m[n].device) for n in names}
        try:  # every BatchNorm tensor is [C], sharded alike: any one's share of a per-channel xi is every one's
            new = fold_batchnorm(b, m, float(module.eps), coeffs[names[0]] if per_channel else xi)
        except ValueError:
            if per_channel:
                raise ValueError(f"BatchNorm {unit.name!r} without affine parameters cannot absorb this per-channel "
                                 "calibration in its statistics") from None
            kind = "runtime"
        else:
            for n, v in new.items():
                m[n].copy_(v.to(m[n].dtype))
            return "folded"
    if sharded:
        raise ValueError(f"module {unit.name!r} ({type(module).__name__}) cannot be folded, and its weights are "
                         "sharded: a runtime wrapper would hold full base tensors on every rank; calibrate it without "
                         "sharding, or leave it out of the calibrated modules")
    base_local = {}
    for local in unit.tensors:
        t = current[local]
        base_local[local] = base[local].to(device=t.device, dtype=t.dtype)
    replace_submodule(model, unit.name, CalibratedModule(module, base_local, xi))
    return "wrapped"
