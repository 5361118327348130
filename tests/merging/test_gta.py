"""MergeKit's generalized task arithmetic (``gta``) against the formula of MergeKit 0.1.5's ``merge_group``, written out
here on a stacked ``[K, ...]`` tensor (MergeKit's own layout, unlike the method's task-by-task loop), and MergeKit's
parameter settings (gradients over the layers, filters)."""

from __future__ import annotations

import pytest
import torch

from magic_pl.merging import merge
from magic_pl.merging.gta import gta, layer_count, layer_position, resolve_setting
from magic_pl.merging.registry import validate_merge_options


def _mergekit_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel())
    mask[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
    return t * mask.reshape(t.shape)


def _mergekit_outliers(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = t.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    idx = torch.sort(t.abs().reshape(-1)).indices
    mask = torch.zeros(n)
    mask[idx[bottom:bottom + target]] = 1
    return t * mask.reshape(t.shape)


def _reference(taus, weights, densities, sparsify, consensus, normalize, lam, gamma=0.01):
    """MergeKit's merge_group in task-vector space: stack, weight, sign mask from the stacked sum, divide."""
    deltas = torch.stack([
        t if sparsify is None else (_mergekit_magnitude(t, d) if sparsify == "magnitude"
                                    else _mergekit_outliers(t, d, gamma))
        for t, d in zip(taus, densities)])
    w = torch.tensor(weights).reshape(-1, *([1] * taus[0].dim()))
    deltas = deltas * w
    if consensus:
        sign = deltas.sign()
        majority = ((deltas.sum(0) if consensus == "sum" else sign.sum(0)) >= 0).float() * 2 - 1
        mask = sign == majority
        mixed, divisor = (deltas * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam


@pytest.mark.parametrize("sparsify,consensus,normalize", [
    (None, None, False), (None, None, True), ("magnitude", "sum", True), ("magnitude", "count", False),
    ("magnitude", None, False), ("magnitude_outliers", "sum", False), ("magnitude_outliers", None, True)])
def test_gta_equals_the_mergekit_formula(sparsify, consensus, normalize):
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(6, 7, generator=g) for _ in range(3)]
    weights, densities = [1.0, 0.5, 0.8], [0.5, 0.3, 0.9]
    got = gta(taus, sparsify=sparsify or "none", consensus=consensus or "none", weights=weights,
              densities=densities, normalize=normalize, scale=0.7, gammas=0.1)
    want = _reference(taus, weights, densities, sparsify, consensus, normalize, 0.7, gamma=0.1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_gradients_and_filters_resolve_per_layer():
    # MergeKit's evaluate_setting: layer i of N at t = i / (N - 1), interpolated over the list
    assert resolve_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert resolve_setting([0.2, 0.4, 1.0], "x", 0.75) == pytest.approx(0.7)
    assert resolve_setting([{"filter": "mlp", "value": 0.3}, {"value": [0.0, 1.0]}], "layers.1.mlp.w", 0.5) == 0.3
    assert resolve_setting([{"filter": "mlp", "value": 0.3}, {"value": [0.0, 1.0]}], "layers.1.attn.w", 0.5) == 0.5
    with pytest.raises(ValueError, match="no filter"):
        resolve_setting([{"filter": "mlp", "value": 0.3}], "layers.1.attn.w", 0.5)
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 5) == 0.0  # outside the layers: t = 0, as MergeKit plans them
    assert layer_count(["model.layers.0.w", "model.layers.3.w", "lm_head.weight"]) == 4

    g = torch.Generator().manual_seed(0)
    keys = [f"layers.{i}.w" for i in range(3)] + ["emb"]
    tvs = [{k: torch.randn(4, 4, generator=g) for k in keys} for _ in range(2)]
    out = merge("gta", tvs, weights=[[0.0, 1.0], 1.0], num_layers=3)
    for i, k in enumerate(keys):
        w0 = i / 2 if k != "emb" else 0.0
        torch.testing.assert_close(out[k], w0 * tvs[0][k] + tvs[1][k])


def test_bad_settings_are_refused_before_any_tensor():
    with pytest.raises(ValueError, match="weights"):
        validate_merge_options("gta", {"weights": "heavy"})
    with pytest.raises(ValueError, match=r"filter"):
        validate_merge_options("gta", {"densities": [{"filter": 3, "value": 0.5}]})
    with pytest.raises(ValueError, match="sparsify"):
        validate_merge_options("gta", {"sparsify": "top_k"})
    with pytest.raises(ValueError, match="3 weights for K = 2"):
        merge("gta", [{"w": torch.ones(2)}] * 2, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="della_magprune needs density"):
        gta([torch.ones(3, 3)] * 2, sparsify="della_magprune", densities=0.1, epsilons=0.2)


def test_random_sparsifiers_are_seeded_and_keep_the_l1_norm():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(32, 32, generator=g) for _ in range(2)]
    a = gta(taus, name="w", sparsify="random", densities=0.5, rescale=True, weights=[1.0, 0.0], seed=4)
    b = gta(taus, name="w", sparsify="random", densities=0.5, rescale=True, weights=[1.0, 0.0], seed=4)
    assert torch.equal(a, b)
    kept = (a != 0).float().mean()
    assert 0.4 < float(kept) < 0.6
    # MergeKit's rescale matches the L1 norm of the task vector (not DARE's 1 / p)
    torch.testing.assert_close(a.abs().sum(), taus[0].abs().sum(), rtol=1e-5, atol=0)


def test_base_weight_averages_the_base_as_mergekits_linear_does():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 3, generator=g)
    experts = [base + torch.randn(4, 3, generator=g) for _ in range(2)]
    got = base + gta([e - base for e in experts], weights=[0.6, 0.4], normalize=True, base_weight=0.5)
    want = (0.5 * base + 0.6 * experts[0] + 0.4 * experts[1]) / 1.5  # MergeKit's linear over all three models
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
