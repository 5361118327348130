"""RegMean / RegMean++: against hand computations (explicit forward ops, numpy solves), sum-reducibility over
simulated processes, attention-mask handling, and input checks."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_merge_fixtures import (  # the shared fixtures (importable through conftest.py)
    K,
    Tokens,
    Unreadable,
    batches_of,
    masked_token_batches,
    mean,
    mlp,
    rel,
    task_vectors_for,
    tied_task_vectors,
)
from torch import Tensor, nn
from two_ranks import run_two_ranks

from magic_pl.merging import MergeError, regmean
from magic_pl.merging.regmean import regmean_blocks, regmean_memory

# --------------------------------------------------------------------------------------------------------------------
# Fixtures of their own (the shared ones: data_merge_fixtures)
# --------------------------------------------------------------------------------------------------------------------


def _expert(base: Mapping[str, Tensor], tau: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: base[n] + tau[n] for n in base}


def _mlp_hidden(w: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """The input of the MLP's second linear layer, by explicit ops."""
    h = x @ w["0.weight"].T + w["0.bias"]
    h = F.layer_norm(h, (h.shape[-1],), w["1.weight"], w["1.bias"])
    return torch.relu(h)


def _gram(xs: list[Tensor]) -> np.ndarray:
    x = np.concatenate([t.reshape(-1, t.shape[-1]).numpy() for t in xs])
    return x.T @ x / x.shape[0]


def _reduced(g: np.ndarray, alpha: float) -> np.ndarray:
    d = np.diag(np.diag(g))
    return alpha * g + (1 - alpha) * d


def _closed_form(grams: list[np.ndarray], weights: list[Tensor], alpha: float) -> np.ndarray:
    """FusionBench's rule in weight space: W_m^T = (sum G')^-1 sum G' W_k^T."""
    gs = [_reduced(g, alpha) for g in grams]
    rhs = sum(g @ w.numpy().T for g, w in zip(gs, weights))
    return np.linalg.solve(sum(gs), rhs).T


# --------------------------------------------------------------------------------------------------------------------
# 1-2. RegMean closed form
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.95, 1.0, 0.3])
def test_regmean_matches_hand_computed_closed_form(alpha):
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    tau_m = regmean(base, model, taus, batches, reduce_non_diagonal=alpha)
    experts = [_expert(base, t) for t in taus]
    g1 = [_gram(batches[k]) for k in range(K)]
    g2 = [_gram([_mlp_hidden(experts[k], x) for x in batches[k]]) for k in range(K)]
    w1 = _closed_form(g1, [e["0.weight"] for e in experts], alpha)
    w2 = _closed_form(g2, [e["3.weight"] for e in experts], alpha)
    assert rel(tau_m["0.weight"], w1 - base["0.weight"].numpy()) < 1e-6
    assert rel(tau_m["3.weight"], w2 - base["3.weight"].numpy()) < 1e-6
    for key in ("0.bias", "1.weight", "1.bias", "3.bias"):
        torch.testing.assert_close(tau_m[key], mean(taus, key), rtol=1e-12, atol=1e-12)
    # on return the model holds theta0 + tau_m
    for key, v in model.state_dict().items():
        torch.testing.assert_close(v, base[key] + tau_m[key], rtol=1e-12, atol=1e-12)


def test_diagnostics_are_the_conditioning_and_shift_of_each_layer():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    diagnostics: dict = {}
    tau_m = regmean(base, model, taus, batches, diagnostics=diagnostics)
    assert set(diagnostics) == {"0", "3"}
    s = sum(_reduced(_gram(batches[k]), 0.95) for k in range(K))
    first = diagnostics["0"]
    assert first["rows"] == [18] * K and first["dim"] == 5
    assert first["condition"] == pytest.approx(np.linalg.cond(s), rel=1e-9)
    avg = mean(taus, "0.weight")
    assert first["shift"] == pytest.approx(float((tau_m["0.weight"] - avg).norm() / avg.norm()), rel=1e-9)
    # one row per task through a 5-wide layer: each G_k has rank 1, and alpha = 1 leaves the sum singular
    single = {k: [batches[k][0][:1]] for k in range(K)}
    diagnostics = {}
    regmean(base, mlp(), taus, single, reduce_non_diagonal=1.0, diagnostics=diagnostics)
    assert diagnostics["0"]["rows"] == [1] * K and diagnostics["0"]["condition"] > 1e12


