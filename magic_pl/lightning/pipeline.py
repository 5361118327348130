"""The calibration steps of one merged body under Lightning, shared by every Lightning front door.

:class:`CalibrationRun` is the one piece that :class:`~magic_pl.lightning.module.MagicModule` and the plug-in
:class:`~magic_pl.lightning.callbacks.MagicCalibration` callback (for a foreign LightningModule) both use, so the two
paths run the same code:

1. :meth:`CalibrationRun.bind` after the merge: the merged body, the base weights and the task vectors; the
   setting's data-free weight steps (WSC for ``wsc``/``dsc``) run here unless the setting must first detect its
   sensitive set or the merge itself needs data (RegMean: ``data_merge``, run at :meth:`finish` on the calibration
   samples).
2. :meth:`CalibrationRun.begin` at the start of ``trainer.predict``: the FSC statistics component (a
   :class:`~magic_pl.lightning.statistics.FeatureStatisticsCollector`, torchmetrics states reduced with one ``sum``
   at the end; for a feature step that measures in passes of its own, FeatCal, a
   :class:`~magic_pl.lightning.statistics.PassesCollector` that keeps the samples); when the sensitive set must be
   detected first (``sensitive="detect"``) or the merge is data-based, the calibration samples are kept instead.
3. :meth:`CalibrationRun.update` per batch (called directly by ``MagicModule.predict_step``, or by a forward pre-hook
   on the foreign module's backbone: :meth:`attach`).
4. :meth:`CalibrationRun.finish` at the end of the predict epoch: the data-based merge on the kept samples (its
   statistics summed over processes), the label-free probe (its per-tensor scores summed over processes), the
   deferred weight steps, and the FSC statistics measured on the kept samples; then one all-reduce, the same xi on
   every rank, the fold (FeatCal: its passes, each block's statistics summed over processes with one reduce, the
   same weights on every rank).

Everything a step does is written into a :class:`~magic_pl.lightning.report.CalibrationRecord`, under the step's
own name (``"wsc"``, ``"svc"``, ``"lines"``, ``"fsc"``, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.calibration.fsc import CalibrationResult, FeatureSpaceCalibrator, FSCStep
from magic_pl.calibration.sensitivity import ModelInputs
from magic_pl.calibration.settings import CalibrationSetting, SensitiveSet, detect_label_free
from magic_pl.calibration.steps import CalibrationStep
from magic_pl.lightning.report import CalibrationRecord, delta_norms, relative_deviation
from magic_pl.lightning.statistics import FeatureStatisticsCollector, PassesCollector, task_calls

__all__ = ["CalibrationRun", "DataMerge", "sum_over_processes"]

#: ``reduce(tensor) -> tensor``: the sum over processes (identity on one process).
Reduce = Callable[[Tensor], Tensor]
#: One task-tagged model call: ``(task index, args, kwargs)``.
Call = tuple[int, tuple, dict]
#: A merge that needs data: ``(body, base_state, task_vectors, calls, reduce) -> tau_m``; writes ``theta0 + tau_m``
#: into ``body`` in place (statistics summed over processes with ``reduce``).
DataMerge = Callable[[nn.Module, Mapping[str, Tensor], Sequence[Mapping[str, Tensor]], list[Call], Reduce],
                     Mapping[str, Tensor]]


def sum_over_processes(trainer: Any) -> Reduce:
    """``reduce`` for :meth:`CalibrationRun.finish`: a tensor summed over the trainer's processes (identity on one, or
    without a trainer)."""
    def reduce(t: Tensor) -> Tensor:
        if trainer is None or trainer.world_size == 1:
            return t
        return trainer.strategy.reduce(t.to(trainer.strategy.root_device), reduce_op="sum").cpu()

    return reduce


class CalibrationRun:
    """Applies one :class:`~magic_pl.calibration.CalibrationSetting` to one merged body through a Trainer.

    Args:
        setting: how to calibrate (resolved already; see :func:`magic_pl.calibration.resolve_setting`).
        sensitive: a given sensitive set (names, a ranking JSON, or ``{policy: names}``); default none.
        modules: explicit FSC module names (default: the caller's automatic choice).
        per_sample: feed FSC one sample at a time (default ``True``: results independent of batching and of the
            number of processes).
        record: where the steps are recorded (default: a new :class:`CalibrationRecord`).
    """

    def __init__(self, setting: CalibrationSetting, *, sensitive: SensitiveSet = None,
                 modules: Optional[Sequence[str]] = None, per_sample: bool = True,
                 record: Optional[CalibrationRecord] = None) -> None:
        self.setting = setting
        self.given = sensitive
        self.modules = list(modules) if modules is not None else None
        self.per_sample = per_sample
        self.record = record if record is not None else CalibrationRecord()
        self.body: Optional[nn.Module] = None
        self.base_state: Mapping[str, Tensor] = {}
        self.task_vectors: list[Mapping[str, Tensor]] = []
        self.task_names: list[str] = []
        self.sensitive_set: Optional[list[str]] = None
        self.row_scales: dict[str, Tensor] = {}
        self._wsc_means: dict[str, float] = {}
        self.collector: Optional[Union[FeatureStatisticsCollector, PassesCollector]] = None
        self.result: Optional[CalibrationResult] = None
        self._handle: Any = None
        self._pending: Optional[list[Call]] = None
        self._data_merge: Optional[DataMerge] = None
        self._fsc_modules: Optional[Sequence[str]] = None
        self._task: Any = None
        self._busy = False
        self._contributes = True

    # --- what the run still needs ----------------------------------------------------------------------------------
    @property
    def must_detect(self) -> bool:
        """The setting detects its sensitive set and none was given: the probe needs calibration data."""
        given = self.given.get(self.setting.sensitive) if isinstance(self.given, Mapping) else self.given
        return self.setting.detects and given is None

    @property
    def needs_data(self) -> bool:
        """True while a step that needs unlabelled calibration data (``trainer.predict``) has not run."""
        return self.result is None and (self.setting.uses_data or (self.must_detect and self.setting.uses_wsc)
                                        or self._data_merge is not None)

    @property
    def _keeps_samples(self) -> bool:
        """A step must run on the calibration samples before the FSC statistics can be measured."""
        return self.must_detect or self._data_merge is not None

    @property
    def done(self) -> bool:
        return self.result is not None

    # --- 1. after the merge ---------------------------------------------------------------------------------------
    def bind(self, body: nn.Module, base_state: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
             task_names: Sequence[str], merged_tv: Optional[Mapping[str, Tensor]] = None, *,
             data_merge: Optional[DataMerge] = None,
             weight_steps_done: Optional[Mapping[str, float]] = None) -> None:
        """Attach the merged ``body`` and, unless the sensitive set must be detected first, apply the data-free step.

        With ``data_merge`` the body holds the base weights until :meth:`finish`, where the merge runs on the
        calibration samples before every calibration step. ``weight_steps_done``: the merge already applied the
        setting's weight steps key by key (a merge into shards); their mean row scale per key, for the record."""
        self.body, self.base_state = body, base_state
        self.task_vectors, self.task_names = list(task_vectors), list(task_names)
        self._data_merge = data_merge
        self.record.config["calibration"] = self.setting.to_string()
        self.record.config["calibration_setting"] = self.setting.to_dict()
        if weight_steps_done is not None and self._keeps_samples:
            raise ValueError("weight steps applied during the merge cannot follow a step that needs the samples")
        if not self._keeps_samples:
            self.sensitive_set = self.setting.resolve_sensitive(self.given)
            if weight_steps_done is None:
                self._weight_space(merged_tv)
            elif self.setting.uses_wsc:
                for step in self.setting.weight_steps:
                    self.record.add_step(step.name, 0.0, tensors=len(weight_steps_done), in_merge=True,
                                         gated=self.sensitive_set is not None)
                self._wsc_means = dict(weight_steps_done)
                self.record.wsc_scales = dict(weight_steps_done)
                self._update_deviation()
            if not self.setting.uses_data:
                self.result = self._result(None)

    def _weight_space(self, merged_tv: Optional[Mapping[str, Tensor]] = None) -> None:
        """The setting's weight steps, in order, each recorded under its own name (``merged_tv``: tau_m before the
        first; each later step reads the body the one before wrote)."""
        if not self.setting.uses_wsc:
            return
        assert self.body is not None
        rec = self.record
        start = time.perf_counter()

        def on_step(step: CalibrationStep, written: list[str]) -> None:
            nonlocal start
            rec.add_step(step.name, time.perf_counter() - start, tensors=len(written),
                         gated=self.sensitive_set is not None)
            start = time.perf_counter()

        self.row_scales = self.setting.weight_space(self.base_state, self.body, self.task_vectors, merged_tv,
                                                    self.sensitive_set, on_step)
        rec.wsc_scales = {k: float(v.float().mean()) for k, v in self.row_scales.items()}
        self._update_deviation()

    # --- 2. start of predict -----------------------------------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        """True between :meth:`begin` and :meth:`finish`."""
        return self.collector is not None or self._pending is not None

    def check_shardable(self) -> None:
        """Raise ``ValueError`` unless every step still to run works on a sharded body (FSDP2): the weight steps ran
        at :meth:`bind` on the whole body, and what remains is FSC's statistics and fold. Steps that need the kept
        samples first (a sensitive set to detect, a data-based merge) or measure in passes of their own (FeatCal)
        write whole tensors in between, so they are refused before anything is sharded."""
        if not self.needs_data:
            return
        step = self.setting.feature_step
        if self._keeps_samples or not isinstance(step, FSCStep):
            what = ("a data-based merge" if self._data_merge is not None else
                    "detecting the sensitive set" if self.must_detect else f"the feature step {step.name!r}")
            raise ValueError(f"calibration {self.setting.to_string()!r} cannot run on a sharded model: "
                             f"{what} needs the whole model between steps; use DDP for it, give the sensitive set, "
                             "or choose an FSC setting (fsc, dsc, fsc:granularity=channel, ...)")

    def begin(self, device: torch.device, fsc_modules: Optional[Sequence[str]] = None, *,
              contributes: bool = True) -> None:
        """Start collecting: the FSC statistics, or (when the sensitive set must be detected first) this process's
        calibration samples, kept for the probe and measured at :meth:`finish`.

        ``contributes``: whether this process's statistics enter the sum over processes (see
        :class:`~magic_pl.lightning.statistics.FeatureStatisticsCollector`); False on the ranks of a sharded model
        that run the same samples as their shard group's first rank."""
        assert self.body is not None, "bind() first"
        if self.result is not None:
            return
        self._contributes = contributes
        self.body.to(device).eval()
        self._fsc_modules = self.modules if self.modules is not None else fsc_modules
        if self._keeps_samples:
            self._pending = []
        else:
            self._start_statistics()

    def _start_statistics(self) -> None:
        calibrator = self.setting.feature_calibrator(self.base_state, self.body, self.task_vectors,
                                                     self.sensitive_set, modules=self._fsc_modules,
                                                     task_names=self.task_names)
        if isinstance(calibrator, FeatureSpaceCalibrator):
            self.collector = FeatureStatisticsCollector(calibrator, per_sample=self.per_sample,
                                                        contributes=self._contributes)
        else:  # a feature step measuring in passes of its own (FeatCal): it sums its statistics with the reduce
            self.collector = PassesCollector(calibrator, per_sample=self.per_sample)

    # --- 3. per batch ---------------------------------------------------------------------------------------------
    def update(self, task: Any, *args: Any, **kwargs: Any) -> None:
        """Feed one task-tagged call of the body (``task``: an int, or one task index per sample)."""
        if self._pending is not None:
            self._pending.extend(task_calls(task, args, kwargs))
        elif self.collector is not None:
            self.collector.update(task, *args, **kwargs)
        else:
            raise RuntimeError("calibration statistics are not collecting: begin() runs at the start of predict")

    def attach(self, body: nn.Module) -> None:
        """Feed the statistics from a forward pre-hook on ``body`` (for a foreign LightningModule's backbone): each
        call made while :meth:`set_task` holds a task is one update."""
        self.detach()
        self._handle = body.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def set_task(self, task: Any) -> None:
        self._task = task

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._busy or not self.collecting or self._task is None:
            return None
        self._busy = True  # the calibrator runs the body itself
        try:
            self.update(self._task, *args, **kwargs)
        finally:
            self._busy = False
        return None

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # --- 4. end of predict ------------------------------------------------------------------------------------------
    def finish(self, reduce: Reduce) -> CalibrationResult:
        """Detect the sensitive set if needed (probe scores summed over processes with ``reduce``), apply the deferred
        weight steps, sum the FSC statistics over processes (once), fold the same xi on every rank, and record the
        result."""
        self.detach()
        if self._pending is not None:
            calls, self._pending = self._pending, None
            merged_tv = None
            if self._data_merge is not None:
                assert self.body is not None
                with torch.inference_mode(False), torch.no_grad():  # writes the body's own (normal) tensors
                    merged_tv = self._data_merge(self.body, self.base_state, self.task_vectors, calls, reduce)
                self._data_merge = None
            if self.must_detect:
                start = time.perf_counter()
                found = detect_label_free(self.base_state, self.body, self.task_vectors,
                                          [ModelInputs(a, kw) for _, a, kw in calls], alpha=self.setting.alpha,
                                          reduce=reduce)
                self.sensitive_set = self.setting.resolve_sensitive(None, found)
                self.record.config["sensitive_detected"] = list(found)
                self.record.add_step("probe", time.perf_counter() - start, samples=len(calls),
                                     alpha=self.setting.alpha)
            else:
                self.sensitive_set = self.setting.resolve_sensitive(self.given)
            self._weight_space(merged_tv)
            if not self.setting.uses_data:
                self.result = self._result(None)
                return self.result
            self._start_statistics()  # measured on the model the weight steps left, on the same samples
            for task, args, kwargs in calls:
                self.collector.update(task, *args, **kwargs)
        collector = self.collector
        if collector is None:
            raise RuntimeError("no calibration statistics were collected (begin() did not run)")
        if isinstance(collector, PassesCollector):
            fold = collector.finish(reduce)
            details: dict[str, Any] = {"rounds": fold.rounds, "modules": len(fold.folded)}
        else:
            fold = collector.finish()
            details = {"mode": fold.mode, "norm": fold.norm, "rounds": fold.rounds}
        self.result = self._result(fold)
        rec = self.record
        rec.set_fold(self.result)
        step = self.setting.feature_step
        rec.add_step(step.name if step is not None else "fsc", collector.seconds, **details,
                     samples_per_task=collector.samples.tolist())
        self._update_deviation()
        self.collector = None
        return self.result

    def _result(self, fold: Optional[CalibrationResult]) -> CalibrationResult:
        result = self.setting.result(fold, self.row_scales)
        if self._wsc_means:  # weight steps applied key by key during the merge: their means only
            result.wsc_scales = dict(self._wsc_means)
        return result

    def discard(self) -> None:
        """Forget a predict run that ended without :meth:`finish`."""
        self.detach()
        self.collector = None
        self._pending = None

    def _update_deviation(self) -> None:
        rec = self.record
        if self.body is None or not rec.expert_norms:
            return
        current = {k: v for k, v in self.body.state_dict().items()
                   if k in self.base_state and v.dtype.is_floating_point}
        rec.deviation_after = relative_deviation(delta_norms(current, self.base_state), rec.expert_norms)
