"""WUDI: the closed-form gradient equals autograd's on the reference loss; Adam steps as the reference."""

from __future__ import annotations

import pytest
import torch

from magic_pl.merging import merge_tensor
from magic_pl.merging.wudi import wudi, wudi_matrix


def _taus(k: int, m: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(m, n, generator=g)
    return [(common + torch.randn(m, n, generator=g)) * 1e-3 for _ in range(k)]


def _reference_loss(x: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    tvs = torch.stack(taus)
    sq = torch.square(torch.norm(tvs.reshape(len(taus), -1), p=2, dim=-1))
    product = torch.matmul(x.unsqueeze(0) - tvs, tvs.transpose(1, 2))
    return torch.sum(torch.square(product) / sq.unsqueeze(-1).unsqueeze(-1))


def _reference_wudi(taus: list[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """The reference optimisation: autograd on the loss, Adam from the sum."""
    x = torch.nn.Parameter(torch.stack(taus).sum(0))
    opt = torch.optim.Adam([x], lr=lr, weight_decay=0)
    for _ in range(steps):
        loss = _reference_loss(x, taus)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


def test_matches_the_autograd_reference_in_float64():
    taus = [t.double() for t in _taus(4, 10, 7, seed=0)]
    ours = wudi_matrix(taus, steps=60, lr=1e-5)
    ref = _reference_wudi(taus, steps=60, lr=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert (ours - sum(taus)).abs().max() > 1e-5  # it moved


def test_float32_close_to_reference_and_lowers_the_loss():
    taus = _taus(3, 16, 12, seed=1)
    ours = wudi(taus, name="blocks.0.mlp.fc1.weight", steps=100)
    ref = _reference_wudi(taus, steps=100, lr=1e-5)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-4
    start = sum(taus)
    assert _reference_loss(ours, taus) < 0.5 * _reference_loss(start, taus)


def test_non_matrices_are_averaged_and_zero_tasks_are_skipped():
    vs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])]
    torch.testing.assert_close(wudi(vs, name="ln.bias"), torch.tensor([2.0, 1.0]))
    emb = [torch.randn(5, 4), torch.randn(5, 4)]
    torch.testing.assert_close(wudi(emb, name="token_embedding.weight"), (emb[0] + emb[1]) / 2)
    t = _taus(1, 6, 5, seed=2)[0]
    out = wudi([t, torch.zeros(6, 5)], name="w", steps=20)
    torch.testing.assert_close(out, wudi([t], name="w", steps=20) * 1.0)  # the zero task adds nothing
    assert torch.isfinite(out).all()


def test_options_and_device():
    taus = _taus(2, 6, 4, seed=3)
    torch.testing.assert_close(merge_tensor("wudi", taus, name="w", steps=5, device="cpu", scale=2.0),
                               2.0 * wudi(taus, name="w", steps=5))
    with pytest.raises(ValueError, match=r"'wudi'.*steps=-1"):
        merge_tensor("wudi", taus, steps=-1)
    with pytest.raises(ValueError, match=r"'wudi'.*lr=0"):
        merge_tensor("wudi", taus, lr=0)
    with pytest.raises(ValueError, match=r"'wudi'.*device='gpu0'"):
        merge_tensor("wudi", taus, device="gpu0")
