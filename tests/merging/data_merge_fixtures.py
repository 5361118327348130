"""Shared fixtures of the data-based merge tests (RegMean, LOT): tiny float64 models, base + K task vectors, batches
and a mapping that must not be read."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

K = 3


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 4)).double().eval()


def task_vectors_for(model: nn.Module, k: int = K, seed: int = 0, scale: float = 0.3):
    """``(base state, K random task vectors)`` for ``model``."""
    torch.manual_seed(seed)
    base = {n: v.detach().clone() for n, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    taus = [{n: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in base.items()} for _ in range(k)]
    return base, taus


def batches_of(k: int = K, n: int = 3, shape=(6, 5), seed: int = 2) -> dict[int, list[Tensor]]:
    """``n`` float64 batches per task, shifted by the task index."""
    g = torch.Generator().manual_seed(seed)
    return {t: [torch.randn(*shape, generator=g, dtype=torch.float64) + t for _ in range(n)] for t in range(k)}


def mean(taus, key):
    return sum(t[key] for t in taus) / len(taus)


def rel(a: Tensor, b) -> float:
    """Largest absolute difference relative to ``b``'s largest entry."""
    b = torch.as_tensor(b, dtype=a.dtype)
    return float((a - b).abs().max() / b.abs().max())


class Tokens(nn.Module):
    """An embedding then a linear layer, called with token ids and an attention mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def masked_token_batches(k: int = K, seed: int = 5) -> dict[int, list[dict[str, Tensor]]]:
    """One batch of 3 x 6 token ids per task whose first and last rows end in padding (attention mask 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(k):
        ids = torch.randint(0, 10, (3, 6), generator=g)
        mask = torch.ones(3, 6, dtype=torch.long)
        mask[0, 4:] = 0
        mask[2, 2:] = 0
        out[t] = [{"input_ids": ids, "attention_mask": mask}]
    return out


class Tied(nn.Module):
    """Two linear layers sharing one weight, a third one, and one never called."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # shared
        self.c = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def tied_task_vectors():
    """``(model, base, taus)`` of a float64 :class:`Tied`, its task vectors tied like its weights."""
    model = Tied().double().eval()
    base, taus = task_vectors_for(model)
    return model, base, [{**t, "b.weight": t["a.weight"]} for t in taus]


class Unreadable(Mapping):
    """Keys without tensors: reading one fails the test (validation must come first)."""

    def __init__(self, keys):
        self._keys = list(keys)

    def __getitem__(self, key):
        raise AssertionError("a tensor was read before validation")

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)
