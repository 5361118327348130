"""Lightning callbacks: merging, WSC, FSC, writing and reporting, each usable on its own in an existing project.

Add them to any ``Trainer``; which submodule of the LightningModule is the merged body is an argument
(``backbone="backbone"``, ``""`` for the whole module), and base / expert weights come from checkpoint paths keyed
like that submodule (a prefix such as ``"backbone."`` or ``"model."`` is found automatically)::

    trainer = Trainer(callbacks=[
        MergeExperts(experts=["a.safetensors", "b.safetensors"], method="task_arithmetic"),
        WeightSpaceCalibration(),           # base / experts taken from MergeExperts
        FeatureSpaceCalibration(),          # statistics during trainer.predict, folded at its end
        CalibratedModelWriter("out/model"),
        CalibrationReport("out"),
    ])
    trainer.predict(my_module, datamodule=my_data, return_predictions=False)

The order in the list does not matter: WSC and FSC first run the merge (and FSC the WSC) they depend on. Merging and
WSC are deterministic and run on every rank; FSC statistics are summed across ranks once at the end of the predict
epoch, then every rank folds the same coefficients; files are written by rank 0 only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from magic_pl.calibration import FeatureSpaceCalibrator, weight_space_calibration
from magic_pl.calibration.taskvectors import LazyTaskVector as DiffView
from magic_pl.lightning.data import TASK_KEY, check_calibration_size, count_predict_samples
from magic_pl.lightning.report import (
    CalibrationRecord,
    delta_norms,
    expert_norms,
    plot_record,
    relative_deviation,
    write_json,
)
from magic_pl.lightning.statistics import FeatureStatisticsCollector
from magic_pl.lightning.writer import save_module
from magic_pl.merging import merge
from magic_pl.models.base import KeyView, LazyTaskVector, PrefixView, check_experts, find_tied_keys
from magic_pl.statedict import CheckpointError, load_state_dict

__all__ = [
    "MergeExperts",
    "WeightSpaceCalibration",
    "FeatureSpaceCalibration",
    "CalibratedModelWriter",
    "CalibrationReport",
    "WeightSources",
    "record_of",
]

Source = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module]
_PREFIX_GUESSES = ("model.", "module.", "backbone.", "_orig_mod.", "state_dict.")


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------
def record_of(trainer: Optional[Trainer], pl_module: Optional[LightningModule]) -> Optional[CalibrationRecord]:
    """The record calibration steps write into: the module's own (``MagicModule``), else a
    :class:`CalibrationReport` callback's, else ``None``."""
    rec = getattr(pl_module, "calibration_record", None)
    if isinstance(rec, CalibrationRecord):
        return rec
    for cb in getattr(trainer, "callbacks", None) or []:
        rec = getattr(cb, "calibration_record", None)
        if isinstance(rec, CalibrationRecord):
            return rec
    return None


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


def _weights_view(sd: Mapping[str, Tensor], keys: Sequence[str], prefix: Optional[str], what: str,
                  backbone_path: str) -> Mapping[str, Tensor]:
    """``sd`` restricted to ``keys`` after removing ``prefix`` (``None``: found automatically)."""
    wanted = set(keys)
    candidates = [prefix] if prefix is not None else ["", f"{backbone_path}." if backbone_path else "", *_PREFIX_GUESSES]
    best, best_hits = None, -1
    for cand in dict.fromkeys(candidates):
        view = PrefixView(sd, cand) if cand else sd
        hits = sum(1 for k in view.keys() if k in wanted)
        if hits > best_hits:
            best, best_hits = view, hits
        if hits == len(wanted):
            break
    assert best is not None
    present = [k for k in keys if k in best]
    missing = [k for k in keys if k not in best]
    if missing:
        hint = f" with key_prefix={prefix!r}" if prefix is not None else " (tried prefixes '', " + ", ".join(
            repr(c) for c in candidates if c) + ")"
        raise CheckpointError(f"{what} lacks {len(missing)} key(s) of the backbone{hint}, e.g. {missing[:5]}")
    return KeyView(best, present)


