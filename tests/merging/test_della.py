"""DELLA: MagPrune's keep probabilities, its rescale rules, the sign election and the disjoint mean."""

from __future__ import annotations

import pytest
import torch

from magic_pl.merging import merge_tensor
from magic_pl.merging._common import generator_for
from magic_pl.merging.della import della
from magic_pl.merging.steps import magprune, magprune_keep_probabilities


def test_keep_probabilities_rise_linearly_with_the_magnitude_rank_per_row():
    tau = torch.tensor([[0.1, -3.0, 2.0, 0.5, -0.2], [5.0, 4.0, -3.0, 2.0, 1.0]])
    probs = magprune_keep_probabilities(tau, density=0.5, epsilon=0.2)
    # Row 0 magnitude ranks (1 = smallest): 0.1 -> 1, 3 -> 5, 2 -> 4, 0.5 -> 3, 0.2 -> 2; p = 0.3 + 0.4 (r - 1) / 4.
    torch.testing.assert_close(probs[0], torch.tensor([0.3, 0.7, 0.6, 0.5, 0.4]))
    torch.testing.assert_close(probs[1], torch.tensor([0.7, 0.6, 0.5, 0.4, 0.3]))
    assert probs.mean().item() == pytest.approx(0.5)
    # A vector is one row; a one-entry row takes the lowest probability.
    torch.testing.assert_close(magprune_keep_probabilities(torch.tensor([1.0, -2.0, 3.0]), 0.5, 0.1),
                               torch.tensor([[0.4, 0.5, 0.6]]))


def test_rescale_rules():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(20, 30, generator=g)
    probs = magprune_keep_probabilities(tau, 0.4, 0.1)
    mask = torch.bernoulli(probs, generator=generator_for(3, "w", 0, tau.device))
    kept = tau * mask
    none = magprune(tau, 0.4, 0.1, generator_for(3, "w", 0, tau.device), rescale="none")
    assert torch.equal(none, kept)
    inverse = magprune(tau, 0.4, 0.1, generator_for(3, "w", 0, tau.device), rescale="inverse")
    torch.testing.assert_close(inverse, kept / probs)
    l1 = magprune(tau, 0.4, 0.1, generator_for(3, "w", 0, tau.device), rescale="l1")
    torch.testing.assert_close(l1.abs().sum(), tau.abs().sum())  # the L1 norm is restored
    torch.testing.assert_close(l1, kept * (tau.abs().sum() / kept.abs().sum()))
    assert torch.equal(magprune(tau, 1.0, 0.1, generator_for(0, "w", 0, tau.device)), tau)


def test_inverse_rescale_is_unbiased():
    tau = torch.linspace(-1, 1, 50).reshape(5, 10)
    acc = torch.zeros_like(tau, dtype=torch.float64)
    n = 4000
    for s in range(n):
        acc += magprune(tau, 0.3, 0.2, generator_for(s, "w", 0, tau.device), rescale="inverse").double()
    probs = magprune_keep_probabilities(tau, 0.3, 0.2).double()
    sd = tau.double().abs() * torch.sqrt((1 - probs) / probs / n)
    assert ((acc / n - tau.double()).abs() <= 5 * sd + 1e-12).all()


def test_della_elects_signs_and_averages_agreeing_pruned_entries():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(8, 12, generator=g) for _ in range(4)]
    out = della(taus, name="blocks.0.w", density=0.5, epsilon=0.1, scale=0.7, seed=9)
    pruned = [magprune(t, 0.5, 0.1, generator_for(9, "blocks.0.w", k, t.device)) for k, t in enumerate(taus)]
    stack = torch.stack(pruned).double()
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(stack) == elected
    expected = 0.7 * (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)
    # Reproducible, and the masks differ per key and seed.
    assert torch.equal(out, della(taus, name="blocks.0.w", density=0.5, epsilon=0.1, scale=0.7, seed=9))
    assert not torch.equal(out, della(taus, name="blocks.1.w", density=0.5, epsilon=0.1, scale=0.7, seed=9))


def test_density_one_is_ties_without_trimming():
    taus = [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([-1.0, -1.0, 2.0, 1.0])]
    # sums [0, -3, 2, 4] -> elected [+, -, +, +]; means over agreeing: [1, -1.5, 2, 2].
    assert torch.equal(della(taus, density=1.0), torch.tensor([1.0, -1.5, 2.0, 2.0]))


def test_probability_window_must_stay_inside_zero_one():
    taus = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"della.*density \+/- epsilon.*\(0, 1\)"):
        merge_tensor("della", taus, density=0.9, epsilon=0.15)
    with pytest.raises(ValueError, match="rescale='l2'"):
        merge_tensor("della", taus, rescale="l2")
