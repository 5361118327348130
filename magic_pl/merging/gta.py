"""MergeKit's generalized task arithmetic: one rule behind its ``task_arithmetic``, ``ties``, ``dare_ties``,
``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della`` and ``della_linear`` recipes, with per-model
weights and densities and MergeKit's per-layer parameter values.

The paper-faithful methods (:mod:`~magic_pl.merging.ties`, :mod:`~magic_pl.merging.dare`, ...) follow each paper's
reference code; this one follows MergeKit instead, so that a MergeKit recipe file gives MergeKit's tensors
(:mod:`magic_pl.recipe` maps each recipe method onto it).

A *setting* (MergeKit's ``ParameterSetting``) is what a recipe may write for a number:

- a number;
- a list of numbers, a gradient over the layers: layer ``i`` of ``N`` sits at ``t = i / (N - 1)`` and takes the
  linear interpolation of the list at ``t * (len - 1)``; tensors outside the layers (embeddings, final norm, heads)
  sit at ``t = 0``, as in MergeKit's planner;
- a list of ``{"filter": substring, "value": setting}``: the first entry whose filter occurs in the tensor's name (or
  has no filter, or ``"*"``) gives the value.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import torch
from torch import Tensor

from ._common import generator_for, prepare
from .method import merge_method
from .options import SCALE_LIMIT, Flag, Integer, Maybe, OneOf, Rule, Seed
from .steps import magprune

__all__ = ["gta", "resolve_setting", "layer_position", "layer_count", "check_setting", "LAYER_PATTERN", "SPARSIFY",
           "CONSENSUS"]

#: A decoder/encoder layer's index in a tensor name: ``model.layers.3.``, ``encoder.layer.3.``, ``h.3.``,
#: ``blocks.3.``. The first match counts.
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
SPARSIFY = ("none", "magnitude", "random", "magnitude_outliers", "della_magprune")
CONSENSUS = ("none", "sum", "count")
_RESCALE_EPS = 1e-7  # MergeKit's: below it a norm is not matched


# --------------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_setting(value: Any, where: str, low: Optional[float] = None, high: Optional[float] = None) -> Any:
    """``value`` as a setting (numbers as float, each within ``[low, high]``), or ``ValueError`` naming ``where``."""
    if _is_number(value):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{where}={value!r} must be finite")
        if (low is not None and v < low) or (high is not None and v > high):
            raise ValueError(f"{where}={value!r} must lie in [{low if low is not None else '-inf'}, "
                             f"{high if high is not None else 'inf'}]")
        return v
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value:
        if all(_is_number(v) for v in value):
            return [check_setting(v, where, low, high) for v in value]
        if all(isinstance(v, Mapping) for v in value):
            out = []
            for i, cond in enumerate(value):
                unknown = set(cond) - {"filter", "value"}
                if unknown or "value" not in cond:
                    raise ValueError(f"{where}[{i}] must be {{filter: NAME, value: ...}}, got {dict(cond)!r}")
                f = cond.get("filter")
                if f is not None and not isinstance(f, str):
                    raise ValueError(f"{where}[{i}].filter must be a string, got {f!r}")
                out.append({"filter": f, "value": check_setting(cond["value"], f"{where}[{i}].value", low, high)})
            return out
    raise ValueError(f"{where}={value!r} must be a number, a list of numbers (a gradient over the layers) or a list "
                     "of {filter: NAME, value: ...}")


@dataclass(frozen=True)
class Settings(Rule):
    """One setting per task (a list of K), or one setting for all (a number, or ``{filter, value}`` list); every
    number within ``[low, high]``."""

    low: Optional[float] = None
    high: Optional[float] = None
    per_task: bool = True

    def __call__(self, method: str, option: str, value: Any) -> Any:
        where = f"merge method {method!r}: option {option}"
        if value is None:
            return None
        if not self.per_task or _is_number(value) or (
                isinstance(value, Sequence) and value and isinstance(value[0], Mapping)):
            return check_setting(value, where, self.low, self.high)
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value:
            return [check_setting(v, f"{where}[{i}]", self.low, self.high) for i, v in enumerate(value)]
        raise ValueError(f"{where}={value!r} must be one setting per task (a list) or one for all")


def resolve_setting(setting: Any, name: str, t: float) -> float:
    """The number ``setting`` gives tensor ``name`` at layer position ``t`` in [0, 1] (MergeKit's
    ``evaluate_setting``); a ``{filter, value}`` list no entry of which matches is an error naming the tensor."""
    if _is_number(setting):
        return float(setting)
    if setting and all(_is_number(v) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return resolve_setting(cond["value"], name, t)
    raise ValueError(f"no filter of {setting!r} matches tensor {name!r}: add an entry without a filter as default")


def layer_position(name: str, num_layers: Optional[int]) -> float:
    """``t`` of tensor ``name`` for gradients: ``i / (num_layers - 1)`` for layer ``i`` (1 for a one-layer model), 0
    for tensors outside the layers, as MergeKit's planner places them."""
    found = LAYER_PATTERN.search(name)
    if found is None or not num_layers:
        return 0.0
    return int(found.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _per_task(value: Any, k: int, default: float, option: str) -> list[Any]:
    if value is None:
        return [default] * k
    if _is_number(value) or (value and isinstance(value[0], Mapping)):
        return [value] * k
    if len(value) != k:
        raise ValueError(f"gta: {len(value)} {option} for K = {k} task vectors (give one per task, or one for all)")
    return list(value)


def _task_rule(k: int, options: Mapping[str, Any]) -> Optional[str]:
    for opt in ("weights", "densities", "gammas", "epsilons"):
        v = options.get(opt)
        if v is not None and not _is_number(v) and not (v and isinstance(v[0], Mapping)) and len(v) != k:
            return f"gta: {len(v)} {opt} for K = {k} task vectors (give one per task, or one for all)"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Sparsification (MergeKit's rules: counts, ranks and L1 rescaling)
# --------------------------------------------------------------------------------------------------------------------
def _rescaled(tau: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    kept = tau * mask
    if not rescale:
        return kept
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def _sparsify(tau: Tensor, how: str, density: float, gamma: float, epsilon: float, rescale: bool,
              generator: torch.Generator) -> Tensor:
    if how == "none" or density >= 1:
        return tau
    n = tau.numel()
    if how in ("magnitude", "della_magprune") and (density <= 0 or n == 0):
        return torch.zeros_like(tau)
    if how == "magnitude":
        k = max(1, int(density * n))
        mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
        mask[torch.argsort(tau.abs().reshape(-1), descending=True)[:k]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    if how == "magnitude_outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)
        order = torch.sort(tau.abs().reshape(-1), descending=False).indices
        mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
        mask[order[n_bot:n_bot + target]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    if how == "random":
        mask = torch.bernoulli(torch.full_like(tau, density), generator=generator)
        return _rescaled(tau, mask, rescale)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"gta: della_magprune needs density +/- epsilon in (0, 1), got density={density}, "
                         f"epsilon={epsilon}")
    return magprune(tau, density, epsilon, generator, rescale="l1" if rescale else "none")


# --------------------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------------------
@merge_method(
    name="gta",
    paper="Goddard et al., EMNLP 2024 Industry, arXiv 2403.13257 (MergeKit's generalized task arithmetic); "
          "Yadav et al., NeurIPS 2023 (TIES); Yu et al., ICML 2024 (DARE); Deep et al., 2024 (DELLA)",
    task_rule=_task_rule,
)
def gta(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    sparsify: Annotated[str, OneOf(SPARSIFY)] = "none",
    consensus: Annotated[str, OneOf(CONSENSUS)] = "none",
    weights: Annotated[Any, Settings(-SCALE_LIMIT, SCALE_LIMIT)] = None,
    densities: Annotated[Any, Settings(0.0, 1.0)] = None,
    gammas: Annotated[Any, Settings(0.0, 1.0)] = None,
    epsilons: Annotated[Any, Settings(0.0, 1.0)] = None,
    scale: Annotated[Any, Settings(-SCALE_LIMIT, SCALE_LIMIT, per_task=False)] = 1.0,
    normalize: Annotated[bool, Flag()] = False,
    rescale: Annotated[bool, Flag()] = False,
    num_layers: Annotated[Optional[int], Maybe(Integer(1))] = None,
    base_weight: Annotated[float, Settings(0.0, SCALE_LIMIT, per_task=False)] = 0.0,
    seed: Seed = 0,
) -> Tensor:
    """MergeKit's generalized task arithmetic of one tensor, in task-vector space (the result is ``tau_m``).

    1. Sparsify each ``tau_k`` (``sparsify``): ``"magnitude"`` keeps the ``max(1, int(density * n))`` largest
       magnitudes; ``"random"`` keeps each entry with probability ``density``; ``"magnitude_outliers"`` drops the
       ``int(gamma * n)`` largest and then the smallest to keep ``int(density * n)``; ``"della_magprune"`` keeps
       entries with rank-dependent probabilities in ``density +- epsilon`` per row. With ``rescale`` the survivors
       are scaled to the task vector's L1 norm (MergeKit's ``rescale``: an L1 norm match, not DARE's ``1 / p``).
    2. Weight: ``d_k = w_k * sparse(tau_k)``.
    3. Combine: without ``consensus``, ``sum_k d_k`` and the divisor ``sum_k w_k``; with ``consensus="sum"`` (TIES)
       the entries whose sign equals the sign of ``sum_k d_k`` (``>= 0`` counts as ``+``), ``"count"`` the majority
       sign; the divisor is then ``sum_k w_k`` over the agreeing tasks (1 where none agree).
    4. ``normalize`` divides by the divisor; the result is multiplied by ``scale`` (MergeKit's ``lambda``).

    Each of ``weights`` (default 1.0 each), ``densities`` (1.0), ``gammas`` (0.01), ``epsilons`` (0.15) and ``scale``
    is one setting for all tasks or one per task (``scale``: one for all), MergeKit's defaults; a gradient needs
    ``num_layers`` (the recipe reader sets it from the base model's keys). ``base_weight`` (default 0) adds the base
    model's own weight to the divisor of a consensus-free merge: MergeKit's ``linear`` with the base listed among its
    models, ``(w_0 theta_0 + sum_k w_k theta_k) / (w_0 + sum_k w_k) = theta_0 + sum_k w_k tau_k / (w_0 + sum_k w_k)``.

    Departures from MergeKit 0.1.5: arithmetic is float32 whatever the checkpoints' dtype (MergeKit computes in the
    recipe's ``dtype``); the random masks come from a ``torch.Generator`` seeded from (``seed``, tensor name, task),
    so ``random`` and ``della_magprune`` equal MergeKit's only in distribution; the sums run task by task (MergeKit
    sums a ``[K, ...]`` stack), which can differ in the last bit.
    """
    ts = prepare(taus, name)
    k = len(ts)
    t = layer_position(name, num_layers)
    w = [resolve_setting(s, name, t) for s in _per_task(weights, k, 1.0, "weights")]
    dens = [resolve_setting(s, name, t) for s in _per_task(densities, k, 1.0, "densities")]
    gam = [resolve_setting(s, name, t) for s in _per_task(gammas, k, 0.01, "gammas")]
    eps = [resolve_setting(s, name, t) for s in _per_task(epsilons, k, 0.15, "epsilons")]
    lam = resolve_setting(scale, name, t)
    device = ts[0].device
    deltas = [
        _sparsify(tau, sparsify, dens[i], gam[i], eps[i], rescale, generator_for(seed, name, i, device)) * w[i]
        for i, tau in enumerate(ts)
    ]
    mixed = torch.zeros_like(ts[0])
    if consensus == "none":
        for d in deltas:
            mixed += d
        divisor: Any = sum(w) + resolve_setting(base_weight, name, t)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    else:
        if consensus == "sum":
            total = torch.zeros_like(ts[0])
            for d in deltas:
                total += d
        else:
            total = torch.zeros_like(ts[0])
            for d in deltas:
                total += torch.sign(d)
        majority = torch.where(total >= 0, 1.0, -1.0)
        del total
        divisor = torch.zeros_like(ts[0])
        for d, wk in zip(deltas, w):
            agree = torch.sign(d) == majority
            mixed += torch.where(agree, d, 0.0)
            divisor += agree * wk
        divisor[divisor == 0] = 1.0
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed


def layer_count(keys: Sequence[str]) -> Optional[int]:
    """``1 +`` the largest layer index (:data:`LAYER_PATTERN`) among ``keys``; ``None`` when no key has one."""
    found = [int(m.group(1)) for m in map(LAYER_PATTERN.search, keys) if m is not None]
    return max(found) + 1 if found else None