class WeightSources:
    """Base and expert weights for one backbone: state dicts keyed like ``backbone.state_dict()``, lazy when the
    files are safetensors.

    Args:
        backbone: the module that is merged / calibrated.
        experts: one checkpoint per task (path, state dict or module).
        base: the base checkpoint; ``None`` snapshots the backbone's current weights as the base.
        key_prefix: prefix to strip from checkpoint keys (``None``: tried automatically).
        backbone_path: the backbone's attribute path (a prefix guess for full-module checkpoints).
        trust_pickle: allow full pickle for torch checkpoint files (default ``False``).
    """

    def __init__(self, backbone: nn.Module, experts: Sequence[Source], base: Optional[Source] = None, *,
                 key_prefix: Optional[str] = None, backbone_path: str = "", trust_pickle: bool = False,
                 task_names: Optional[Sequence[str]] = None) -> None:
        if not experts:
            raise ValueError("need at least one expert checkpoint")
        state = backbone.state_dict()
        self.tied = find_tied_keys(backbone)
        keys = [k for k in state if k not in self.tied]
        if base is None:
            self.base_state: Mapping[str, Tensor] = {k: state[k].detach().cpu().clone() for k in keys}
        else:
            self.base_state = _weights_view(load_state_dict(base, trust_pickle=trust_pickle), keys, key_prefix,
                                            f"base {_name(base)}", backbone_path)
        self.experts = [
            _weights_view(load_state_dict(e, trust_pickle=trust_pickle), keys, key_prefix, f"expert {_name(e)}",
                          backbone_path)
            for e in experts
        ]
        self.task_names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(experts))]
        if len(self.task_names) != len(self.experts):
            raise ValueError(f"{len(self.task_names)} task names for {len(self.experts)} experts")
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
                new = self.base_state[key].to(target.device, torch.float32) + tau[key].to(target.device, torch.float32)
                target.copy_(new.to(target.dtype))


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _find(trainer: Trainer, cls: type, backbone: str) -> Optional[Any]:
    for cb in trainer.callbacks:
        if isinstance(cb, cls) and getattr(cb, "backbone", None) == backbone:
            return cb
    return None


class _SourcesMixin:
    """Resolves base/expert weights: its own arguments, else those of a :class:`MergeExperts` on the same backbone."""

    backbone: str
    experts: Optional[list[Source]]
    base: Optional[Source]
    key_prefix: Optional[str]
    trust_pickle: bool
    sources: Optional[WeightSources] = None

    def _sources(self, trainer: Trainer, pl_module: LightningModule) -> WeightSources:
        if self.sources is not None:
            return self.sources
        merger = _find(trainer, MergeExperts, self.backbone)
        if self.experts is None:
            if merger is None:
                raise ValueError(
                    f"{type(self).__name__}: give experts= (and base=) or add a MergeExperts callback for backbone "
                    f"{self.backbone!r}"
                )
            merger.merge_now(trainer, pl_module)
            self.sources = merger.sources
        else:
            if self.base is None:
                raise ValueError(f"{type(self).__name__}: base= is needed with experts= (the pretrained weights)")
            self.sources = WeightSources(get_backbone(pl_module, self.backbone), self.experts, self.base,
                                         key_prefix=self.key_prefix, backbone_path=self.backbone,
                                         trust_pickle=self.trust_pickle)
        assert self.sources is not None
        return self.sources


def _ensure_reference(rec: Optional[CalibrationRecord], sources: WeightSources, backbone: nn.Module) -> None:
    """Fill the record's expert norms and 'before' deviation (from the current weights) if no step did yet."""
    if rec is None:
        return
    if not rec.sources:
        rec.sources = {"base": sources.base_source, "experts": sources.expert_sources}
    if not rec.expert_norms:
        rec.expert_norms = expert_norms(sources.task_vectors())
    if not rec.deviation_before:
        current = {k: v for k, v in backbone.state_dict().items() if k in sources.base_state}
        rec.deviation_before = relative_deviation(delta_norms(current, sources.base_state), rec.expert_norms)


