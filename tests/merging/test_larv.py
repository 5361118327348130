"""LARV (arXiv 2602.09413): effective rank, commutator conflict and the per-layer factors checked against closed forms
and an independent numpy recomputation; the rescaled merge equals the `then` method on hand-scaled task vectors;
the per-tensor paths refuse it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from magic_pl.merging import merge, merge_models, merge_tensor, validate_merge_options
from magic_pl.merging.basic import task_arithmetic
from magic_pl.merging.breadcrumbs import breadcrumbs
from magic_pl.merging.larv import commutator_conflict, effective_rank, larv_scales
from magic_pl.merging.ties import ties
from magic_pl.models.streaming import KeyMerger, MergeRequest, merge_request
from magic_pl.statedict import CheckpointError


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# Independent numpy reference of the paper's equations
# --------------------------------------------------------------------------------------------------------------------
def _np_reff(a: np.ndarray) -> float:
    s2 = np.linalg.svd(a.reshape(a.shape[0], -1), compute_uv=False) ** 2
    if s2.sum() == 0:
        return 1.0
    p = s2[s2 > 0] / s2.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _np_conflict(a: np.ndarray, d: np.ndarray) -> float:
    a, d = a.reshape(a.shape[0], -1), d.reshape(d.shape[0], -1)
    na, nd = np.linalg.norm(a), np.linalg.norm(d)
    if na < 1e-10 or nd < 1e-10:
        return 0.0
    return 0.5 * (np.linalg.norm(a @ d.T - d @ a.T) + np.linalg.norm(a.T @ d - d.T @ a)) / (na * nd)


def _np_factors(base: dict, tvs: list[dict], blocks: dict[int, list[str]], *, gate="tiered", tiers=(0.5, 0.75, 1.0),
                eta=1.0, rho=0.5, delta=0.5, gamma=3.0) -> list[dict[int, float]]:
    """Per task: block l -> s_{k,l}, straight from the equations (blocks: index -> keys of its matrices)."""
    layers = sorted(blocks)
    L = layers[-1] + 1
    out = []
    for tv in tvs:
        e, c = [], []
        for b in layers:
            mats = [(base[k].double().numpy(), tv[k].double().numpy()) for k in blocks[b]]
            if all(not d.any() for _, d in mats):
                e.append(0.0)
            else:
                e.append(np.mean([_np_reff(a) / (_np_reff(d) + 1e-8) for a, d in mats]))
            c.append(np.mean([_np_conflict(a, d) for a, d in mats]))
        e, c = np.array(e), np.array(c)
        std = c.std()
        z = (c - c.mean()) / (std if std >= 1e-8 else 1.0)
        score = e ** eta * ((np.array(layers) + 1.0) / L) ** rho / (1.0 + np.log1p(np.exp(z)))
        if gate == "continuous":
            s = 1.0 + delta * np.tanh(gamma * (score - 1.0))
        else:
            q1, q2 = np.quantile(score, [1 / 3, 2 / 3])  # linear interpolation, as torch.quantile
            s = np.where(score <= q1, tiers[0], np.where(score <= q2, tiers[1], tiers[2]))
        out.append(dict(zip(layers, s.tolist())))
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1-2. Effective rank and commutator conflict
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", [(3.0, 4.0), (1.0, 1.0), (1e-3, 2.0)])
def test_effective_rank_of_a_diagonal_matrix(a, b):
    p = np.array([a * a, b * b]) / (a * a + b * b)
    assert effective_rank(torch.diag(torch.tensor([a, b]))) == pytest.approx(math.exp(-(p * np.log(p)).sum()), 1e-12)


def test_effective_rank_closed_forms():
    u, v = _randn(7, 1, seed=0), _randn(1, 5, seed=1)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)  # rank 1
    for n in (1, 4, 9):
        assert effective_rank(torch.eye(n)) == pytest.approx(n, 1e-12)
    assert effective_rank(torch.zeros(3, 4)) == 1.0
    conv = _randn(6, 3, 3, 3, seed=2)
    assert effective_rank(conv) == pytest.approx(_np_reff(conv.double().numpy()), 1e-6)  # viewed as (6, 27)
    big = _randn(600, 520, seed=3)  # > 2^18 entries: float32
    assert effective_rank(big) == pytest.approx(_np_reff(big.double().numpy()), 1e-4)


def test_commutator_conflict_known_values():
    a = _randn(5, 5, seed=4)
    assert commutator_conflict(a, a) == pytest.approx(0.0, abs=1e-6)  # both commutator terms vanish
    assert commutator_conflict(a, -2.5 * a) == pytest.approx(0.0, abs=1e-6)
    # A = E11, D = E12: A D^T = D A^T = 0; A^T D - D^T A = E12 - E21, norm sqrt(2); ||A|| = ||D|| = 1
    e11, e12 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert commutator_conflict(e11, e12) == pytest.approx(math.sqrt(2) / 2, 1e-12)
    assert commutator_conflict(a, torch.zeros(5, 5)) == 0.0
    assert commutator_conflict(torch.full((2, 2), 1e-12), a[:2, :2]) == 0.0


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 2, 3, 3)])
def test_commutator_conflict_matches_the_direct_formula(shape):
    # tall, wide and conv: the Gram-product route equals the rows x rows / cols x cols commutators
    a, d = _randn(*shape, seed=5), _randn(*shape, seed=6)
    assert commutator_conflict(a, d) == pytest.approx(_np_conflict(a.double().numpy(), d.double().numpy()), 1e-9)


# --------------------------------------------------------------------------------------------------------------------
# 3. The factors of a toy model
# --------------------------------------------------------------------------------------------------------------------
def _toy(k: int = 2, n_blocks: int = 3):
    """A base and k task vectors keyed like a tiny timm model: blocks with matrices, a conv, biases and norms."""
    base = {"embed.weight": _randn(10, 6, seed=10)}
    for b in range(n_blocks):
        base[f"blocks.{b}.attn.weight"] = _randn(6, 6, seed=20 + b)
        base[f"blocks.{b}.attn.bias"] = _randn(6, seed=30 + b)
        base[f"blocks.{b}.mlp.weight"] = _randn(12, 6, seed=40 + b)
        base[f"blocks.{b}.norm.weight"] = torch.ones(6)
    base["blocks.1.conv.weight"] = _randn(4, 2, 3, 3, seed=50)
    base["head.weight"] = _randn(3, 6, seed=60)
    base["head.bias"] = _randn(3, seed=61)
    tvs = []
    for i in range(k):
        tv = {}
        for j, (key, t) in enumerate(base.items()):
            g = _randn(*t.shape, seed=1000 * (i + 1) + j)
            if key.startswith(f"blocks.{i % n_blocks}."):  # one low-rank block per task: a distinct contrast
                g = (_randn(t.shape[0], 1, seed=7 + i) @ _randn(1, t[0].numel(), seed=8 + i)).reshape(t.shape) \
                    if t.dim() >= 2 else g
            tv[key] = 0.1 * g
        tvs.append(tv)
    return base, tvs


def _matrix_blocks(base: dict) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for key, t in base.items():
        if key.startswith("blocks.") and t.dim() >= 2:
            out.setdefault(int(key.split(".")[1]), []).append(key)
    return out


def _hand_scaled(tvs, factors):
    out = []
    for tv, f in zip(tvs, factors):
        out.append({key: t * f[int(key.split(".")[1])] if key.startswith("blocks.") else t for key, t in tv.items()})
    return out


def test_scales_match_an_independent_recomputation():
    base, tvs = _toy()
    scales = larv_scales(tvs, list(base), base)
    expected = _np_factors(base, tvs, _matrix_blocks(base))
    for key in base:
        if key.startswith("blocks."):
            layer = int(key.split(".")[1])
            assert scales[key] == pytest.approx([f[layer] for f in expected], abs=1e-12), key
        else:  # embeddings and the head keep factor 1
            assert scales[key] == [1.0, 1.0], key
    # three blocks: the terciles give each block its own tier
    for k in range(2):
        assert sorted(scales[f"blocks.{b}.attn.weight"][k] for b in range(3)) == [0.5, 0.75, 1.0]


def test_a_zero_task_vector_block_gets_e_zero_and_the_lowest_tier():
    base, tvs = _toy(n_blocks=4)
    for key in tvs[0]:
        if key.startswith("blocks.2."):
            tvs[0][key] = torch.zeros_like(tvs[0][key])
    scales = larv_scales(tvs, list(base), base)
    expected = _np_factors(base, tvs, _matrix_blocks(base))
    assert scales["blocks.2.attn.weight"][0] == expected[0][2] == 0.5  # score 0: the smallest
    for b in range(4):
        assert scales[f"blocks.{b}.norm.weight"] == pytest.approx([expected[0][b], expected[1][b]], abs=1e-12)


def test_continuous_gate_and_tiers_options():
    base, tvs = _toy(n_blocks=5)
    blocks = _matrix_blocks(base)
    opts = {"gate": "continuous", "delta": 0.3, "gamma": 2.0, "eta": 0.5, "rho": 1.0}
    scales = larv_scales(tvs, list(base), base, **opts)
    expected = _np_factors(base, tvs, blocks, **opts)
    for b in range(5):
        assert scales[f"blocks.{b}.mlp.weight"] == pytest.approx([f[b] for f in expected], abs=1e-12)
        assert all(0.7 < s < 1.3 for s in scales[f"blocks.{b}.mlp.weight"])  # 1 + delta tanh(...)
    scales = larv_scales(tvs, list(base), base, tiers=(2.0, 3.0, 4.0))
    expected = _np_factors(base, tvs, blocks, tiers=(2.0, 3.0, 4.0))
    for b in range(5):
        assert scales[f"blocks.{b}.attn.bias"] == pytest.approx([f[b] for f in expected], abs=1e-12)
    assert {s for b in range(5) for s in scales[f"blocks.{b}.attn.weight"]} <= {2.0, 3.0, 4.0}


# --------------------------------------------------------------------------------------------------------------------
# 4. The merge is the `then` method on hand-scaled task vectors
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("then,fn,opts", [
    ("task_arithmetic", task_arithmetic, {"scale": 1.0}),
    ("ties", ties, {"density": 0.5}),
    ("breadcrumbs", breadcrumbs, {"beta": 0.2, "then_gamma": 0.9}),
])
def test_merge_is_the_then_method_on_hand_scaled_task_vectors(then, fn, opts):
    base, tvs = _toy(k=3)
    factors = _np_factors(base, tvs, _matrix_blocks(base))
    scaled = _hand_scaled(tvs, factors)
    out = merge("larv", tvs, base=base, then=then, **opts)
    fn_opts = {("gamma" if k == "then_gamma" else k): v for k, v in opts.items()}
    assert list(out) == list(base)
    for key in base:
        torch.testing.assert_close(out[key], fn([tv[key] for tv in scaled], name=key, **fn_opts), rtol=1e-6,
                                   atol=1e-7, msg=key)


def test_default_then_is_iso_c_and_merge_tensor_takes_explicit_key_scales():
    base, tvs = _toy(k=2)
    out = merge("larv", tvs, base=base)
    scales = larv_scales(tvs, list(base), base)
    key = "blocks.1.mlp.weight"
    expected = merge_tensor("iso_c", [t[key] * s for t, s in zip(tvs, scales[key])], name=key)
    torch.testing.assert_close(out[key], expected)
    torch.testing.assert_close(merge_tensor("larv", [t[key] for t in tvs], name=key, key_scales=scales), expected)


# --------------------------------------------------------------------------------------------------------------------
# 6. Errors
# --------------------------------------------------------------------------------------------------------------------
def test_bad_options_are_refused_before_any_tensor():
    with pytest.raises(ValueError, match=r"option gate='steps' must be one of 'tiered', 'continuous'"):
        validate_merge_options("larv", {"gate": "steps"})
    for tiers, why in (([1.0, 2.0], "three numbers"), ((0.5, 0.0, 1.0), "positive"), ((1.0, float("nan"), 1.0),
                                                                                        "finite"), ("abc", "three")):
        with pytest.raises(ValueError, match=rf"'larv': option tiers=.*{why}"):
            validate_merge_options("larv", {"tiers": tiers})
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'density' for merge method 'larv'"):
        validate_merge_options("larv", {"density": 0.2})  # iso_c (the default then) takes no density
    assert validate_merge_options("larv", {"then": "ties", "density": 0.2}) == {"then": "ties", "density": 0.2}
    with pytest.raises(ValueError, match="then='dare' must be one of"):
        validate_merge_options("larv", {"then": "dare"})
    with pytest.raises(ValueError, match="depth='blocks' needs a regex group"):
        validate_merge_options("larv", {"depth": "blocks"})
    with pytest.raises(ValueError, match="delta=2"):
        validate_merge_options("larv", {"delta": 2})
    with pytest.raises(ValueError, match=r"'larv' with then='breadcrumbs' \(then_gamma under larv\).*gamma=0.1"):
        validate_merge_options("larv", {"then": "breadcrumbs", "then_gamma": 0.1})
    with pytest.raises(ValueError, match="gate needs all tensors: use merge"):
        validate_merge_options("larv", {"gate": "tiered"}, driver=False)
    base, tvs = _toy()
    with pytest.raises(ValueError, match="gate='x'"):
        merge("larv", tvs, base=base, gate="x")


def test_base_is_required():
    _, tvs = _toy()
    with pytest.raises(ValueError, match="merge method 'larv' needs the base model's weights.*pass base="):
        merge("larv", tvs)


def test_no_block_keys_names_the_depth_option():
    base = {"trunk.0.w": _randn(4, 4, seed=1), "trunk.1.w": _randn(4, 4, seed=2), "out.w": _randn(2, 4, seed=3)}
    tvs = [{k: 0.1 * _randn(*t.shape, seed=9 + i) for k, t in base.items()} for i in range(2)]
    with pytest.raises(ValueError, match=r"no parameter name is in a block \(e.g. 'trunk.0.w'\).*give the depth opt"):
        merge("larv", tvs, base=base)
    out = merge("larv", tvs, base=base, depth=r"trunk\.(\d+)\.", then="task_arithmetic", scale=1.0)
    torch.testing.assert_close(out["out.w"], tvs[0]["out.w"] + tvs[1]["out.w"])  # outside the blocks: factor 1


def test_non_finite_inputs_are_refused_by_the_pass():
    base, tvs = _toy()
    tvs[1]["blocks.0.mlp.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"task vector 1: tensor 'blocks\.0\.mlp\.weight' has 1 NaN"):
        merge("larv", tvs, base=base)


def test_per_tensor_paths_refuse_larv():
    taus = [_randn(4, 4, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match=r"factors from a pass over the whole model.*use merge\(\)/merge_models\(\)"):
        merge_tensor("larv", taus, name="blocks.0.w")
    message = r"merge method 'larv' needs every tensor before the first is merged; stream_merge merges per tensor"
    with pytest.raises(ValueError, match=message):
        merge_request("larv", {}, "none", None, caller="stream_merge")
    with pytest.raises(ValueError, match="'larv' needs every tensor.*KeyMerger merges per tensor"):
        KeyMerger({}, [{}], MergeRequest("larv", {}, None, None))


# --------------------------------------------------------------------------------------------------------------------
# 7. merge_models on module state dicts
# --------------------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.blocks = nn.ModuleList([_Block() for _ in range(4)])
        self.head = nn.Linear(6, 2)


def test_merge_models_is_base_plus_merge():
    torch.manual_seed(0)
    base = _Tiny().state_dict()
    experts = []
    for i in range(3):
        torch.manual_seed(100 + i)
        experts.append({k: v + 0.05 * torch.randn_like(v) for k, v in base.items()})
    out = merge_models(base, experts, "larv", then="ties", density=0.4)
    tvs = [{k: e[k] - base[k] for k in base} for e in experts]
    tau_m = merge("larv", tvs, base=base, then="ties", density=0.4)
    assert list(out) == list(base)
    for key in base:
        torch.testing.assert_close(out[key], base[key] + tau_m[key], rtol=1e-6, atol=1e-6, msg=key)
