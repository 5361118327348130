"""torchmetrics states for calibration statistics and per-task accuracy, reduced across processes.

The statistics and the accuracy counts are plain sums (``dist_reduce_fx="sum"``); per-example correctness is
concatenated (``"cat"``). All are synchronised once, at the end of an epoch, when ``compute()`` is called on every
rank (docs/method.md): ranks may run different numbers of batches, so nothing is reduced per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from magic_pl.lightning.data import IGNORE_INDEX

__all__ = ["FSCStatistics", "PerTaskAccuracy", "ExampleCorrectness", "accumulation_dtype", "bootstrap_ci"]


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (not MPS), so sums of float32 per-sample terms do not depend on the order
    in which processes add them up."""
    return torch.float32 if device.type == "mps" else torch.float64


class FSCStatistics(Metric):
    """Sum-reduced FSC statistics: ``ratio_sum`` and ``ratio_count``, ``[K, M]`` (tasks x calibrated modules).

    ``update(ratio_sum, ratio_count, samples=None)`` adds one chunk of the calibration core's statistics (float32,
    typically one sample's) and optionally per-task sample counts ``[K]``; ``compute()`` returns
    ``(ratio_sum, ratio_count, samples)`` summed over all processes. States are float64 so
    that the total is (to the last bit, in practice) independent of how samples are split over processes.
    NaN/Inf (non-finite calibration features on some process) are summed like any value, never masked: the total
    carries them to the calibrator's check on every process.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    ratio_sum: Tensor
    ratio_count: Tensor
    samples: Tensor

    def __init__(self, num_tasks: int, num_modules: int, dtype: torch.dtype = torch.float64, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_tasks < 1 or num_modules < 1:
            raise ValueError(f"need >= 1 task and >= 1 module, got {num_tasks} tasks and {num_modules} modules")
        self.shape = (int(num_tasks), int(num_modules))
        self.add_state("ratio_sum", torch.zeros(self.shape, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("ratio_count", torch.zeros(self.shape, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros(self.shape[0], dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ratio_sum: Tensor, ratio_count: Tensor, samples: Optional[Tensor] = None) -> None:  # type: ignore[override]
        if tuple(ratio_sum.shape) != self.shape or tuple(ratio_count.shape) != self.shape:
            raise ValueError(
                f"FSC statistics of shape {tuple(ratio_sum.shape)}/{tuple(ratio_count.shape)} do not match the "
                f"metric's [tasks, modules] = {list(self.shape)}"
            )
        self.ratio_sum += ratio_sum.to(self.ratio_sum)
        self.ratio_count += ratio_count.to(self.ratio_count)
        if samples is not None:
            self.samples += samples.to(self.samples)

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """``(ratio_sum, ratio_count, samples)`` summed over processes."""
        return self.ratio_sum.clone(), self.ratio_count.clone(), self.samples.clone()

    def totals(self) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`compute` with the states' shapes (torchmetrics squeezes one-element results to scalars)."""
        ratio_sum, ratio_count, samples = self.compute()
        return ratio_sum.reshape(self.shape), ratio_count.reshape(self.shape), samples.reshape(self.shape[0])


