"""WSC (docs/method.md, WSC): known answers, scale invariance, gating, an independent row loop, key selection, edge
cases."""

from __future__ import annotations

import math

import pytest
import torch

from magic_pl.calibration import weight_space_calibration
from magic_pl.calibration.wsc import DEFAULT_WSC_EXCLUDE, row_scales, wsc_keys


def _loop_lambda(d: torch.Tensor, rows: list[torch.Tensor], eps: float) -> float:
    """The paper's formula for one row, written out in float64 with a Python loop over tasks."""
    d = d.double()
    alphas = []
    res = d.clone()
    for a in rows:
        a = a.double()
        alpha = float(d @ a) / float(a @ a)
        alphas.append(alpha)
        res -= alpha * a
    r = sum(float(a.double().norm()) for a in rows) / len(rows)
    lam = 1.0 / math.sqrt(sum(x * x for x in alphas) + float(res @ res) / (r * r) + eps)
    return lam if math.isfinite(lam) else 1.0


def _orthogonal_rows(k: int, dim: int, norm: float, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q.T * norm).float()  # [k, dim], orthogonal rows of equal norm


def test_orthogonal_equal_norm_rows_mean_rescaled_to_task_norm():
    K, out, dim, r = 4, 3, 16, 2.5
    tasks = torch.stack([_orthogonal_rows(K, dim, r, seed=i) for i in range(out)], dim=1)  # [K, out, dim]
    tvs = [{"fc.weight": tasks[k]} for k in range(K)]
    mean = tasks.mean(0)
    cal = weight_space_calibration({"fc.weight": mean}, tvs)["fc.weight"]
    torch.testing.assert_close(cal.norm(dim=-1), torch.full((out,), r), rtol=1e-5, atol=0)
    torch.testing.assert_close(cal, mean * math.sqrt(K), rtol=1e-5, atol=1e-6)  # direction kept, lambda = sqrt(K)


def test_scale_invariance():
    g = torch.Generator().manual_seed(1)
    tvs = [{"w": torch.randn(5, 7, generator=g)} for _ in range(3)]
    d = torch.randn(5, 7, generator=g)
    base = weight_space_calibration({"w": d}, tvs, eps=0.0)["w"]
    for c in (0.1, 0.3, 7.0):
        scaled = weight_space_calibration({"w": c * d}, tvs, eps=0.0)["w"]
        torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-6)


def test_matches_independent_row_loop_random_and_conv():
    g = torch.Generator().manual_seed(2)
    shapes = {"lin.weight": (6, 9), "conv.weight": (4, 3, 3, 3)}
    tvs = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    merged = {k: 0.3 * sum(tv[k] for tv in tvs) + 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}
    out, scales = weight_space_calibration(merged, tvs, eps=1e-8, return_scales=True)
    for key, shape in shapes.items():
        d = merged[key].reshape(shape[0], -1)
        want = torch.tensor(
            [_loop_lambda(d[i], [tv[key].reshape(shape[0], -1)[i] for tv in tvs], 1e-8) for i in range(shape[0])]
        )
        torch.testing.assert_close(scales[key].double(), want.double(), rtol=1e-5, atol=0)
        torch.testing.assert_close(out[key], (d * want[:, None].float()).reshape(shape), rtol=1e-5, atol=1e-6)


def _mixed_rows():
    """Row 0 of the merged vector is large (lambda < 1), row 1 small (lambda > 1)."""
    g = torch.Generator().manual_seed(3)
    tvs = [{"a.weight": torch.randn(2, 8, generator=g), "b.weight": torch.randn(2, 8, generator=g)} for _ in range(3)]
    merged = {}
    for key in ("a.weight", "b.weight"):
        m = sum(tv[key] for tv in tvs)
        m[0] *= 3.0
        m[1] *= 0.1
        merged[key] = m
    return merged, tvs


def test_gating_rules():
    merged, tvs = _mixed_rows()
    _, ungated = weight_space_calibration(merged, tvs, return_scales=True)
    assert ungated["a.weight"][0] < 1 < ungated["a.weight"][1]
    # sensitive tensor: rows only shrink; other tensors: rows only grow. Module names work too.
    for sensitive in ({"a.weight"}, ["a"]):
        out, sc = weight_space_calibration(merged, tvs, sensitive, return_scales=True)
        assert sc["a.weight"].tolist() == pytest.approx([ungated["a.weight"][0].item(), 1.0])
        assert sc["b.weight"].tolist() == pytest.approx([1.0, ungated["b.weight"][1].item()])
        torch.testing.assert_close(out["a.weight"][1], merged["a.weight"][1])
        torch.testing.assert_close(out["b.weight"][0], merged["b.weight"][0])
    # empty sensitive set: gating on, every tensor only grows
    _, sc = weight_space_calibration(merged, tvs, set(), return_scales=True)
    assert sc["a.weight"][0] == 1.0 and sc["a.weight"][1] > 1