def _update_after(rec: Optional[CalibrationRecord], sources: WeightSources, backbone: nn.Module) -> None:
    if rec is None or not rec.expert_norms:
        return
    current = {k: v for k, v in backbone.state_dict().items() if k in sources.base_state}
    rec.deviation_after = relative_deviation(delta_norms(current, sources.base_state), rec.expert_norms)


# --------------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------------
class MergeExperts(_SourcesMixin, Callback):
    """Merge expert checkpoints into the module's backbone in ``setup`` (once, on every rank, deterministic).

    Args:
        experts: one fine-tuned checkpoint per task, keyed like the backbone (a ``"backbone."``-style prefix and
            extra keys such as classifier heads are handled).
        base: the pretrained checkpoint; default ``None``: the backbone's weights at setup are the base.
        method: a :data:`magic_pl.merging.MERGE_METHODS` name (default ``"task_arithmetic"``).
        options: the method's options, plus ``bn_stats`` / ``seed`` (default none).
        backbone: attribute path of the merged body in the LightningModule (default ``"backbone"``; ``""``: all).
        key_prefix: prefix to strip from checkpoint keys (default ``None``: found automatically).
        task_names: names of the experts' tasks (for reports).
        trust_pickle: allow full pickle for torch checkpoint files (default ``False``).
    """

    def __init__(self, experts: Sequence[Source], base: Optional[Source] = None, method: str = "task_arithmetic",
                 options: Optional[dict[str, Any]] = None, backbone: str = "backbone",
                 key_prefix: Optional[str] = None, task_names: Optional[Sequence[str]] = None,
                 trust_pickle: bool = False) -> None:
        if not experts:
            raise ValueError("MergeExperts needs at least one expert checkpoint")
        self.experts = list(experts)
        self.base = base
        self.method = method
        self.options = dict(options or {})
        self.backbone = backbone
        self.key_prefix = key_prefix
        self.task_names = list(task_names) if task_names is not None else None
        self.trust_pickle = trust_pickle
        self.sources: Optional[WeightSources] = None
        self.merged = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_before_work(trainer, stage)
        self.merge_now(trainer, pl_module)

    def merge_now(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Merge now unless already done (idempotent)."""
        if self.merged:
            return
        start = time.perf_counter()
        body = get_backbone(pl_module, self.backbone)
        self.sources = WeightSources(body, self.experts, self.base, key_prefix=self.key_prefix,
                                     backbone_path=self.backbone, trust_pickle=self.trust_pickle,
                                     task_names=self.task_names)
        from magic_pl.lightning.module import NormRecorder

        taus = [NormRecorder(tv) for tv in self.sources.task_vectors()]
        tau_m = merge(self.method, taus, **self.options)
        self.sources.load_into(body, tau_m)
        rec = record_of(trainer, pl_module)
        if rec is not None:
            from magic_pl.lightning.module import _module_means

            rec.sources = {"base": self.sources.base_source, "experts": self.sources.expert_sources}
            rec.task_names = rec.task_names or list(self.sources.task_names)
            rec.config.setdefault("merge_method", self.method)
            rec.config.setdefault("merge_options", self.options)
            rec.expert_norms = _module_means([t.sq_norms for t in taus])
            rec.deviation_before = relative_deviation(delta_norms(_float_items(body, self.sources), self.sources.base_state),
                                                      rec.expert_norms)
            rec.deviation_after = dict(rec.deviation_before)
            rec.add_step("merge", time.perf_counter() - start, method=self.method, options=self.options)
        del tau_m
        self.merged = True


def _float_items(body: nn.Module, sources: WeightSources) -> dict[str, Tensor]:
    return {k: v for k, v in body.state_dict().items() if k in sources.base_state and v.dtype.is_floating_point}


# --------------------------------------------------------------------------------------------------------------------
# WSC
# --------------------------------------------------------------------------------------------------------------------
class WeightSpaceCalibration(_SourcesMixin, Callback):
    """Weight space calibration (data-free), applied once in ``setup`` before FSC or evaluation (DESIGN.md 2.2).

    Args:
        backbone: attribute path of the merged body (default ``"backbone"``; ``""``: the whole module).
        base, experts: pretrained and fine-tuned checkpoints keyed like the backbone; default ``None``: taken from a
            :class:`MergeExperts` callback on the same backbone (which then runs first).
        sensitive: magnitude-sensitive tensors (names) or a ranking JSON path; ``None`` (default): ungated.
        include, exclude, eps, variant: :func:`magic_pl.calibration.weight_space_calibration` options (defaults:
            all eligible 2-D weights, ``DEFAULT_WSC_EXCLUDE``, 1e-8, ``"paper"``).
        key_prefix, trust_pickle: as in :class:`MergeExperts`.
    """

    def __init__(self, backbone: str = "backbone", base: Optional[Source] = None,
                 experts: Optional[Sequence[Source]] = None, sensitive: Optional[Union[str, Sequence[str]]] = None,
                 include: Optional[Union[str, Sequence[str]]] = None,
                 exclude: Optional[Union[str, Sequence[str]]] = None, eps: float = 1e-8, variant: str = "paper",
                 key_prefix: Optional[str] = None, trust_pickle: bool = False) -> None:
        from magic_pl.calibration import DEFAULT_WSC_EXCLUDE
        from magic_pl.lightning.module import resolve_sensitive

        self.backbone = backbone
        self.base = base
        self.experts = list(experts) if experts is not None else None
        self.sensitive = resolve_sensitive(sensitive)
        self.options = {"include": include, "exclude": DEFAULT_WSC_EXCLUDE if exclude is None else exclude,
                        "eps": eps, "variant": variant}
        self.key_prefix = key_prefix
        self.trust_pickle = trust_pickle
        self.sources = None
        self.applied = False
        self.scales: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_before_work(trainer, stage)
        self.apply_now(trainer, pl_module)

    def apply_now(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Apply WSC now unless already done (idempotent)."""
        if self.applied:
            return
        sources = self._sources(trainer, pl_module)
        body = get_backbone(pl_module, self.backbone)
        rec = record_of(trainer, pl_module)
        _ensure_reference(rec, sources, body)
        start = time.perf_counter()
        current = {k: v.detach() for k, v in body.state_dict().items() if k in sources.base_state}
        merged_tv = DiffView(current, sources.base_state)  # tau_m = current - base, computed per key
        taus = sources.task_vectors()
        calibrated, scales = weight_space_calibration(merged_tv, taus, self.sensitive, return_scales=True,
                                                      **self.options)
        sources.load_into(body, calibrated, keys=list(scales))
        self.scales = {k: float(v.mean()) for k, v in scales.items()}
        if rec is not None:
            rec.wsc_scales = dict(self.scales)
            rec.config.setdefault("wsc", {"sensitive": self.sensitive, **{k: v for k, v in self.options.items()}})
            rec.add_step("wsc", time.perf_counter() - start, tensors=len(scales), gated=self.sensitive is not None)
            _update_after(rec, sources, body)
        self.applied = True


# --------------------------------------------------------------------------------------------------------------------
# FSC
# --------------------------------------------------------------------------------------------------------------------
class FeatureSpaceCalibration(_SourcesMixin, Callback):
    """Feature space calibration of an existing LightningModule's backbone during ``trainer.predict``.

    While the module's own ``predict_step`` runs on unlabelled calibration batches, a forward pre-hook on the
    backbone passes each call's inputs to the FSC calibration core with the batch's task. At the end of the predict
    epoch the statistics are summed across processes once and every rank folds the same xi into the backbone.

    The task of a batch is ``task_fn(batch, dataloader_idx)`` if given, else ``batch[task_key]`` for dict batches,
    else the dataloader index (one predict dataloader per task, in expert order).

    Args:
        backbone: attribute path of the merged body (default ``"backbone"``; ``""``: the whole module).
        base, experts: checkpoints keyed like the backbone; default: from a :class:`MergeExperts` callback.
        norm: feature norm p, 1 (paper default), 2 or ``"inf"``.
        mode: ``"parallel"`` (paper, default) or ``"sequential"``.
        sensitive: magnitude-sensitive modules (names) or a ranking JSON path: xi capped at 1 (default none).
        modules: explicit module names to calibrate (default: automatic).
        statistic, granularity, gate: FSC variants beyond the paper (:class:`FeatureSpaceCalibrator`; defaults are
            the paper's).
        per_sample: feed samples one at a time (default ``True``; makes results independent of the process count).
        task_key: batch key of the task index (default ``"task"``).
        task_fn: ``(batch, dataloader_idx) -> int or LongTensor[B]`` overriding the rules above.
        key_prefix, trust_pickle: as in :class:`MergeExperts`.
    """

    def __init__(self, backbone: str = "backbone", base: Optional[Source] = None,
                 experts: Optional[Sequence[Source]] = None, norm: Union[int, float, str] = 1,
                 mode: Literal["parallel", "sequential"] = "parallel",
                 sensitive: Optional[Union[str, Sequence[str]]] = None, modules: Optional[Sequence[str]] = None,
                 statistic: Literal["mean_of_ratios", "ratio_of_means"] = "mean_of_ratios",
                 granularity: Literal["module", "channel"] = "module", gate: Literal["none", "paper"] = "none",
                 per_sample: bool = True, task_key: str = TASK_KEY,
                 task_fn: Optional[Callable[[Any, int], Any]] = None, key_prefix: Optional[str] = None,
                 trust_pickle: bool = False) -> None:
        from magic_pl.lightning.module import resolve_sensitive

        self.backbone = backbone
        self.base = base
        self.experts = list(experts) if experts is not None else None
        self.norm = norm
        self.mode = mode
        self.sensitive = resolve_sensitive(sensitive)
        self.modules = list(modules) if modules is not None else None
        self.variant = {"statistic": statistic, "granularity": granularity, "gate": gate}
        self.per_sample = per_sample
        self.task_key = task_key
        self.task_fn = task_fn
        self.key_prefix = key_prefix
        self.trust_pickle = trust_pickle
        self.sources = None
        self.collector: Optional[FeatureStatisticsCollector] = None
        self.report: Any = None
        self.done = False
        self._task: Any = None
        self._handle: Any = None
        self._busy = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict" or self.done:
            return
        check_before_work(trainer, stage)
        from magic_pl.lightning.module import MagicModule

        if isinstance(pl_module, MagicModule) and pl_module.uses_fsc:
            rank_zero_warn("FeatureSpaceCalibration on a MagicModule that already runs FSC: calibrating twice")
        sources = self._sources(trainer, pl_module)
        wsc = _find(trainer, WeightSpaceCalibration, self.backbone)
        if wsc is not None:
            wsc.apply_now(trainer, pl_module)  # DSC: FSC is measured on the WSC-calibrated model
        body = get_backbone(pl_module, self.backbone)
        _ensure_reference(record_of(trainer, pl_module), sources, body)
        device = trainer.strategy.root_device
        body.to(device)
        body.eval()
        modules = self.modules if self.modules is not None else _fsc_units(body, sources)
        calibrator = FeatureSpaceCalibrator(
            sources.base_state, body, sources.task_vectors(device=device), norm=self.norm,
            sensitive=self.sensitive, mode=self.mode, modules=modules, **self.variant,
        )
        self.collector = FeatureStatisticsCollector(calibrator, per_sample=self.per_sample)
        self._handle = body.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._busy or self.collector is None or self._task is None:
            return None
        self._busy = True  # the calibrator runs the backbone itself
        try:
            self.collector.update(self._task, *args, **kwargs)
        finally:
            self._busy = False
        return None

    def _batch_task(self, batch: Any, dataloader_idx: int) -> Any:
        if self.task_fn is not None:
            return self.task_fn(batch, dataloader_idx)
        if isinstance(batch, Mapping) and self.task_key in batch:
            return batch[self.task_key]
        return dataloader_idx

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.collector is not None:
            get_backbone(pl_module, self.backbone).eval()

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if self.collector is not None:
            self._task = self._batch_task(batch, dataloader_idx)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._task = None

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.collector is None:
            return
        self._remove_hook()
        self.report = self.collector.finish()  # one sum all-reduce; every rank folds the same xi
        rec = record_of(trainer, pl_module)
        if rec is not None:
            rec.set_fold(self.report)
            rec.config.setdefault("fsc", {"norm": self.norm, "mode": self.mode, "sensitive": self.sensitive,
                                          "modules": self.modules, "per_sample": self.per_sample})
            rec.add_step("fsc", self.collector.seconds, mode=self.report.mode, rounds=self.report.rounds,
                         samples_per_task=self.collector.samples.tolist())
            assert self.sources is not None
            _update_after(rec, self.sources, get_backbone(pl_module, self.backbone))
        rank_zero_info(f"FSC folded {len(self.report.folded)} module(s), wrapped {len(self.report.wrapped)}")
        self.collector = None
        self.done = True

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hook()
        if stage == "predict" and self.collector is not None:  # predict ended without finishing: discard
            self.collector = None


def _fsc_units(body: nn.Module, sources: WeightSources) -> Optional[list[str]]:
    """Automatic FSC units restricted to those whose tensors are all in the base weights (no tied aliases)."""
    from magic_pl.calibration import find_units

    units = find_units(body)
    keys = sources.base_state.keys()
    names = [u.name for u in units if all(k in keys and k not in sources.tied for k in u.keys)]
    return None if len(names) == len(units) else names


def check_before_work(trainer: Trainer, stage: str) -> None:
    """Before merging for a predict run with FSC: at least one calibration sample per process (clear error)."""
    if stage != "predict" or not any(isinstance(cb, FeatureSpaceCalibration) for cb in trainer.callbacks):
        return
    count = count_predict_samples(trainer)
    if count is not None:
        check_calibration_size(count, trainer.world_size)


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
        dirpath: output directory (replaced atomically if it exists).
        backbone: attribute path of the body to save for non-MagicModule modules (default ``"backbone"``).
        on_test_start: also write at the start of test if nothing was written yet (default ``True``).
    """

    def __init__(self, dirpath: Union[str, os.PathLike], backbone: str = "backbone", on_test_start: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.backbone = backbone
        self.write_on_test_start = on_test_start
        self.written: Optional[Path] = None

    def write(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Write now (rank 0), then wait for all ranks."""
        start = time.perf_counter()
        if trainer.is_global_zero:
            if callable(getattr(pl_module, "save_calibrated", None)):
                pl_module.save_calibrated(self.dirpath)
            else:
                save_module(get_backbone(pl_module, self.backbone), self.dirpath)
        trainer.strategy.barrier("magic_pl_writer")
        self.written = self.dirpath
        rec = record_of(trainer, pl_module)
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
        rec = record_of(trainer, pl_module) or self.calibration_record
        if not trainer.is_global_zero:
            return None
        doc = rec.to_dict(hash_inputs=self.hash_inputs)
        doc["config"] = {**doc.get("config", {}), **self.config,
                         "trainer": {"world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                                     "strategy": type(trainer.strategy).__name__,
                                     "accelerator": type(trainer.accelerator).__name__,
                                     "precision": str(trainer.precision)}}
        doc["timings"]["wall_since_report_created"] = round(time.perf_counter() - self._start, 3)
        out = self._dir(trainer) / self.filename
        write_json(doc, out)
        if self.plot:
            plot_record(rec, out.with_suffix(".png"))
        self.path = out
        return out

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rec = record_of(trainer, pl_module) or self.calibration_record
        for k, v in trainer.callback_metrics.items():
            if k.startswith("test/"):
                rec.metrics.setdefault(k, float(v))  # keep the module's float64 values where it recorded them
        self.write(trainer, pl_module)
