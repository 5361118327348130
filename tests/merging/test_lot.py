"""LOT Merging: each closed form (Eq. 9 matrix product, Eq. 12 element-wise product, Eq. 14 addition) against an
independent computation (explicit forward ops in numpy, least-squares solves of the stacked drift objective), the
paper's two limiting cases (§5.1), convolutions as matrix products, sum-reducibility over simulated processes, the
registry and the Lightning front door."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
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
from tiny_models import body_tasks
from torch import Tensor, nn
from two_ranks import run_two_ranks

from magic_pl.merging import (
    DATA_MERGE_METHODS,
    MERGE_METHODS,
    get_method,
    merge,
    merge_tensor,
    validate_merge_options,
)
from magic_pl.merging.lot import lot, lot_units

EPS = 1e-5  # nn.LayerNorm's default


# --------------------------------------------------------------------------------------------------------------------
# Fixtures of their own (the shared ones: data_merge_fixtures): numpy references
# --------------------------------------------------------------------------------------------------------------------


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _rows(xs: list[Tensor]) -> np.ndarray:
    return np.concatenate([_np(x).reshape(-1, x.shape[-1]) for x in xs])


def _lstsq_matrix(inputs: list[np.ndarray], taus: list[np.ndarray]) -> np.ndarray:
    """argmin_T sum_k ||X_k T^T - X_k T_k^T||^2 by a minimum-norm least-squares solve of the stacked system (no Gram
    matrix, no pseudo-inverse): returns T ``[out, in]``."""
    a = np.concatenate(inputs)
    b = np.concatenate([x @ t.T for x, t in zip(inputs, taus)])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


def _lstsq_scale(xhats: list[np.ndarray], taus: list[np.ndarray]) -> np.ndarray:
    """argmin_t sum_k sum_x (x[d] t[d] - x[d] T_k[d])^2, one least-squares solve per dimension d."""
    out = np.empty(taus[0].shape)
    for d in range(out.shape[0]):
        a = np.concatenate([x[:, d] for x in xhats])[:, None]
        b = np.concatenate([x[:, d] * t[d] for x, t in zip(xhats, taus)])
        out[d] = np.linalg.lstsq(a, b, rcond=None)[0][0]
    return out


def _lstsq_shift(rows: list[int], taus: list[np.ndarray]) -> np.ndarray:
    """argmin_b sum_k sum_{n_k rows} ||b - b_k||^2, as a stacked least-squares solve."""
    a = np.concatenate([np.ones((n, 1)) for n in rows])
    b = np.concatenate([np.tile(t, (n, 1)) for n, t in zip(rows, taus)])
    return np.linalg.lstsq(a, b, rcond=None)[0][0]


def _layer_norm(h: np.ndarray) -> np.ndarray:
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + EPS)


# --------------------------------------------------------------------------------------------------------------------
# 1. The three closed forms on an MLP (Linear, LayerNorm, ReLU, Linear), features from each expert
# --------------------------------------------------------------------------------------------------------------------
def _mlp_reference(base, taus, batches) -> dict[str, np.ndarray]:
    """LOT written out with explicit forward ops of each expert and least-squares solves."""
    experts = [{n: _np(base[n] + t[n]) for n in base} for t in taus]
    tv = [{n: _np(v) for n, v in t.items()} for t in taus]
    x0 = [_rows(batches[k]) for k in range(len(taus))]                       # inputs of layer 0
    h = [x @ e["0.weight"].T + e["0.bias"] for x, e in zip(x0, experts)]   # inputs of the LayerNorm
    xhat = [_layer_norm(v) for v in h]
    x3 = [np.maximum(v * e["1.weight"] + e["1.bias"], 0) for v, e in zip(xhat, experts)]  # inputs of layer 3
    rows = [x.shape[0] for x in x0]
    return {
        "0.weight": _lstsq_matrix(x0, [t["0.weight"] for t in tv]),
        "0.bias": _lstsq_shift(rows, [t["0.bias"] for t in tv]),
        "1.weight": _lstsq_scale(xhat, [t["1.weight"] for t in tv]),
        "1.bias": _lstsq_shift(rows, [t["1.bias"] for t in tv]),
        "3.weight": _lstsq_matrix(x3, [t["3.weight"] for t in tv]),
        "3.bias": _lstsq_shift(rows, [t["3.bias"] for t in tv]),
    }


def test_every_unit_matches_an_independent_least_squares_solve():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    tau_m = lot(base, model, taus, batches)
    ref = _mlp_reference(base, taus, batches)
    assert set(tau_m) == set(base)
    for key, want in ref.items():
        assert rel(tau_m[key], want) < 1e-8, key
    # the closed form is not the average, and the model holds theta0 + T* on return
    assert rel(tau_m["0.weight"], mean(taus, "0.weight")) > 1e-2
    assert rel(tau_m["1.weight"], mean(taus, "1.weight")) > 1e-2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, base[key] + tau_m[key], rtol=0, atol=1e-12)


def test_scale_is_lambda_on_every_key():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    one = lot(base, copy.deepcopy(model), taus, batches)
    scaled = lot(base, copy.deepcopy(model), taus, batches, scale=1.2)
    for key in one:
        torch.testing.assert_close(scaled[key], 1.2 * one[key], rtol=1e-12, atol=1e-14)


def test_biases_are_the_rows_weighted_mean():
    model = mlp()
    base, taus = task_vectors_for(model)
    equal = lot(base, copy.deepcopy(model), taus, batches_of())
    for key in ("0.bias", "1.bias", "3.bias"):  # as many rows per task: the plain mean (the paper's setting)
        torch.testing.assert_close(equal[key], mean(taus, key), rtol=1e-12, atol=1e-14)
    batches = {k: bs[: k + 1] for k, bs in batches_of().items()}  # 6, 12 and 18 rows
    unequal = lot(base, copy.deepcopy(model), taus, batches)
    for key in ("0.bias", "3.bias"):
        want = _lstsq_shift([6, 12, 18], [_np(t[key]) for t in taus])
        assert rel(unequal[key], want) < 1e-12
    assert rel(unequal["0.bias"], mean(taus, "0.bias")) > 1e-3


def test_one_task_returns_its_task_vector():
    # tanh, not ReLU: every input direction of the last layer is excited, so the pseudo-inverse is an inverse
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 4)).double().eval()
    base, taus = task_vectors_for(model, k=1)
    tau_m = lot(base, model, taus, batches_of(k=1))
    for key in base:
        torch.testing.assert_close(tau_m[key], taus[0][key], rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------------------------------------
# 2. The paper's limiting cases (§5.1) and the pseudo-inverse on unexcited inputs
# --------------------------------------------------------------------------------------------------------------------
def _linear(i: int = 5, o: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o)).double().eval()


def test_orthogonal_task_features_give_the_sum_of_projected_task_vectors_and_no_drift():
    # task 0 excites inputs 0-1, task 1 inputs 2-4: T* = sum_k V_k V_k^T T_k (Eq. 16), no feature drift (Eq. 17)
    model = _linear()
    base, taus = task_vectors_for(model, k=2)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 5, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 0, 0, 0.0], dtype=torch.float64)
    x1 = torch.randn(8, 5, generator=g, dtype=torch.float64) * torch.tensor([0, 0, 1, 1, 1.0], dtype=torch.float64)
    tau_m = lot(base, model, taus, {0: [x0], 1: [x1]})
    want = torch.cat([taus[0]["0.weight"][:, :2], taus[1]["0.weight"][:, 2:]], dim=1)
    torch.testing.assert_close(tau_m["0.weight"], want, rtol=1e-10, atol=1e-12)
    for x, t in ((x0, taus[0]), (x1, taus[1])):
        torch.testing.assert_close(x @ tau_m["0.weight"].T, x @ t["0.weight"].T, rtol=1e-10, atol=1e-12)


def test_shared_task_features_give_the_average():
    # every task on the same exemplars (V_k = V, full rank): T* is the average of the task vectors (Eq. 18)
    model = _linear()
    base, taus = task_vectors_for(model)
    x = batches_of(k=1)[0]
    tau_m = lot(base, model, taus, {k: x for k in range(K)})
    torch.testing.assert_close(tau_m["0.weight"], mean(taus, "0.weight"), rtol=1e-10, atol=1e-12)


def test_unexcited_inputs_keep_the_pretrained_weights():
    # input 2 is never active: sum_k X_k^T X_k is singular; the Moore-Penrose solution has no component there
    model = _linear()
    base, taus = task_vectors_for(model)
    mask = torch.tensor([1, 1, 0, 1, 1.0], dtype=torch.float64)
    batches = {k: [b * mask for b in bs] for k, bs in batches_of().items()}
    tau_m = lot(base, model, taus, batches)
    assert float(tau_m["0.weight"][:, 2].abs().max()) < 1e-12
    want = _lstsq_matrix([_rows(batches[k]) for k in range(K)], [_np(t["0.weight"]) for t in taus])
    assert rel(tau_m["0.weight"], want) < 1e-8


# --------------------------------------------------------------------------------------------------------------------
# 3. Convolutions as matrix products; RMSNorm's scale
# --------------------------------------------------------------------------------------------------------------------
def _patches(x: np.ndarray, kh: int, kw: int, stride: int, padding: int, dilation: int) -> np.ndarray:
    """im2col by explicit loops: one row per output position, features in (channel, kh, kw) order."""
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + w] = x
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    rows = []
    for s in range(n):
        for i in range(oh):
            for j in range(ow):
                rows.append([xp[s, ch, i * stride + a * dilation, j * stride + b * dilation]
                             for ch in range(c) for a in range(kh) for b in range(kw)])
    return np.array(rows)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 2)])
def test_conv2d_is_merged_as_the_matrix_product_of_its_patches(stride, padding, dilation):
    model = nn.Sequential(nn.Conv2d(2, 3, kernel_size=2, stride=stride, padding=padding,
                                    dilation=dilation)).double().eval()
    base, taus = task_vectors_for(model)
    g = torch.Generator().manual_seed(4)
    batches = {k: [torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64) + k] for k in range(K)}
    tau_m = lot(base, model, taus, batches)
    patches = [_patches(_np(batches[k][0]), 2, 2, stride, padding, dilation) for k in range(K)]
    want = _lstsq_matrix(patches, [_np(t["0.weight"]).reshape(3, -1) for t in taus])
    assert rel(tau_m["0.weight"].reshape(3, -1), want) < 1e-8
    torch.testing.assert_close(tau_m["0.bias"], mean(taus, "0.bias"), rtol=1e-12, atol=1e-14)


def test_grouped_convolutions_are_averaged():
    model = nn.Sequential(nn.Conv2d(2, 2, kernel_size=1, groups=2)).double().eval()
    assert lot_units(model, model.state_dict()) == {}


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch without nn.RMSNorm")
def test_rmsnorm_scale_uses_the_normalised_input():
    model = nn.Sequential(nn.RMSNorm(5, eps=1e-6)).double().eval()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    tau_m = lot(base, model, taus, batches)
    xs = [_rows(batches[k]) for k in range(K)]
    xhat = [x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) for x in xs]
    want = _lstsq_scale(xhat, [_np(t["0.weight"]) for t in taus])
    assert rel(tau_m["0.weight"], want) < 1e-10


# --------------------------------------------------------------------------------------------------------------------
# 4. Padding positions, tied and unused layers, dtypes
# --------------------------------------------------------------------------------------------------------------------


def test_padding_positions_are_excluded():
    model = Tokens().double().eval()
    base, taus = task_vectors_for(model)
    batches = masked_token_batches()
    tau_m = lot(base, model, taus, batches)
    xs = [_np((base["emb.weight"] + taus[k]["emb.weight"])[b[0]["input_ids"]][b[0]["attention_mask"].bool()])
          for k, b in batches.items()]
    want = _lstsq_matrix(xs, [_np(t["lin.weight"]) for t in taus])
    assert rel(tau_m["lin.weight"], want) < 1e-8
    torch.testing.assert_close(tau_m["emb.weight"], mean(taus, "emb.weight"))  # no rule for a lookup table


def test_tied_and_uncalled_layers_are_averaged():
    model, base, taus = tied_task_vectors()
    with pytest.warns(UserWarning, match="unused"):
        tau_m = lot(base, model, taus, batches_of(shape=(6, 4)), scale=1.5)
    for key in ("a.weight", "b.weight", "unused.weight", "unused.bias"):
        torch.testing.assert_close(tau_m[key], 1.5 * mean(taus, key), rtol=1e-12, atol=1e-12)
    assert rel(tau_m["c.weight"], 1.5 * mean(taus, "c.weight")) > 1e-2


def test_float32_task_vectors_give_float32_results():
    model = mlp().float()
    base, taus = task_vectors_for(model)
    batches = {k: [b.float() for b in bs] for k, bs in batches_of().items()}
    tau_m = lot(base, model, taus, batches)
    assert all(v.dtype == torch.float32 for v in tau_m.values())
    ref = lot({k: v.double() for k, v in base.items()}, mlp(), [{k: v.double() for k, v in t.items()} for t in taus],
              {k: [b.double() for b in bs] for k, bs in batches.items()})
    for key in ref:
        assert rel(tau_m[key], ref[key]) < 1e-5, key


def test_pairs_and_mapping_give_the_same_result():
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of()
    a = lot(base, copy.deepcopy(model), taus, batches)
    b = lot(base, copy.deepcopy(model), taus, [(k, x) for k, bs in batches.items() for x in bs])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------------------------
# 5. Sum-reducibility: two simulated processes with an all-reduce that sums
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["batches", "tasks"])
def test_sharded_statistics_reduce_to_the_one_process_result(split):
    model = mlp()
    base, taus = task_vectors_for(model)
    batches = batches_of(n=4)
    single = lot(base, copy.deepcopy(model), taus, batches)
    if split == "batches":  # every rank sees every task
        shards = [{k: bs[r::2] for k, bs in batches.items()} for r in range(2)]
    else:  # rank 0 holds task 0 only: tasks are covered by the totals
        shards = [{0: batches[0]}, {k: batches[k] for k in range(1, K)}]
    results, comm = run_two_ranks(lambda r, reduce: lot(base, copy.deepcopy(model), taus, shards[r], reduce=reduce))
    assert comm.calls == [4, 4]  # one reduce per unit (Linear, LayerNorm, Linear) and one for the row counts
    for r in range(2):
        for key in single:
            torch.testing.assert_close(results[r][key], single[key], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# 6. Registry, bad input, the Lightning front door
# --------------------------------------------------------------------------------------------------------------------
def test_registered_as_a_data_based_method():
    spec = get_method("lot")
    assert "lot" in DATA_MERGE_METHODS and "lot" not in MERGE_METHODS and spec.needs_data
    assert "2505.23859" in spec.paper and spec.defaults() == {"scale": 1.0}
    assert validate_merge_options("lot", {"scale": 1.2}) == {"scale": 1.2}
    with pytest.raises(ValueError, match="scale"):
        validate_merge_options("lot", {"scale": 1e4})
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'density'"):
        validate_merge_options("lot", {"density": 0.2})
    taus = [torch.zeros(3), torch.ones(3)]
    with pytest.raises(ValueError, match="not a per-tensor rule"):
        merge_tensor("lot", taus)
    with pytest.raises(ValueError, match="data-based merge"):
        merge("lot", [{"w": t} for t in taus])


def test_bad_input_is_refused_before_reading_tensors():
    model = mlp()
    base, _ = task_vectors_for(model)
    taus = [Unreadable(base) for _ in range(2)]
    with pytest.raises(ValueError, match="no calibration batches for task 1"):
        lot(base, model, taus, {0: [torch.zeros(2, 5, dtype=torch.float64)], 1: []})
    with pytest.raises(ValueError, match="task 2"):
        lot(base, model, taus, batches_of(k=3))
    with pytest.raises(ValueError, match="scale"):
        lot(base, model, taus, batches_of(k=2), scale=float("nan"))
    with pytest.raises(ValueError, match="base must not be the model"):
        lot(model, model, taus, batches_of(k=2))
    with pytest.raises(Exception, match="at least one task vector"):
        lot(base, model, [], batches_of(k=1))


def test_through_magic_module_predict_equals_the_pure_function():
    from lightning.pytorch import Trainer

    from magic_pl.lightning import MagicModule, TaskDataModule
    from magic_pl.statedict import task_vector

    base, experts, heads, data = body_tasks()
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=3, seed=2, batch_size=4)
    mod = MagicModule(model=copy.deepcopy(base), experts=experts, heads=heads, task_names=list("xyz"),
                      merge_method="lot", merge_options={"scale": 1.2}, calibration="none")
    assert mod.needs_calibration_data
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False).predict(mod, datamodule=dm, return_predictions=False)
    assert mod.run.done

    ref = copy.deepcopy(base).eval()
    taus = [task_vector(e, base) for e in experts]
    calib = dm.calibration_dataset()
    pairs = [(calib[i]["task"], (calib[i]["inputs"][None],)) for i in range(len(calib))]
    tau = lot(base.state_dict(), ref, taus, pairs, scale=1.2)
    assert not torch.allclose(tau["fc1.weight"], 1.2 * sum(t["fc1.weight"] for t in taus) / 3)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mod.model.state_dict()[key], value, rtol=1e-6, atol=1e-6)