def test_regmean_differs_from_the_average():
    model = mlp()
    base, taus = task_vectors_for(model)
    tau_m = regmean(base, model, taus, batches_of())
    assert rel(tau_m["0.weight"], mean(taus, "0.weight")) > 1e-2


def test_alpha_zero_is_the_per_column_diagonal_rule():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    tau_m = regmean(base, model, taus, batches, reduce_non_diagonal=0.0)
    # diagonal G: column j of W_m is the mean of the experts' columns j weighted by mean(x_j^2)
    d = torch.stack([torch.cat(batches[k]).pow(2).mean(0) for k in range(K)])  # [K, in]
    w = torch.stack([base["0.weight"] + taus[k]["0.weight"] for k in range(K)])  # [K, out, in]
    ref = (d[:, None, :] * w).sum(0) / d.sum(0) - base["0.weight"]
    torch.testing.assert_close(tau_m["0.weight"], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("plus_plus", [False, True])
def test_one_task_returns_its_own_task_vector(plus_plus):
    model = mlp()
    base, taus = task_vectors_for(model, k=1)
    tau_m = regmean(base, model, taus, batches_of(k=1), plus_plus=plus_plus)
    for key in taus[0]:
        torch.testing.assert_close(tau_m[key], taus[0][key], rtol=1e-9, atol=1e-10)


def test_float32_task_vectors_give_float32_results():
    model = mlp().float()
    base, taus = task_vectors_for(model)
    batches = {k: [b.float() for b in bs] for k, bs in batches_of().items()}
    tau_m = regmean(base, model, taus, batches)
    assert all(v.dtype == torch.float32 for v in tau_m.values())


def test_pairs_and_mapping_give_the_same_result():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    a = regmean(base, copy.deepcopy(model), taus, batches)
    b = regmean(base, copy.deepcopy(model), taus, [(k, x) for k in range(K) for x in batches[k]])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# Singular sums, non-finite results, memory, layer selection
# --------------------------------------------------------------------------------------------------------------------
def test_never_active_input_dimension_keeps_the_average_column():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    for bs in batches.values():
        for b in bs:
            b[:, 2] = 0.0
    tau_m = regmean(base, model, taus, batches, reduce_non_diagonal=0.9)
    torch.testing.assert_close(tau_m["0.weight"][:, 2], mean(taus, "0.weight")[:, 2], rtol=1e-10, atol=1e-12)
    # the other columns solve the reduced system (column 2 drops out of every G)
    experts = [_expert(base, t) for t in taus]
    keep = [0, 1, 3, 4]
    g = [_gram([b[:, keep] for b in batches[k]]) for k in range(K)]
    ref = _closed_form(g, [e["0.weight"][:, keep] for e in experts], 0.9) - base["0.weight"][:, keep].numpy()
    assert rel(tau_m["0.weight"][:, keep], ref) < 1e-8


def test_non_finite_activations_raise_merge_error():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    batches[1][0][0, 0] = float("inf")
    with pytest.raises(MergeError, match="0.weight"):
        regmean(base, model, taus, batches)


def test_memory_formula():
    model = mlp()
    assert regmean_memory(model, 3, torch.float64) == (5 * 5 + 7 * 7) * 3 * 8
    assert regmean_memory(model, 3, torch.float32, plus_plus=True) == 7 * 7 * 3 * 4


def test_tied_and_uncalled_linear_layers_are_averaged():
    model, base, taus = tied_task_vectors()
    with pytest.warns(UserWarning, match="unused"):
        tau_m = regmean(base, model, taus, batches_of(shape=(6, 4)))
    for key in ("a.weight", "b.weight", "unused.weight"):
        torch.testing.assert_close(tau_m[key], mean(taus, key), rtol=1e-12, atol=1e-12)
    assert rel(tau_m["c.weight"], mean(taus, "c.weight")) > 1e-2


# --------------------------------------------------------------------------------------------------------------------
# 3. Sum-reducibility: two simulated processes with an all-reduce that sums
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plus_plus", [False, True])
def test_sharded_statistics_reduce_to_the_one_process_result(plus_plus):
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of(n=4)
    single = regmean(base, copy.deepcopy(model), taus, batches, plus_plus=plus_plus)
    shards = [{k: bs[r::2] for k, bs in batches.items()} for r in range(2)]
    results, comm = run_two_ranks(lambda r, reduce: regmean(base, copy.deepcopy(model), taus, shards[r],
                                                            plus_plus=plus_plus, reduce=reduce))
    # RegMean: one reduce per layer's Gram sums plus one for the counts; RegMean++: the same per block
    assert comm.calls == [3, 3] if not plus_plus else comm.calls == [4, 4]
    for r in range(2):
        for key in single:
            torch.testing.assert_close(results[r][key], single[key], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# 4. RegMean++
# --------------------------------------------------------------------------------------------------------------------
def test_regmean_plus_plus_on_an_mlp_uses_the_merged_first_layer():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    alpha = 0.95
    tau_m = regmean(base, model, taus, batches, plus_plus=True, reduce_non_diagonal=alpha)
    experts = [_expert(base, t) for t in taus]
    w1 = _closed_form([_gram(batches[k]) for k in range(K)], [e["0.weight"] for e in experts], alpha)
    assert rel(tau_m["0.weight"], w1 - base["0.weight"].numpy()) < 1e-6
    # layer 2's inputs: the model with layer 1 merged (RegMean) and its bias and the LayerNorm averaged
    merged = {k: base[k] + mean(taus, k) for k in base}
    merged["0.weight"] = torch.from_numpy(w1)
    g2 = [_gram([_mlp_hidden(merged, x) for x in batches[k]]) for k in range(K)]
    w2 = _closed_form(g2, [e["3.weight"] for e in experts], alpha)
    assert rel(tau_m["3.weight"], w2 - base["3.weight"].numpy()) < 1e-6
    plain = regmean(base, mlp(), taus, batches, reduce_non_diagonal=alpha)
    assert rel(tau_m["3.weight"], plain["3.weight"]) > 1e-3  # the rule matters


class _Blocks(nn.Module):
    """Two residual blocks in a ModuleList (RegMean++'s default blocks), then a head."""

    def __init__(self, d: int = 4, h: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)) for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for blk in self.layers:
            x = x + blk(x)
        return self.head(x)


def _block(w: Mapping[str, Tensor], i: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(inner activation, block output) of block i by explicit ops."""
    p = f"layers.{i}."
    a = torch.relu(x @ w[p + "0.weight"].T + w[p + "0.bias"])
    return a, x + a @ w[p + "2.weight"].T + w[p + "2.bias"]


def test_regmean_plus_plus_blocks_see_the_expert_block_on_merged_features():
    model = _Blocks().double().eval()
    base, taus = task_vectors_for(model)
    batches = batches_of(shape=(5, 4))
    alpha = 0.9
    assert regmean_blocks(model, base) == {"layers.0": ["layers.0.0", "layers.0.2"],
                                           "layers.1": ["layers.1.0", "layers.1.2"], "head": ["head"]}
    tau_m = regmean(base, model, taus, batches, plus_plus=True, reduce_non_diagonal=alpha)
    experts = [_expert(base, t) for t in taus]
    merged = {k: base[k] + mean(taus, k) for k in base}
    feats = {k: list(batches[k]) for k in range(K)}  # merged model's features entering the current block
    for i in range(2):
        p = f"layers.{i}."
        inner = {k: [_block(experts[k], i, x)[0] for x in feats[k]] for k in range(K)}  # expert k's block
        for lin, xs in ((p + "0", feats), (p + "2", inner)):
            w = _closed_form([_gram(xs[k]) for k in range(K)], [e[lin + ".weight"] for e in experts], alpha)
            merged[lin + ".weight"] = torch.from_numpy(w)
            assert rel(tau_m[lin + ".weight"], w - base[lin + ".weight"].numpy()) < 1e-6, lin
        feats = {k: [_block(merged, i, x)[1] for x in feats[k]] for k in range(K)}
    w = _closed_form([_gram(feats[k]) for k in range(K)], [e["head.weight"] for e in experts], alpha)
    assert rel(tau_m["head.weight"], w - base["head.weight"].numpy()) < 1e-6
    torch.testing.assert_close(tau_m["layers.1.0.bias"], mean(taus, "layers.1.0.bias"), rtol=1e-12, atol=1e-12)


def test_regmean_plus_plus_refuses_one_shot_iterators():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = {k: iter(v) for k, v in batches_of().items()}
    with pytest.raises(TypeError, match="one-shot"):
        regmean(base, model, taus, batches, plus_plus=True)


# --------------------------------------------------------------------------------------------------------------------
# 5. Padding positions
# --------------------------------------------------------------------------------------------------------------------


def test_padding_positions_are_excluded():
    model = Tokens().double().eval()
    base, taus = task_vectors_for(model)
    batches = masked_token_batches()
    tau_m = regmean(base, model, taus, batches, reduce_non_diagonal=0.95)
    experts = [_expert(base, t) for t in taus]
    grams = []
    for k in range(K):
        b = batches[k][0]
        x = experts[k]["emb.weight"][b["input_ids"]][b["attention_mask"].bool()]
        grams.append(_gram([x]))
    w = _closed_form(grams, [e["lin.weight"] for e in experts], 0.95)
    assert rel(tau_m["lin.weight"], w - base["lin.weight"].numpy()) < 1e-6
    unmasked = {k: [{"input_ids": b[0]["input_ids"]}] for k, b in batches.items()}
    other = regmean(base, Tokens().double().eval(), taus, unmasked)
    assert rel(other["lin.weight"], tau_m["lin.weight"]) > 1e-3
    # a call that carries positional and keyword arguments (how the Lightning pipeline hands its kept calls over):
    # the same calls, the same mask, the same merge
    from magic_pl.calibration.sensitivity import ModelInputs

    calls = {k: [ModelInputs((b[0]["input_ids"],), {"attention_mask": b[0]["attention_mask"]})]
             for k, b in batches.items()}
    both = regmean(base, Tokens().double().eval(), taus, calls, reduce_non_diagonal=0.95)
    assert rel(both["lin.weight"], tau_m["lin.weight"]) < 1e-12


# --------------------------------------------------------------------------------------------------------------------
# 6. Bad input, refused before a tensor is read
# --------------------------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_before_reading_tensors():
    model = mlp()
    base, _ = task_vectors_for(model)
    taus = [Unreadable(base) for _ in range(2)]
    with pytest.raises(ValueError, match="no calibration batches for task 1"):
        regmean(base, model, taus, {0: [torch.zeros(2, 5, dtype=torch.float64)], 1: []})
    with pytest.raises(ValueError, match="no calibration batches for task 1"):
        regmean(base, model, taus, {0: [torch.zeros(2, 5, dtype=torch.float64)]})
    with pytest.raises(ValueError, match="reduce_non_diagonal"):
        regmean(base, model, taus, batches_of(k=2), reduce_non_diagonal=1.5)
    with pytest.raises(ValueError, match="task 2"):
        regmean(base, model, taus, batches_of(k=3))
    with pytest.raises(ValueError, match="block 'nope'"):
        regmean(base, model, taus, batches_of(k=2), plus_plus=True, blocks=["nope"])
    with pytest.raises(ValueError, match="base must not be the model"):
        regmean(model, model, taus, batches_of(k=2))
    with pytest.raises(Exception, match="at least one task vector"):
        regmean(base, model, [], batches_of(k=1))


def test_a_task_without_batches_in_pairs_is_named():
    model = mlp()
    base, taus = task_vectors_for(model)
    with pytest.raises(ValueError, match="no calibration batches for task 2"):
        x = torch.zeros(2, 5, dtype=torch.float64)
        regmean(base, model, taus, [(0, x), (1, x)])
