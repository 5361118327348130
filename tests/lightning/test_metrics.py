"""Sum-reduced torchmetrics states: per-task accuracy and FSC statistics."""

from __future__ import annotations

import math

import pytest
import torch

from magic_pl.lightning.metrics import FSCStatistics, PerTaskAccuracy


def test_per_task_accuracy_counts_and_ignores_padding():
    m = PerTaskAccuracy(3)
    m.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1]))
    m.update(torch.tensor([[1, 1, 0]]), torch.tensor([[1, -100, 1]]), 1)  # token-level, -100 ignored
    acc = m.compute()
    assert acc[0].item() == 1.0
    assert acc[1].item() == pytest.approx(2 / 4)
    assert math.isnan(acc[2].item())
    assert m.total.tolist() == [2, 4, 0] and m.correct.tolist() == [2, 2, 0]
    assert PerTaskAccuracy.average(acc) == pytest.approx(0.75)


def test_per_task_accuracy_rejects_bad_task():
    m = PerTaskAccuracy(2)
    with pytest.raises(ValueError, match=r"task index out of range \[0, 2\)"):
        m.update(torch.tensor([0]), torch.tensor([0]), 2)


def test_fsc_statistics_accumulate_in_float64_and_check_shape():
    m = FSCStatistics(2, 3)
    a = torch.full((2, 3), 0.1, dtype=torch.float32)
    for _ in range(10):
        m.update(a, torch.ones(2, 3), torch.tensor([1, 0]))
    s, c, n = m.compute()
    assert n.tolist() == [10, 0]
    assert s.dtype == torch.float64 and torch.allclose(s, torch.full((2, 3), 10 * float(a[0, 0]), dtype=torch.float64))
    assert c.tolist() == [[10.0] * 3] * 2
    with pytest.raises(ValueError, match=r"do not match the metric's \[tasks, modules\] = \[2, 3\]"):
        m.update(torch.zeros(3, 2), torch.zeros(3, 2))


def test_example_correctness_places_examples_by_task_and_index():
    from magic_pl.lightning.metrics import ExampleCorrectness

    m = ExampleCorrectness(num_tasks=2)
    m.update(torch.tensor([True, False]), torch.tensor([3, 0]), 1)
    m.update(torch.tensor([False, True, True]), torch.tensor([1, 2, 0]), torch.tensor([1, 1, 0]))
    table = m.compute()
    assert table.tolist() == [[1, -1, -1, -1], [0, 0, 1, 1]]  # -1: never evaluated
    per_task = m.per_task()
    assert per_task[0].tolist() == [True] and per_task[1].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="2 correctness values for 3"):
        m.update(torch.tensor([True, False]), torch.tensor([0, 1, 2]), 0)
    single = ExampleCorrectness(num_tasks=1)
    single.update(torch.tensor([True]), torch.tensor([0]), 0)
    assert single.per_task()[0].tolist() == [True]  # a one-element result is not squeezed away
