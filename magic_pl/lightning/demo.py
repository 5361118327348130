"""A self-contained synthetic setup: ``magic-pl calibrate`` with no config runs merge + DSC + save + evaluate on it.

Nothing is downloaded or read from disk: :class:`DemoAdapter` builds a tiny MLP body, K seeded "experts" (the body
plus seeded noise) and per-task linear heads in memory. It exists to smoke-test an installation and to show the
config layout; accuracies on its random data are at chance level.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from magic_pl.models.base import MergeSetup, ModelAdapter

__all__ = ["DemoBody", "DemoAdapter", "DEMO_TASKS", "DEMO_CLASSES", "demo_defaults"]

DEMO_TASKS = ("task0", "task1", "task2")
DEMO_CLASSES = (2, 3, 4)


class DemoBody(nn.Module):
    """``Linear -> LayerNorm -> ReLU -> Linear`` on ``in_features`` inputs (defaults 16 -> 32 -> 16)."""

    def __init__(self, in_features: int = 16, hidden: int = 32, out_features: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class DemoAdapter(ModelAdapter):
    """Synthetic base, experts and heads, built in memory from seeds.

    Args:
        task_names: one expert per task (default ``task0..task2``).
        num_classes: classes per task (default 2, 3, 4).
        in_features: input size (16).
        noise: standard deviation of the experts' seeded perturbation of the base (0.05).
        seed: base seed (0).
    """

    def __init__(self, task_names: Sequence[str] = DEMO_TASKS, num_classes: Sequence[int] = DEMO_CLASSES,
                 in_features: int = 16, noise: float = 0.05, seed: int = 0) -> None:
        if len(task_names) != len(num_classes):
            raise ValueError(f"{len(task_names)} task names for {len(num_classes)} class counts")
        self.task_names = list(task_names)
        self.num_classes = [int(n) for n in num_classes]
        self.in_features = in_features
        self.noise = noise
        self.seed = seed

    def setup(self) -> MergeSetup:
        torch.manual_seed(self.seed)
        base = DemoBody(self.in_features).eval()
        experts, heads = [], {}
        for k, (task, n) in enumerate(zip(self.task_names, self.num_classes)):
            g = torch.Generator().manual_seed(self.seed * 1000 + k + 1)
            experts.append({key: v + self.noise * torch.randn(v.shape, generator=g)
                            for key, v in base.state_dict().items()})
            heads[task] = nn.Linear(base.fc2.out_features, n).eval()
        return MergeSetup(base=base, experts=experts, task_names=list(self.task_names), heads=heads, adapter=self,
                          metadata={"family": "demo", "seed": self.seed})

    def save(self, setup: MergeSetup, body: nn.Module, path: Union[str, os.PathLike], **options: Any) -> Path:
        from magic_pl.lightning.writer import save_module

        return save_module(body, path, heads=setup.heads)


def demo_defaults() -> dict[str, Any]:
    """CLI defaults (``model`` / ``data``) that run the demo when no config is given."""
    test = {
        t: {"class_path": "magic_pl.lightning.RandomTaskDataset",
            "init_args": {"num_samples": 33, "shape": [16], "num_classes": n, "seed": k}}
        for k, (t, n) in enumerate(zip(DEMO_TASKS, DEMO_CLASSES))
    }
    return {
        "model": {"class_path": "magic_pl.lightning.MagicModule",
                  "init_args": {"adapter": {"class_path": "magic_pl.lightning.demo.DemoAdapter"}}},
        "data": {"class_path": "magic_pl.lightning.TaskDataModule",
                 "init_args": {"task_names": list(DEMO_TASKS), "test": test}},
    }
