"""Weight space calibration (WSC): MAGIC's data-free, per-row magnitude correction (docs/method.md, WSC).

For every 2-D weight (Linear weights; conv weights viewed as ``[out, -1]``) and every output row ``i``, with task rows
``a_k = tau_k[i, :]`` and merged row ``d = tau_m[i, :]`` (Li et al., MAGIC, arXiv 2512.19320, section on WSC)::

    alpha_k  = <d, a_k> / ||a_k||^2
    d_res    = d - sum_k alpha_k a_k
    r        = mean_k ||a_k||
    lambda_i = 1 / sqrt( sum_k alpha_k^2 + ||d_res||^2 / r^2 + eps )

The candidate row is ``lambda_i * d``; a non-finite ``lambda_i`` counts as 1. Sensitivity gating (the paper's rule):
rows of a magnitude-sensitive tensor take ``lambda_i`` only where it is < 1, rows of any other tensor only where it is
> 1; with ``sensitive=None`` every row takes it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from magic_pl.calibration._names import Patterns, compile_patterns, matches_any, tensor_is_sensitive
from magic_pl.calibration.steps import CalibrationStep, register_step

__all__ = ["DEFAULT_WSC_EXCLUDE", "WSC_VARIANTS", "WSCStep", "row_scales", "weight_space_calibration", "wsc_keys"]

#: Keys WSC leaves alone by default (regexes, ``re.search``): norms, biases, embeddings (docs/method.md, WSC; the paper
#: calibrates the 2-D weights of linear/conv layers). 1-D tensors are never calibrated whatever the patterns say.
DEFAULT_WSC_EXCLUDE: tuple[str, ...] = (
    r"(?i)norm",  # LayerNorm / BatchNorm / RMSNorm / GroupNorm by name (their 1-D tensors are skipped anyway)
    r"bias$",
    r"(?i)embed",  # word/position/patch embeddings, class_embedding, pos_embed
    r"(^|\.)(wte|wpe)\.",  # GPT-2 embeddings
    r"(^|\.)(cls|reg|dist|mask)_token$",  # timm ViT tokens
)

#: ``"paper"``: the formula above (default, MAGIC paper). ``"norm_match"``: ``lambda_i = mean_k ||a_k|| / ||d||`` (the
#: merged row's norm matched to the mean task-row norm; equals "paper" for orthogonal equal-norm task rows and gives 1
#: for K identical task rows where "paper" gives ``1/sqrt(K + (K-1)^2)``; docs/benchmark.md). ``"joint"``: the
#: paper's formula with the ``alpha_k`` solved jointly, ``alpha = argmin ||d - sum_k alpha_k a_k||`` (minimum-norm
#: least squares, ``pinv`` of the K x K Gram matrix per row), so correlated task rows are not counted twice; equals
#: "paper" for orthogonal task rows; K identical rows and ``d = a`` give ``alpha_k = 1/K`` and ``lambda = sqrt(K)``.
WSC_VARIANTS: tuple[str, ...] = ("paper", "norm_match", "joint")


def row_scales(merged: Tensor, tasks: Tensor, *, eps: float = 1e-8, variant: str = "paper") -> Tensor:
    """Per-row WSC scales ``lambda`` for one tensor, vectorised over rows and tasks, in float32.

    Args:
        merged: ``[out, in]`` merged rows ``d``.
        tasks: ``[K, out, in]`` task rows ``a_k``.
        eps: added under the square root (paper formula; default 1e-8).
        variant: one of :data:`WSC_VARIANTS` (default ``"paper"``).

    Returns:
        ``[out]`` float32 scales with non-finite values replaced by 1.
    """
    if variant not in WSC_VARIANTS:
        raise ValueError(f"unknown WSC variant {variant!r}; choose one of {WSC_VARIANTS}")
    if tasks.dim() != 3 or merged.dim() != 2 or tasks.shape[1:] != merged.shape:
        raise ValueError(
            f"expected merged [out, in] and tasks [K, out, in], got {tuple(merged.shape)} and {tuple(tasks.shape)}"
        )
    d = merged.to(torch.float32)
    a = tasks.to(torch.float32)
    task_sq = (a * a).sum(-1)  # [K, out]
    r = task_sq.sqrt().mean(0)  # [out]
    if variant == "norm_match":
        lam = r / torch.linalg.vector_norm(d, dim=-1)
    elif variant == "joint":
        gram = torch.einsum("koi,joi->okj", a, a).double()  # [out, K, K]
        rhs = torch.einsum("koi,oi->ok", a, d).double()  # [out, K]
        alpha = (torch.linalg.pinv(gram, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1).float().T  # [K, out]
        d_res = d - torch.einsum("ko,koi->oi", alpha, a)
        lam = ((alpha * alpha).sum(0) + (d_res * d_res).sum(-1) / (r * r) + eps).rsqrt()
    else:
        alpha = torch.einsum("koi,oi->ko", a, d) / task_sq  # [K, out]; a zero task row gives NaN -> lambda 1
        d_res = d - torch.einsum("ko,koi->oi", alpha, a)
        denom = (alpha * alpha).sum(0) + (d_res * d_res).sum(-1) / (r * r) + eps
        lam = denom.rsqrt()
    return torch.where(torch.isfinite(lam), lam, torch.ones_like(lam))


def wsc_keys(
    merged_tv: Mapping[str, Tensor], *, include: Patterns = None, exclude: Patterns = DEFAULT_WSC_EXCLUDE
) -> list[str]:
    """Keys of ``merged_tv`` that WSC calibrates: floating tensors with >= 2 dims, matching ``include`` (if given) and
    no ``exclude`` pattern. Pass ``exclude=()`` to drop the default exclusions."""
    inc, exc = compile_patterns(include), compile_patterns(exclude)
    out = []
    for key in merged_tv:
        t = merged_tv[key]
        if not t.dtype.is_floating_point or t.dim() < 2:
            continue
        if inc and not matches_any(key, inc):
            continue
        if matches_any(key, exc):
            continue
        out.append(key)
    return out


def task_slices(key: str, merged: Tensor, task_vectors: Sequence[Mapping[str, Tensor]]) -> list[Tensor]:
    """The K task vectors' tensors of ``key``, each checked present and shaped like the merged one."""
    out = []
    for k, tv in enumerate(task_vectors):
        if key not in tv:
            raise KeyError(f"task vector {k} lacks key {key!r} of the merged task vector")
        t = tv[key]
        if t.shape != merged.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: merged task vector {tuple(merged.shape)} vs task vector {k} "
                f"{tuple(t.shape)}"
            )
        out.append(t)
    return out


