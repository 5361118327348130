"""The linear merge (MergeKit's ``linear``): closed form, weight-average parity bit for bit, traits and options."""

from __future__ import annotations

import pytest
import torch

from magic_pl.merging import MERGE_METHODS, get_method, merge, merge_tensor, validate_merge_options
from magic_pl.merging.basic import weight_average
from magic_pl.merging.linear import linear


def _taus(k: int, *shape: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(k)]


@pytest.mark.parametrize("weights,normalize", [([0.5, 2.0, -1.0], True), ([0.5, 2.0, -1.0], False), (0.7, False),
                                               (0.7, True)])
def test_closed_form(weights, normalize):
    taus = _taus(3, 6, 5)
    w = weights if isinstance(weights, list) else [weights] * 3
    expected = sum(wk * t.double() for wk, t in zip(w, taus)) / (sum(w) if normalize else 1.0)
    out = linear(taus, weights=weights, normalize=normalize)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merge_tensor("linear", taus, weights=weights, normalize=normalize), out, rtol=0, atol=0)


def test_equal_normalised_weights_are_the_weight_average_bit_for_bit():
    taus = _taus(5, 33, 17, seed=1)
    for t in taus:
        t[0, :3] = -0.0  # signed zeros too
    assert torch.equal(linear(taus).view(torch.int32), weight_average(taus).view(torch.int32))
    tvs = [{"a.weight": t, "a.bias": t[0]} for t in taus]
    a, b = merge("linear", tvs), merge("weight_average", tvs)
    assert all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_registered_as_a_linear_row_separable_method():
    spec = get_method("linear")
    assert "linear" in MERGE_METHODS and spec.row_separable and not spec.needs_data
    assert spec.linear_weights(3, {"weights": [1.0, 2.0, 1.0]}).coefficients == (0.25, 0.5, 0.25)
    assert spec.linear_weights(2, {"normalize": False}).coefficients == (1.0, 1.0)
    assert validate_merge_options("linear", {"weights": [1, 2], "normalize": False}) == {
        "weights": [1.0, 2.0], "normalize": False}


def test_bad_options_and_weight_counts_are_refused_before_reading():
    with pytest.raises(ValueError, match=r"'linear': option weights=nan must be finite"):
        validate_merge_options("linear", {"weights": [1.0, float("nan")]})
    with pytest.raises(ValueError, match="option normalize=1 must be True or False"):
        validate_merge_options("linear", {"normalize": 1})
    tvs = [{"w": t} for t in _taus(3, 4)]
    with pytest.raises(ValueError, match="2 weights for K = 3"):
        merge("linear", tvs, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights sum to 0"):
        merge("linear", tvs, weights=[1.0, -1.0, 0.0])
    assert torch.isfinite(merge("linear", tvs, weights=[1.0, -1.0, 0.0], normalize=False)["w"]).all()
