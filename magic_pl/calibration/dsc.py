"""Dual space calibration (DSC): WSC on the merged task vector, then FSC measured on the WSC-calibrated model
(MAGIC, arXiv 2512.19320; docs/method.md), and the shared steps: feeding batches, writing a calibrated task vector
into a model."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.calibration.fsc import CalibrationResult, FeatureSpaceCalibrator, StateSource, _state_of
from magic_pl.calibration.sensitivity import ModelInputs
from magic_pl.calibration.taskvectors import LazyTaskVector
from magic_pl.statedict import apply_delta

__all__ = ["Batches", "call_with_batch", "dual_space_calibration", "feed", "merged_task_vector", "task_batches",
           "write_task_vector"]

#: Calibration data: ``{task_index: iterable of batches}`` or an iterable of ``(task_index, batch)`` pairs. A batch
#: that is a tensor is passed as ``model(batch)``, a tuple/list as ``model(*batch)``, a mapping as ``model(**batch)``.
Batches = Union[Mapping[int, Iterable[Any]], Iterable[tuple[int, Any]]]


def task_batches(batches: Batches) -> Iterable[tuple[int, Any]]:
    """The ``(task_index, batch)`` pairs of ``batches`` (see :data:`Batches`), in order."""
    if isinstance(batches, Mapping):
        return ((k, b) for k, task_batches in batches.items() for b in task_batches)
    return batches


def call_with_batch(fn: Callable[..., Any], batch: Any, *leading: Any) -> Any:
    """``fn(*leading, *args, **kwargs)`` for :class:`~magic_pl.calibration.sensitivity.ModelInputs` (a call that needs
    both), ``fn(*leading, **batch)`` for a mapping, ``fn(*leading, *batch)`` for a tuple/list, else ``fn(*leading,
    batch)``: the one batch-calling convention of :data:`Batches`."""
    if isinstance(batch, ModelInputs):  # a NamedTuple: checked before plain tuples
        return fn(*leading, *batch.args, **batch.kwargs)
    if isinstance(batch, Mapping):
        return fn(*leading, **batch)
    if isinstance(batch, (tuple, list)):
        return fn(*leading, *batch)
    return fn(*leading, batch)


def feed(calibrator: FeatureSpaceCalibrator, batches: Batches) -> int:
    """Call ``calibrator.update`` on every batch of ``batches`` (see :data:`Batches`); returns the number of batches."""
    n = 0
    for k, batch in task_batches(batches):
        call_with_batch(calibrator.update, batch, k)
        n += 1
    return n


@torch.no_grad()
def write_task_vector(base: StateSource, merged: nn.Module, tau: Mapping[str, Tensor], keys: Iterable[str],
                      what: str = "calibrated model") -> None:
    """Set ``keys`` of ``merged`` (in place) to ``theta0 + tau`` in each tensor's dtype (float64 stays float64)."""
    base_state = _state_of(base)
    merged_state = merged.state_dict()
    for key in keys:
        if key not in merged_state:
            raise KeyError(f"calibrated {key!r}, which the merged model does not have")
        target = merged_state[key]
        target.copy_(apply_delta(base_state[key].to(target.device), tau[key], key=key, name=what,
                                 out_dtype=target.dtype))


def merged_task_vector(base: StateSource, merged: nn.Module) -> Mapping[str, Tensor]:
    """``tau_m = merged - base``, computed per key on access."""
    return LazyTaskVector({k: v.detach() for k, v in merged.state_dict().items()}, _state_of(base))


def dual_space_calibration(
    base: StateSource,
    merged: nn.Module,
    task_vectors: Sequence[Mapping[str, Tensor]],
    merged_tv: Optional[Mapping[str, Tensor]],
    batches: Batches,
    sensitive: Optional[Collection[str]] = None,
    *,
    modules: Optional[Sequence[str]] = None,
    **options: Any,
) -> CalibrationResult:
    """DSC: WSC, then FSC measured on the WSC-calibrated model, folded (``merged`` modified in place).

    The same as ``CalibrationSetting(space="dsc", **options).calibrate(...)``: ``options`` are setting fields (``norm``,
    ``mode``, ``statistic``, ``granularity``, ``gate``, ``wsc_variant``, ``eps``; the paper's defaults). ``sensitive``:
    magnitude-sensitive tensors/modules, used by both WSC gating and the FSC cap (``None``: none, WSC ungated).
    Returns the :class:`CalibrationResult` (FSC coefficients plus WSC row scales).
    """
    from magic_pl.calibration.settings import CalibrationSetting

    if "variant" in options:
        options["wsc_variant"] = options.pop("variant")
    setting = CalibrationSetting(space="dsc", sensitive="none" if sensitive is None else "given", **options)
    return setting.calibrate(base, merged, task_vectors, merged_tv, batches, sensitive, modules=modules)