def test_identical_experts_and_variants():
    K = 4
    a = torch.randn(3, 10, generator=torch.Generator().manual_seed(4))
    tvs = [{"w": a.clone()} for _ in range(K)]
    paper = row_scales(a, torch.stack([a] * K))
    torch.testing.assert_close(paper, torch.full((3,), 1 / math.sqrt(K + (K - 1) ** 2)), rtol=1e-5, atol=0)
    out = weight_space_calibration({"w": a}, tvs, variant="norm_match")["w"]
    torch.testing.assert_close(out, a, rtol=1e-5, atol=1e-6)  # norm already equals the task-row norm
    with pytest.raises(ValueError, match="unknown WSC variant"):
        weight_space_calibration({"w": a}, tvs, variant="nope")


def test_norm_match_equals_paper_for_orthogonal_equal_norm_rows():
    K, dim = 3, 12
    tasks = _orthogonal_rows(K, dim, 1.7)[:, None, :]  # [K, 1, dim]
    d = (0.3 * tasks.sum(0))
    torch.testing.assert_close(
        row_scales(d, tasks, eps=0.0), row_scales(d, tasks, variant="norm_match"), rtol=1e-5, atol=0
    )


def test_single_task_and_zero_vectors():
    a = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    out = weight_space_calibration({"w": 0.3 * a}, [{"w": a}], eps=0.0)["w"]
    torch.testing.assert_close(out, a, rtol=1e-5, atol=1e-6)  # K = 1: lambda = 1/0.3
    zero = {"w": torch.zeros(4, 6)}
    out, sc = weight_space_calibration(zero, [zero, zero], return_scales=True)
    assert torch.equal(out["w"], zero["w"]) and torch.equal(sc["w"], torch.ones(4))  # 0/0 -> lambda 1


def test_key_selection_dtype_and_passthrough():
    g = torch.Generator().manual_seed(6)
    shapes = {
        "blocks.0.fc.weight": (4, 4), "blocks.0.fc.bias": (4,), "norm.weight": (4,),
        "embeddings.word_embeddings.weight": (9, 4),
        "pos_embed": (1, 5, 4), "cls_token": (1, 1, 4), "head.weight": (3, 4), "bn.running_mean": (4,),
    }
    tvs = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(2)]
    merged = {k: (0.5 * (tvs[0][k] + tvs[1][k])).to(torch.bfloat16) for k in shapes}
    assert wsc_keys(merged) == ["blocks.0.fc.weight", "head.weight"]
    assert wsc_keys(merged, include=r"^head\.") == ["head.weight"]
    assert "embeddings.word_embeddings.weight" in wsc_keys(merged, exclude=())
    out = weight_space_calibration(merged, tvs)
    assert set(out) == set(merged)
    for k in merged:
        assert out[k].dtype == torch.bfloat16
        if k not in ("blocks.0.fc.weight", "head.weight"):
            assert out[k] is merged[k]
    assert not torch.equal(out["head.weight"], merged["head.weight"])
    assert isinstance(DEFAULT_WSC_EXCLUDE, tuple)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="K >= 1"):
        weight_space_calibration({"w": torch.ones(2, 2)}, [])
    with pytest.raises(KeyError, match="'w'"):
        weight_space_calibration({"w": torch.ones(2, 2)}, [{"v": torch.ones(2, 2)}])
    with pytest.raises(ValueError, match="shape mismatch for 'w'"):
        weight_space_calibration({"w": torch.ones(2, 2)}, [{"w": torch.ones(2, 3)}])


def test_joint_variant():
    K, dim = 3, 12
    tasks = _orthogonal_rows(K, dim, 1.3)[:, None, :]
    d = 0.4 * tasks.sum(0) + 0.0
    torch.testing.assert_close(row_scales(d, tasks, variant="joint"), row_scales(d, tasks), rtol=1e-5, atol=0)
    a = torch.randn(2, dim, generator=torch.Generator().manual_seed(7))
    same = torch.stack([a] * 4)
    torch.testing.assert_close(row_scales(a, same, variant="joint", eps=0.0), torch.full((2,), 2.0), rtol=1e-5, atol=0)
    # random correlated rows against an independent float64 least-squares solve, row by row
    g = torch.Generator().manual_seed(8)
    tasks = torch.randn(3, 4, dim, generator=g) + torch.randn(1, 4, dim, generator=g)
    d = torch.randn(4, dim, generator=g)
    got = row_scales(d, tasks, variant="joint", eps=0.0)
    for i in range(4):
        A = tasks[:, i, :].double()  # [K, dim]
        alpha = torch.linalg.lstsq(A.T, d[i].double().unsqueeze(-1)).solution.squeeze(-1)
        res = d[i].double() - alpha @ A
        r = A.norm(dim=-1).mean()
        want = 1 / math.sqrt(float(alpha @ alpha) + float(res @ res) / float(r * r))
        assert got[i].item() == pytest.approx(want, rel=1e-4)