class PerTaskAccuracy(Metric):
    """Exact per-task accuracy: ``correct[T]`` and ``total[T]`` counts (int64, sum-reduced).

    ``update(preds, target, task)`` with class predictions ``preds[N]``, targets ``target[N]`` and task indices
    ``task[N]`` (or one int); targets equal to ``ignore_index`` (-100) are skipped (token-level LM accuracy).
    ``compute()`` returns accuracy per task ``[T]`` (NaN for a task with no samples).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, ignore_index: Optional[int] = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_tasks = int(num_tasks)
        self.ignore_index = ignore_index
        self.add_state("correct", torch.zeros(self.num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(self.num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, task: "Tensor | int") -> None:  # type: ignore[override]
        preds, target = preds.reshape(-1), target.reshape(-1).to(preds.device)
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in size")
        if isinstance(task, int) or (isinstance(task, Tensor) and task.dim() == 0):
            task = torch.full_like(target, int(task))
        task = task.reshape(-1).to(preds.device)
        if task.numel() != target.numel():
            # task given per sample while preds are per token: repeat per sample's tokens
            if target.numel() % task.numel() != 0:
                raise ValueError(f"{task.numel()} task ids for {target.numel()} targets")
            task = task.repeat_interleave(target.numel() // task.numel())
        if self.ignore_index is not None:
            keep = target != self.ignore_index
        else:
            keep = torch.ones_like(target, dtype=torch.bool)
        if bool((task[keep] >= self.num_tasks).any()) or bool((task[keep] < 0).any()):
            raise ValueError(f"task index out of range [0, {self.num_tasks})")
        hits = (preds == target) & keep
        self.correct += torch.bincount(task[hits], minlength=self.num_tasks)
        self.total += torch.bincount(task[keep], minlength=self.num_tasks)

    def compute(self) -> Tensor:  # type: ignore[override]
        total = self.total.to(torch.float64)
        return torch.where(total > 0, self.correct.to(torch.float64) / total.clamp_min(1), torch.nan)

    def per_task(self) -> Tensor:
        """:meth:`compute` as ``[T]`` (torchmetrics squeezes a one-task result to a scalar)."""
        return self.compute().reshape(self.num_tasks)

    @staticmethod
    def average(acc: Tensor, tasks: Optional[Sequence[int]] = None) -> float:
        """Mean accuracy over tasks that have samples."""
        vals = acc if tasks is None else acc[list(tasks)]
        vals = vals[~torch.isnan(vals)]
        return float(vals.mean()) if vals.numel() else float("nan")


class ExampleCorrectness(Metric):
    """Per-example correctness, for intervals that resample test examples (paired bootstrap).

    ``update(correct, index, task)`` records, for each sample of a batch, whether it was predicted right, its position
    ``index`` in its task's test set and its task. States are concatenated across processes, so every rank gets all
    examples whichever process evaluated them. ``compute()`` returns ``[T, N_max]`` int8: 1 right, 0 wrong, -1 for a
    position never evaluated (:meth:`per_task` keeps the evaluated ones).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_tasks = int(num_tasks)
        for name in ("correct", "index", "task"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, correct: Tensor, index: Tensor, task: "Tensor | int") -> None:  # type: ignore[override]
        correct, index = correct.reshape(-1), index.reshape(-1).to(correct.device)
        if correct.shape != index.shape:
            raise ValueError(f"{correct.numel()} correctness values for {index.numel()} example indices")
        if isinstance(task, int) or (isinstance(task, Tensor) and task.dim() == 0):
            task = torch.full_like(index, int(task))
        self.correct.append(correct.to(torch.int8))  # type: ignore[attr-defined]
        self.index.append(index.long())  # type: ignore[attr-defined]
        self.task.append(task.reshape(-1).long().to(index.device))  # type: ignore[attr-defined]

    def compute(self) -> Tensor:  # type: ignore[override]
        correct, index, task = (_cat(getattr(self, n)) for n in ("correct", "index", "task"))
        size = int(index.max()) + 1 if index.numel() else 0
        out = torch.full((self.num_tasks, size), -1, dtype=torch.int8, device=correct.device)
        out[task, index] = correct  # an example evaluated twice (a padded sampler) holds the same value
        return out

    def per_task(self) -> list[Tensor]:
        """Per task: correctness (bool) of the evaluated examples, in index order."""
        table = self.compute().cpu().reshape(self.num_tasks, -1)  # one example: torchmetrics returns a scalar
        return [row[row >= 0].bool() for row in table]


def _cat(state: "Tensor | list[Tensor]") -> Tensor:
    if isinstance(state, Tensor):  # already concatenated by a sync
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=torch.long)


def bootstrap_ci(per_task: Mapping[str, np.ndarray], *, samples: int = 1000, seed: int = 0,
                 weights: Mapping[str, float] | None = None) -> tuple[float, float]:
    """95% percentile bootstrap interval of the task-averaged accuracy (test examples resampled within each task).

    Args:
        per_task: task -> per-example score in [0, 1] (correctness, or its mean over calibration draws).
        samples: bootstrap resamples (1000).
        weights: optional per-task divisor (e.g. the expert's accuracy, for the normalised average).
    """
    if samples <= 0 or not per_task:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    total = np.zeros(samples)
    for name, c in per_task.items():
        c = np.asarray(c, dtype=np.float64)
        idx = rng.integers(0, len(c), size=(samples, len(c)))
        acc = c[idx].mean(1)
        if weights is not None:
            acc = acc / weights[name]
        total += acc
    total /= len(per_task)
    lo, hi = np.percentile(total, [2.5, 97.5])
    return float(lo), float(hi)
