"""Singular value calibration (SVC): data-free, per-direction correction of a merged matrix's spectrum.

Li et al., "When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging" (arXiv 2602.05536, by MAGIC's
authors). Per matrix (2-D weights; conv weights viewed as ``[out, -1]``), with ``tau_m = U diag(S) V^T`` and K task
matrices ``tau_i``::

    a_r^m = u_r^T tau_m,  a_r^i = u_r^T tau_i            (responses along the left singular vector u_r)
    s_ri  = <a_r^m, a_r^i> / ||a_r^i||^2                  (how much the merge over-counts task i along u_r)
    gamma_r = K / sum_i max(alpha, s_ri)
    tau_m' = U diag(gamma * S) V^T

A direction that every task also carries (s_ri ~ 1 each, summed K times in TA) is scaled back by ~1/K' of its
over-count; ``alpha`` floors each task's coefficient, so tasks that barely touch a direction cannot inflate it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from magic_pl.calibration._names import Patterns
from magic_pl.calibration.steps import CalibrationStep, register_step
from magic_pl.calibration.wsc import DEFAULT_WSC_EXCLUDE, task_slices, wsc_keys

__all__ = ["DEFAULT_SVC_ALPHA", "SVCStep", "singular_value_calibration", "svc_matrix"]

#: FusionBench 0.2.33's SVC setting for Task Arithmetic, TIES, DARE, weight averaging and Iso-C (its configs use 0.2
#: after Iso-CTS and 1.0 after TSV-M and WUDI).
DEFAULT_SVC_ALPHA = 0.1


def svc_matrix(merged: Tensor, tasks: Sequence[Tensor], *, alpha: float = DEFAULT_SVC_ALPHA) -> Tensor:
    """SVC of one ``[m, n]`` matrix ``merged`` against its K task matrices; returns the calibrated matrix.

    Computed in float64, as the reference (FusionBench's vectorised SVC): the ratios ``s_ri`` of the spectrum's tail
    divide by tiny ``||u_r^T tau_i||^2``. Denominators are clamped at 1e-12; a NaN or -inf ratio counts as ``alpha``
    (the reference's rules). One task's ``[r, n]`` responses are resident at a time.
    """
    m64 = merged.to(torch.float64)
    u, s, vh = torch.linalg.svd(m64, full_matrices=False)
    ut = u.T.contiguous()
    merged_resp = ut @ m64  # [r, n]
    floor = torch.tensor(float(alpha), dtype=torch.float64, device=m64.device)
    acc = torch.zeros_like(s)
    for t in tasks:
        resp = ut @ t.to(device=m64.device, dtype=torch.float64)  # [r, n]
        denom = (resp * resp).sum(dim=-1).clamp_min(1e-12)
        coef = torch.nan_to_num((merged_resp * resp).sum(dim=-1) / denom, nan=float(alpha), neginf=float(alpha))
        acc += torch.maximum(coef, floor)
        del resp
    gamma = len(tasks) / acc
    return ((u * (gamma * s)) @ vh).to(merged.dtype)


def singular_value_calibration(
    merged_tv: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    *,
    alpha: float = DEFAULT_SVC_ALPHA,
    include: Patterns = None,
    exclude: Patterns = DEFAULT_WSC_EXCLUDE,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, Tensor]:
    """Calibrate the merged task vector's spectrum matrix by matrix from the task vectors alone (SVC, see module doc).

    Args:
        merged_tv: the merged task vector ``tau_m`` (key -> tensor; lazily loaded mappings are fine).
        task_vectors: the K task vectors (read one key at a time).
        alpha: floor of each task's projection coefficient (default :data:`DEFAULT_SVC_ALPHA` = 0.1); must be > 0.
        include: regex(es); when given, only matching keys are calibrated.
        exclude: regex(es) of keys left alone (default: WSC's, norms, biases and embeddings; FusionBench also
            calibrates 2-D embedding tables, ``exclude=()`` does too).
        device: where the SVDs run (default: the merged tensor's device).

    Returns:
        Every key of ``merged_tv``: calibrated tensors (>= 2-D, selected) are new tensors in ``merged_tv``'s dtype and
        device; the others are the input tensors themselves. 1-D tensors are never calibrated.

    Parity: FusionBench 0.2.33's ``SingularValueCalibration`` calibrates every 2-D parameter (conv weights not); on
    the same matrices the results agree to float64 rounding (benchmarks/bench_vs_peers.py).
    """
    a = float(alpha)
    if not a > 0 or a != a or a == float("inf"):
        raise ValueError(f"singular_value_calibration: alpha={alpha!r} must be a finite number > 0")
    if len(task_vectors) == 0:
        raise ValueError("singular_value_calibration needs at least one task vector (K >= 1), got none")
    keys = set(wsc_keys(merged_tv, include=include, exclude=exclude))
    out: dict[str, Tensor] = {}
    for key in merged_tv:
        d = merged_tv[key]
        if key not in keys:
            out[key] = d
            continue
        dev = torch.device(device) if device is not None else d.device
        rows = d.shape[0]
        mats = []
        for k, t in enumerate(task_slices(key, d, task_vectors)):
            t = t.to(dev).reshape(rows, -1)
            if not bool(torch.isfinite(t).all()):  # its ratios would silently become alpha
                raise ValueError(f"singular_value_calibration: task vector {k} holds NaN/Inf in {key!r}")
            mats.append(t)
        try:
            cal = svc_matrix(d.to(dev).reshape(rows, -1), mats, alpha=a)
        except torch.linalg.LinAlgError as err:
            raise ValueError(f"singular_value_calibration: SVD failed for {key!r}: {err}") from err
        if not bool(torch.isfinite(cal).all()):  # e.g. a NaN in the merged tensor
            raise ValueError(f"singular_value_calibration produced non-finite values for {key!r}; check its inputs")
        out[key] = cal.reshape(d.shape).to(device=d.device, dtype=d.dtype)
    return out


@register_step
@dataclass(frozen=True)
class SVCStep(CalibrationStep):
    """The calibration step ``svc``: :func:`singular_value_calibration` of tau_m (arXiv 2602.05536), on the matrices
    WSC calibrates (:func:`~magic_pl.calibration.wsc.wsc_keys`); it has no use for a sensitive set.

    Attributes:
        alpha: the floor of each task's coefficient, in (0, 1000] (:data:`DEFAULT_SVC_ALPHA` = 0.1, FusionBench's
            setting after Task Arithmetic, TIES and averages).
    """

    name: ClassVar[str] = "svc"
    alpha: float = DEFAULT_SVC_ALPHA

    def __post_init__(self) -> None:
        self._number("alpha", lambda v: 0 < v <= 1e3, "a finite number in (0, 1000]")

    def apply(self, merged_tv: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
              sensitive: Optional[Collection[str]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        calibrated = singular_value_calibration(merged_tv, task_vectors, alpha=self.alpha)
        return {k: calibrated[k] for k in wsc_keys(merged_tv)}, {}
