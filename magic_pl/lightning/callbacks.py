"""Lightning callbacks for an existing project: merge + calibrate, write the model, write the report.

Each is self-contained (none calls another; the order in the list does not matter) and works with any
LightningModule; which submodule is the merged body is an argument (``backbone="backbone"``, ``""`` for the whole
module), and base / expert weights come from checkpoint paths keyed like that submodule (a prefix such as
``"backbone."`` or ``"model."`` is found automatically)::

    trainer = Trainer(callbacks=[
        MagicCalibration(experts=["a.safetensors", "b.safetensors"], base="base.safetensors", calibration="auto"),
        CalibratedModelWriter("out/model"),
        CalibrationReport("out"),
    ])
    trainer.predict(my_module, datamodule=my_data, return_predictions=False)

:class:`MagicCalibration` merges in ``setup`` and applies the calibration setting with the very same
:class:`~magic_pl.lightning.pipeline.CalibrationRun` that :class:`~magic_pl.lightning.module.MagicModule` uses: its
statistics component is fed from a forward pre-hook on the backbone while the module's own ``predict_step`` runs, the
sums are reduced across ranks once at the end of the predict epoch, and every rank folds the same coefficients.
Files are written by rank 0 only.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from magic_pl.calibration import resolve_setting
from magic_pl.lightning.data import TASK_KEY, check_calibration_size, count_predict_samples
from magic_pl.lightning.module import Calibration, merge_and_bind
from magic_pl.lightning.pipeline import CalibrationRun, sum_over_processes
from magic_pl.lightning.report import CalibrationRecord, write_report
from magic_pl.lightning.writer import save_module
from magic_pl.merging import validate_merge_options
from magic_pl.models.base import LazyTaskVector, body_view, check_experts, default_task_names, find_tied_keys
from magic_pl.recommended import fill_recipe
from magic_pl.statedict import apply_delta, load_state_dict

__all__ = [
    "MagicCalibration",
    "CalibratedModelWriter",
    "CalibrationReport",
    "WeightSources",
    "record_of",
]

Source = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module]


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------
def record_of(pl_module: Optional[LightningModule]) -> Optional[CalibrationRecord]:
    """The record calibration steps write into: ``pl_module.calibration_record`` (a ``MagicModule``'s own, or the one
    :class:`MagicCalibration` attaches to a foreign module), else ``None``."""
    rec = getattr(pl_module, "calibration_record", None)
    return rec if isinstance(rec, CalibrationRecord) else None


def get_backbone(pl_module: nn.Module, path: str) -> nn.Module:
    """The submodule at attribute path ``path`` (``""``: the module itself), with a clear error."""
    _ensure_built(pl_module)
    if not path:
        return pl_module
    try:
        return pl_module.get_submodule(path)
    except AttributeError:
        children = [n for n, _ in pl_module.named_children()]
        raise AttributeError(
            f"{type(pl_module).__name__} has no submodule {path!r} (its children: {children}); set backbone= to the "
            "attribute path of the merged body"
        ) from None


def _ensure_built(pl_module: nn.Module) -> None:
    from magic_pl.lightning.module import MagicModule

    if isinstance(pl_module, MagicModule):
        pl_module.build()


class WeightSources:
    """Base and expert weights for one backbone: state dicts keyed like ``backbone.state_dict()``, lazy when the
    files are safetensors.

    Args:
        backbone: the module that is merged / calibrated.
        experts: one checkpoint per task (path, state dict or module).
        base: the base checkpoint; ``None`` snapshots the backbone's current weights as the base.
        key_prefix: prefix to strip from the experts' keys, and from the base's unless ``base_key_prefix`` is given
            (``None``: found automatically, see :func:`_weights_view`).
        base_key_prefix: prefix to strip from the base's keys (default: ``key_prefix``).
        backbone_path: the backbone's attribute path (a prefix guess for full-module checkpoints).
        trust_pickle: allow full pickle for torch checkpoint files (default ``False``).
    """

    def __init__(self, backbone: nn.Module, experts: Sequence[Source], base: Optional[Source] = None, *,
                 key_prefix: Optional[str] = None, base_key_prefix: Optional[str] = None, backbone_path: str = "",
                 trust_pickle: bool = False,
                 task_names: Optional[Sequence[str]] = None) -> None:
        if not experts:
            raise ValueError("need at least one expert checkpoint")
        # checked (file-safe names, pairing) before any checkpoint is read
        self.task_names = (default_task_names(experts, task_names) if task_names is not None
                           else [f"task{i}" for i in range(len(experts))])
        state = backbone.state_dict()
        self.tied = find_tied_keys(backbone)
        keys = [k for k in state if k not in self.tied]
        if base is None:
            self.base_state: Mapping[str, Tensor] = {k: state[k].detach().cpu().clone() for k in keys}
        else:
            base_prefix = base_key_prefix if base_key_prefix is not None else key_prefix
            self.base_state = body_view(load_state_dict(base, trust_pickle=trust_pickle), keys, base_prefix,
                                            f"base {_name(base)}", backbone_path)
        self.experts = [
            body_view(load_state_dict(e, trust_pickle=trust_pickle), keys, key_prefix, f"expert {_name(e)}",
                          backbone_path)
            for e in experts
        ]
        check_experts(self.base_state, self.experts, [f"expert {_name(e)}" for e in experts])
        self.base_source = base if base is not None else "<backbone weights at setup>"
        self.expert_sources = list(experts)

    def task_vectors(self, device: Optional[torch.device] = None) -> list[LazyTaskVector]:
        return [LazyTaskVector(e, self.base_state, device=device, name=f"expert {n!r}")
                for e, n in zip(self.experts, self.task_names)]

    @torch.no_grad()
    def load_into(self, backbone: nn.Module, tau: Mapping[str, Tensor], keys: Optional[Sequence[str]] = None) -> None:
        """Set ``backbone`` to ``base + tau`` for ``keys`` (default: every key of ``tau``), in each tensor's dtype."""
        state = backbone.state_dict()
        with torch.inference_mode(False):
            for key in (keys if keys is not None else list(tau.keys())):
                target = state[key]
                target.copy_(apply_delta(self.base_state[key].to(target.device), tau[key], key=key,
                                         out_dtype=target.dtype))


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


