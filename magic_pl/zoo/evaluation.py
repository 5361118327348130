"""Plain-torch evaluation for the benchmark: one encoder, every task's test split through its own head.

Test inputs are prepared once (tokenised / resized) and kept; evaluation runs under ``torch.inference_mode`` in
length-sorted batches. Results are per-example correctness vectors so averages, draws and bootstrap intervals are
computed afterwards without running the model again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from magic_pl.zoo.backbones import Backbone
from magic_pl.zoo.data import Task

__all__ = ["Evaluator", "bootstrap_ci"]


class Evaluator:
    """Accuracy of an encoder + the task heads on one split of every task.

    Args:
        backbone: prepares inputs and batches them.
        tasks: tasks with splits.
        heads: task name -> linear head.
        split: which split to evaluate (``"test"``, or ``"val"`` for tuning).
        device: where to run.
        batch_size: evaluation batch size.
    """

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], heads: Mapping[str, nn.Module], *,
                 split: str = "test", device: torch.device = torch.device("cpu"), batch_size: int = 128):
        self.backbone = backbone
        self.device = device
        self.batch_size = batch_size
        self.names = [t.name for t in tasks]
        self.heads = {n: heads[n].to(device).eval() for n in self.names}
        self.prepared: dict[str, Any] = {}
        self.labels: dict[str, Tensor] = {}
        for t in tasks:
            x, y = t.select(split)
            self.prepared[t.name] = backbone.prepare(x)
            self.labels[t.name] = y

    def sizes(self) -> dict[str, int]:
        return {n: int(len(y)) for n, y in self.labels.items()}

    @torch.inference_mode()
    def correct(self, encoder: nn.Module, tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """task -> bool array: is the prediction right, per example (input order)."""
        encoder.eval()
        out = {}
        for name in tasks or self.names:
            y = self.labels[name]
            ok = np.zeros(len(y), dtype=bool)
            head = self.heads[name]
            for idx, kw in self.backbone.eval_batches(self.prepared[name], self.batch_size, self.device):
                pred = head(encoder(**kw).float()).argmax(-1).cpu()
                ok[idx] = (pred == y[torch.as_tensor(idx, dtype=torch.long)]).numpy()
            out[name] = ok
        return out

    def accuracy(self, encoder: nn.Module, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """task -> accuracy."""
        return {n: float(c.mean()) for n, c in self.correct(encoder, tasks).items()}

    @torch.inference_mode()
    def log_likelihood(self, encoder: nn.Module, limit: int | None = None) -> float:
        """Mean over tasks of the mean log-probability of the true label (first ``limit`` examples per task): a
        smooth labelled score, e.g. for the labelled magnitude-sensitivity probe (accuracy on a few examples moves
        in steps and ties most tensors)."""
        encoder.eval()
        scores = []
        for name in self.names:
            y = self.labels[name]
            n = len(y) if limit is None else min(limit, len(y))
            total = 0.0
            # prepared inputs are token lists or image tensors: both slice
            for idx, kw in self.backbone.eval_batches(self.prepared[name][:n], self.batch_size, self.device):
                logp = torch.log_softmax(self.heads[name](encoder(**kw).float()), -1).cpu()
                total += float(logp.gather(1, y[torch.as_tensor(idx, dtype=torch.long)].view(-1, 1)).sum())
            scores.append(total / n)
        return float(np.mean(scores))


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
