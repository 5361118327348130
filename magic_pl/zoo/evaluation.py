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

__all__ = ["log_likelihood"]

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


