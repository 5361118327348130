"""What the benchmark computes from evaluations: bootstrap intervals over test examples, and the labelled probe's
score.

Accuracy itself comes from ``Trainer.test`` on :class:`~magic_pl.lightning.module.MagicModule` (per-example
correctness vectors, so averages, draws and bootstrap intervals are computed afterwards without running the model
again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from magic_pl.zoo.pipeline import SuiteData

__all__ = ["log_likelihood", "bootstrap_ci"]

_CPU = torch.device("cpu")  # the default device (a module-level value: torch.device is immutable)


@torch.inference_mode()
def log_likelihood(encoder: nn.Module, data: "SuiteData", heads: Mapping[str, nn.Module], *,
                   limit: int | None = None, device: torch.device = _CPU) -> float:
    """Mean over tasks of the mean log-probability of the true label on the first ``limit`` validation examples
    of each task: a smooth labelled score for the labelled magnitude-sensitivity probe (accuracy on a few examples
    moves in steps and ties most tensors). Plain torch: the probe calls it once per perturbed tensor."""
    encoder.eval()
    scores = []
    for name in data.names:
        split = data.val[name]
        y = split.labels
        n = len(y) if limit is None else min(limit, len(y))
        head = heads[name].to(device).eval()
        total = 0.0
        # prepared inputs are token lists or image tensors: both slice
        for idx, kw in data.backbone.eval_batches(split.prepared[:n], data.batch_size, device):
            logp = torch.log_softmax(head(encoder(**kw).float()), -1).cpu()
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
