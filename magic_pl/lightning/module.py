"""``MagicModule``: a LightningModule that merges experts, calibrates the merged model with MAGIC and evaluates it.

Lifecycle:

1. ``setup()`` (any stage, once): load the base and experts (an adapter from :mod:`magic_pl.models`, or a module plus
   checkpoint paths), validate them, merge tensor by tensor (:func:`magic_pl.merging.merge`, streaming lazy task
   vectors) and apply the data-free step of the calibration setting (WSC for ``wsc``/``dsc``). Every process does the
   same deterministic work, so weights are identical on all ranks.
2. ``trainer.predict`` with unlabelled, task-tagged batches (settings that use data: FSC, DSC, ``auto``, or a
   sensitive set to detect): ``predict_step`` feeds the shared :class:`~magic_pl.lightning.pipeline.CalibrationRun`;
   statistics are torchmetrics states summed across processes once, at the end of the predict epoch; every rank then
   computes the same xi and folds it into the weights.
3. ``trainer.test``: per-task accuracy (exact under DDP with :class:`~magic_pl.lightning.data.TaskDataModule`),
   logged as ``test/acc/<task>`` and ``test/acc/avg``.

Under Lightning's ``ModelParallelStrategy`` (torch FSDP2; it runs on CPU with gloo too) ``configure_model`` shards the
body per block over the processes (:mod:`magic_pl.lightning.sharding`), so each rank holds 1/N of it. With an adapter
that builds a skeleton (:meth:`~magic_pl.models.base.ModelAdapter.sharded_setup`: causal LMs) no rank ever holds the
whole model: the body is built with its parameters on the meta device, sharded, and each rank fills its own shards
from the checkpoints, key by key (:func:`~magic_pl.models.shard_merge.merge_into_shards`; row-separable methods read
only the shard's rows; the setting's weight steps run inside the merge), and FSC reads the base weights theta0 from
disk module by module. Otherwise (other adapters, data-based merges, whole-model options) the body is merged whole
on every rank and sharded afterwards, with a warning. The ranks of a shard group run the same samples, which FSDP's
collective forwards need; one rank per group adds them to the statistics, so the one sum counts each sample once and
xi equals one process's. The fold writes each rank's shards; :meth:`MagicModule.save_calibrated` gathers the whole
state dict on rank 0 and writes it through the adapter.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from magic_pl._memory import release_large_allocations
from magic_pl.calibration import CalibrationSetting, resolve_setting
from magic_pl.calibration.sensitivity import ModelInputs, sensitive_names
from magic_pl.lightning.data import (
    INDEX_KEY,
    INPUTS_KEY,
    LABELS_KEY,
    TASK_KEY,
    check_calibration_size,
    check_label_range,
    count_predict_samples,
)
from magic_pl.lightning.metrics import ExampleCorrectness, PerTaskAccuracy
from magic_pl.lightning.pipeline import CalibrationRun, sum_over_processes
from magic_pl.lightning.report import CalibrationRecord, module_sq_norms, relative_deviation
from magic_pl.lightning.sharding import (
    check_strategy,
    contributes_statistics,
    data_parallel_size,
    full_state_dict,
    is_fully_sharded,
    shard_mesh,
    shard_model,
    sharded_parameter_numel,
)
from magic_pl.lightning.statistics import batch_size_of, split_batch, task_calls, task_tensor
from magic_pl.merging import get_method, merge, split_driver_args, validate_merge_options
from magic_pl.models.base import (
    KeyView,
    MergeSetup,
    ModelAdapter,
    body_view,
    default_task_names,
    find_tied_keys,
)
from magic_pl.models.heads import TaskModel, logits_of
from magic_pl.models.shard_merge import merge_into_shards
from magic_pl.models.streaming import MergeRequest, merge_request
from magic_pl.recommended import Recommendation, fill_recipe
from magic_pl.statedict import CheckpointError, load_state_dict, validate_state_dict

__all__ = ["MagicModule", "Calibration", "split_inputs", "NormRecorder", "task_calls",
           "record_merge", "regmean_merge"]

#: A calibration setting as every front door takes it: a preset name (``"dsc"``, ``"auto"``, ...), a
#: ``"space:key=value,..."`` string, a dict of :class:`~magic_pl.calibration.CalibrationSetting` fields, or the object.
Calibration = Union[str, dict[str, Any], CalibrationSetting]
Source = Union[str, os.PathLike, nn.Module]


class _Same:
    """Default of :meth:`MagicModule.with_calibration`'s ``sensitive``: keep the module's own."""


_SAME = _Same()


def split_inputs(batch: Any) -> tuple[Any, tuple, dict, Optional[Tensor]]:
    """``(task, args, kwargs, labels)`` of a batch.

    A dict batch holds ``"task"``, optional ``"labels"`` and ``"index"`` (positions in the test sets, see
    :data:`~magic_pl.lightning.data.INDEX_KEY`) and the inputs: ``"inputs"`` (one tensor, passed positionally) or
    named tensors (passed as keyword arguments, e.g. ``pixel_values`` or ``input_ids`` + ``attention_mask``). A tuple
    ``(inputs, labels, task)`` or ``(inputs, task)`` is accepted too.
    """
    if isinstance(batch, Mapping):
        if TASK_KEY not in batch:
            raise KeyError(f"a task-tagged batch needs a {TASK_KEY!r} entry; got keys {sorted(batch)}")
        task = batch[TASK_KEY]
        labels = batch.get(LABELS_KEY)
        if INPUTS_KEY in batch:
            return task, (batch[INPUTS_KEY],), {}, labels
        kwargs = {k: v for k, v in batch.items() if k not in (TASK_KEY, LABELS_KEY, INDEX_KEY)}
        return task, (), kwargs, labels
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        if len(batch) == 2:
            return batch[1], (batch[0],), {}, None
        return batch[2], (batch[0],), {}, batch[1]
    raise TypeError(f"cannot read a task-tagged batch of type {type(batch).__name__}")


class NormRecorder(Mapping[str, Tensor]):
    """A task-vector view that records ``||tau[key]||^2`` the first time each key is read (expert norms for the
    report come for free with the merge, which reads every key once)."""

    def __init__(self, source: Mapping[str, Tensor]) -> None:
        self.source = source
        self.sq_norms: dict[str, float] = {}

    def __getitem__(self, key: str) -> Tensor:
        t = self.source[key]
        if key not in self.sq_norms:
            self.sq_norms[key] = float(t.double().pow(2).sum())
        return t

    def __iter__(self):
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def __contains__(self, key: object) -> bool:
        return key in self.source

    def shape(self, key: str) -> torch.Size:
        fn = getattr(self.source, "shape", None)
        return fn(key) if callable(fn) else self.source[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32


def record_merge(record: CalibrationRecord, taus: Sequence[NormRecorder], tau_m: Mapping[str, Tensor]) -> None:
    """The merge's magnitudes in ``record``: mean expert update norm per module and the merged model's deviation."""
    record.expert_norms = _module_means([t.sq_norms for t in taus])
    record.deviation_before = relative_deviation(_sqrt(module_sq_norms(tau_m.items())), record.expert_norms)


def merge_and_bind(run: CalibrationRun, method: str, options: Mapping[str, Any],
                   task_vectors: Sequence[Mapping[str, Tensor]], task_names: Sequence[str],
                   base_state: Mapping[str, Tensor], load: Callable[[Optional[Mapping[str, Tensor]]], nn.Module]
                   ) -> nn.Module:
    """The merge of every Lightning front door (``MagicModule``, the plug-in ``MagicCalibration``): merge the task
    vectors with ``method``, record the step and the magnitudes, put ``theta0 + tau_m`` into a body with ``load(tau_m)``
    and bind ``run`` to it; returns the body. A data-based method (RegMean) gets the base (``load(None)``) and is
    merged at the end of predict from the calibration samples."""
    record = run.record
    if get_method(method).needs_data:
        body = load(None)
        run.bind(body, base_state, list(task_vectors), list(task_names),
                 data_merge=regmean_merge(method, options, record))
    else:
        start = time.perf_counter()
        taus = [NormRecorder(tv) for tv in task_vectors]
        tau_m = merge(method, taus, base=base_state, **dict(options))
        record.add_step("merge", time.perf_counter() - start, method=method, options=dict(options))
        record_merge(record, taus, tau_m)
        body = load(tau_m)
        run.bind(body, base_state, [t.source for t in taus], list(task_names), merged_tv=tau_m)
    record.deviation_after = record.deviation_after or dict(record.deviation_before)
    return body


def regmean_merge(method: str, options: Mapping[str, Any], record: CalibrationRecord) -> Callable[..., Any]:
    """The :data:`~magic_pl.lightning.pipeline.DataMerge` of a data-based method (RegMean / RegMean++) for
    :meth:`CalibrationRun.bind <magic_pl.lightning.pipeline.CalibrationRun.bind>`: merges the body from the kept
    calibration calls (Gram sums reduced over processes) and records the step. Shared by ``MagicModule`` and the
    plug-in callback."""
    def run(body: nn.Module, base_state: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
            calls: list[tuple[int, tuple, dict]], reduce: Callable[[Tensor], Tensor]) -> Mapping[str, Tensor]:
        start = time.perf_counter()
        taus = [NormRecorder(tv) for tv in task_vectors]
        batches = [(t, ModelInputs(a, kw)) for t, a, kw in calls]
        tau_m = get_method(method)(base_state, body, taus, batches, reduce=reduce, **dict(options))
        record.add_step("merge", time.perf_counter() - start, method=method, options=dict(options),
                        samples=len(calls))
        record_merge(record, taus, tau_m)
        return tau_m

    return run


class MagicModule(LightningModule):
    """Merge K experts of one base, calibrate with MAGIC (WSC / FSC / DSC) and evaluate per task.

    Give either ``adapter`` (a :class:`magic_pl.models.base.ModelAdapter`: timm, Hugging Face CLIP / classifiers /
    causal LMs; it brings the body, the experts, the per-task heads and the saving format) or ``model`` + ``experts``
    (a body module and checkpoints keyed like its ``state_dict()``).

    Args:
        adapter: the model family adapter (preferred; see :mod:`magic_pl.models`).
        model: the body architecture as a module (or a zero-argument builder). Its own weights are the base unless
            ``base`` is given.
        experts: expert checkpoints (paths, state dicts or modules), one per task, keyed like ``model``.
        base: base checkpoint for ``model`` (default: ``model``'s own weights).
        task_names: one per expert (default: the adapter's, or the expert file names).
        heads: per-task heads (task name -> module, or a list in task order) applied to the body's output; default
            none (the body's output is the prediction).
        output_key: field of the body's output the heads read (e.g. ``"image_embeds"``; default: a tensor output).
        key_prefix: prefix to strip from the experts' keys, and from the base's unless ``base_key_prefix`` is given
            (e.g. ``"bert."`` or ``"model.backbone."``); default ``None``: found per checkpoint
            (:func:`~magic_pl.models.base.body_view`; keys outside it, such as a classifier head, are left out).
        base_key_prefix: prefix to strip from the base's keys (default: ``key_prefix``, or found automatically).
        merge_method: a :data:`magic_pl.merging.MERGE_METHODS` name (default ``None``: the recommended recipe's, see
            ``calibration``), or
            a data-based merge of :data:`magic_pl.merging.DATA_MERGE_METHODS` (``"regmean"``, ``"regmean_plusplus"``:
            merged at the end of ``trainer.predict`` from the calibration samples' Gram matrices, summed over
            processes, then calibrated on the same samples).
        merge_options: options of the method (e.g. ``{"scale": 0.3}``, ``{"density": 0.2}``,
            ``{"reduce_non_diagonal": 0.95}``) plus ``bn_stats`` and ``seed``; default none.
        calibration: the calibration setting: a preset of :data:`magic_pl.calibration.PRESETS` (``"none"``,
            ``"wsc"``, ``"fsc"``, ``"dsc"``, the recommended ``"auto"``, ...), a ``"space:key=value,..."`` string
            (``"fsc:statistic=ratio_of_means,granularity=channel"``) or a dict of
            :class:`~magic_pl.calibration.CalibrationSetting` fields. Settings that use data need
            ``trainer.predict`` on unlabelled, task-tagged batches. Default ``None``: with ``merge_method`` also
            ``None``, the recipe :func:`magic_pl.recommended.recommended` gives for ``samples_per_task`` (chosen
            out of sample on the benchmark's two suites); a ``None`` beside a named method or setting takes the
            recommended recipe's other half.
        samples_per_task: the budget the default recipe is chosen for: unlabelled samples per task the calibration
            data gives (default 1, :class:`~magic_pl.lightning.data.TaskDataModule`'s default; ``None``: every
            sample of the calibration set); the CLI passes the data module's. Unused when both are named.
        sensitive: a given magnitude-sensitive set (tensor/module names, or a ranking JSON of
            :func:`magic_pl.calibration.save_sensitivity`); default ``None``. With the setting's ``sensitive``
            policy ``"none"`` a given set turns on WSC gating and the FSC cap (policy ``"given"``); with ``"detect"``
            it replaces the probe.
        fsc_modules: explicit module names to calibrate (default: automatic).
        fsc_per_sample: run FSC one sample at a time (default ``True``): statistics independent of batching and of
            the number of processes.
        check_finite: scan experts for NaN/Inf during validation (reads every tensor once more; default ``False``).
        trust_pickle: allow full pickle for torch checkpoints given as ``model``/``experts`` paths (default ``False``).
        save_options: options of the adapter's ``save`` for :meth:`save_calibrated` (e.g. ``{"dtype": "bfloat16"}``,
            ``{"layout": "shared"}`` for Hugging Face classifiers); default none.
    """

    def __init__(
        self,
        adapter: Optional[ModelAdapter] = None,
        model: Optional[Union[nn.Module, Callable[[], nn.Module]]] = None,
        experts: Optional[Sequence[Source]] = None,
        base: Optional[Source] = None,
        task_names: Optional[Sequence[str]] = None,
        heads: Optional[Union[Mapping[str, nn.Module], Sequence[nn.Module]]] = None,
        output_key: Optional[str] = None,
        key_prefix: Optional[str] = None,
        base_key_prefix: Optional[str] = None,
        merge_method: Optional[str] = None,
        merge_options: Optional[dict[str, Any]] = None,
        calibration: Optional[Calibration] = None,
        samples_per_task: Optional[int] = 1,
        sensitive: Optional[Union[str, Sequence[str]]] = None,
        fsc_modules: Optional[Sequence[str]] = None,
        fsc_per_sample: bool = True,
        check_finite: bool = False,
        trust_pickle: bool = False,
        save_options: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        # the constructor's arguments as given, so with_calibration builds the same module with another setting
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if (adapter is None) == (model is None):
            raise ValueError("give exactly one of `adapter` (a magic_pl.models adapter) or `model` (+ `experts`)")
        if adapter is not None and trust_pickle:
            raise ValueError("trust_pickle applies to `model`/`experts` paths; with an adapter, set the adapter's own "
                             "trust_pickle (e.g. --model.init_args.adapter.init_args.trust_pickle true)")
        if model is not None and not experts:
            raise ValueError("`model` needs `experts`: one fine-tuned checkpoint per task")
        #: the recommended recipe a ``None`` method or setting was filled from (``None`` when both were named)
        self.recommendation: Optional[Recommendation]
        merge_method, calibration, self.recommendation = fill_recipe(merge_method, calibration, samples_per_task)
        setting = resolve_setting(calibration)  # every option checked before any checkpoint is read
        if model is not None and task_names is not None:
            default_task_names(experts, task_names)  # names, never paths, paired by name: checked before any read
        validate_merge_options(merge_method, dict(merge_options or {}))
        self.save_hyperparameters(ignore=["adapter", "model", "experts", "base", "heads"])
        self.adapter = adapter
        self._model_source = model
        self._expert_sources = list(experts or [])
        self._base_source = base
        self._heads_arg = heads
        self._task_names_arg = list(task_names) if task_names is not None else None
        self.output_key = output_key
        self.key_prefix, self.base_key_prefix = key_prefix, base_key_prefix
        self.merge_method = merge_method
        self.merge_options = dict(merge_options or {})
        self.calibration: CalibrationSetting = setting
        self.sensitive = sensitive_names(sensitive)
        self.fsc_modules = list(fsc_modules) if fsc_modules is not None else None
        self.fsc_per_sample = fsc_per_sample
        self.check_finite = check_finite
        self.trust_pickle = trust_pickle
        self.save_options = dict(save_options or {})
        if self.save_options and adapter is None:
            raise ValueError("save_options are options of an adapter's save (layout, dtype, ...): give an adapter")

        self.merge_setup: Optional[MergeSetup] = None
        self.model: Optional[nn.Module] = None
        self.heads: Optional[nn.ModuleDict] = None
        self.task_names: list[str] = []
        self.calibration_record = CalibrationRecord()
        self.run = CalibrationRun(setting, sensitive=self.sensitive, modules=self.fsc_modules,
                                  per_sample=fsc_per_sample, record=self.calibration_record)
        self._task_models: dict[str, nn.Module] = {}
        #: A merge into shards waiting for ``configure_model`` (set by ``build`` under ``ModelParallelStrategy``).
        self._shard_request: Optional[MergeRequest] = None
        #: The unsharded skeleton (meta parameters) that saving loads the gathered weights into (not a submodule).
        object.__setattr__(self, "_template", None)
        self._test_metric: Optional[PerTaskAccuracy] = None
        self._examples: Optional[ExampleCorrectness] = None
        #: After ``trainer.test``/``validate`` on batches with an ``"index"`` entry: task -> correctness per example
        #: (bool, in index order), gathered from every process.
        self.example_correctness: dict[str, Tensor] = {}
        #: Tasks whose evaluation labels the datamodule checked against the head in ``setup``; the others are checked
        #: batch by batch against the logits' width.
        self._labels_checked: set[str] = set()

    # ----------------------------------------------------------------------------------------------------------------
    # Building
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def needs_calibration_data(self) -> bool:
        """True while a step still needs unlabelled data (``trainer.predict``): a calibration step, or a data-based
        merge."""
        return self.run.needs_data or (not self.is_built and get_method(self.merge_method).needs_data)

    @property
    def is_built(self) -> bool:
        return self.model is not None

    def _direct_setup(self) -> MergeSetup:
        model = self._model_source
        if not isinstance(model, nn.Module):
            model = model()  # a builder
            if not isinstance(model, nn.Module):
                raise TypeError(f"the model builder returned a {type(model).__name__}, not an nn.Module")
        keys = list(model.state_dict().keys())
        if self._base_source is not None:
            prefix = self.base_key_prefix if self.base_key_prefix is not None else self.key_prefix
            base_sd = self._load(self._base_source, "base", keys, prefix)
            try:
                model.load_state_dict({k: base_sd[k] for k in base_sd}, strict=True)
            except RuntimeError as err:
                raise CheckpointError(
                    f"base {_name(self._base_source)} does not fit {type(model).__name__}: {err}"
                ) from err
        model.eval()
        tied = find_tied_keys(model)
        experts = []
        for src in self._expert_sources:
            sd = self._load(src, f"expert {_name(src)}", keys, self.key_prefix)
            experts.append(KeyView(sd, [k for k in sd if k not in tied]) if tied else sd)
        paths = [s if isinstance(s, (str, os.PathLike)) else f"task{i}" for i, s in enumerate(self._expert_sources)]
        names = default_task_names(paths, self._task_names_arg)
        heads = self._heads_arg
        if heads is not None and not isinstance(heads, Mapping):
            heads = list(heads)
            if len(heads) != len(names):
                raise ValueError(f"{len(heads)} heads given for {len(names)} tasks")
            heads = dict(zip(names, heads))
        return MergeSetup(
            base=model, experts=experts, task_names=names, heads=dict(heads) if heads is not None else None,
            tied=tied, adapter=None,
            metadata={"base": self._base_source if self._base_source is not None else model,
                      "experts": list(self._expert_sources)},
        )

    def _load(self, source: Source, what: str, keys: Sequence[str], prefix: Optional[str]) -> Mapping[str, Tensor]:
        return body_view(load_state_dict(source, trust_pickle=self.trust_pickle), keys, prefix, what)

    def build(self) -> None:
        """Load, validate, merge and (``wsc``/``dsc``) weight-space calibrate; idempotent. Called by ``setup``."""
        if self.is_built:
            return
        rec = self.calibration_record
        start = time.perf_counter()
        request = self._shard_merge_request()
        setup = None
        if request is not None:
            setup = self.adapter.sharded_setup()
        if setup is None:
            request = None
            setup = self.adapter.setup() if self.adapter is not None else self._direct_setup()
        setup.validate(check_finite=self.check_finite)
        self.merge_setup = setup
        self.task_names = list(setup.task_names)
        rec.task_names = list(self.task_names)
        rec.config.update(self.describe())
        rec.sources = {"base": setup.metadata.get("base"), "experts": setup.metadata.get("experts") or []}
        rec.add_step("load", time.perf_counter() - start, tasks=len(self.task_names))
        if request is not None:
            # merged by configure_model, straight into this process's shards
            self._shard_request = request
            # parameters on meta: costs nothing; the writer's body. Kept out of the module tree: Lightning would
            # materialise a meta submodule with to_empty over the whole module, shards included
            object.__setattr__(self, "_template", copy.deepcopy(setup.base))
            self._install(setup.base)
            return

        body = merge_and_bind(self.run, self.merge_method, self.merge_options, setup.task_vectors(),
                              self.task_names, setup.base_state(), lambda tau_m: setup.merged_model(tau_m or {}))
        self._install(body)

    def _shard_merge_request(self) -> Optional[MergeRequest]:
        """The checked request of a merge straight into shards, or ``None`` for the whole-body merge: under
        ``ModelParallelStrategy``, with an adapter that builds a skeleton, a method that merges key by key and weight
        steps that are row-separable. Otherwise the body is merged whole on every process and sharded afterwards
        (with a warning saying why, when sharding)."""
        trainer = self._trainer
        if trainer is None or shard_mesh(getattr(trainer, "strategy", None)) is None:
            return None
        why = None
        if self.adapter is None or type(self.adapter).sharded_setup is ModelAdapter.sharded_setup:
            why = f"the {type(self.adapter).__name__ if self.adapter else 'model'} path has no skeleton to shard"
        elif get_method(self.merge_method).needs_data:
            why = f"{self.merge_method} merges from the calibration samples"
        else:
            options, _ = split_driver_args(self.merge_options)
            try:
                return merge_request(self.merge_method, options, self.calibration, self.sensitive,
                                     caller="the merge into shards", feature=True)
            except ValueError as err:
                why = str(err)
        rank_zero_warn(f"merging the whole model on every process before sharding it: {why}")
        return None

    def _merge_into_shards(self, device: torch.device) -> None:
        """Fill the sharded skeleton with ``theta0 + tau_m`` from the checkpoints and bind the calibration run."""
        setup, request, rec = self.merge_setup, self._shard_request, self.calibration_record
        assert setup is not None and request is not None and self.model is not None
        # from here on, tensors of whole modules are read, merged and freed by the thousand: give them back to the
        # OS as they are freed (glibc would keep them in a fragmenting heap: 4.5 instead of 1.9 model copies)
        release_large_allocations()
        report = merge_into_shards(self.model, setup.base_state(), setup.experts, request, tied=setup.tied,
                                   device=device, **split_driver_args(self.merge_options)[1])
        rec.add_step("merge", report.seconds, method=self.merge_method, options=dict(self.merge_options),
                     into_shards=True, rows_read=report.rows_read)
        rec.expert_norms = _module_means(report.expert_sq)
        rec.deviation_before = relative_deviation(_module_means([report.merged_sq]), rec.expert_norms)
        self.run.bind(self.model, setup.base_state(), setup.task_vectors(), self.task_names,
                      weight_steps_done=report.wsc_scales)
        rec.deviation_after = rec.deviation_after or dict(rec.deviation_before)
        self._shard_request = None

    def _install(self, merged: nn.Module) -> None:
        """Install the merged body (the base, for a data-based merge; the run is bound to it already), its heads and
        task models."""
        setup = self.merge_setup
        assert setup is not None
        self.model = merged
        self.model.requires_grad_(False)
        if setup.heads is not None:
            self.heads = nn.ModuleDict({_safe(t): h for t, h in setup.heads.items()})
            self.heads.requires_grad_(False)
        self._task_models = {t: self._make_task_model(setup, t) for t in self.task_names}

    def uncalibrated(self) -> "MagicModule":
        """A new module with this one's inputs and merge and no calibration (built from the same constructor
        arguments: it loads and merges again), to measure what the calibration changed."""
        return MagicModule(**{**self._init_args, "calibration": "none", "sensitive": None})

    def use_expert(self, task: str) -> None:
        """Make the body expert ``task``'s own weights, theta0 + tau_task (heads unchanged), to evaluate the expert
        through the same test loop; the module must be built."""
        if self.merge_setup is None:
            raise RuntimeError("use_expert needs a built module (call build() first)")
        if task not in self.task_names:
            raise KeyError(f"unknown task {task!r}; tasks: {self.task_names}")
        setup = self.merge_setup
        self._install(setup.merged_model(setup.task_vectors()[self.task_names.index(task)]))

    def with_calibration(self, calibration: Calibration, *,
                         sensitive: Union[str, Sequence[str], None, _Same] = _SAME) -> "MagicModule":
        """A new module holding this module's merge, to be calibrated with another setting; the merge is not repeated.

        For comparing calibration settings on one merge (the benchmark does). This module must not be calibrated yet
        (build it with ``calibration="none"``, or fork before ``trainer.predict``): the copy starts from its current
        weights. ``sensitive``: a given sensitive set for the new setting (default: this module's).
        """
        self.build()
        if self.run.collecting or (self.run.done and self.calibration.space != "none"):
            raise RuntimeError("with_calibration copies the merged weights: call it before this module is calibrated "
                               f"(its setting {self.calibration.to_string()!r} has already run)")
        other = MagicModule(**{**self._init_args, "calibration": calibration,
                               "sensitive": self.sensitive if isinstance(sensitive, _Same) else sensitive})
        setup = self.merge_setup
        assert setup is not None and self.model is not None
        other.merge_setup, other.task_names = setup, list(self.task_names)
        rec, mine = other.calibration_record, self.calibration_record
        rec.task_names, rec.sources = list(mine.task_names), dict(mine.sources)
        rec.config.update(other.describe())
        rec.steps = [dict(step) for step in mine.steps if step["step"] in ("load", "merge")]
        rec.expert_norms, rec.deviation_before = dict(mine.expert_norms), dict(mine.deviation_before)
        body = copy.deepcopy(self.model)
        data_merge = (regmean_merge(self.merge_method, self.merge_options, rec)
                      if get_method(self.merge_method).needs_data else None)
        other.run.bind(body, setup.base_state(), setup.task_vectors(), other.task_names, data_merge=data_merge)
        rec.deviation_after = rec.deviation_after or dict(rec.deviation_before)
        other._install(body)
        return other

    def _make_task_model(self, setup: MergeSetup, task: str) -> nn.Module:
        if setup.adapter is not None:
            return setup.adapter.task_model(setup, self.model, task)
        if setup.heads is None:
            return self.model
        return TaskModel(self.model, setup.heads[task], self.output_key)

    def describe(self) -> dict[str, Any]:
        """This module's merge and calibration settings (for reports)."""
        return {
            "merge_method": self.merge_method,
            "merge_options": self.merge_options,
            "recommended": self.recommendation.describe(self.hparams.get("samples_per_task"))
            if self.recommendation is not None else None,
            "calibration": self.calibration.to_string(),
            "sensitive": self.sensitive,
            "fsc_modules": self.fsc_modules,
            "fsc_per_sample": self.fsc_per_sample,
            "adapter": type(self.adapter).__name__ if self.adapter is not None else None,
            "task_names": self.task_names,
        }

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is not None:
            check_strategy(getattr(trainer, "strategy", None))  # before any checkpoint is read
        if stage == "predict" and self.needs_calibration_data:
            count = count_predict_samples(trainer) if trainer is not None else None
            if count is not None:  # every process the data is split over needs a sample, before any merging work
                check_calibration_size(count, data_parallel_size(trainer))
        self.build()
        self._check_task_names(trainer)
        self._check_labels(trainer)

    def class_counts(self) -> dict[str, Optional[int]]:
        """Classes of each task's head: its ``num_classes``, else the width of its last ``nn.Linear``; ``None`` when
        the head does not say (no heads, or a head without a linear layer)."""
        heads = self.merge_setup.heads if self.merge_setup is not None else None
        out: dict[str, Optional[int]] = {}
        for task in self.task_names:
            head = heads.get(task) if heads is not None else None
            count = getattr(head, "num_classes", None)
            if not isinstance(count, int):
                linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
                count = linears[-1].out_features if linears else None
            out[task] = count
        return out

    def _check_labels(self, trainer: Any) -> None:
        """Labels of the datamodule's test/validation sets against the heads, before anything is calibrated or
        scored (a label outside a head's classes is never predicted: the accuracy would be silently low)."""
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        check = getattr(dm, "check_labels", None)
        if not callable(check):
            self._labels_checked = set()
            return
        counts = self.class_counts()
        check(counts)
        self._labels_checked = {t for t, n in counts.items() if n is not None}

    def _check_task_names(self, trainer: Any) -> None:
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        names = getattr(dm, "task_names", None)
        if names is not None and list(names) != self.task_names:
            raise ValueError(
                f"the data's task order {list(names)} differs from the experts' {self.task_names}: batches are "
                "tagged with the position of their task, which must be the position of its expert"
            )

    @property
    def is_sharded(self) -> bool:
        """Whether the body is sharded over processes (``configure_model`` under ``ModelParallelStrategy``)."""
        return self.model is not None and is_fully_sharded(self.model)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard the merged body with FSDP2, per repeated block and then as a whole,
        over the strategy's ``tensor_parallel`` mesh dimension (:func:`~magic_pl.lightning.sharding.shard_mesh`).
        Any other strategy keeps the whole body. Idempotent (Lightning calls it before every ``predict``/``test``).

        Runs after ``setup``. A skeleton body (``build`` under this strategy, with an adapter that has one) is merged
        here, into this rank's shards; otherwise the merge and the weight steps ran on the whole body in ``setup``.
        The calibration steps still to come must work on shards (FSC does; see
        :meth:`~magic_pl.lightning.pipeline.CalibrationRun.check_shardable`)."""
        trainer = self._trainer
        mesh = shard_mesh(trainer.strategy) if trainer is not None else None
        if mesh is None or self.model is None or self.is_sharded:
            return
        self.run.check_shardable()  # before any weight is sharded
        start = time.perf_counter()
        blocks = shard_model(self.model, mesh)
        local, total = sharded_parameter_numel(self.model)
        self.calibration_record.add_step("shard", time.perf_counter() - start, blocks=blocks,
                                         processes=int(mesh.size()), local_parameters=local,
                                         parameters=total)
        if self._shard_request is not None:
            self._merge_into_shards(trainer.strategy.root_device)

    def on_predict_start(self) -> None:
        if self.model is None:
            return
        self.model.eval()
        if self.run.needs_data:
            setup = self.merge_setup
            assert setup is not None
            trainer = self._trainer
            # default units: the adapter's choice (leaves out tied aliases and modules no task vector covers)
            self.run.begin(self.device, fsc_modules=setup.fsc_modules(self.model),
                           contributes=contributes_statistics(trainer.strategy) if trainer is not None else True)

    def on_predict_end(self) -> None:
        if self.run.collecting:  # predict ended before the epoch end: nothing folded
            self.run.discard()

    def forward(self, *args: Any, task: Union[int, str, None] = None, **kwargs: Any) -> Any:
        """Run the merged model; with ``task`` (index or name) through that task's head, returning logits."""
        if self.model is None:
            raise RuntimeError("MagicModule is not built yet: call build() or run it through a Trainer")
        if task is None:
            return self.model(*args, **kwargs)
        name = self.task_names[task] if isinstance(task, int) else task
        return logits_of(self._task_models[name](*args, **kwargs))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """While calibrating: feed the calibration statistics (returns ``{}``). Otherwise: class predictions."""
        task, args, kwargs, _ = split_inputs(batch)
        if self.run.collecting:
            self.run.update(task, *args, **kwargs)
            return {}  # nothing to return (an empty dict avoids Lightning's "predict returned None" warning)
        return self._predict(task, args, kwargs)

    def on_predict_epoch_end(self) -> None:
        if self.run.collecting:
            self.run.finish(sum_over_processes(self._trainer))  # one sum all-reduce, then the same fold on every rank

    # --- evaluation -------------------------------------------------------------------------------------------------
    def _groups(self, task: Any, args: tuple, kwargs: dict) -> Iterator[tuple[int, Optional[Tensor], tuple, dict]]:
        """``(task, rows, args, kwargs)`` per task present in the batch (``rows`` None: the whole batch)."""
        tasks = task_tensor(task)
        if tasks is None or bool((tasks == tasks[0]).all()):
            yield (int(tasks[0]) if tasks is not None else int(task)), None, args, kwargs
            return
        size = batch_size_of(args, kwargs)
        for t in torch.unique(tasks).tolist():
            rows = (tasks == t).nonzero().reshape(-1)
            a, kw = split_batch(args, kwargs, rows, size)
            yield int(t), rows, a, kw

    def _predict(self, task: Any, args: tuple, kwargs: dict) -> Tensor:
        """Predicted class per sample (per token for causal LMs), rows in batch order."""
        out: Optional[Tensor] = None
        size = batch_size_of(args, kwargs)
        for t, rows, a, kw in self._groups(task, args, kwargs):
            preds = self(*a, task=t, **kw).argmax(-1)
            if rows is None:
                return preds
            if out is None:
                out = preds.new_zeros((size, *preds.shape[1:]))
            out[rows.to(out.device)] = preds
        assert out is not None
        return out

    def _eval_step(self, batch: Any) -> None:
        task, args, kwargs, labels = split_inputs(batch)
        if labels is None:
            raise KeyError(f"evaluation batches need {LABELS_KEY!r}")
        index = batch.get(INDEX_KEY) if isinstance(batch, Mapping) else None
        assert self._test_metric is not None and self._examples is not None
        for t, rows, a, kw in self._groups(task, args, kwargs):
            target = labels if rows is None else labels.index_select(0, rows.to(labels.device))
            logits = self(*a, task=t, **kw)
            if logits.dim() == 3 and target.dim() == 2:  # causal LM: next-token accuracy on labelled positions
                preds, target = logits[:, :-1].argmax(-1), target[:, 1:]
            else:
                if self.task_names[t] not in self._labels_checked:  # the datamodule could not check them up front
                    stage = "validation" if self._trainer is not None and self._trainer.validating else "test"
                    check_label_range(target, logits.shape[-1], f"a {stage} batch of task {self.task_names[t]!r}")
                preds = logits.argmax(-1)
                if index is not None:
                    at = index if rows is None else index.index_select(0, rows.to(index.device))
                    self._examples.update(preds == target.to(preds.device), at, t)
            self._test_metric.update(preds, target, t)

    def _start_eval(self) -> None:
        with torch.inference_mode(False):
            self._test_metric = PerTaskAccuracy(len(self.task_names)).to(self.device)
            self._examples = ExampleCorrectness(len(self.task_names)).to(self.device)

    def _end_eval(self, prefix: str) -> dict[str, float]:
        assert self._test_metric is not None and self._examples is not None
        acc = self._test_metric.per_task()  # one sum all-reduce of correct/total counts
        totals = self._test_metric.total.clone()
        self._test_metric.reset()
        if self._examples.update_count:  # batches carried their positions: keep per-example correctness
            per_task = self._examples.per_task()  # one gather of every process's examples
            self.example_correctness = {n: c for n, c, total in zip(self.task_names, per_task, totals.tolist())
                                        if total > 0}
        self._examples.reset()
        out: dict[str, float] = {}
        seen = []
        for k, name in enumerate(self.task_names):
            if int(totals[k]) > 0:
                out[f"{prefix}/acc/{name}"] = float(acc[k])
                seen.append(k)
        if seen:
            out[f"{prefix}/acc/avg"] = PerTaskAccuracy.average(acc, seen)
        for key, value in out.items():
            # already summed across ranks (identical everywhere): "max" of identical values is exact
            self.log(key, value, sync_dist=True, reduce_fx="max")
        self.calibration_record.metrics.update(out)
        return out

    def on_test_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def on_validation_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    # --- saving -----------------------------------------------------------------------------------------------------
    def save_calibrated(self, path: Optional[Union[str, os.PathLike]], *, overwrite: bool = False
                        ) -> Optional[Path]:
        """Write the calibrated model atomically: the adapter's format (``save_pretrained`` for Hugging Face models,
        timm layout, ...); without an adapter, ``save_pretrained`` if the body has it, else
        ``path/model.safetensors`` plus the heads. ``path`` is replaced only when it is empty, a previous magic-pl
        output, or with ``overwrite``.

        A sharded body (:attr:`is_sharded`) is gathered on global rank 0, which writes it: every rank must call this
        (the gather is collective); the other ranks write nothing, may pass ``path=None`` and get ``None``. A body
        merged into shards is gathered and written one tensor at a time (the adapter's ``save_streamed``); any
        other sharded body is gathered whole first."""
        from magic_pl.lightning.writer import save_module

        if self.model is None or self.merge_setup is None:
            raise RuntimeError("nothing to save: the module is not built")
        body = self.model
        streamed = getattr(self.merge_setup.adapter, "save_streamed", None)
        if self.is_sharded and self._template is not None and streamed is not None:
            # a skeleton-built body: gathered and written tensor by tensor, never whole on any rank
            options = {**self.save_options, **({"overwrite": True} if overwrite else {})}
            return streamed(self.merge_setup, self.model, self._template, path, **options)
        if self.is_sharded:
            state = full_state_dict(self.model)  # collective; {} on every rank but 0
            if not state:
                return None
            # an unsharded copy of the architecture holding the gathered weights, for the adapter's writer
            template = self._template if self._template is not None else self.merge_setup.base
            body = copy.deepcopy(template)
            # a skeleton's meta parameters take the gathered tensors themselves; tied aliases share them again
            body.load_state_dict(state, strict=True, assign=self._template is not None)
            for alias, canonical in self.merge_setup.tied.items():
                owner, _, name = alias.rpartition(".")
                setattr(body.get_submodule(owner), name, body.get_parameter(canonical))
            del state
        if path is None:
            raise ValueError("save_calibrated needs a path (only the ranks other than 0 of a sharded model may omit "
                             "it)")
        if self.merge_setup.adapter is not None:
            validate_state_dict(body.state_dict(), name="the calibrated model")  # no NaN/Inf is ever written
            options = {**self.save_options, **({"overwrite": True} if overwrite else {})}
            return Path(self.merge_setup.save(body, path, **options))
        return save_module(body, path, heads=dict(self.heads.items()) if self.heads is not None else None,
                           overwrite=overwrite)


# --------------------------------------------------------------------------------------------------------------------
def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _safe(name: str) -> str:
    return name.replace(".", "_")


def _sqrt(d: Mapping[str, float]) -> dict[str, float]:
    return {k: v ** 0.5 for k, v in d.items()}


def _module_means(per_task_sq: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """mean_k ||tau_k,l|| per module from per-key squared norms of each task vector."""
    from magic_pl.lightning.report import module_of

    totals: dict[str, float] = {}
    for sq in per_task_sq:
        per_module: dict[str, float] = {}
        for key, v in sq.items():
            per_module[module_of(key)] = per_module.get(module_of(key), 0.0) + v
        for m, v in per_module.items():
            totals[m] = totals.get(m, 0.0) + v ** 0.5
    n = max(len(per_task_sq), 1)
    return {m: v / n for m, v in totals.items()}