def weight_space_calibration(
    merged_tv: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    sensitive: Optional[Collection[str]] = None,
    *,
    include: Patterns = None,
    exclude: Patterns = DEFAULT_WSC_EXCLUDE,
    eps: float = 1e-8,
    variant: str = "paper",
    return_scales: bool = False,
) -> Union[dict[str, Tensor], tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Calibrate the merged task vector ``tau_m`` row by row from the task vectors alone (MAGIC WSC,
    docs/method.md, WSC).

    Args:
        merged_tv: the merged task vector ``tau_m`` (key -> tensor; lazily loaded mappings are fine).
        task_vectors: the K task vectors ``tau_k`` (read one key at a time; only one tensor's ``[K, out, in]`` stack
            is resident at once).
        sensitive: magnitude-sensitive tensors (parameter keys, or module names meaning all their tensors).
            ``None`` (default): no gating, every row takes its lambda. A collection (even empty): the paper's gating,
            rows of sensitive tensors only shrink (lambda < 1), rows of the others only grow (lambda > 1).
        include: regex(es); when given, only matching keys are calibrated (default: all eligible keys).
        exclude: regex(es) of keys left alone (default :data:`DEFAULT_WSC_EXCLUDE`: norms, biases, embeddings).
        eps: stabiliser under the square root (default 1e-8).
        variant: ``"paper"`` (default, MAGIC's formula) or ``"norm_match"`` (see :data:`WSC_VARIANTS`).
        return_scales: also return ``{key: [out] float32 scale actually applied per row}``.

    Returns:
        The calibrated task vector: every key of ``merged_tv``; calibrated keys are new tensors in ``merged_tv``'s
        dtype, the others are the input tensors themselves (not copied).
    """
    if len(task_vectors) == 0:
        raise ValueError("weight_space_calibration needs at least one task vector (K >= 1), got none")
    if variant not in WSC_VARIANTS:
        raise ValueError(f"unknown WSC variant {variant!r}; choose one of {WSC_VARIANTS}")
    keys = set(wsc_keys(merged_tv, include=include, exclude=exclude))
    gated = sensitive is not None
    out: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for key in merged_tv:
        d = merged_tv[key]
        if key not in keys:
            out[key] = d
            continue
        rows = [t.to(device=d.device, dtype=torch.float32).reshape(d.shape[0], -1)
                for t in task_slices(key, d, task_vectors)]
        tasks = torch.stack(rows)
        del rows
        d32 = d.to(torch.float32).reshape(d.shape[0], -1)
        lam = row_scales(d32, tasks, eps=eps, variant=variant)
        del tasks
        if gated:
            take = lam < 1 if tensor_is_sensitive(key, sensitive) else lam > 1
            lam = torch.where(take, lam, torch.ones_like(lam))
        out[key] = (d32 * lam[:, None]).reshape(d.shape).to(d.dtype)
        scales[key] = lam
    return (out, scales) if return_scales else out


@register_step
@dataclass(frozen=True)
class WSCStep(CalibrationStep):
    """The calibration step ``wsc``: :func:`weight_space_calibration` of tau_m (MAGIC, arXiv 2512.19320), gated by
    the setting's sensitive set (``None``: every row takes its lambda).

    Attributes:
        variant: one of :data:`WSC_VARIANTS` (``"paper"``, the paper's formula).
        eps: the stabiliser under the square root, in (0, 1] (1e-8, the paper's).
    """

    name: ClassVar[str] = "wsc"
    row_separable: ClassVar[bool] = True
    variant: str = "paper"
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self._choice("variant", WSC_VARIANTS)
        self._number("eps", lambda v: 0 < v <= 1.0, "a finite number in (0, 1]")

    def apply(self, merged_tv: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
              sensitive: Optional[Collection[str]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        calibrated, scales = weight_space_calibration(merged_tv, task_vectors, sensitive, eps=self.eps,
                                                      variant=self.variant, return_scales=True)
        return {k: calibrated[k] for k in scales}, scales
