"""FSC statistics under Lightning: feed the calibration core batch by batch, sum across processes once, fold.

:class:`FeatureStatisticsCollector` is the statistics component of :class:`~magic_pl.lightning.pipeline.CalibrationRun`,
which :class:`~magic_pl.lightning.module.MagicModule` and the plug-in
:class:`~magic_pl.lightning.callbacks.MagicCalibration` callback share:

- ``update`` runs the :class:`~magic_pl.calibration.FeatureSpaceCalibrator` on each sample of a task-tagged batch
  (or per task), and moves the calibrator's float32 statistics into a float64, sum-reduced
  :class:`~magic_pl.lightning.metrics.FSCStatistics` after every chunk. Sums of per-sample terms in float64 do not
  depend on how samples are spread over processes, so xi (and the folded weights) are the same on 1 or N processes.
- ``finish`` synchronises the metric once (``compute()`` on every rank), loads the totals into the calibrator and
  folds: every rank computes the same xi and writes the same weights.

Non-finite calibration features (NaN/Inf in one rank's data) are a
:class:`~magic_pl.calibration.fsc.CalibrationDataError` on every rank alike: on several processes the calibrator does
not raise at the update (the other ranks would then wait in the sum forever); the NaN/Inf it leaves in the statistics
survives the sum, and the calibrator's one check (``finalize``/``fold``) finds it on the totals, on every rank.

Sequential mode (each module measured after the earlier ones are calibrated) needs one reduction per measurement
round; it uses the calibrator's ``finalize(reduce=...)`` with the same sum-reduced metric (exact up to float32
rounding of each rank's partial sums).

Under a sharded model (FSDP2) the ranks of one shard group must run the same forwards (each forward all-gathers
the blocks' weights), so they all see the same samples; only one of them (``contributes=True``) adds its statistics to
the metric, the others add nothing, and the one sum still counts every sample once.

A feature step whose calibrator is not FSC's (FeatCal, :class:`~magic_pl.calibration.featcal.FeatCalCalibrator`)
keeps the samples and measures them in its own passes: :class:`PassesCollector` feeds it and hands it, at the end of
the predict epoch, the run's sum over processes, which it applies to its own statistics (one reduce per pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from magic_pl.calibration import CalibrationResult, FeatureSpaceCalibrator
from magic_pl.lightning.metrics import FSCStatistics, accumulation_dtype

__all__ = ["FeatureStatisticsCollector", "PassesCollector", "split_batch", "batch_size_of", "trim_padding",
           "task_calls", "task_tensor"]


def batch_size_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[int]:
    """Size of dim 0 of the first tensor among ``args`` then ``kwargs`` (None if there is no tensor)."""
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return None


def _take(v: Any, index: Tensor, size: int) -> Any:
    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size:
        return v.index_select(0, index.to(v.device))
    return v


def split_batch(args: Sequence[Any], kwargs: Mapping[str, Any], index: Tensor, size: int) -> tuple[tuple, dict]:
    """Rows ``index`` of every tensor whose dim 0 is the batch ``size``; other values pass through unchanged."""
    return tuple(_take(a, index, size) for a in args), {k: _take(v, index, size) for k, v in kwargs.items()}


def trim_padding(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """For one right-padded sequence (``attention_mask`` of shape [1, L]), drop the padded positions of every
    tensor with a length-L dim 1, so a sample's statistics do not depend on the batch it was padded in."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != 1:
        return args, kwargs
    length = int(mask.sum())
    full = mask.shape[1]
    if length == full or length == 0 or not bool(mask[0, :length].all()):
        return args, kwargs  # nothing to trim, or not right padding

    def cut(v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == full:
            return v[:, :length]
        return v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def task_tensor(task: Any) -> Optional[Tensor]:
    """Per-sample task indices of a batch as a flat tensor (``None`` when one task is given for the whole batch)."""
    if isinstance(task, Tensor) and task.dim() > 0:
        return task.reshape(-1)
    return None


def task_calls(task: Any, args: tuple, kwargs: dict) -> Iterator[tuple[int, tuple, dict]]:
    """One ``(task, args, kwargs)`` body call per sample of a task-tagged batch (right padding trimmed)."""
    tasks = task_tensor(task)
    size = batch_size_of(args, kwargs)
    if size is None:
        yield (int(tasks[0]) if tasks is not None else int(task)), args, kwargs
        return
    for i in range(size):
        a, kw = trim_padding(*split_batch(args, kwargs, torch.tensor([i]), size))
        yield (int(tasks[i]) if tasks is not None else int(task)), a, kw


def _summed_over_processes() -> bool:
    """Whether the metric's states will be summed over several processes (torchmetrics syncs over the default
    process group whenever one is initialised)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FeatureStatisticsCollector:
    """Collects FSC statistics for one calibrator across a (possibly distributed) predict epoch.

    Args:
        calibrator: the calibration core, built on the merged module (already on its device).
        per_sample: feed samples one at a time (default True). Makes the statistics independent of batch
            composition (and so of the number of processes) and lets right padding be trimmed per sample.
        device: where the sum-reduced states live (default: the calibrator's statistics' device).
        contributes: whether this process's statistics enter the sum (default True). False on a rank that runs the
            same samples as another rank of its shard group (sharded model): it runs every forward, since they are
            collective, but the samples are counted on that other rank only.
    """

    def __init__(
        self, calibrator: FeatureSpaceCalibrator, *, per_sample: bool = True, device: Optional[torch.device] = None,
        contributes: bool = True,
    ) -> None:
        self.calibrator = calibrator
        self.contributes = contributes
        # one process can raise as soon as an update meets NaN/Inf features; several must reach the sum first
        calibrator.raise_at_update = not _summed_over_processes()
        self.per_sample = per_sample
        device = device or calibrator.ratio_sum.device
        k, m = calibrator.ratio_sum.shape
        with torch.inference_mode(False):
            self.metric = FSCStatistics(k, m, dtype=accumulation_dtype(device)).to(device)
            self._zeros = torch.zeros_like(calibrator.ratio_sum)
        self.samples = torch.zeros(k, dtype=torch.long)  # this process's samples per task (all, after finish)
        self.seconds = 0.0
        self.report: Optional[CalibrationResult] = None

    @property
    def sequential(self) -> bool:
        return self.calibrator.mode == "sequential"

    @property
    def num_tasks(self) -> int:
        return self.calibrator.num_tasks

    # ------------------------------------------------------------------------------------------------------------
    def update(self, task: Union[int, Tensor], *args: Any, **kwargs: Any) -> None:
        """Accumulate one batch. ``task``: one int for the whole batch, or a tensor of per-sample task indices."""
        start = time.perf_counter()
        size = batch_size_of(args, kwargs)
        if isinstance(task, Tensor) and task.dim() > 0:
            tasks = task.detach().to("cpu", torch.long).reshape(-1)
            if size is not None and tasks.numel() != size:
                raise ValueError(f"batch has {size} samples but {tasks.numel()} task ids")
        else:
            tasks = None
            task_id = int(task)
        if size is None:  # no tensor to split: one chunk
            self._update_one(int(tasks[0]) if tasks is not None else task_id, args, kwargs, 1)
        elif self.per_sample:
            for i in range(size):
                idx = torch.tensor([i])
                a, kw = split_batch(args, kwargs, idx, size)
                a, kw = trim_padding(a, kw)
                self._update_one(int(tasks[i]) if tasks is not None else task_id, a, kw, 1)
        elif tasks is None or bool((tasks == tasks[0]).all()):
            self._update_one(int(tasks[0]) if tasks is not None else task_id, args, kwargs, size)
        else:
            for t in torch.unique(tasks).tolist():
                idx = (tasks == t).nonzero().reshape(-1)
                a, kw = split_batch(args, kwargs, idx, size)
                self._update_one(int(t), a, kw, int(idx.numel()))
        self.seconds += time.perf_counter() - start

    def _update_one(self, task: int, args: tuple, kwargs: dict, n: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"batch task index {task} is out of range: there are {self.num_tasks} experts")
        self.calibrator.update(task, *args, **kwargs)
        if self.contributes:
            self.samples[task] += n
        if not self.sequential:
            # move this chunk's float32 sums into the float64 sum-reduced states, then zero the calibrator's
            # (a rank that does not contribute adds exact zeros: the metric is updated, and synced, on every rank)
            count = torch.zeros(self.num_tasks, dtype=torch.long)
            count[task] = n if self.contributes else 0
            sums = (self.calibrator.ratio_sum, self.calibrator.ratio_count) if self.contributes else (
                self._zeros, self._zeros)
            self.metric.update(*sums, count)
            self.calibrator.ratio_sum.zero_()
            self.calibrator.ratio_count.zero_()

    # ------------------------------------------------------------------------------------------------------------
    def _reduce(self, stacked: Tensor) -> Tensor:
        """Sum ``[2, K, M]`` statistics over processes with the metric (one sync)."""
        self.metric.reset()
        self.metric.update(*(stacked if self.contributes else torch.zeros_like(stacked)))
        total_sum, total_count, _ = self.metric.totals()
        self.metric.reset()
        return torch.stack([total_sum, total_count]).to(stacked)

    def finish(self) -> CalibrationResult:
        """Sum the statistics over all processes (once), compute xi and fold it into the merged module.

        Call on every rank at the end of the predict epoch (collective). Safe under ``inference_mode``: the fold
        runs with inference mode off so the model keeps normal tensors.

        Raises:
            CalibrationDataError: on every rank alike, after the sum: some task's calibration data gave non-finite
                features (on any process), or some task sent no sample.
        """
        start = time.perf_counter()
        if self.sequential:
            self.calibrator.finalize(reduce=self._reduce)
            self.metric.reset()
            self.metric.update(self._zeros, self._zeros, self.samples)
            _, _, samples = self.metric.totals()  # every process's sample counts, for the coverage check
            self.samples = samples.detach().cpu().clone()
            self.calibrator.task_samples = self.samples.clone()
            self.metric.reset()
        else:
            total_sum, total_count, samples = self.metric.totals()  # the one all-reduce (sum)
            with torch.inference_mode(False):
                total_sum, total_count = total_sum.clone(), total_count.clone()
                self.samples = samples.detach().cpu().clone()  # now the count over all processes
            self.calibrator.load_statistics(total_sum, total_count, self.samples)
            self.calibrator.finalize()
            self.metric.reset()
        self.report = self.calibrator.fold()
        self.seconds += time.perf_counter() - start
        return self.report


class PassesCollector:
    """Feeds a feature calibrator that measures the kept samples in passes of its own and sums its statistics over
    processes with the reduce it is given (FeatCal: one reduce per block), instead of FSC's metric states.

    The calibrator offers ``update(task, *args, **kwargs)``, ``finalize(reduce)``, ``fold()`` and ``task_samples``.

    Args:
        calibrator: the calibration core, built on the merged module.
        per_sample: feed samples one at a time (default True), right padding trimmed, as
            :class:`FeatureStatisticsCollector` does (the calibrator may stack them again).
    """

    def __init__(self, calibrator: Any, *, per_sample: bool = True) -> None:
        self.calibrator = calibrator
        self.per_sample = per_sample
        self.samples = torch.zeros(calibrator.num_tasks, dtype=torch.long)  # this process's (all, after finish)
        self.seconds = 0.0
        self.report: Optional[CalibrationResult] = None

    def update(self, task: Union[int, Tensor], *args: Any, **kwargs: Any) -> None:
        """Keep one batch. ``task``: one int for the whole batch, or a tensor of per-sample task indices."""
        start = time.perf_counter()
        tasks = task_tensor(task)
        size = batch_size_of(args, kwargs)
        if tasks is not None and size is not None and tasks.numel() != size:
            raise ValueError(f"batch has {size} samples but {tasks.numel()} task ids")
        if self.per_sample or (tasks is not None and not bool((tasks == tasks[0]).all())):
            calls = list(task_calls(task, args, kwargs)) if self.per_sample else [
                (int(t), *split_batch(args, kwargs, (tasks == t).nonzero().reshape(-1), size))
                for t in torch.unique(tasks).tolist()]
        else:
            calls = [(int(tasks[0]) if tasks is not None else int(task), args, kwargs)]
        for t, a, kw in calls:
            if not 0 <= t < self.calibrator.num_tasks:
                raise IndexError(f"batch task index {t} is out of range: there are {self.calibrator.num_tasks} "
                                 "experts")
            self.calibrator.update(t, *a, **kw)
            self.samples[t] += batch_size_of(a, kw) or 1
        self.seconds += time.perf_counter() - start

    def finish(self, reduce: Callable[[Tensor], Tensor]) -> CalibrationResult:
        """Run the calibrator's passes with ``reduce`` (collective: every rank, at the end of the predict epoch), fold
        and return the report; ``samples`` becomes the count over every process."""
        start = time.perf_counter()
        self.calibrator.finalize(reduce)
        self.report = self.calibrator.fold()
        self.samples = self.calibrator.task_samples.detach().cpu().clone()
        self.seconds += time.perf_counter() - start
        return self.report