class MagicCalibration(Callback):
    """Merge experts into an existing LightningModule's backbone and calibrate it with MAGIC.

    In ``setup`` (every stage, once, on every rank, deterministic): load the base and expert weights, merge
    (:func:`magic_pl.merging.merge`) into the backbone and apply the setting's data-free step (WSC for
    ``wsc``/``dsc``). During ``trainer.predict`` on unlabelled, task-tagged batches (settings that use data): the
    module's own ``predict_step`` runs, a forward pre-hook on the backbone feeds the shared
    :class:`~magic_pl.lightning.pipeline.CalibrationRun`, and at the end of the predict epoch every rank folds the same
    coefficients. The record of the steps is attached to the module as ``calibration_record`` (for
    :class:`CalibrationReport`).

    The task of a batch is ``task_fn(batch, dataloader_idx)`` if given, else ``batch[task_key]`` for dict batches,
    else the dataloader index (one predict dataloader per task, in expert order).

    Args:
        experts: one fine-tuned checkpoint per task (path, state dict or module), keyed like the backbone (a
            ``"backbone."``-style prefix and extra keys such as classifier heads are handled).
        base: the pretrained checkpoint; default ``None``: the backbone's weights at setup are the base.
        merge_method: a registered merge method (:data:`magic_pl.merging.METHODS`; default ``None``: the
            recommended recipe's, as in :class:`~magic_pl.lightning.module.MagicModule`); a data-based one
            (``"regmean"``, ``"regmean_plusplus"``) merges the backbone at the end of predict from the calibration
            batches, then calibrates it on them. The names ``MagicModule`` uses.
        merge_options: the method's options, plus ``bn_stats`` / ``seed`` (default none).
        calibration: the calibration setting (a preset such as ``"dsc"`` or ``"auto"``, a ``"space:key=value"``
            string or a dict; default ``None``: the recommended recipe's), as in
            :class:`~magic_pl.lightning.module.MagicModule`.
        samples_per_task: the budget the recommended recipe is chosen for (unlabelled samples per task your predict
            loop gives; default 1); unused when ``merge_method`` and ``calibration`` are both named.
        sensitive: a given sensitive set (names or a ranking JSON); default none.
        backbone: attribute path of the merged body in the LightningModule (default ``"backbone"``; ``""``: all).
        modules: explicit FSC module names (default: automatic).
        per_sample: feed FSC one sample at a time (default ``True``; independent of the process count).
        task_key: batch key of the task index (default ``"task"``).
        task_fn: ``(batch, dataloader_idx) -> int or LongTensor[B]`` overriding the rules above.
        key_prefix: prefix to strip from the experts' checkpoint keys, and from the base's unless ``base_key_prefix``
            is given (default ``None``: found automatically: the backbone's attribute path or the checkpoint's own
            prefix, e.g. ``bert.`` in a ``BertForSequenceClassification`` expert of a ``BertModel`` backbone; keys
            outside it, such as a classifier head, are left out).
        base_key_prefix: prefix to strip from the base's keys (default: ``key_prefix``, or found automatically).
        task_names: names of the experts' tasks (for reports and errors).
        trust_pickle: allow full pickle for torch checkpoint files (default ``False``).
        method, options: deprecated spellings of ``merge_method`` / ``merge_options`` (a ``DeprecationWarning``).
    """

    def __init__(self, experts: Sequence[Source], base: Optional[Source] = None,
                 merge_method: Optional[str] = None, merge_options: Optional[dict[str, Any]] = None,
                 calibration: Optional[Calibration] = None, samples_per_task: Optional[int] = 1,
                 sensitive: Optional[Union[str, Sequence[str]]] = None, backbone: str = "backbone",
                 modules: Optional[Sequence[str]] = None, per_sample: bool = True, task_key: str = TASK_KEY,
                 task_fn: Optional[Callable[[Any, int], Any]] = None, key_prefix: Optional[str] = None,
                 base_key_prefix: Optional[str] = None,
                 task_names: Optional[Sequence[str]] = None, trust_pickle: bool = False,
                 method: Optional[str] = None, options: Optional[dict[str, Any]] = None) -> None:
        if method is not None or options is not None:
            warnings.warn("MagicCalibration(method=, options=) are deprecated; use merge_method=, merge_options=",
                          DeprecationWarning, stacklevel=2)
            merge_method = method if method is not None else merge_method
            merge_options = options if options is not None else merge_options
        if not experts:
            raise ValueError("MagicCalibration needs at least one expert checkpoint")
        merge_method, calibration, self.recommendation = fill_recipe(merge_method, calibration, samples_per_task)
        setting = resolve_setting(calibration)  # options checked before any checkpoint is read
        validate_merge_options(merge_method, dict(merge_options or {}))
        self.experts = list(experts)
        self.base = base
        self.merge_method = merge_method
        self.merge_options = dict(merge_options or {})
        self.backbone = backbone
        self.task_key = task_key
        self.task_fn = task_fn
        self.key_prefix, self.base_key_prefix = key_prefix, base_key_prefix
        # checked at construction, before the Trainer starts or any checkpoint is read
        self.task_names = default_task_names(self.experts, task_names) if task_names is not None else None
        self.trust_pickle = trust_pickle
        self.run = CalibrationRun(setting, sensitive=sensitive, modules=modules, per_sample=per_sample)
        self.sources: Optional[WeightSources] = None

    @property
    def record(self) -> CalibrationRecord:
        return self.run.record

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and self.run.needs_data:
            count = count_predict_samples(trainer)
            if count is not None:
                check_calibration_size(count, trainer.world_size)  # before any merging work
        if getattr(pl_module, "calibration_record", None) is None:
            pl_module.calibration_record = self.record
        if self.sources is None:
            self._merge(pl_module)

    def _merge(self, pl_module: LightningModule) -> None:
        start = time.perf_counter()
        body = get_backbone(pl_module, self.backbone)
        self.sources = sources = WeightSources(body, self.experts, self.base, key_prefix=self.key_prefix,
                                               base_key_prefix=self.base_key_prefix,
                                               backbone_path=self.backbone, trust_pickle=self.trust_pickle,
                                               task_names=self.task_names)
        rec = self.record
        rec.sources = {"base": sources.base_source, "experts": sources.expert_sources}
        rec.task_names = list(sources.task_names)
        rec.config.update({"merge_method": self.merge_method, "merge_options": self.merge_options,
                           "backbone": self.backbone})
        rec.add_step("load", time.perf_counter() - start, tasks=len(sources.task_names))

        def load(tau_m: Optional[Mapping[str, Tensor]]) -> nn.Module:
            if tau_m is not None:
                sources.load_into(body, tau_m)
            return body

        merge_and_bind(self.run, self.merge_method, self.merge_options, sources.task_vectors(), sources.task_names,
                       sources.base_state, load)

    # --- predict: the statistics -------------------------------------------------------------------------------------
    def _batch_task(self, batch: Any, dataloader_idx: int) -> Any:
        if self.task_fn is not None:
            return self.task_fn(batch, dataloader_idx)
        if isinstance(batch, Mapping) and self.task_key in batch:
            return batch[self.task_key]
        return dataloader_idx

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.run.needs_data:
            return
        assert self.sources is not None
        body = get_backbone(pl_module, self.backbone)
        self.run.begin(trainer.strategy.root_device, fsc_modules=_fsc_units(body, self.sources))
        self.run.attach(body)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if self.run.collecting:
            self.run.set_task(self._batch_task(batch, dataloader_idx))

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.run.set_task(None)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.run.collecting:
            return
        result = self.run.finish(sum_over_processes(trainer))  # one sum all-reduce; every rank folds the same xi
        rank_zero_info(f"MAGIC {result.setting}: folded {len(result.folded)} module(s), wrapped {len(result.wrapped)}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and self.run.collecting:  # predict ended without finishing: discard
            self.run.discard()


def _fsc_units(body: nn.Module, sources: WeightSources) -> Optional[list[str]]:
    """Automatic FSC units restricted to those whose tensors are all in the base weights (no tied aliases)."""
    from magic_pl.calibration.modules import find_units

    units = find_units(body)
    keys = sources.base_state.keys()
    names = [u.name for u in units if all(k in keys and k not in sources.tied for k in u.keys)]
    return None if len(names) == len(units) else names


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------
class CalibratedModelWriter(Callback):
    """Save the calibrated model atomically on rank 0 (temporary directory, then rename).

    Writes at the end of ``trainer.predict`` (after FSC folded) and, if nothing was written yet, at the start of
    ``trainer.test`` (covers merge/WSC-only pipelines). A crash before that writes nothing; a crash while writing
    leaves no partial directory.

    Format: a :class:`~magic_pl.lightning.module.MagicModule` saves through its adapter (``save_pretrained`` for
    Hugging Face models, timm layout, ...). Otherwise the ``backbone`` submodule is saved with ``save_pretrained`` if
    it is a Hugging Face model, else as ``<dirpath>/model.safetensors``.

    Args:
        dirpath: output directory. It is checked in ``setup``, before any weight is read: an existing directory is
            replaced only when it is empty or a previous magic-pl output (unless ``overwrite``), and only once the
            new one is complete (:class:`magic_pl.output.OutputLocation`).
        backbone: attribute path of the body to save for non-MagicModule modules (default ``"backbone"``).
        on_test_start: also write at the start of test if nothing was written yet (default ``True``).
        overwrite: replace ``dirpath`` even if magic-pl did not write it (default ``False``).
        support_from: for a backbone saved directly, the model directory whose tokenizer / processor files are copied
            in (e.g. the base's ``save_pretrained`` folder); default none. Adapters copy their own.
    """

    def __init__(self, dirpath: Union[str, os.PathLike], backbone: str = "backbone", on_test_start: bool = True,
                 overwrite: bool = False, support_from: Optional[Union[str, os.PathLike]] = None) -> None:
        self.dirpath = Path(dirpath)
        self.support_from = support_from
        self.backbone = backbone
        self.write_on_test_start = on_test_start
        self.overwrite = overwrite
        self.written: Optional[Path] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            from magic_pl.lightning.trainer import input_paths
            from magic_pl.output import OutputLocation

            OutputLocation(self.dirpath, overwrite=self.overwrite, inputs=input_paths(pl_module)).check()

    def write(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Write now (rank 0), then wait for all ranks."""
        start = time.perf_counter()
        if trainer.is_global_zero:
            if callable(getattr(pl_module, "save_calibrated", None)):
                pl_module.save_calibrated(self.dirpath, overwrite=self.overwrite)
            else:
                save_module(get_backbone(pl_module, self.backbone), self.dirpath, overwrite=self.overwrite,
                            support_from=self.support_from)
        trainer.strategy.barrier("magic_pl_writer")
        self.written = self.dirpath
        rec = record_of(pl_module)
        if rec is not None:
            rec.outputs["model"] = str(self.dirpath.resolve())
            rec.add_step("write", time.perf_counter() - start)
        return self.dirpath

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.write_on_test_start and self.written is None:
            with torch.inference_mode(False):
                self.write(trainer, pl_module)


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
class CalibrationReport(Callback):
    """Write ``calibration_report.json`` and ``calibration_report.png`` (rank 0) after calibration and after test.

    The JSON holds xi per module, the magnitude deviation per module before and after calibration
    (``||theta - theta0|| / mean_k ||tau_k||``), folded / wrapped modules, the inputs (paths and sha256 of their
    contents), the configuration, timings and test metrics; the PNG plots xi and the deviations per module.

    Args:
        dirpath: output directory (default: the trainer's log directory, else its ``default_root_dir``).
        filename: JSON file name (default ``"calibration_report.json"``; the plot replaces ``.json`` by ``.png``).
        plot: write the PNG (default ``True``).
        hash_inputs: sha256 of the input checkpoints (default ``True``; reads every input file once).
        config: extra configuration to store (e.g. the CLI config); default none.
    """

    def __init__(self, dirpath: Optional[Union[str, os.PathLike]] = None,
                 filename: str = "calibration_report.json", plot: bool = True, hash_inputs: bool = True,
                 config: Optional[dict[str, Any]] = None) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.plot = plot
        self.hash_inputs = hash_inputs
        self.config = dict(config or {})
        self.calibration_record = CalibrationRecord()
        self.path: Optional[Path] = None
        self._start = time.perf_counter()

    def _dir(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir)

    def write(self, trainer: Trainer, pl_module: LightningModule) -> Optional[Path]:
        """Write the JSON (and PNG) now on rank 0; returns the JSON path there."""
        rec = record_of(pl_module) or self.calibration_record
        if not trainer.is_global_zero:
            return None
        self.path = write_report(rec, trainer, self._dir(trainer) / self.filename, hash_inputs=self.hash_inputs,
                                 plot=self.plot, config=self.config,
                                 timings={"wall_since_report_created": round(time.perf_counter() - self._start, 3)})
        return self.path

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rec = record_of(pl_module) or self.calibration_record
        for k, v in trainer.callback_metrics.items():
            if k.startswith("test/"):
                rec.metrics.setdefault(k, float(v))  # keep the module's float64 values where it recorded them
        self.write(trainer, pl_module)
