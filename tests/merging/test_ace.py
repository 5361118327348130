"""ACE-Merging: the closed form against an independent float64 computation (numpy, covariance per task, explicit
inverse), both branches of the heterogeneity switch, the properties its formulas imply, options, and the front doors
on a tiny model."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch
from torch import nn

from magic_pl.merging import MERGE_METHODS, get_method, merge, merge_models, merge_tensor, validate_merge_options
from magic_pl.merging.ace import ace, heterogeneity
from magic_pl.merging.registry import method_options


def _taus(shape: tuple[int, int], scales: tuple[float, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * s for s in scales]


SAME = (1.0, 1.0, 1.0, 1.0)       # energies alike: gamma ~ 1e-4, the plain closed form
UNEQUAL = (0.05, 1.0, 3.0, 0.5)   # energies apart: gamma > 1, trace normalisation and spectral refinement


def _gamma(taus: list[torch.Tensor]) -> float:
    logs = np.log(np.array([np.sum(t.double().numpy() ** 2) for t in taus]) + 1e-12)
    return float(np.var(logs, ddof=1) / (np.mean(logs) ** 2 + 1e-12)) if len(taus) > 1 else math.nan


def _reference(taus: list[torch.Tensor], eps: float = 1e-2, k_frac: float = 0.3, threshold: float = 0.3,
               hetero: bool | None = None) -> np.ndarray:
    """ACE written out task by task in numpy float64: each covariance kept, the normal matrix inverted."""
    ws = [t.double().numpy() for t in taus]
    k, n = len(ws), ws[0].shape[1]
    energy = np.array([np.sum(w * w) for w in ws])
    if hetero is None:
        hetero = _gamma(taus) > threshold
    xs = [w - w.mean(axis=0, keepdims=True) for w in ws]
    grams = [np.einsum("ri,rj->ij", x, x) for x in xs]
    traces = [np.trace(c) + 1e-12 for c in grams]
    sigmas = [c / t if hetero else c for c, t in zip(grams, traces)]
    ridges = [eps / t if hetero else eps for t in traces]
    reg = [s + r * np.eye(n) for s, r in zip(sigmas, ridges)]
    numer = sum(x @ m for x, m in zip(xs, reg))
    prior = np.sum(sigmas, axis=0).mean(axis=0)
    if hetero:
        prior = prior / (energy.mean() + 1e-12)
    normal = np.sum(reg, axis=0) + np.outer(np.ones(n), prior)
    merged = numer @ np.linalg.inv(normal)
    if hetero:
        sigma_bar = np.sum(reg, axis=0) / k
        fused = merged + sum(w @ (s - sigma_bar) for w, s in zip(ws, sigmas))
        u, s, vt = np.linalg.svd(fused, full_matrices=False)
        top = int(min(fused.shape) * k_frac)
        if top > 0:
            merged = merged + s[:top].mean() * u[:, :top] @ vt[:top]
    return merged


def _close(out: torch.Tensor, expected: np.ndarray, rtol: float = 2e-6) -> None:
    assert out.dtype == torch.float32
    err = np.abs(out.double().numpy() - expected).max()
    assert err <= rtol * np.abs(expected).max(), (err, np.abs(expected).max())


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
@pytest.mark.parametrize("scales,hetero", [(SAME, False), (UNEQUAL, True)])
def test_closed_form_matches_an_independent_float64_computation(shape, scales, hetero):
    taus = _taus(shape, scales, seed=sum(shape))
    assert (_gamma(taus) > 0.3) is hetero  # both branches are exercised
    _close(ace(taus, name="blocks.0.mlp.weight"), _reference(taus))
    _close(ace(taus, name="w", eps=0.3, rank_fraction=0.5), _reference(taus, eps=0.3, k_frac=0.5))
    _close(merge_tensor("ace", taus, name="w", scale=0.5), 0.5 * _reference(taus))


def test_heterogeneity_score_and_threshold():
    taus = _taus((9, 6), UNEQUAL, seed=1)
    energies = torch.stack([t.double().pow(2).sum() for t in taus])
    assert heterogeneity(energies) == pytest.approx(_gamma(taus), rel=1e-12)
    assert math.isnan(heterogeneity(energies[:1]))  # K = 1: undefined, never heterogeneous
    # the threshold option picks the branch: forced homogeneous, forced heterogeneous
    _close(ace(taus, gamma_threshold=1e9), _reference(taus, hetero=False))
    same = _taus((9, 6), SAME, seed=2)
    _close(ace(same, gamma_threshold=0.0), _reference(same, hetero=True))
    _close(ace(taus[:1]), _reference(taus[:1], hetero=False))


def test_homogeneous_merge_lies_in_the_row_centred_space():
    # the numerator holds the row-centred task vectors, so every column of W0 sums to zero
    taus = _taus((15, 6), SAME, seed=3)
    out = ace(taus).double()
    assert out.sum(0).abs().max() <= 1e-6 * out.abs().max()


def test_copies_of_one_expert_merge_like_the_expert_alone():
    # every sum over tasks is K times one term, and the prior scales the same way: K cancels
    one = _taus((10, 8), (1.0,), seed=4)
    for k in (2, 5):
        torch.testing.assert_close(ace(one * k), ace(one), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ace(one), one[0], atol=1e-3)  # the centring and the prior move even one expert


def test_a_large_ridge_tends_to_the_row_centred_mean():
    taus = _taus((11, 5), SAME, seed=5)
    centred = torch.stack([t - t.mean(0) for t in taus]).mean(0)
    torch.testing.assert_close(ace(taus, eps=1e9), centred, rtol=1e-5, atol=1e-5)


def test_task_order_invariant_and_row_column_permutation_equivariant():
    taus = _taus((13, 9), UNEQUAL, seed=6)
    out = ace(taus)
    torch.testing.assert_close(ace(taus[::-1]), out, rtol=1e-5, atol=1e-5)
    rows, cols = torch.randperm(13, generator=torch.Generator().manual_seed(0)), torch.arange(9).flip(0)
    # rows are the covariance's samples (their order is irrelevant); a column permutation keeps the all-ones
    # vector of the prior, so it permutes the merge
    torch.testing.assert_close(ace([t[rows][:, cols] for t in taus]), out[rows][:, cols], rtol=1e-5, atol=1e-5)


def test_refinement_without_directions_adds_nothing():
    taus = _taus((12, 7), UNEQUAL, seed=7)
    _close(ace(taus, rank_fraction=0.0), _reference(taus, k_frac=0.0))
    small = _taus((3, 8), UNEQUAL, seed=8)  # floor(0.3 * 3) = 0: the reference would average no singular value
    assert _gamma(small) > 0.3
    out = ace(small)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ace(small, rank_fraction=0.0))


def test_other_tensors_are_averaged_and_scaled():
    g = torch.Generator().manual_seed(9)
    bias = [torch.randn(6, generator=g) for _ in range(3)]
    conv = [torch.randn(4, 2, 3, 3, generator=g) for _ in range(3)]
    proj = _taus((5, 4), UNEQUAL[:3], seed=10)
    for taus, name in ((bias, "fc.bias"), (conv, "conv.weight"), (proj, "text_projection")):
        mean = torch.stack(taus).mean(0)
        torch.testing.assert_close(ace(taus, name=name), mean)
        torch.testing.assert_close(ace(taus, name=name, scale=0.3), 0.3 * mean)
    _close(ace(proj, name="text_projection", matrix_exclude=None), _reference(proj))
    _close(ace(proj, name="embeddings.weight"), _reference(proj))  # embedding tables are merged as matrices
    taus = _taus((8, 6), UNEQUAL, seed=11)
    assert torch.equal(ace(taus, scale=2.0), 2.0 * ace(taus))
    assert torch.equal(ace([torch.zeros(6, 4)] * 3), torch.zeros(6, 4))
    assert ace([t.to(torch.bfloat16) for t in taus]).dtype == torch.float32


def test_registered_with_its_defaults_and_traits():
    spec = get_method("ace")
    assert "ace" in MERGE_METHODS and "2603.02945" in spec.paper
    assert not spec.row_separable and spec.linear is None and not spec.needs_data and spec.needs_base is False
    assert method_options("ace") == {"scale": 1.0, "eps": 1e-2, "rank_fraction": 0.3, "gamma_threshold": 0.3,
                                     "matrix_exclude": "text_projection"}
    assert spec.task_count_error(1, {}) is None


class _Untouchable(Mapping[str, torch.Tensor]):
    """A task vector whose tensors must not be read."""

    def __getitem__(self, key: str) -> torch.Tensor:
        raise AssertionError(f"tensor {key!r} was read before the options were validated")

    def __iter__(self) -> Iterator[str]:
        return iter(["w"])

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize(
    "options,message",
    [
        ({"eps": 0.0}, r"'ace': option eps=0.0 must lie in \(0, inf\]"),
        ({"eps": -1e-3}, r"option eps=-0.001 must lie in \(0, inf\]"),
        ({"eps": float("nan")}, "eps=nan must be finite"),
        ({"rank_fraction": 1.5}, r"rank_fraction=1.5 must lie in \[0, 1\]"),
        ({"gamma_threshold": -0.1}, "gamma_threshold=-0.1 must be >= 0"),
        ({"matrix_exclude": "("}, "is not a valid regex"),
        ({"scale": 1e4}, r"is out of range \(\|scale\| <= 1000\)"),
        ({"k_frac": 0.3}, r"unknown option\(s\) 'k_frac' for merge method 'ace'; valid options: eps, gamma_threshold, "
                          r"matrix_exclude, rank_fraction, scale"),
    ],
)
def test_bad_options_are_refused_before_reading_any_tensor(options, message):
    with pytest.raises(ValueError, match=message):
        validate_merge_options("ace", options)
    with pytest.raises(ValueError, match=message):
        merge("ace", [_Untouchable(), _Untouchable()], **options)


def test_direct_calls_check_their_options():
    taus = _taus((4, 3), SAME[:2])
    with pytest.raises(ValueError, match="eps=0"):
        ace(taus, eps=0)
    with pytest.raises(ValueError, match="rank_fraction"):
        ace(taus, rank_fraction=2.0)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 5)
        self.text_projection = nn.Parameter(torch.randn(5, 4))


@torch.no_grad()
def _expert(base: nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return model.state_dict()


def test_front_doors_on_a_tiny_model():
    torch.manual_seed(0)
    base = _Tiny()
    base_sd = base.state_dict()
    experts = [_expert(base, 10 + i, s) for i, s in enumerate((0.002, 0.02, 0.2))]
    tvs = [{k: e[k] - base_sd[k] for k in base_sd} for e in experts]
    out = merge("ace", tvs)
    assert list(out) == list(base_sd)
    for key in ("embed.weight", "fc1.weight", "fc2.weight"):
        taus = [tv[key] for tv in tvs]
        assert _gamma(taus) > 0.3  # energies spread over two decades: the refined branch
        _close(out[key], _reference(taus), rtol=5e-6)
        assert torch.equal(out[key], merge_tensor("ace", taus, name=key))
    for key in ("conv.weight", "conv.bias", "fc1.bias", "norm.weight", "text_projection"):
        torch.testing.assert_close(out[key], torch.stack([tv[key] for tv in tvs]).mean(0))
    again = merge("ace", [{k: v.clone() for k, v in tv.items()} for tv in tvs])
    assert all(torch.equal(again[k], out[k]) for k in out)  # bit-reproducible
    scaled = merge("ace", tvs, scale=0.5, eps=0.1)
    _close(scaled["fc1.weight"], 0.5 * _reference([tv["fc1.weight"] for tv in tvs], eps=0.1), rtol=5e-6)
    full = merge_models(base_sd, experts, "ace")
    for key in base_sd:
        torch.testing.assert_close(full[key], base_sd[key] + out[key])
