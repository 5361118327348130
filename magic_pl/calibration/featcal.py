"""FeatCal: closed-form feature calibration of a merged model, block by block in forward order.

FeatCal (Gu et al., "FeatCal: Feature Calibration for Post-Merging Models", arXiv 2605.13030, 2026; reference code
github.com/egangu/featcal, ``solver.py`` and ``featcal.py``) corrects a merged model theta_m, whatever merge made it,
with a few unlabelled samples per task, so that its features follow each expert's on that expert's task. Blocks
(transformer layers) are calibrated in forward order: in block b, with the blocks before it already calibrated, every
``nn.Linear`` and ``nn.LayerNorm`` is rewritten in closed form from statistics of its input, measured on the block as
merged. On task k's samples, at one module:

- ``x_s`` is its input in the model being calibrated (the student), ``x_e`` its input in expert k (theta0 + tau_k
  everywhere) on the same sample, and the teacher input is ``x_t = alpha x_e + (1 - alpha) x_s``.
- ``E_k`` is the weighted mean over task k's rows (every sample and position; see "token weights" below).
- The anchor of a tensor is ``rho theta_m + (1 - rho) theta0 = theta0 + rho tau_m``, its merged value extrapolated
  along the merged task vector.

Linear ``y = W x + b`` (``W_k``, ``b_k``: expert k's; ``W_a``, ``b_a``: the anchors)::

    C_k = E_k[x_s x_s^T]   X_k = E_k[x_s x_t^T]   mu_sk = E_k[x_s]   mu_tk = E_k[x_t]   s_k = 1 / max(||C_k||_F, eps)
    W^T = (sum_k s_k C_k + (lambda + eps) I)^-1 (sum_k s_k X_k W_k^T + lambda W_a^T)
    b   = (sum_k s_k (b_k + W_k mu_tk - W mu_sk) + lambda b_a) / (sum_k s_k + lambda)

the minimiser of ``sum_k s_k E_k ||W x_s - W_k x_t||^2 + lambda ||W - W_a||_F^2`` (uncentred, bias left out), then of
``sum_k s_k ||W mu_sk + b - W_k mu_tk - b_k||^2 + lambda ||b - b_a||^2`` with the new (stored) W.

LayerNorm ``y = g z + beta`` (``z``: the student's input normalised without the affine map; per channel)::

    a11 = sum_k E_k[z^2] + lambda    a12 = sum_k E_k[z]    a22 = K + lambda
    r_g = sum_k (E_k[z^2] g_k + E_k[z] beta_k) + lambda g_a      r_beta = sum_k (E_k[z] g_k + beta_k) + lambda beta_a
    g = (a22 r_g - a12 r_beta) / d    beta = (a11 r_beta - a12 r_g) / d    d = max(a11 a22 - a12^2, eps)

the minimiser of ``sum_k E_k (g z + beta - g_k z - beta_k)^2 + lambda ((g - g_a)^2 + (beta - beta_a)^2)``: expert k's
affine map on the student's normalised features (a LayerNorm without bias: ``g`` alone, the 1-D case).

Defaults: ``ridge`` lambda = 0.05 (``lambda_ratio``), ``anchor`` rho = 2.2 (``anchor_blend_rho``), ``teacher_mix``
alpha = 0.25 (``teacher_interp_alpha``) and ``eps`` = 1e-8 (``covariance_eps``): the reference's run script, which
reproduces the paper's CLIP ViT-B/32 8-task result (task arithmetic 67.5 -> 85.5 with 256 samples per task); the
reference README gives rho = 2.0, alpha = 0.3 as the paper's main-text default. Biases and LayerNorms are calibrated
(``calibrate_bias``, ``calibrate_layernorm``: true).

As implemented (the reference is CLIP-specific; this runs on any model through its forward pass):

- Blocks: the children of every outermost stack (an ``nn.ModuleList`` or ``nn.Sequential`` of at least two modules of
  one class: HF ``encoder.layers``, timm ``blocks``, open_clip ``resblocks``), in forward order. Linear and LayerNorm
  modules outside every block keep their merged values (the reference calibrates CLIP's encoder layers only). A model
  without a stack: every Linear and LayerNorm is a block of its own, in forward order.
- Modules: every ``nn.Linear`` whose weight is a task-vector key and not tied to another parameter, and every
  ``nn.LayerNorm`` with an affine map in the task vectors, that one forward pass of the first sample calls. All of a
  block's modules are solved from statistics of the block as merged, then written together (the reference's order).
- Student and expert run the whole model (the expert through ``torch.func.functional_call`` with theta0 + tau_k, so
  no expert model is built; one expert's tensors at a time), stopped once the block has run when one pass calls it
  once. Per-sample calls are stacked into batches of ``batch_size`` rows when their shapes allow (row sums do not
  depend on it).
- Token weights: in the last block, every position but the first of a ``[batch, positions, features]`` input counts
  ``last_block_token_weight``, except in key and value projections (:data:`KEY_VALUE_NAMES`), whose every position
  feeds the first one through attention. The reference uses 0.01 for CLIP (whose features are the first token's);
  the default here is 1, every position alike, right for any model. Positions where a batch's 2-D ``attention_mask``
  is 0 weigh 0.
- Statistics: float32 weighted sums and weight totals per task (not means), summed over processes with one reduce per
  block (block b + 1 is measured on block b's result), divided afterwards; the solves in float64 (the reference:
  float32). A task that never reaches a module is left out of that module's sums.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from magic_pl.calibration.fsc import (
    CalibrationDataError,
    CalibrationResult,
    StateSource,
    _model_device,
    _rows,
    _state_of,
)
from magic_pl.calibration.steps import CalibrationStep, register_step
from magic_pl.statedict import apply_delta

__all__ = ["KEY_VALUE_NAMES", "FeatCalCalibrator", "FeatCalStep", "featcal_blocks", "featcal_layernorm",
           "featcal_linear", "featcal_modules"]

#: ``reduce(tensor) -> tensor``: the sum over processes (``None`` back: reduced in place).
Reduce = Callable[[Tensor], Optional[Tensor]]
#: Last name components of key and value projections: in the last block every position of their input keeps its
#: weight (the reference spares ``k_proj`` and ``v_proj``; ``key``/``value`` are BERT's names).
KEY_VALUE_NAMES: tuple[str, ...] = ("k_proj", "v_proj", "key", "value")


def _key(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


# --------------------------------------------------------------------------------------------------------------------
# The closed forms
# --------------------------------------------------------------------------------------------------------------------
def featcal_linear(cov: Tensor, cross: Tensor, mean_s: Tensor, mean_t: Tensor, weights: Sequence[Tensor],
                   biases: Optional[Sequence[Tensor]], anchor_w: Tensor, anchor_b: Optional[Tensor], *,
                   ridge: float = 0.05, eps: float = 1e-8,
                   stored: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Optional[Tensor]]:
    """FeatCal's Linear update (module docstring), in the inputs' dtype (float64 in the calibrator).

    Args:
        cov, cross: ``[K, in, in]`` per-task ``E[x_s x_s^T]`` and ``E[x_s x_t^T]``.
        mean_s, mean_t: ``[K, in]`` per-task ``E[x_s]`` and ``E[x_t]``.
        weights, biases: the K experts' ``[out, in]`` weights and ``[out]`` biases (``biases=None``: no bias update).
        anchor_w, anchor_b: the anchors ``theta0 + rho tau_m``.
        ridge, eps: lambda (0.05) and eps (1e-8), the reference run script's.
        stored: the weight as the model stores it (e.g. rounded to float32); the bias is solved for it.

    Returns ``(W, b)`` (``b`` ``None`` without ``biases``).
    """
    scale = 1.0 / torch.linalg.matrix_norm(cov).clamp_min(eps)  # [K]: each task's statistics normalised
    lhs = (cov * scale[:, None, None]).sum(0)
    lhs.diagonal().add_(max(float(ridge), 0.0) + (float(eps) if eps > 0 else 0.0))
    rhs = float(ridge) * anchor_w.T
    for k, w in enumerate(weights):
        rhs = rhs.addmm(cross[k], w.T, alpha=float(scale[k]))
    try:
        solved = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (ridge and eps 0, an input direction no task excites): least squares
        solved = torch.linalg.pinv(lhs) @ rhs
    new_w = solved.T.contiguous()
    if biases is None:
        return new_w, None
    w_used = stored(new_w) if stored is not None else new_w
    num = float(ridge) * anchor_b if anchor_b is not None else torch.zeros_like(biases[0])
    den = float(ridge) if anchor_b is not None else 0.0
    for k, (w, b) in enumerate(zip(weights, biases)):
        num = num + scale[k] * (b + w @ mean_t[k] - w_used @ mean_s[k])
        den = den + scale[k]
    return new_w, num / torch.as_tensor(den, dtype=num.dtype).clamp_min(torch.finfo(num.dtype).eps)


def featcal_layernorm(mean_z: Tensor, energy_z: Tensor, gains: Sequence[Tensor], shifts: Optional[Sequence[Tensor]],
                      anchor_g: Tensor, anchor_b: Optional[Tensor], *, ridge: float = 0.05,
                      eps: float = 1e-8) -> tuple[Tensor, Optional[Tensor]]:
    """FeatCal's LayerNorm update (module docstring), per channel, in the inputs' dtype.

    Args:
        mean_z, energy_z: ``[K, C]`` per-task ``E[z]`` and ``E[z^2]`` of the student's normalised input.
        gains, shifts: the K experts' weights and biases (``shifts=None``: a LayerNorm without bias, ``g`` alone).
        anchor_g, anchor_b: the anchors ``theta0 + rho tau_m``.
        ridge, eps: lambda (0.05) and the determinant floor eps (1e-8), the reference run script's.
    """
    lam = max(float(ridge), 0.0)
    g_k = torch.stack([g.reshape(-1) for g in gains])
    a11 = energy_z.sum(0) + lam
    r_g = (energy_z * g_k).sum(0) + lam * anchor_g.reshape(-1)
    if shifts is None:
        floor = max(float(eps), torch.finfo(a11.dtype).tiny)
        return (r_g / a11.clamp_min(floor)).reshape(anchor_g.shape), None
    b_k = torch.stack([b.reshape(-1) for b in shifts])
    a12 = mean_z.sum(0)
    a22 = float(len(gains)) + lam
    r_g = r_g + (mean_z * b_k).sum(0)
    r_b = (mean_z * g_k).sum(0) + b_k.sum(0) + lam * anchor_b.reshape(-1)
    det = (a11 * a22 - a12 * a12).clamp_min(max(float(eps), torch.finfo(a11.dtype).tiny))
    gain = (a22 * r_g - a12 * r_b) / det
    shift = (a11 * r_b - a12 * r_g) / det
    return gain.reshape(anchor_g.shape), shift.reshape(anchor_b.shape)


# --------------------------------------------------------------------------------------------------------------------
# Modules and blocks
# --------------------------------------------------------------------------------------------------------------------
def featcal_modules(model: nn.Module, keys: Iterable[str], modules: Optional[Sequence[str]] = None, *,
                    layernorm: bool = True) -> dict[str, nn.Module]:
    """The modules FeatCal may rewrite, in registration order: every ``nn.Linear`` whose weight is in ``keys`` and not
    tied to another parameter, and (``layernorm``) every ``nn.LayerNorm`` whose affine tensors are in ``keys``.
    ``modules``: only these names."""
    from magic_pl.merging.regmean import _linear_layers  # one rule for "a mergeable linear layer"

    keys = set(keys)
    found: dict[str, nn.Module] = dict(_linear_layers(model, keys))
    if layernorm:
        for name, m in model.named_modules():
            if (isinstance(m, nn.LayerNorm) and m.weight is not None and _key(name, "weight") in keys
                    and (m.bias is None or _key(name, "bias") in keys)):
                found[name] = m
    if modules is not None:
        wanted = set(modules)
        found = {n: m for n, m in found.items() if n in wanted}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _stacks(model: nn.Module) -> list[str]:
    """The children of every outermost ``nn.ModuleList``/``nn.Sequential`` of >= 2 modules of one class."""
    stacks: list[str] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if any(_under(name, t) for t in taken):
            continue
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            children = list(m.named_children())
            if len(children) >= 2 and len({type(c) for _, c in children}) == 1:
                taken.append(name)
                stacks.extend(_key(name, child) for child, _ in children)
    return stacks


def featcal_blocks(model: nn.Module, units: Iterable[str]) -> dict[str, list[str]]:
    """FeatCal's blocks, in registration order: block module name -> its units (module names, registration order).

    The children of every outermost stack (module docstring) that hold a unit; units outside every block are not
    calibrated. A model without such a stack: every unit is its own block.
    """
    units = list(units)
    stacks = _stacks(model)
    blocks: dict[str, list[str]] = {}
    for b in stacks:
        inside = [u for u in units if _under(u, b)]
        if inside:
            blocks[b] = inside
    if blocks:
        return blocks
    return {u: [u] for u in units}


# --------------------------------------------------------------------------------------------------------------------
# Calls: stacking per-sample calls into batches
# --------------------------------------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain equality do not stack
        return False


def _batched(v: Any, n: int) -> bool:
    return isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n


def _stackable(first: tuple[tuple, dict, int], call: tuple[tuple, dict, int]) -> bool:
    (a1, k1, n1), (a2, k2, n2) = first, call
    if len(a1) != len(a2) or list(k1) != list(k2):
        return False
    for u, v in zip((*a1, *k1.values()), (*a2, *k2.values())):
        if _batched(u, n1) and _batched(v, n2):
            if u.shape[1:] != v.shape[1:] or u.dtype != v.dtype or u.device != v.device:
                return False
        elif not _same(u, v):
            return False
    return True


def _stack(calls: Sequence[tuple[tuple, dict]], limit: int) -> list[tuple[tuple, dict]]:
    """Consecutive calls concatenated along dim 0 (tensors whose dim 0 is the call's batch; other values must be
    equal) into batches of at most ``limit`` rows."""
    out: list[tuple[tuple, dict]] = []
    group: list[tuple[tuple, dict, int]] = []

    def flush() -> None:
        if len(group) == 1:
            out.append(group[0][:2])
        elif group:
            a0, k0, n0 = group[0]

            def cat(i: int, key: Optional[str]) -> Any:
                values = [g[0][i] if key is None else g[1][key] for g in group]
                return torch.cat(values) if _batched(values[0], n0) else values[0]

            out.append((tuple(cat(i, None) for i in range(len(a0))), {key: cat(-1, key) for key in k0}))
        group.clear()

    rows = 0
    for args, kwargs in calls:
        n = _rows(args, kwargs)
        call = (tuple(args), dict(kwargs), n)
        if group and rows + n <= limit and _stackable(group[0], call):
            group.append(call)
            rows += n
            continue
        flush()
        group.append(call)
        rows = n
    flush()
    return out


def _attention_mask(kwargs: Mapping[str, Any]) -> Optional[Tensor]:
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


# --------------------------------------------------------------------------------------------------------------------
# The calibrator
# --------------------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised once the block being measured has run: the rest of the forward pass is not needed."""


