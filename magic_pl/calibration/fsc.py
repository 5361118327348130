"""Feature space calibration (FSC): MAGIC's per-module magnitude coefficients from a few unlabelled samples per task.

docs/method.md, FSC (Li et al., MAGIC, arXiv 2512.19320): run ``n`` unlabelled samples of task ``k`` (paper default
``n = 1``) through the **merged** model. At every calibrated module ``l``, with ``z`` the input ``l`` receives there,
``dh(z; tau) = f_l(z; theta0 + tau) - f_l(z; theta0)`` and::

    r_{k,l} = mean over samples and positions of ||dh(z; tau_k)||_p / ||dh(z; tau_m)||_p      (p = 1 by default)
    xi_l    = mean over k of r_{k,l}                    (min(xi_l, 1) for a magnitude-sensitive module)

A ratio whose merged change is exactly zero with finite features (0/0 where merging left the module's output
unchanged, or x/0) counts as 1; non-finite features (NaN/Inf in the calibration data, or produced from it) are a
:class:`CalibrationDataError` naming the task and the module, never a ratio. The norm is over the feature dimension
(last dim, or dim 1 for Conv/BatchNorm/GroupNorm outputs). The calibrated module computes
``f_l(z; theta0) + xi_l (f_l(z; theta_m) - f_l(z; theta0))``.

Beyond the paper (the paper's behaviour is the default of every option):

- ``statistic="ratio_of_means"``: ``r_{k,l} = sum ||dh(z; tau_k)|| / sum ||dh(z; tau_m)||`` over samples and positions
  instead of the mean of per-position ratios, which positions where the merged change is tiny can dominate.
- ``granularity="channel"``: one xi per output channel (the norm over the feature dimension becomes the absolute value
  of each channel, so ``norm`` does not matter); foldable modules take it per row, runtime-wrapped ones keep one xi.
- ``gate="paper"``: WSC's gating rule (docs/method.md, WSC) applied to xi: non-sensitive modules only scale up
  (``xi = max(xi, 1)``), sensitive ones only down (``min(xi, 1)``, the paper's FSC cap).

Implementation: forward hooks on the merged model's units capture ``z`` and ``f_l(z; theta_m)``; the base and expert
outputs come from ``torch.func.functional_call`` on the same module with swapped tensors (``theta0``,
``theta0 + tau_k``), one module at a time, so no expert model is ever built (memory: merged model + base tensors +
one module's worth of temporaries; task vectors are read one key at a time, so lazily loaded ones stay on disk).
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from magic_pl.calibration._names import module_is_sensitive
from magic_pl.calibration.folding import fold_unit
from magic_pl.calibration.modules import CalibrationUnit, calibrate_output, find_units, fold_kind, primary_tensor
from magic_pl.calibration.sharding import local_part, reshard, sum_over_shards
from magic_pl.calibration.steps import CalibrationStep, register_step
from magic_pl.statedict import apply_delta

__all__ = ["FSC_MODES", "CalibrationDataError", "CalibrationResult", "FSCStep", "FeatureSpaceCalibrator", "StateSource"]

#: ``"parallel"``: the paper's measurement, every module on the uncalibrated merged model in one pass (default).
#: ``"sequential"``: each module measured with the modules executed before it already calibrated (an extension).
FSC_MODES: tuple[str, ...] = ("parallel", "sequential")
#: How per-position ratios become ``r_{k,l}``: the paper's mean of ratios, or the ratio of the summed norms.
FSC_STATISTICS: tuple[str, ...] = ("mean_of_ratios", "ratio_of_means")
#: One xi per module (paper) or per output channel.
FSC_GRANULARITIES: tuple[str, ...] = ("module", "channel")
#: ``"none"``: xi as measured (sensitive modules capped at 1, the paper's FSC); ``"paper"``: WSC's rule, non-sensitive
#: modules only scale up and sensitive ones only down.
FSC_GATES: tuple[str, ...] = ("none", "paper")

StateSource = Union[nn.Module, Mapping[str, Tensor]]


class CalibrationDataError(ValueError):
    """The calibration data cannot give FSC statistics for some task: it sent no sample, or its features at a
    calibrated module are non-finite (NaN/Inf). Raised instead of taking xi from the other tasks only, or 1."""


@dataclass
class CalibrationResult:
    """What a calibration did, for every space (none, WSC, FSC, DSC): the one result type of
    :meth:`~magic_pl.calibration.CalibrationSetting.calibrate` and :meth:`FeatureSpaceCalibrator.fold`.

    Attributes:
        coefficients: module name -> xi (sensitive cap applied; with per-channel coefficients, their mean).
        channel_coefficients: module name -> per-channel xi (``granularity="channel"`` only; runtime-wrapped modules
            are absent: they keep one xi).
        folded: modules whose weights now hold ``theta0 + xi * tau_m`` (or the BatchNorm rewrite).
        wrapped: modules replaced by a runtime :class:`~magic_pl.calibration.modules.CalibratedModule`.
        unchanged: modules with xi == 1 exactly (left as merged).
        uncalibrated: floating state keys that differ from the base but belong to no calibrated module (e.g. a ViT's
            ``cls_token``/``pos_embed`` owned by the root next to parameterised children); they keep merged values.
        sensitive: calibrated modules treated as magnitude-sensitive (xi capped at 1).
        task_ratios: module name -> per-task ``r_{k,l}`` (``None`` where task k sent no sample through it).
        mode, norm, rounds, statistic, granularity, gate: the FSC settings, and the measurement rounds used (1 for
            parallel).
        wsc_scales: WSC and DSC: tensor key -> mean WSC row scale applied (empty without WSC).
        row_scales: WSC and DSC: tensor key -> the ``[rows]`` float32 row scales applied (not in :meth:`to_dict`).
        space: the calibration space that produced this result (``"none"``, ``"wsc"``, ``"fsc"``, ``"dsc"``).
        setting: the calibration setting as a string (:meth:`CalibrationSetting.to_string`), when known.
        samples_per_task: calibration samples seen per task (FSC/DSC; summed over processes).
    """

    coefficients: dict[str, float] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)
    wrapped: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)
    sensitive: list[str] = field(default_factory=list)
    task_ratios: dict[str, list[Optional[float]]] = field(default_factory=dict)
    mode: str = "parallel"
    norm: float = 1.0
    rounds: int = 1
    wsc_scales: dict[str, float] = field(default_factory=dict)
    statistic: str = "mean_of_ratios"
    granularity: str = "module"
    gate: str = "none"
    channel_coefficients: dict[str, list[float]] = field(default_factory=dict)
    row_scales: dict[str, Tensor] = field(default_factory=dict, repr=False)
    space: str = "fsc"
    setting: str = ""
    samples_per_task: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``norm = inf`` is written as the string ``"inf"``; per-channel coefficients are
        summarised as min/mean/max per module; per-row WSC scales by their per-tensor means, ``wsc_scales``)."""
        out = asdict(replace(self, row_scales={}))
        del out["row_scales"]
        if math.isinf(self.norm):
            out["norm"] = "inf"
        out["channel_coefficients"] = {
            name: {"min": min(v), "mean": sum(v) / len(v), "max": max(v), "channels": len(v)}
            for name, v in self.channel_coefficients.items()
        }
        return out


