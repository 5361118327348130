"""Benchmark tasks and their disjoint splits (shared by the text, vision and tiny suites).

A :class:`Task` holds every usable example of one classification task (texts or an image tensor), its integer labels
and a *group key* per example (the document, speech or image it comes from). Splits are assigned per group by a seeded
hash, so

- the expert-training split, the labelled validation split, the unlabelled calibration pool and the test split are
  disjoint, and chunks of one document never straddle two splits;
- tasks built from the same corpus (Rotten Tomatoes sentiment and review-vs-plot; debate party and speaker) put a given
  document in the *same* split, so no merged model has seen a test document of one task in another task's training;
- the assignment does not depend on which other tasks are in the suite, or on the order of the examples.

Each split is then capped (seeded subsample) to the suite's sizes. :func:`split_digest` hashes a split's content for
the expert cache's manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["SPLITS", "Task", "DataUnavailableError", "hash_unit", "assign_splits", "split_digest", "chunk_text"]

#: Split names, in assignment order along the hash's unit interval.
SPLITS = ("test", "calib", "val", "train")

Inputs = Union[list, Tensor]


class DataUnavailableError(RuntimeError):
    """A dataset the suite needs is not on this machine; the message says how to install it."""


def hash_unit(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) from ``key`` and ``seed`` (blake2b; identical on every machine)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_splits(
    groups: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Assign every example to one split by hashing its group key.

    Args:
        groups: one group key per example (examples sharing a key always land in the same split).
        fractions: share of groups for each of :data:`SPLITS` (they must sum to at most 1; ``train`` takes the rest
            if absent).
        seed: the split seed (suites default to 0).

    Returns:
        split name -> sorted int64 indices, pairwise disjoint.
    """
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; expected {SPLITS}")
    bounds, acc = [], 0.0
    for name in SPLITS:
        frac = fractions.get(name, max(0.0, 1.0 - acc) if name == "train" else 0.0)
        if frac < 0:
            raise ValueError(f"split fraction for {name!r} is negative: {frac}")
        acc += frac
        bounds.append(acc)
    if acc > 1.0 + 1e-9:
        raise ValueError(f"split fractions sum to {acc:.3f} > 1: {dict(fractions)}")
    cache: dict[str, int] = {}
    which = np.empty(len(groups), dtype=np.int64)
    for i, g in enumerate(groups):
        s = cache.get(g)
        if s is None:
            u = hash_unit(g, seed)
            s = next((j for j, b in enumerate(bounds) if u < b), len(SPLITS))
            cache[g] = s
        which[i] = s
    return {name: np.flatnonzero(which == j) for j, name in enumerate(SPLITS)}


def split_digest(inputs: Inputs, labels: Tensor, indices: np.ndarray) -> str:
    """sha256 over a split's examples (texts or image bytes) and labels, in index order."""
    h = hashlib.sha256()
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    if isinstance(inputs, Tensor):
        h.update(inputs[torch.as_tensor(indices, dtype=torch.long)].contiguous().numpy().tobytes())
    else:
        for i in indices:
            h.update(str(inputs[int(i)]).encode())
            h.update(b"\x00")
    h.update(labels[torch.as_tensor(indices, dtype=torch.long)].numpy().astype(np.int64).tobytes())
    return h.hexdigest()


@dataclass
class Task:
    """One classification task with its disjoint splits.

    Attributes:
        name: task name (unique in a suite).
        classes: class names; labels index into it.
        inputs: all examples: a list of strings (text) or a float tensor ``[N, C, H, W]`` (images).
        labels: int64 tensor ``[N]``.
        groups: group key per example (document / speech / image id); splits never separate a group.
        source: where the data comes from, for the report.
        splits: split name -> indices into ``inputs`` (set by :meth:`make_splits`).
    """

    name: str
    classes: list[str]
    inputs: Inputs
    labels: Tensor
    groups: list[str]
    source: str = ""
    splits: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if len(self.labels) != n or len(self.groups) != n:
            raise ValueError(
                f"task {self.name!r}: {n} inputs, {len(self.labels)} labels and {len(self.groups)} group keys"
            )
        if n == 0:
            raise ValueError(f"task {self.name!r} has no examples")
        bad = int(((self.labels < 0) | (self.labels >= len(self.classes))).sum())
        if bad:
            raise ValueError(f"task {self.name!r}: {bad} labels outside [0, {len(self.classes)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def make_splits(self, fractions: Mapping[str, float], caps: Mapping[str, int | None], seed: int) -> "Task":
        """Assign disjoint splits by group hash (seed ``seed``), then cap each split by a seeded subsample."""
        splits = assign_splits(self.groups, fractions, seed)
        rng = np.random.default_rng(int(hash_unit(self.name, seed) * 2**32))
        for name in SPLITS:
            cap = caps.get(name)
            idx = splits[name]
            if cap is not None and len(idx) > cap:
                idx = np.sort(rng.choice(idx, size=cap, replace=False))
            splits[name] = idx
        for name in ("train", "test"):
            if len(splits[name]) == 0:
                raise ValueError(f"task {self.name!r}: the {name} split is empty ({len(self)} examples)")
        self.splits = splits
        return self

    def __len__(self) -> int:
        return len(self.inputs)

    def select(self, split: str) -> tuple[Inputs, Tensor]:
        """The inputs and labels of one split."""
        idx = self.splits[split]
        return self.take(idx), self.labels[torch.as_tensor(idx, dtype=torch.long)]

    def take(self, indices: Sequence[int] | np.ndarray) -> Inputs:
        """Inputs at ``indices`` (a list of strings or a tensor)."""
        if isinstance(self.inputs, Tensor):
            return self.inputs[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
        return [self.inputs[int(i)] for i in indices]

    def digests(self) -> dict[str, str]:
        """split name -> :func:`split_digest` of that split."""
        return {name: split_digest(self.inputs, self.labels, idx) for name, idx in self.splits.items()}

    def summary(self) -> dict:
        """Sizes and class counts per split (JSON-ready)."""
        out = {"name": self.name, "classes": list(self.classes), "source": self.source, "splits": {}}
        for name, idx in self.splits.items():
            counts = torch.bincount(self.labels[torch.as_tensor(idx, dtype=torch.long)], minlength=self.num_classes)
            out["splits"][name] = {"size": int(len(idx)), "class_counts": counts.tolist()}
        return out


def chunk_text(text: str, max_words: int, min_words: int = 1) -> list[str]:
    """Split ``text`` into chunks of whole sentences of at most ``max_words`` words.

    Sentences are cut after ``.``, ``!``, ``?`` or a line break; a sentence longer than ``max_words`` is cut by words.
    Chunks shorter than ``min_words`` words are dropped.
    """
    import re

    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s and s.strip()]
    chunks: list[str] = []
    cur: list[str] = []
    for sent in sentences:
        words = sent.split()
        while len(words) > max_words:
            if cur:
                chunks.append(" ".join(cur))
                cur = []
            chunks.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if len(cur) + len(words) > max_words and cur:
            chunks.append(" ".join(cur))
            cur = []
        cur.extend(words)
    if cur:
        chunks.append(" ".join(cur))
    return [c for c in chunks if len(c.split()) >= min_words]
