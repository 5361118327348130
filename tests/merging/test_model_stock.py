"""Model Stock: the ratio t = K cos / (1 + (K - 1) cos) from the mean pairwise cosine, per tensor."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from magic_pl.merging import merge
from magic_pl.merging.model_stock import mean_pairwise_cosine, model_stock


def test_equal_angle_closed_form():
    # Three orthonormal-plus-common vectors: tau_k = c + e_k with |c| = |e_k| = 1, c orthogonal to all e_k, so every
    # pair has cos = 1/2; t = 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    eye = torch.eye(4)
    c = eye[3]
    taus = [(c + eye[k]).reshape(2, 2) for k in range(3)]
    assert mean_pairwise_cosine(taus) == pytest.approx(0.5, abs=1e-7)
    torch.testing.assert_close(model_stock(taus), 0.75 * sum(taus) / 3)


def test_matches_an_independent_recomputation():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(7, 5, generator=g)
    taus = [common + torch.randn(7, 5, generator=g) for _ in range(5)]
    flat = [t.double().numpy().ravel() for t in taus]
    cos = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.combinations(flat, 2)])
    ratio = 5 * cos / (1 + 4 * cos)
    expected = ratio * np.mean(flat, axis=0).reshape(7, 5)
    np.testing.assert_allclose(model_stock(taus).double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_identical_tasks_keep_the_average_and_orthogonal_ones_vanish():
    t = torch.randn(4, 3)
    torch.testing.assert_close(model_stock([t, t, t]), t)  # cos = 1: t = 1
    eye = torch.eye(3)
    assert torch.equal(model_stock([eye[0], eye[1], eye[2]]), torch.zeros(3))  # cos = 0: t = 0
    # A zero task vector counts as orthogonal, not as NaN.
    assert torch.equal(model_stock([torch.zeros(3), eye[0]]), torch.zeros(3))


def test_singular_ratio_keeps_the_base():
    # K = 2 antipodal vectors: 1 + (K - 1) cos = 0, the ratio is undefined -> t = 0 (MergeKit's rule).
    v = torch.tensor([1.0, 2.0])
    assert torch.equal(model_stock([v, -v]), torch.zeros(2))


def test_per_tensor_ratio_and_k_errors():
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(6, generator=g) for _ in range(3)]
    b = [torch.ones(4) + 0.01 * torch.randn(4, generator=g) for _ in range(3)]
    out = merge("model_stock", [{"a": x, "b": y} for x, y in zip(a, b)])
    torch.testing.assert_close(out["a"], model_stock(a))
    torch.testing.assert_close(out["b"], model_stock(b))  # near-identical tasks: ratio ~ 1
    assert abs(float(out["b"].mean()) - 1.0) < 0.02
    with pytest.raises(ValueError, match="at least two"):
        merge("model_stock", [{"a": a[0]}])
