"""SLERP: closed forms on rows with known angles, the linear fallback, and the full-weights space."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from magic_pl.merging import merge, merge_models, merge_tensor
from magic_pl.merging.slerp import slerp, slerp_rows


def _np_slerp_row(a: np.ndarray, b: np.ndarray, t: float, threshold: float = 0.9995) -> np.ndarray:
    """Independent float64 SLERP of one row."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= 1e-8 or nb <= 1e-8:
        return (1 - t) * a + t * b
    c = np.clip(a @ b / (na * nb), -1, 1)
    if abs(c) > threshold:
        return (1 - t) * a + t * b
    th = math.acos(c)
    return math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b


def test_orthogonal_unit_rows_stay_on_the_circle():
    # a = e1, b = e2 (90 degrees): the midpoint is (e1 + e2) / sqrt(2), unit norm; t = 1/3 rotates by 30 degrees.
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(slerp([a, b]), torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2))
    torch.testing.assert_close(slerp([a, b], t=1 / 3), torch.tensor([[math.cos(math.pi / 6), 0.5, 0.0]]))
    assert torch.equal(slerp([a, b], t=0.0), a) and torch.allclose(slerp([a, b], t=1.0), b, atol=1e-7)


def test_each_row_is_interpolated_on_its_own_sphere():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    b[2] = 3.0 * a[2]  # colinear row: linear fallback
    b[4] = -a[4]  # antipodal row: linear fallback (the midpoint is 0)
    a[5] = 0.0  # zero row: no direction, linear
    out = slerp([a, b], t=0.3).double().numpy()
    for i in range(6):
        ref = _np_slerp_row(a[i].double().numpy(), b[i].double().numpy(), 0.3)
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], 0.7 * a[2].numpy() + 0.3 * b[2].numpy(), rtol=1e-6)
    # Per-row, not per-tensor: the whole-tensor SLERP (FusionBench's rule) differs.
    whole = _np_slerp_row(a.double().numpy().ravel(), b.double().numpy().ravel(), 0.3).reshape(6, 9)
    assert np.abs(out - whole).max() > 1e-2


def test_conv_and_vectors_use_the_leading_axis_as_rows():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    out = slerp([a, b]).reshape(4, -1).double().numpy()
    for i in range(4):
        ref = _np_slerp_row(a[i].reshape(-1).double().numpy(), b[i].reshape(-1).double().numpy(), 0.5)
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-6)
    # A 1-D tensor is one-entry rows: always colinear, so linear.
    v, w = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 4.0, 0.0])
    torch.testing.assert_close(slerp([v, w]), 0.5 * (v + w))
    torch.testing.assert_close(slerp([torch.tensor(2.0), torch.tensor(4.0)]), torch.tensor(3.0))


def test_weights_space_interpolates_full_weights_and_returns_a_task_vector():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 8, generator=g)
    t1, t2 = 0.1 * torch.randn(5, 8, generator=g), 0.1 * torch.randn(5, 8, generator=g)
    two = slerp([t1, t2], base=base, space="weights", t=0.4)
    torch.testing.assert_close(two, slerp_rows(base + t1, base + t2, 0.4) - base)
    one = slerp([t1], base=base, space="weights")
    torch.testing.assert_close(one, slerp_rows(base, base + t1, 0.5) - base)
    # Full-weight SLERP is not task-space SLERP.
    assert (two - slerp([t1, t2], t=0.4)).abs().max() > 1e-4


def test_weights_space_through_the_drivers():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(4, 6, generator=g), "b": torch.randn(4, generator=g)}
    experts = [{k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    tau_m = merge("slerp", taus, base=base, space="weights", t=0.25)
    model = merge_models(base, experts, "slerp", space="weights", t=0.25)
    for k in base:
        ref = slerp_rows(experts[0][k], experts[1][k], 0.25)
        torch.testing.assert_close(model[k], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tau_m[k], ref - base[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the base"):
        merge("slerp", taus, space="weights")


def test_task_count_and_option_errors():
    taus = [torch.randn(3, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="two task vectors.*K = 3"):
        merge("slerp", [{"w": t} for t in taus])
    with pytest.raises(ValueError, match="K = 1"):
        merge_tensor("slerp", taus[:1])
    with pytest.raises(ValueError, match=r"'slerp'.*t=1.5.*\[0, 1\]"):
        merge_tensor("slerp", taus[:2], t=1.5)
    with pytest.raises(ValueError, match="space='rows'.*'task', 'weights'"):
        merge_tensor("slerp", taus[:2], space="rows")
