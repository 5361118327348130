"""A benchmark suite as inputs to the shipped Lightning pipeline.

The suite's prepared data become :class:`~magic_pl.lightning.data.TaskDataModule` datasets (test and validation
splits carry each example's position, so ``Trainer.test`` keeps per-example correctness for the bootstrap; the
calibration samples of a draw are the datamodule's calibration sets), and its base, experts and heads become a
:class:`~magic_pl.lightning.module.MagicModule`: the same module, metrics, calibration run and evaluation that
``magic-pl calibrate`` uses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from magic_pl.lightning.data import INDEX_KEY, LABELS_KEY, TaskDataModule
from magic_pl.lightning.module import Calibration, MagicModule
from magic_pl.zoo.backbones import Backbone
from magic_pl.zoo.data import Task
from magic_pl.zoo.experts import ExpertSet, build_experts

__all__ = ["LoadedSuite", "load_suite", "PreparedSplit", "SuiteData", "suite_module"]


@dataclass
class LoadedSuite:
    """A suite's tasks, backbone and experts as every benchmark row uses them."""

    tasks: list[Task]
    backbone: Backbone
    experts: ExpertSet
    #: a fresh encoder holding the base weights, in eval mode (the merge template)
    template: nn.Module
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def expert_states(self) -> list[Mapping[str, Tensor]]:
        """The fine-tuned encoders' state dicts, in task order."""
        return [self.experts.experts[n] for n in self.names]


def load_suite(spec: Any, cache_root: Path, device: torch.device, *, max_test: Optional[int] = None, seed: int = 0,
               rebuild: bool = False, progress: bool = False) -> LoadedSuite:
    """Load a suite's tasks (``max_test``: a seeded subsample of at most that many test examples per task, drawn after
    the splits, so the experts and their cache entry stay the same), its backbone, and its experts (fine-tuned on
    ``device`` unless cached under ``cache_root``). ``timings``: ``data_seconds`` and ``experts_seconds``."""
    t0 = time.perf_counter()
    tasks = spec.load_tasks(cache_root)
    if max_test is not None:
        for t in tasks:
            test = t.splits["test"]
            if len(test) > max_test:
                rng = np.random.default_rng(seed * 7919 + sum(map(ord, t.name)))
                t.splits["test"] = np.sort(rng.choice(test, size=int(max_test), replace=False))
    backbone: Backbone = spec.build_backbone()
    prepared_train = {t.name: backbone.prepare(t.select("train")[0]) for t in tasks}
    timings = {"data_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    es = build_experts(spec.name, backbone, tasks, prepared_train, spec.finetune, cache_dir=cache_root,
                       split_config=spec.split_config(), device=device, rebuild=rebuild, progress=progress)
    timings["experts_seconds"] = time.perf_counter() - t0
    del prepared_train
    template = backbone.build()
    template.load_state_dict(es.base)
    template.eval()
    return LoadedSuite(tasks, backbone, es, template, timings)


class PreparedSplit(Dataset):
    """Examples of one task prepared once by the backbone: item ``i`` is example ``order[i]``'s forward kwargs,
    plus its label and its position (``"index"``) when ``labels`` are given.

    Args:
        backbone: turns a prepared example into forward kwargs (:meth:`Backbone.example`).
        prepared: the split's prepared inputs.
        labels: the split's labels (``None``: unlabelled, e.g. calibration samples).
        order: which examples, in which order (default: the backbone's evaluation order, e.g. by length).
    """

    def __init__(self, backbone: Backbone, prepared: Any, labels: Optional[Tensor] = None,
                 order: Optional[Sequence[int]] = None) -> None:
        self.backbone, self.prepared, self.labels = backbone, prepared, labels
        self.order = np.asarray(order if order is not None else backbone.eval_order(prepared), dtype=np.int64)
        self._items = [self._item(int(j)) for j in self.order]  # built once: every evaluation reads them again

    def _item(self, j: int) -> dict[str, Tensor]:
        out = self.backbone.example(self.prepared, j)
        if self.labels is not None:
            out[LABELS_KEY] = self.labels[j]
            out[INDEX_KEY] = torch.tensor(j)
        return out

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return dict(self._items[i])


class SuiteData:
    """A suite's tasks, prepared once, and the datamodules of its runs.

    Args:
        backbone: the suite's backbone.
        tasks: the tasks, in expert order.
        pools: task name -> the split indices calibration samples are drawn from.
        batch_size: evaluation batch size.
        val: also prepare the validation splits (for tuning and labelled probes).
    """

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], pools: Mapping[str, np.ndarray], *,
                 batch_size: int, val: bool = False) -> None:
        self.backbone = backbone
        self.names = [t.name for t in tasks]
        self.batch_size = batch_size
        self.test = {t.name: PreparedSplit(backbone, *_prepared(backbone, t, "test")) for t in tasks}
        self.val = {t.name: PreparedSplit(backbone, *_prepared(backbone, t, "val")) for t in tasks} if val else {}
        self.pools = {t.name: np.asarray(pools[t.name]) for t in tasks}
        self.pool_inputs = {t.name: backbone.prepare(t.take(self.pools[t.name])) for t in tasks}
        self._pool_pos = {n: {int(i): j for j, i in enumerate(p)} for n, p in self.pools.items()}

    def positions(self, task: str, picked: Sequence[int]) -> list[int]:
        """Positions in the prepared pool of ``task`` of the split indices ``picked``."""
        return [self._pool_pos[task][int(i)] for i in picked]

    def batches(self, task: str, picked: Sequence[int], device: torch.device, size: int = 1) -> list[dict[str, Tensor]]:
        """Pool examples ``picked`` (split indices) as forward-kwargs batches of ``size`` (for probes and BatchNorm)."""
        pos = self.positions(task, picked)
        return [self.backbone.batch(self.pool_inputs[task], pos[s: s + size], device) for s in range(0, len(pos), size)]

    def datamodule(self, calibration: Optional[Mapping[str, Sequence[int]]] = None,
                   tasks: Optional[Sequence[str]] = None) -> TaskDataModule:
        """Test and validation data of ``tasks`` (default all), and as calibration data exactly the pool examples
        ``calibration[task]`` (split indices, in that order; fed one sample per batch)."""
        names = list(tasks) if tasks is not None else self.names
        calib = {n: PreparedSplit(self.backbone, self.pool_inputs[n], order=self.positions(n, picked))
                 for n, picked in (calibration or {}).items()}
        return TaskDataModule(names, test={n: self.test[n] for n in names},
                              val={n: self.val[n] for n in names if n in self.val}, calibration=calib or None,
                              samples_per_task=None, batch_size=self.batch_size, calibration_batch_size=1)


def _prepared(backbone: Backbone, task: Task, split: str) -> tuple[Any, Tensor]:
    x, y = task.select(split)
    return backbone.prepare(x), y


def suite_module(template: nn.Module, experts: Sequence[Mapping[str, Tensor]], heads: Mapping[str, nn.Module],
                 task_names: Sequence[str], method: str, options: Mapping[str, Any], calibration: Calibration = "none",
                 sensitive: Optional[Sequence[str]] = None) -> MagicModule:
    """The :class:`MagicModule` of one merge of the suite: ``template`` holds the base weights, ``experts`` the
    fine-tuned encoders (task order), ``heads`` the frozen task heads."""
    return MagicModule(model=template, experts=list(experts), task_names=list(task_names),
                       heads={n: heads[n] for n in task_names}, merge_method=method, merge_options=dict(options),
                       calibration=calibration, sensitive=sensitive)