def _parse_norm(norm: Union[int, float, str]) -> float:
    try:
        p = float(norm)
    except (TypeError, ValueError):
        p = float("nan")
    if p not in (1.0, 2.0, math.inf):
        raise ValueError(f"FSC norm must be 1, 2 or inf (paper default 1), got {norm!r}")
    return p


def _state_of(source: StateSource) -> Mapping[str, Tensor]:
    if isinstance(source, nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"expected an nn.Module or a mapping of tensors, got {type(source).__name__}")


def _rows(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """Samples in a batch: dim 0 of its first tensor (1 when it has none)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class FeatureSpaceCalibrator:
    """Accumulate MAGIC FSC statistics on the merged model and fold the coefficients into it (docs/method.md, FSC).

    Args:
        base: the base model theta0, or its state dict (any mapping; lazily loaded is fine). Its tensors are moved
            to the merged model's device one module at a time.
        merged: the merged model theta0 + tau_m (calibrated in place by :meth:`fold`). Put it in eval mode:
            BatchNorm is folded for inference with running statistics.
        task_vectors: the K task vectors tau_k (mappings key -> tensor, read one key at a time). They must hold every
            floating tensor of the calibrated modules, BatchNorm running statistics included.
        norm: p of the feature norm: 1 (paper default), 2 or ``inf``.
        sensitive: magnitude-sensitive modules (module names or parameter keys; docs/method.md): xi capped at 1.
            ``None`` (default) or empty: no cap.
        mode: ``"parallel"`` (paper, default) or ``"sequential"``. Sequential: ``xi_l`` is measured on inputs produced
            by the merged model in which every module executed before ``l`` (in forward order) is already calibrated
            with its final coefficient. :meth:`update` then only stores the batch; :meth:`finalize` runs measurement
            rounds over the stored batches, round ``j`` replacing each module's output by ``f0 + xi (fm - f0)`` with
            the coefficients of round ``j - 1`` (round 1 = parallel). After ``j`` rounds the first ``j`` modules in
            execution order are exact, so ``max_rounds = M`` (the number of modules) gives the exact definition;
            rounds stop early once no coefficient moves by more than ``tol``.
        modules: explicit module names to calibrate (default: automatic, see
            :func:`~magic_pl.calibration.modules.find_units`).
        tol: sequential mode's stopping tolerance on max |delta xi| (default 1e-4; 0 runs until exact).
        max_rounds: sequential mode's round limit (default ``None``: the number of modules, i.e. exact).
        statistic: ``"mean_of_ratios"`` (paper, default) or ``"ratio_of_means"`` (see the module docstring).
        granularity: ``"module"`` (paper, default) or ``"channel"`` (one xi per output channel of every foldable
            module: Linear/Conv rows, norm and BatchNorm channels, Embedding columns).
        gate: ``"none"`` (paper's FSC, default) or ``"paper"`` (WSC's gating rule applied to xi).

    Attributes:
        module_names: the calibrated modules, in registration order.
        slots: module name -> ``(start, stop)``: its columns of the statistics (one per module, or one per channel).
        ratio_sum: float32 ``[K, N]`` (N slots: M modules, or all channels): the numerator, summed over samples and
            positions: the ratios (mean of ratios) or the task-change norms (ratio of means). Summable across
            processes.
        ratio_count: float32 ``[K, N]``: the denominator: the number of ratio terms, or the merged-change norms.
            Non-finite features make both non-finite for their (task, slot) (NaN/Inf survives the sum over
            processes), so every process finds them after the reduction.
        raise_at_update: raise :class:`CalibrationDataError` at the :meth:`update` (or sequential round) that meets
            non-finite features (default True; the statistics are left as they were). A front door whose processes
            sum the statistics later turns it off, so that they all raise together after the sum instead of one
            process leaving the others waiting in it; :meth:`finalize` and :meth:`fold` check in every case.
    """

    def __init__(
        self,
        base: StateSource,
        merged: nn.Module,
        task_vectors: Sequence[Mapping[str, Tensor]],
        norm: Union[int, float, str] = 1,
        sensitive: Optional[Collection[str]] = None,
        mode: str = "parallel",
        modules: Optional[Sequence[str]] = None,
        *,
        tol: float = 1e-4,
        max_rounds: Optional[int] = None,
        statistic: str = "mean_of_ratios",
        granularity: str = "module",
        gate: str = "none",
        task_names: Optional[Sequence[str]] = None,
    ):
        for what, value, choices in (("mode", mode, FSC_MODES), ("statistic", statistic, FSC_STATISTICS),
                                     ("granularity", granularity, FSC_GRANULARITIES), ("gate", gate, FSC_GATES)):
            if value not in choices:
                raise ValueError(f"unknown FSC {what} {value!r}; choose one of {choices}")
        self.statistic, self.granularity, self.gate = statistic, granularity, gate
        self.task_vectors = list(task_vectors)
        if not self.task_vectors:
            raise ValueError("FeatureSpaceCalibrator needs at least one task vector (K >= 1), got none")
        self.merged = merged
        self.base_state = _state_of(base)
        self.norm = _parse_norm(norm)
        self.mode = mode
        self.tol = float(tol)
        self.max_rounds = max_rounds
        self.units: list[CalibrationUnit] = find_units(merged, modules)
        if not self.units:
            raise ValueError(f"{type(merged).__name__} has no module with floating parameters to calibrate")
        for u in self.units:
            if getattr(u.module, "inplace", False) is True:
                raise ValueError(
                    f"module {u.name!r} ({type(u.module).__name__}) modifies its input in place, so FSC cannot re-run "
                    "it on the same input; build the model with inplace=False"
                )
        self._validate_keys()
        self.module_names = [u.name for u in self.units]
        sizes = [self._channels(u) if granularity == "channel" else 1 for u in self.units]
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        self.slots = {u.name: (bounds[i], bounds[i + 1]) for i, u in enumerate(self.units)}
        self._bounds = bounds
        self.set_sensitive(sensitive)
        K, N = len(self.task_vectors), bounds[-1]
        if task_names is not None and len(task_names) != K:
            raise ValueError(f"{len(task_names)} task names for {K} task vectors")
        self.task_names = [str(n) for n in task_names] if task_names is not None else [f"task {k}" for k in range(K)]
        self._named = task_names is not None
        self.raise_at_update = True
        device = _model_device(merged)
        with torch.inference_mode(False):  # normal tensors even if constructed inside inference mode
            self.ratio_sum = torch.zeros(K, N, dtype=torch.float32, device=device)
            self.ratio_count = torch.zeros(K, N, dtype=torch.float32, device=device)
            self.task_samples = torch.zeros(K, dtype=torch.long)
            # this process's non-finite positions per (task, slot): [K, 3, N] = (any, task change, merged change);
            # only for the error message (the statistics themselves carry whether and where)
            self._nonfinite = torch.zeros(K, 3, N, dtype=torch.float32, device=device)
        self.rounds = 0
        self._cache: list[tuple[int, tuple, dict]] = []
        self._apply: Optional[list[float]] = None
        self._task: Optional[int] = None
        self._busy = False
        self._scratch: Optional[Tensor] = None
        self._scratch_count: Optional[Tensor] = None
        self._scratch_bad: Optional[Tensor] = None
        self._finalized = False
        self._folded = False
        self._warned_train = False

    # ---------------------------------------------------------------------------------------------------------------
    def set_sensitive(self, sensitive: Optional[Collection[str]]) -> None:
        """Set the magnitude-sensitive modules (names or parameter keys; xi capped at 1). Parallel measurements do not
        depend on it, so a set detected from the same calibration data may be given after :meth:`update`."""
        sens = set(sensitive) if sensitive else set()
        self.sensitive_modules = [u.name for u in self.units if module_is_sensitive(u.name, u.keys, sens)]
        names = set(self.sensitive_modules)
        self._sensitive_mask = torch.tensor(
            [u.name in names for i, u in enumerate(self.units) for _ in range(self._bounds[i + 1] - self._bounds[i])],
            dtype=torch.bool)

    @property
    def num_tasks(self) -> int:
        return len(self.task_vectors)

    @staticmethod
    def _channels(unit: CalibrationUnit) -> int:
        """Output channels of a foldable unit (its per-channel xi length); 1 for runtime units (one xi)."""
        module = unit.module
        if fold_kind(module) not in ("affine", "batchnorm"):
            return 1
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        first = tensors[next(iter(unit.tensors))]
        if first.dim() == 0:
            return 1
        return int(first.shape[-1] if isinstance(module, nn.Embedding) else first.shape[0])

    def _validate_keys(self) -> None:
        for u in self.units:
            for key in u.keys:
                if key not in self.base_state:
                    raise KeyError(f"the base lacks {key!r} of calibrated module {u.name!r}")
                for k, tv in enumerate(self.task_vectors):
                    if key not in tv:
                        raise KeyError(f"task vector {k} lacks {key!r} of calibrated module {u.name!r}")

    def _task_index(self, task_index: Any) -> int:
        if isinstance(task_index, Tensor):
            if task_index.numel() != 1:
                raise ValueError(f"task_index must be one integer, got a tensor of shape {tuple(task_index.shape)}")
            task_index = task_index.item()
        if isinstance(task_index, bool) or not float(task_index).is_integer():
            raise ValueError(f"task_index must be an integer, got {task_index!r}")
        k = int(task_index)
        if not 0 <= k < self.num_tasks:
            raise IndexError(
                f"task_index {k} is out of range: the calibrator has {self.num_tasks} task vectors "
                f"(0..{self.num_tasks - 1})"
            )
        return k

    def _check_open(self) -> None:
        if self._folded:
            raise RuntimeError("this FeatureSpaceCalibrator has already folded its coefficients; create a new one")

    # ---------------------------------------------------------------------------------------------------------------
    def update(self, task_index: int, *args: Any, **kwargs: Any) -> None:
        """Run ``merged(*args, **kwargs)`` on a batch of unlabelled samples of task ``task_index`` and accumulate.

        Works under ``torch.no_grad`` and ``torch.inference_mode`` (statistics live in normal float32 tensors
        allocated at construction). In sequential mode the batch is stored and measured by :meth:`finalize`.
        """
        self._check_open()
        k = self._task_index(task_index)
        if self._finalized:
            raise RuntimeError("statistics were finalized; update() cannot add more (create a new calibrator)")
        if self.mode == "sequential":
            self.task_samples[k] += _rows(args, kwargs)
            self._cache.append((k, args, kwargs))
            return
        self._run(k, args, kwargs, check=self.raise_at_update)
        self.task_samples[k] += _rows(args, kwargs)  # after the run: a batch that raised is not counted

    def _run(self, k: int, args: tuple, kwargs: dict, check: bool) -> None:
        """One forward of the merged model with the measuring hooks; ``check``: raise on non-finite features
        before adding this batch to the statistics."""
        if not self._warned_train and any(m.training for m in self.merged.modules()):
            warnings.warn(
                "FSC on a model in training mode (dropout active, BatchNorm on batch statistics, which the fold does "
                "not use); call model.eval() first"
            )
            self._warned_train = True
        handles = [u.module.register_forward_hook(self._hook(i), with_kwargs=True) for i, u in enumerate(self.units)]
        n_slots = self._bounds[-1]
        self._scratch = torch.zeros(n_slots, dtype=torch.float32, device=_model_device(self.merged))
        self._scratch_count = torch.zeros(n_slots, dtype=torch.float32, device=self._scratch.device)
        self._scratch_bad = torch.zeros(3, n_slots, dtype=torch.float32, device=self._scratch.device)
        self._task = k
        try:
            with torch.no_grad():
                self.merged(*args, **kwargs)
            dev = self.ratio_sum.device
            scratch, count, bad = self._scratch.to(dev), self._scratch_count.to(dev), self._scratch_bad.to(dev)
        finally:
            self._task = None
            self._scratch = self._scratch_count = self._scratch_bad = None
            for h in handles:
                h.remove()
        if check and not bool((torch.isfinite(scratch) & torch.isfinite(count)).all()):  # one sync per batch
            rows = torch.zeros_like(self.ratio_sum)
            detail = torch.zeros_like(self._nonfinite)
            detail[k] = bad
            sums, counts = rows.clone(), rows
            sums[k], counts[k] = scratch, count
            raise self._nonfinite_error(sums, counts, detail)
        self.ratio_sum[k].add_(scratch)
        self.ratio_count[k].add_(count)
        self._nonfinite[k].add_(bad)

    def _hook(self, idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._busy or self._task is None:
                return None
            fm = primary_tensor(output)
            if fm is None or not fm.dtype.is_floating_point:
                return None
            self._busy = True
            try:
                return self._measure(idx, module, args, kwargs, output, fm)
            finally:
                self._busy = False

        return hook

    def _swapped(self, unit: CalibrationUnit, k: Optional[int]) -> dict[str, Tensor]:
        """The unit's tensors for theta0 (``k=None``) or theta0 + tau_k, on the merged tensors' device/dtype."""
        params = dict(unit.module.named_parameters())
        current = dict(params)
        current.update(dict(unit.module.named_buffers()))
        out = {}
        for local, key in unit.tensors.items():
            like = current[local]
            theta0 = self.base_state[key]
            if k is None:
                t = theta0.to(device=like.device, dtype=like.dtype)
                # buffers are cloned: a BatchNorm in training mode would update them in place
                out[local] = t.clone() if local not in params and t is theta0 else t
            else:
                tau = self.task_vectors[k][key]
                if tau.shape != like.shape:
                    raise ValueError(
                        f"task vector {k}: shape {tuple(tau.shape)} of {key!r} does not match the model's "
                        f"{tuple(like.shape)}"
                    )
                # task vectors are checked finite where they are read
                out[local] = apply_delta(theta0.to(like.device), tau, key=key, check_finite=False, out_dtype=like.dtype)
        return out

    def _deltas(self, unit: CalibrationUnit, k: Optional[int]) -> dict[str, Tensor]:
        """The unit's tau_k (or tau_m = theta_m - theta0 for ``k=None``), float32 math, in the merged tensors' dtype."""
        out = {}
        for local, like in unit.module.named_parameters():
            key = unit.tensors[local]
            if k is None:
                d = like.float() - self.base_state[key].to(device=like.device, dtype=torch.float32)
            else:
                d = self.task_vectors[k][key]
                if d.shape != like.shape:
                    raise ValueError(
                        f"task vector {k}: shape {tuple(d.shape)} of {key!r} does not match the model's "
                        f"{tuple(like.shape)}"
                    )
            out[local] = d.to(device=like.device, dtype=like.dtype)
        return out

    def _measure(self, idx: int, module: nn.Module, args: tuple, kwargs: dict, output: Any, fm: Tensor) -> Any:
        unit = self.units[idx]
        k = self._task
        xi = self._apply[idx] if self._apply is not None else 1.0
        if unit.linear:
            # f is linear in its parameters: dh(z; tau) = f(z; tau) exactly, without subtracting two nearly equal
            # outputs (docs/method.md, FSC). For tau_m that needs theta_m - theta0 per call; in float32/float64 the
            # cancellation of fm - f0 is negligible and f0 needs no parameter arithmetic, so that path is used there.
            dk = primary_tensor(functional_call(module, self._deltas(unit, k), args, kwargs)).float()
            if fm.dtype in (torch.float32, torch.float64):
                f0_out = functional_call(module, self._swapped(unit, None), args, kwargs)
                dm = fm.float() - primary_tensor(f0_out).float()
            else:
                dm = primary_tensor(functional_call(module, self._deltas(unit, None), args, kwargs)).float()
                f0_out = None
        else:
            f0_out = functional_call(module, self._swapped(unit, None), args, kwargs)
            f0 = primary_tensor(f0_out).float()
            dk = primary_tensor(functional_call(module, self._swapped(unit, k), args, kwargs)).float() - f0
            dm = fm.float() - f0
            del f0
        if fm.dim() == 0:
            dk, dm = dk.reshape(1), dm.reshape(1)
        dim = unit.feature_dim if fm.dim() > 1 else -1
        start, stop = self._bounds[idx], self._bounds[idx + 1]
        if stop - start > 1:  # per channel: |dh| of each channel over all other dimensions
            c = stop - start
            if dk.shape[dim] != c:
                raise ValueError(f"module {unit.name!r}: output has {dk.shape[dim]} channels on dim {dim}, its "
                                 f"parameters {c}; per-channel FSC needs them equal")
            nk, nm = dk.movedim(dim, -1).reshape(-1, c).abs(), dm.movedim(dim, -1).reshape(-1, c).abs()
        else:
            nk = torch.linalg.vector_norm(dk, ord=self.norm, dim=dim).reshape(-1, 1)
            nm = torch.linalg.vector_norm(dm, ord=self.norm, dim=dim).reshape(-1, 1)
        del dk
        # NaN/Inf features must never become a ratio: a non-finite norm (from the expert's or the merged model's
        # change, or both: a non-finite input or base output) is counted per slot for the message and carried into
        # the statistic as NaN/Inf, which survives the sum over processes to the check. With finite features a zero
        # merged change (0/0: merging left the output unchanged; or x/0) still counts as 1.
        fin_k, fin_m = torch.isfinite(nk), torch.isfinite(nm)
        good = fin_k & fin_m
        rows = nk.shape[0]
        bad = torch.stack([rows - good.sum(0), rows - fin_k.sum(0), rows - fin_m.sum(0)])
        self._scratch_bad[:, start:stop] += bad.to(self._scratch_bad)
        if self.statistic == "ratio_of_means":
            num, den = nk.sum(0), nm.sum(0)  # norms are >= 0: a non-finite one makes its sum non-finite
        else:
            ratio = nk / nm
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
            num = torch.where(good, ratio, nk + nm).sum(0)  # nk + nm: NaN if either is NaN, else Inf
            den = torch.full_like(num, float(ratio.shape[0]))
        self._scratch[start:stop] += num.to(self._scratch.device)
        self._scratch_count[start:stop] += den.to(self._scratch.device)
        if isinstance(xi, Tensor):
            shape = [1] * fm.dim()
            shape[dim] = -1
            xi = xi.to(fm.device).reshape(shape)
        elif xi == 1.0:
            return None
        if f0_out is None:  # f0 + xi (fm - f0) = fm + (xi - 1) dh(z; tau_m)
            return (fm.float() + (xi - 1.0) * dm.reshape(fm.shape)).to(fm.dtype)
        return calibrate_output(f0_out, output, xi)

    # ---------------------------------------------------------------------------------------------------------------
    def _reduce(self, reduce: Callable[[Tensor], Tensor]) -> None:
        stacked = torch.stack([self.ratio_sum, self.ratio_count])
        reduced = reduce(stacked)
        if reduced is None:  # an in-place all-reduce
            reduced = stacked
        self.load_statistics(reduced[0], reduced[1])

    def finalize(self, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> dict[str, float]:
        """Finish the statistics and return the coefficients.

        Args:
            reduce: optional callable applied to the stacked ``[2, K, M]`` float32 ``(ratio_sum, ratio_count)``
                returning the sum over processes (or reducing in place and returning ``None``). Parallel mode applies
                it once; sequential mode once per round, so every process computes the same rounds and coefficients.

        Raises:
            CalibrationDataError: the (summed) statistics hold non-finite features; with ``reduce``, sequential
                rounds check only after it, so every process raises alike.
        """
        self._check_open()
        if self._finalized:
            return self.coefficients()
        if self.mode == "parallel":
            if reduce is not None:
                self._reduce(reduce)
            self.rounds = 1
        else:
            max_rounds = self.max_rounds if self.max_rounds is not None else len(self.units)
            prev = torch.ones(self._bounds[-1])
            self.rounds = 0
            for _ in range(max(1, max_rounds)):
                self.ratio_sum.zero_()
                self.ratio_count.zero_()
                self._nonfinite.zero_()
                self._apply = self._per_unit(prev)
                try:
                    for k, args, kwargs in self._cache:
                        # with a reduce, raising here on one process would leave the others waiting in it
                        self._run(k, args, kwargs, check=self.raise_at_update and reduce is None)
                finally:
                    self._apply = None
                if reduce is not None:
                    self._reduce(reduce)
                self.rounds += 1
                xi = self._xi()  # checks the (summed) statistics are finite
                done = bool((xi - prev).abs().max() <= self.tol)
                prev = xi
                if done:
                    break
            self._cache.clear()
        self._finalized = True
        return self.coefficients()

    def load_statistics(self, ratio_sum: Tensor, ratio_count: Tensor, samples: Optional[Tensor] = None) -> None:
        """Replace the statistics, e.g. by their sum over processes (the Lightning layer's all-reduce); ``samples``:
        the ``[K]`` samples per task behind them (kept as counted by :meth:`update` when ``None``)."""
        if samples is not None:
            if tuple(samples.shape) != (self.num_tasks,):
                raise ValueError(f"samples has shape {tuple(samples.shape)}, expected ({self.num_tasks},)")
            self.task_samples = samples.detach().to("cpu", torch.long).clone()
        shape = tuple(self.ratio_sum.shape)
        for name, t in (("ratio_sum", ratio_sum), ("ratio_count", ratio_count)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} (K tasks x M modules)")
        with torch.no_grad():
            self.ratio_sum.copy_(ratio_sum.to(self.ratio_sum.device, torch.float32))
            self.ratio_count.copy_(ratio_count.to(self.ratio_count.device, torch.float32))

    def to(self, device: Union[str, torch.device]) -> "FeatureSpaceCalibrator":
        """Move the statistics (e.g. to the GPU before an NCCL all-reduce); returns self."""
        self.ratio_sum = self.ratio_sum.to(device)
        self.ratio_count = self.ratio_count.to(device)
        self._nonfinite = self._nonfinite.to(device)
        return self

    def reset(self) -> None:
        """Zero the statistics and forget stored batches."""
        self._check_open()
        self.ratio_sum.zero_()
        self.ratio_count.zero_()
        self.task_samples.zero_()
        self._nonfinite.zero_()
        self._cache.clear()
        self._finalized = False

    # ---------------------------------------------------------------------------------------------------------------
    def task_ratios(self) -> Tensor:
        """``[K, N]`` float32 ``r_{k,l}`` per slot (module or channel): NaN where task k sent no sample through it.
        With ``statistic="ratio_of_means"`` a zero merged change under a non-zero task change counts as 1."""
        s, c = self.ratio_sum.detach().float().cpu(), self.ratio_count.detach().float().cpu()
        nan = torch.full_like(s, float("nan"))
        r = torch.where(c > 0, s / torch.where(c > 0, c, torch.ones_like(c)), nan)
        if self.statistic == "ratio_of_means":
            r = torch.where((c == 0) & (s > 0), torch.ones_like(s), r)
        return r

    def _xi(self) -> Tensor:
        self.check_finite()  # xi never comes from a task whose statistics are non-finite (task_ratios: NaN)
        r = self.task_ratios()
        seen = ~torch.isnan(r)
        n = seen.sum(0)
        xi = torch.where(
            n > 0, torch.where(seen, r, torch.zeros_like(r)).sum(0) / n.clamp_min(1), torch.ones(r.shape[1])
        )
        xi = torch.where(self._sensitive_mask, xi.clamp(max=1.0), xi)
        if self.gate == "paper":
            xi = torch.where(self._sensitive_mask, xi, xi.clamp(min=1.0))
        return xi

    def _per_unit(self, xi: Tensor) -> list[Union[float, Tensor]]:
        """Slot coefficients -> one float per module-level unit, a ``[C]`` tensor per per-channel unit."""
        out: list[Union[float, Tensor]] = []
        for i in range(len(self.units)):
            start, stop = self._bounds[i], self._bounds[i + 1]
            out.append(float(xi[start]) if stop - start == 1 else xi[start:stop].clone())
        return out

    def coefficients(self) -> dict[str, float]:
        """Module name -> xi_l (mean over tasks that reached the module; 1 where none did; sensitive capped at 1;
        the mean of the module's channels with ``granularity="channel"``, see :meth:`channel_coefficients`).
        In sequential mode the first call runs :meth:`finalize` (single process)."""
        if self.mode == "sequential" and not self._finalized and not self._folded:
            self.finalize()
        return {name: float(x) if isinstance(x, float) else float(x.mean())
                for name, x in zip(self.module_names, self._per_unit(self._xi()))}

    def channel_coefficients(self) -> dict[str, Tensor]:
        """Module name -> ``[C]`` float32 per-channel xi (``granularity="channel"``; modules with one xi are absent)."""
        if self.mode == "sequential" and not self._finalized and not self._folded:
            self.finalize()
        return {name: x for name, x in zip(self.module_names, self._per_unit(self._xi())) if isinstance(x, Tensor)}

    def check_coverage(self, min_samples: int = 1) -> None:
        """Raise :class:`CalibrationDataError` unless every task has usable statistics: at least ``min_samples``
        calibration samples, and finite features at every module (:meth:`check_finite`). A task without them would
        silently get xi from the other tasks only (or 1 everywhere without any statistics).

        The one check of every front door: :meth:`fold` runs it (after the Lightning layer has loaded the totals
        over processes, so every process decides alike)."""
        counts = self.task_samples.tolist()
        if not any(counts):
            raise CalibrationDataError("FSC has no statistics: feed unlabelled batches of every task (update) "
                                       "before fold()")
        short = [f"{name} ({n})" for name, n in zip(self.task_names, counts) if n < min_samples]
        if short:
            raise CalibrationDataError(f"FSC needs at least {min_samples} unlabelled sample(s) of every task; too "
                                       f"few for: {', '.join(short)}")
        self.check_finite()

    def check_finite(self) -> None:
        """Raise :class:`CalibrationDataError` if the statistics (this process's, or summed over processes) hold a
        non-finite value: some task's calibration data gave NaN/Inf features at some module."""
        if not bool((torch.isfinite(self.ratio_sum) & torch.isfinite(self.ratio_count)).all()):
            raise self._nonfinite_error(self.ratio_sum, self.ratio_count, self._nonfinite)

    def _task_label(self, k: int) -> str:
        return f"task {self.task_names[k]!r}" if self._named else f"task {k}"

    def _nonfinite_error(self, sums: Tensor, counts: Tensor, detail: Tensor) -> CalibrationDataError:
        """The error for ``[K, N]`` statistics holding a non-finite value: the first (task, module) in task order,
        what this process saw there (``detail``: ``[K, 3, N]`` non-finite positions: any, task change, merged
        change), and the other modules and tasks affected."""
        s, c, detail = sums.detach().float().cpu(), counts.detach().float().cpu(), detail.detach().cpu()
        bad = ~(torch.isfinite(s) & torch.isfinite(c))
        nan = torch.isnan(s) | torch.isnan(c)
        k, j = (int(v) for v in bad.nonzero()[0])

        def unit_of(slot: int) -> int:
            return bisect.bisect_right(self._bounds, slot) - 1

        i = unit_of(j)
        start, stop = self._bounds[i], self._bounds[i + 1]
        where = f"module {self.module_names[i]!r}" + (" (the model itself)" if self.module_names[i] == "" else "")
        if stop - start > 1:
            where += f", channel {j - start}"
        kind = "NaN" if bool(nan[k, j]) else "Inf"
        positions, in_task, in_merged = (int(v) for v in detail[k, :, j])
        if positions:
            which = ("the module's output under the base, expert and merged weights alike" if in_task and in_merged
                     else "the expert's output" if in_task else "the merged model's output")
            what = f"{kind} in {which}, at {positions} position(s)"
        else:
            what = f"{kind} in the statistics summed over processes or loaded, not from this process's samples"
        msg = (f"calibration data of {self._task_label(k)} gives non-finite features at {where} ({what}); "
               "check the calibration inputs")
        modules = sorted({unit_of(int(v)) for v in bad[k].nonzero().reshape(-1)} - {i})
        if modules:
            names = ", ".join(repr(self.module_names[m]) for m in modules[:5])
            msg += f"; also at {len(modules)} other module(s): {names}{', ...' if len(modules) > 5 else ''}"
        others = [self._task_label(t) for t in bad.any(1).nonzero().reshape(-1).tolist() if t != k]
        if others:
            msg += f"; other tasks with non-finite features: {', '.join(others)}"
        return CalibrationDataError(msg)

    # ---------------------------------------------------------------------------------------------------------------
    def fold(self, *, dtype: torch.dtype = torch.float64) -> CalibrationResult:
        """Write the calibration into ``merged`` and return the report.

        Affine modules get ``theta0 + xi * tau_m``; BatchNorm (eval, running statistics) the rewrite in
        docs/method.md (FSC, folding); other modules (e.g. ``nn.MultiheadAttention``) and modules sharing a tensor
        with another unit are wrapped in a runtime :class:`~magic_pl.calibration.modules.CalibratedModule`. The
        calibrator is closed afterwards. ``dtype``: the affine fold's arithmetic
        (:func:`~magic_pl.calibration.folding.fold_unit`; default float64, ``torch.float32`` avoids whole-tensor
        float64 temporaries on big models).
        """
        self._check_open()
        self.check_coverage()
        coeffs = self.coefficients()
        per_unit = self._per_unit(self._xi())
        owners: dict[int, set[int]] = {}
        for i, u in enumerate(self.units):
            tensors = dict(u.module.named_parameters())
            tensors.update(dict(u.module.named_buffers()))
            for local in u.tensors:
                owners.setdefault(id(tensors[local]), set()).add(i)
        shared = {i for s in owners.values() if len(s) > 1 for i in s}
        report = CalibrationResult(
            coefficients=coeffs, mode=self.mode, norm=self.norm, rounds=max(self.rounds, 1),
            sensitive=list(self.sensitive_modules), statistic=self.statistic, granularity=self.granularity,
            gate=self.gate, samples_per_task=self.task_samples.tolist(),
        )
        ratios = self.task_ratios()
        for j, name in enumerate(self.module_names):
            start, stop = self._bounds[j], self._bounds[j + 1]
            col = ratios[:, start:stop]
            seen = ~torch.isnan(col)
            # per-channel: the mean over the channels the task reached
            means = torch.where(seen, col, torch.zeros_like(col)).sum(1) / seen.sum(1).clamp_min(1)
            report.task_ratios[name] = [None if not bool(seen[k].any()) else float(v) for k, v in enumerate(means)]
        # sharded weights (FSDP2) fold on their local shards: put the root's parameters, left whole by the last
        # forward, back into shards first, or the fold would be written into temporaries and lost
        reshard(self.merged)
        with torch.inference_mode(False), torch.no_grad():
            for i, u in enumerate(self.units):
                base_local = {local: self.base_state[key] for local, key in u.tensors.items()}
                xi = per_unit[i]
                if isinstance(xi, Tensor) and i in shared:
                    xi = float(xi.mean())  # a runtime wrapper keeps one coefficient
                status = fold_unit(self.merged, u, base_local, xi, force_wrap=i in shared, dtype=dtype)
                getattr(report, status).append(u.name)
                if isinstance(xi, Tensor):
                    report.channel_coefficients[u.name] = xi.tolist()
            covered = {key for u in self.units for key in u.keys}
            keys, tensors, differs = [], [], []
            for key, t in self.merged.state_dict().items():
                if key in covered or not t.dtype.is_floating_point or key not in self.base_state:
                    continue
                b = self.base_state[key]
                if b.shape != t.shape:
                    same = False
                else:
                    local, block = local_part(t, b)  # a sharded tensor: this rank's shard, then over all shards
                    same = torch.equal(block.to(local.device, local.dtype), local)
                keys.append(key)
                tensors.append(t)
                differs.append(0.0 if same else 1.0)
            differs_all = sum_over_shards(torch.tensor(differs), tensors, op="max") if keys else torch.zeros(0)
            report.uncalibrated.extend(k for k, d in zip(keys, differs_all.tolist()) if d > 0)
        self._folded = True
        return report


@register_step
@dataclass(frozen=True)
class FSCStep(CalibrationStep):
    """The calibration step ``fsc``, the feature step: a :class:`FeatureSpaceCalibrator` on the model the weight steps
    left (MAGIC, arXiv 2512.19320), its sensitive modules capped at xi = 1. The defaults are the paper's.

    Attributes:
        norm: p of the feature norm: 1 (the paper's), 2 or ``inf``.
        mode: one of :data:`FSC_MODES` (``"parallel"``, the paper's).
        statistic: one of :data:`FSC_STATISTICS` (``"mean_of_ratios"``, the paper's).
        granularity: one of :data:`FSC_GRANULARITIES` (``"module"``, the paper's).
        gate: one of :data:`FSC_GATES` (``"none"``, the paper's).
    """

    name: ClassVar[str] = "fsc"
    kind: ClassVar[str] = "feature"
    norm: float = 1.0
    mode: str = "parallel"
    statistic: str = "mean_of_ratios"
    granularity: str = "module"
    gate: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", _parse_norm(self.norm))
        for name, choices in (("mode", FSC_MODES), ("statistic", FSC_STATISTICS), ("granularity", FSC_GRANULARITIES),
                              ("gate", FSC_GATES)):
            self._choice(name, choices)

    def calibrator(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                   sensitive: Optional[Collection[str]], *, modules: Optional[Sequence[str]] = None,
                   task_names: Optional[Sequence[str]] = None) -> FeatureSpaceCalibrator:
        """The calibrator on ``merged`` (statistics are fed by the caller, then :meth:`FeatureSpaceCalibrator.fold`)."""
        return FeatureSpaceCalibrator(base, merged, task_vectors, sensitive=sensitive, modules=modules,
                                      task_names=task_names, **self.options())