@dataclass
class _Group:
    """Units of one block that read the same input tensor (HF attention's q, k and v): one set of statistics."""

    units: list[str]
    kind: str  # "linear" or "layernorm"
    dim: int  # input features (Linear) or channels (LayerNorm)
    key_value: bool  # a key/value projection: no token weighting in the last block
    offset: int = 0

    @property
    def size(self) -> int:
        d = self.dim
        return 2 * d * d + 2 * d + 1 if self.kind == "linear" else 2 * d + 1


@dataclass
class _Block:
    name: str
    units: list[str]
    groups: list[_Group] = field(default_factory=list)
    stop: bool = False  # one pass calls the block once, and its units inside it: stop the forward there
    size: int = 0


class FeatCalCalibrator:
    """Calibrate a merged model with FeatCal (module docstring): feed unlabelled batches per task with :meth:`update`,
    then :meth:`fold` (one process) or :meth:`finalize` with a sum over processes, then :meth:`fold`.

    Args:
        base: the base model theta0, or its state dict.
        merged: the merged model theta0 + tau_m, rewritten in place. Put it in eval mode.
        task_vectors: the K task vectors (mappings key -> tensor, read one key at a time); they hold the calibrated
            modules' tensors.
        ridge, anchor, teacher_mix, eps, calibrate_bias, calibrate_layernorm, last_block_token_weight: the options of
            :class:`FeatCalStep` (defaults: the reference run script's).
        modules: only these module names (default: every Linear and LayerNorm that :func:`featcal_modules` finds).
        task_names: names of the tasks, for messages.
        batch_size: rows per stacked call (16, the reference's calibration batch size).

    Attributes:
        task_samples: ``[K]`` samples fed per task (after :meth:`finalize` with a reduce: over every process).
        blocks: after :meth:`finalize`, the calibrated blocks in forward order.
    """

    def __init__(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]], *,
                 ridge: float = 0.05, anchor: float = 2.2, teacher_mix: float = 0.25, eps: float = 1e-8,
                 calibrate_bias: bool = True, calibrate_layernorm: bool = True,
                 last_block_token_weight: float = 1.0, modules: Optional[Sequence[str]] = None,
                 task_names: Optional[Sequence[str]] = None, batch_size: int = 16) -> None:
        FeatCalStep(ridge=ridge, anchor=anchor, teacher_mix=teacher_mix, eps=eps, calibrate_bias=calibrate_bias,
                    calibrate_layernorm=calibrate_layernorm, last_block_token_weight=last_block_token_weight)
        self.task_vectors = list(task_vectors)
        if not self.task_vectors:
            raise ValueError("FeatCal needs at least one task vector (K >= 1), got none")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"FeatCal batch_size must be a positive integer, got {batch_size!r}")
        K = len(self.task_vectors)
        if task_names is not None and len(task_names) != K:
            raise ValueError(f"{len(task_names)} task names for {K} task vectors")
        self.task_names = [str(n) for n in task_names] if task_names is not None else [str(k) for k in range(K)]
        self.merged = merged
        self.base_state = _state_of(base)
        self.ridge, self.anchor, self.eps = float(ridge), float(anchor), float(eps)
        self.teacher_mix = float(teacher_mix)
        self.calibrate_bias, self.calibrate_layernorm = bool(calibrate_bias), bool(calibrate_layernorm)
        self.token_weight = float(last_block_token_weight)
        self.batch_size = batch_size
        keys = [k for k in self.task_vectors[0] if all(k in tv for tv in self.task_vectors[1:])]
        self.units = featcal_modules(merged, keys, modules, layernorm=self.calibrate_layernorm)
        if not self.units:
            raise ValueError(f"{type(merged).__name__} has no nn.Linear or nn.LayerNorm in the task vectors for "
                             "FeatCal to calibrate")
        for name, m in self.units.items():
            for local, _ in m.named_parameters(recurse=False):
                key = _key(name, local)
                if key not in self.base_state:
                    raise KeyError(f"the base lacks {key!r} of calibrated module {name!r}")
        state = merged.state_dict()
        self._expert_keys = [k for k in self.task_vectors[0] if k in state and k in self.base_state
                             and state[k].dtype.is_floating_point]
        self.block_units = featcal_blocks(merged, self.units)
        self.task_samples = torch.zeros(K, dtype=torch.long)
        self.blocks: list[_Block] = []
        self._calls: list[tuple[int, tuple, dict]] = []
        self._finalized = False
        self._folded = False
        self._written: list[str] = []

    @property
    def num_tasks(self) -> int:
        return len(self.task_vectors)

    # ------------------------------------------------------------------------------------------------------------
    def update(self, task_index: Any, *args: Any, **kwargs: Any) -> None:
        """Keep one call of the merged model on unlabelled samples of task ``task_index`` (measured by
        :meth:`finalize`, once per block)."""
        if self._finalized or self._folded:
            raise RuntimeError("FeatCal has already calibrated the model; create a new calibrator")
        if isinstance(task_index, Tensor):
            task_index = task_index.item()
        if isinstance(task_index, bool) or not float(task_index).is_integer():
            raise ValueError(f"task_index must be an integer, got {task_index!r}")
        k = int(task_index)
        if not 0 <= k < self.num_tasks:
            raise IndexError(f"task_index {k} is out of range: there are {self.num_tasks} task vectors "
                             f"(0..{self.num_tasks - 1})")
        self._calls.append((k, args, kwargs))
        self.task_samples[k] += _rows(args, kwargs)

    def finalize(self, reduce: Optional[Reduce] = None) -> None:
        """Calibrate every block in forward order, writing into the merged model.

        ``reduce``: sums a tensor over processes (each process fed its own samples); applied once to the sample
        counts and the forward order, then once to each block's statistics, so every process computes the same
        weights. Raises :class:`~magic_pl.calibration.fsc.CalibrationDataError` (on every process alike) for a task
        without samples or with non-finite features; the blocks calibrated before the error stay written.
        """
        if self._finalized:
            return
        if reduce is None:
            self._check_counts(self.task_samples)
        with torch.inference_mode(False), torch.no_grad():
            self.blocks = self._plan(reduce)
            for i, block in enumerate(self.blocks):
                stats = self._measure(block, last=i == len(self.blocks) - 1)
                stats = self._sum(stats, reduce)
                self._check_finite(stats, block)
                self._solve(block, stats)
        self._calls.clear()
        self._finalized = True

    def fold(self) -> CalibrationResult:
        """Calibrate (:meth:`finalize` without a reduce, unless it ran) and return the report: ``folded`` lists the
        rewritten modules, ``unchanged`` the Linear/LayerNorm modules left as merged, ``rounds`` the blocks."""
        if self._folded:
            raise RuntimeError("this FeatCalCalibrator has already folded; create a new one")
        self.finalize()
        self._folded = True
        left = [n for n in self.units if n not in set(self._written)]
        return CalibrationResult(folded=list(self._written), unchanged=left, mode="sequential",
                                 rounds=len(self.blocks), samples_per_task=self.task_samples.tolist())

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _sum(t: Tensor, reduce: Optional[Reduce]) -> Tensor:
        if reduce is None:
            return t
        out = reduce(t)
        return t if out is None else out.to(device=t.device, dtype=t.dtype)

    def _label(self, k: int) -> str:
        return f"task {self.task_names[k]!r}"

    def _check_counts(self, counts: Tensor) -> None:
        if not bool((counts > 0).any()):
            raise CalibrationDataError("FeatCal has no statistics: feed unlabelled batches of every task (update) "
                                       "before fold()")
        short = [self._label(k) for k in range(self.num_tasks) if int(counts[k]) == 0]
        if short:
            raise CalibrationDataError(f"FeatCal needs at least one unlabelled sample of every task; none for "
                                       f"{', '.join(short)}")

    def _probe(self) -> tuple[dict[str, int], dict[str, int], dict[str, bool]]:
        """One pass of the first call: each unit's first-call position, the unit whose input it shares (q/k/v), and
        per block whether the pass can stop after it."""
        names = list(self.units)
        first: dict[str, int] = {}
        inputs: dict[str, Tensor] = {}
        calls = {b: 0 for b in self.block_units}
        enclosed = {b: True for b in self.block_units}
        open_block: dict[str, bool] = {b: False for b in self.block_units}
        owner = {u: b for b, units in self.block_units.items() for u in units}
        modules = dict(self.merged.named_modules())
        counter = [0]

        def unit_hook(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if name not in first:
                    first[name] = counter[0]
                    counter[0] += 1
                    x = args[0] if args else next(iter(kwargs.values()), None)
                    if isinstance(x, Tensor):
                        inputs[name] = x
                b = owner.get(name)
                if b is not None and b != name and not open_block[b]:
                    enclosed[b] = False
                if b == name:
                    calls[b] += 1

            return hook

        def block_pre(b: str) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:
                calls[b] += 1
                open_block[b] = True

            return hook

        def block_post(b: str) -> Callable:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                open_block[b] = False

            return hook

        handles = [self.units[u].register_forward_pre_hook(unit_hook(u), with_kwargs=True) for u in names]
        for b in self.block_units:
            if b not in self.units:
                handles.append(modules[b].register_forward_pre_hook(block_pre(b)))
                handles.append(modules[b].register_forward_hook(block_post(b)))
        try:
            if self._calls:
                _, args, kwargs = self._calls[0]
                self.merged(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        share: dict[str, int] = {}
        for i, u in enumerate(names):
            share[u] = i
            if not isinstance(self.units[u], nn.Linear) or u not in inputs:
                continue
            for j in range(i):
                v = names[j]
                if (isinstance(self.units[v], nn.Linear) and share[v] == j and inputs.get(v) is inputs[u]
                        and owner.get(v) == owner.get(u)
                        and (self.token_weight == 1.0 or self._key_value(v) == self._key_value(u))):
                    share[u] = j
                    break
        stop = {b: calls[b] == 1 and enclosed[b] for b in self.block_units}
        return first, share, stop

    @staticmethod
    def _key_value(name: str) -> bool:
        return name.rpartition(".")[2] in KEY_VALUE_NAMES

    def _plan(self, reduce: Optional[Reduce]) -> list[_Block]:
        """The blocks in forward order with their statistics' layout; with ``reduce``, agreed over processes (a
        process without samples cannot probe; each process's probe counts once)."""
        names = list(self.units)
        n = len(names)
        first, share, stop = self._probe()
        has = 1.0 if self._calls else 0.0
        reached = torch.tensor([1.0 if u in first else 0.0 for u in names], dtype=torch.float64)
        position = torch.tensor([float(first.get(u, 0)) for u in names], dtype=torch.float64)
        shared = torch.tensor([float(share[u]) * has for u in names], dtype=torch.float64)
        local = torch.cat([reached, position * reached, shared, torch.tensor([has]),
                           self.task_samples.to(torch.float64)])
        total = self._sum(local.to(_model_device(self.merged)), reduce).to("cpu", torch.float64)
        reached, position, shared = total[:n], total[n:2 * n], total[2 * n:3 * n]
        probes, counts = float(total[3 * n]), total[3 * n + 1:]
        if reduce is not None:
            self.task_samples = counts.round().to(torch.long)
            self._check_counts(self.task_samples)
        at = {u: float(position[i] / reached[i]) for i, u in enumerate(names) if reached[i] > 0}
        missing = [u for u in names if u not in at]
        if missing:
            warnings.warn(f"FeatCal: module(s) {missing} are not called by the forward pass; left as merged")
        rep: dict[str, str] = {}
        for i, u in enumerate(names):
            j = float(shared[i] / probes) if probes > 0 else float(i)
            # processes that disagree (they should not) share nothing
            rep[u] = names[int(j)] if j.is_integer() and 0 <= j <= i and int(shared[i]) == int(j) * probes else u
        blocks: list[_Block] = []
        for b, units in self.block_units.items():
            units = [u for u in units if u in at]
            if not units:
                continue
            block = _Block(b, units, stop=stop.get(b, False))
            groups: dict[str, _Group] = {}
            for u in units:
                m = self.units[u]
                r = rep[u] if rep[u] in units else u
                if r in groups:
                    groups[r].units.append(u)
                    continue
                if isinstance(m, nn.Linear):
                    groups[u] = _Group([u], "linear", m.in_features, self._key_value(u))
                else:
                    groups[u] = _Group([u], "layernorm", int(m.weight.numel()), False)
            offset = 0
            for g in groups.values():
                g.offset = offset
                offset += g.size
            block.groups, block.size = list(groups.values()), offset
            blocks.append(block)
        blocks.sort(key=lambda blk: min(at[u] for u in blk.units))
        return blocks

    # ------------------------------------------------------------------------------------------------------------
    def _expert(self, k: int, keys: Sequence[str]) -> dict[str, Tensor]:
        """theta0 + tau_k for ``keys``, in the model's dtypes and devices (for ``functional_call``)."""
        state = self.merged.state_dict()
        out = {}
        for key in keys:
            like = state[key]
            out[key] = apply_delta(self.base_state[key].to(like.device), self.task_vectors[k][key], key=key,
                                   name=f"expert {k}", out_dtype=like.dtype)
        return out

    def _capture(self, block: _Block, params: Optional[Mapping[str, Tensor]], args: tuple, kwargs: dict,
                 kinds: Collection[str]) -> dict[str, list[Tensor]]:
        """The inputs of each group's first unit over one pass (student: ``params`` None; else expert)."""
        modules = dict(self.merged.named_modules())
        seen: dict[str, list[Tensor]] = {g.units[0]: [] for g in block.groups if g.kind in kinds}

        def hook_for(name: str) -> Callable:
            def hook(module: nn.Module, a: tuple, kw: dict) -> None:
                x = a[0] if a else kw.get("input", next(iter(kw.values()), None))
                seen[name].append(x.detach())

            return hook

        def stop(module: nn.Module, a: tuple, output: Any) -> None:
            raise _Stop

        handles = [self.units[n].register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in seen]
        if block.stop:
            handles.append(modules[block.name].register_forward_hook(stop))
        try:
            if params is None:
                self.merged(*args, **kwargs)
            else:
                functional_call(self.merged, dict(params), args, kwargs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return seen

    def _row_weights(self, x: Tensor, group: _Group, last: bool, mask: Optional[Tensor], features: int = 1) -> Tensor:
        """One weight per row of ``x`` (its last ``features`` dims are the features)."""
        lead = x.dim() - features
        w = torch.ones(x.shape[:lead], dtype=torch.float32, device=x.device)
        if last and not group.key_value and self.token_weight != 1.0 and lead == 2 and x.shape[1] > 1:
            w[:, 1:] = self.token_weight  # the reference: CLIP's features are the first token's
        if mask is not None and lead >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
            w = w * (mask.to(x.device) != 0).reshape(*mask.shape, *([1] * (lead - 2)))
        return w.reshape(-1)

    def _measure(self, block: _Block, last: bool) -> Tensor:
        """This process's ``[K, size]`` float32 statistics of ``block``: per group and task, the weighted sums (Linear:
        ``x_s x_s^T``, ``x_s x_t^T``, ``x_s``, ``x_t``; LayerNorm: ``z``, ``z^2``) and the weight total."""
        device = _model_device(self.merged)
        stats = torch.zeros(self.num_tasks, block.size, dtype=torch.float32, device=device)
        linear = any(g.kind == "linear" for g in block.groups)
        later: set[str] = set()
        if block.stop:  # the pass stops after this block: later blocks' tensors are never read
            after = False
            for b in self.blocks:
                if after:
                    later.update(k for k in self._expert_keys if _under(k.rpartition(".")[0], b.name))
                after = after or b is block
        by_task: dict[int, list[tuple[tuple, dict]]] = {}
        for k, args, kwargs in self._calls:
            by_task.setdefault(k, []).append((args, kwargs))
        alpha = self.teacher_mix
        for k in sorted(by_task):
            expert = self._expert(k, [key for key in self._expert_keys if key not in later]) if linear else None
            for args, kwargs in _stack(by_task[k], self.batch_size):
                student = self._capture(block, None, args, kwargs, ("linear", "layernorm"))
                teacher = self._capture(block, expert, args, kwargs, ("linear",)) if linear else {}
                mask = _attention_mask(kwargs)
                for g in block.groups:
                    rep = g.units[0]
                    xs_calls = student[rep]
                    if not xs_calls:
                        continue
                    row = stats[k, g.offset:g.offset + g.size]
                    d = g.dim
                    if g.kind == "layernorm":
                        m = self.units[rep]
                        w = torch.cat([self._row_weights(x, g, last, mask, len(m.normalized_shape)) for x in xs_calls])
                        z = torch.cat([F.layer_norm(x.float(), m.normalized_shape, eps=m.eps).reshape(-1, d)
                                       for x in xs_calls])
                        row[:d].add_((z * w[:, None]).sum(0))
                        row[d:2 * d].add_((z.square() * w[:, None]).sum(0))
                        row[2 * d].add_(w.sum())
                        continue
                    w = torch.cat([self._row_weights(x, g, last, mask) for x in xs_calls])
                    xe_calls = teacher.get(rep, [])
                    if len(xe_calls) != len(xs_calls) or any(a.shape != b.shape for a, b in zip(xs_calls, xe_calls)):
                        raise RuntimeError(f"FeatCal: module {rep!r} receives inputs of other shapes (or a different "
                                           f"number of calls) in expert {k} than in the merged model")
                    xs = torch.cat([x.reshape(-1, d) for x in xs_calls]).float()
                    xe = torch.cat([x.reshape(-1, d) for x in xe_calls]).float()
                    xt = alpha * xe + (1.0 - alpha) * xs
                    del xe
                    row[:d * d].view(d, d).addmm_(xs.T, xs * w[:, None])
                    row[d * d:2 * d * d].view(d, d).addmm_(xs.T, xt * w[:, None])
                    row[2 * d * d:2 * d * d + d].add_((xs * w[:, None]).sum(0))
                    row[2 * d * d + d:2 * d * d + 2 * d].add_((xt * w[:, None]).sum(0))
                    row[-1].add_(w.sum())
            del expert
        return stats

    def _check_finite(self, stats: Tensor, block: _Block) -> None:
        if bool(torch.isfinite(stats).all()):
            return
        for k in range(self.num_tasks):
            for g in block.groups:
                if not bool(torch.isfinite(stats[k, g.offset:g.offset + g.size]).all()):
                    raise CalibrationDataError(
                        f"calibration data of {self._label(k)} gives non-finite features at module {g.units[0]!r} "
                        f"(FeatCal statistics of block {block.name!r}); check the calibration inputs")

    def _tensors(self, name: str, local: str, tasks: Sequence[int]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(current, anchor, experts) of one tensor in float64 on its device."""
        key = _key(name, local)
        current = getattr(self.units[name], local)
        theta0 = self.base_state[key].to(device=current.device, dtype=torch.float64)
        cur = current.detach().to(torch.float64)
        anchor = self.anchor * cur + (1.0 - self.anchor) * theta0
        experts = [theta0 + self.task_vectors[k][key].to(device=current.device, dtype=torch.float64) for k in tasks]
        return cur, anchor, experts

    def _solve(self, block: _Block, stats: Tensor) -> None:
        """Every unit of ``block`` from its group's statistics, then written (all from the block as measured)."""
        updates: list[tuple[Tensor, Tensor]] = []
        for g in block.groups:
            row = stats[:, g.offset:g.offset + g.size].to(torch.float64)
            total = row[:, -1]
            tasks = [k for k in range(self.num_tasks) if float(total[k]) > 0]
            if not tasks:
                warnings.warn(f"FeatCal: module(s) {g.units} saw no input rows of weight > 0; left as merged")
                continue
            row, total = row[tasks], total[tasks, None]
            d = g.dim
            for name in g.units:
                m = self.units[name]
                if g.kind == "linear":
                    cov = (row[:, :d * d] / total).reshape(-1, d, d)
                    cross = (row[:, d * d:2 * d * d] / total).reshape(-1, d, d)
                    mean_s = row[:, 2 * d * d:2 * d * d + d] / total
                    mean_t = row[:, 2 * d * d + d:2 * d * d + 2 * d] / total
                    _, anchor_w, experts_w = self._tensors(name, "weight", tasks)
                    with_bias = (m.bias is not None and self.calibrate_bias
                                 and all(_key(name, "bias") in tv for tv in self.task_vectors))
                    if with_bias:
                        _, anchor_b, experts_b = self._tensors(name, "bias", tasks)
                    else:
                        anchor_b, experts_b = None, None
                    dtype = m.weight.dtype
                    new_w, new_b = featcal_linear(
                        cov, cross, mean_s, mean_t, experts_w, experts_b, anchor_w, anchor_b, ridge=self.ridge,
                        eps=self.eps, stored=lambda t, dtype=dtype: t.to(dtype).to(torch.float64))
                    updates.append((m.weight, new_w))
                    if new_b is not None:
                        updates.append((m.bias, new_b))
                else:
                    mean_z = row[:, :d] / total
                    energy = row[:, d:2 * d] / total
                    _, anchor_g, experts_g = self._tensors(name, "weight", tasks)
                    if m.bias is not None:
                        _, anchor_b, experts_b = self._tensors(name, "bias", tasks)
                    else:
                        anchor_b, experts_b = None, None
                    new_g, new_b = featcal_layernorm(mean_z, energy, experts_g, experts_b, anchor_g, anchor_b,
                                                     ridge=self.ridge, eps=self.eps)
                    updates.append((m.weight, new_g))
                    if new_b is not None:
                        updates.append((m.bias, new_b))
                self._written.append(name)
        for _, value in updates:
            if not bool(torch.isfinite(value).all()):
                raise CalibrationDataError(f"FeatCal: the closed form of block {block.name!r} is not finite (an "
                                           "ill-conditioned solve: raise ridge or eps)")
        for target, value in updates:
            target.copy_(value.to(dtype=target.dtype))


@register_step
@dataclass(frozen=True)
class FeatCalStep(CalibrationStep):
    """The calibration step ``featcal``, a feature step: FeatCal's closed-form, block-by-block update of the Linear
    and LayerNorm tensors of the model the weight steps left (arXiv 2605.13030; :mod:`magic_pl.calibration.featcal`
    has the formulas). It runs after any merge, so it is a calibration step, not a merge method. It has no use for a
    sensitive set. Defaults: the reference's run script (github.com/egangu/featcal, ``run_ta8.py``).

    Attributes:
        ridge: lambda, the pull toward the anchor, relative to the Frobenius-normalised input statistics (0.05).
        anchor: rho, the anchor ``theta0 + rho tau_m`` (2.2; the paper's main text: 2.0).
        teacher_mix: alpha, the teacher input ``alpha x_e + (1 - alpha) x_s`` (0.25; the paper's main text: 0.3).
        eps: the floor of the statistics' norms and of the LayerNorm determinant, added to the Linear system too
            (1e-8).
        calibrate_bias: solve Linear biases (true).
        calibrate_layernorm: solve LayerNorm affine maps (true).
        last_block_token_weight: in the last block, the weight of every position but the first, outside key/value
            projections (1: every position alike; the reference's CLIP recipe: 0.01).
    """

    name: ClassVar[str] = "featcal"
    kind: ClassVar[str] = "feature"
    ridge: float = 0.05
    anchor: float = 2.2
    teacher_mix: float = 0.25
    eps: float = 1e-8
    calibrate_bias: bool = True
    calibrate_layernorm: bool = True
    last_block_token_weight: float = 1.0

    def __post_init__(self) -> None:
        self._number("ridge", lambda v: 0 <= v <= 1e6, "a finite number in [0, 1e6]")
        self._number("anchor", lambda v: -1e3 <= v <= 1e3, "a finite number in [-1000, 1000]")
        self._number("teacher_mix", lambda v: 0 <= v <= 1, "a finite number in [0, 1]")
        self._number("eps", lambda v: 0 <= v <= 1, "a finite number in [0, 1]")
        self._flag("calibrate_bias")
        self._flag("calibrate_layernorm")
        self._number("last_block_token_weight", lambda v: 0 <= v <= 1, "a finite number in [0, 1]")

    def calibrator(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                   sensitive: Optional[Collection[str]], *, modules: Optional[Sequence[str]] = None,
                   task_names: Optional[Sequence[str]] = None) -> FeatCalCalibrator:
        """The calibrator on ``merged`` (fed by the caller, then :meth:`FeatCalCalibrator.fold`)."""
        return FeatCalCalibrator(base, merged, task_vectors, modules=modules, task_names=task_names,
                                 **self.options())
