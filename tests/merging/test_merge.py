"""The streaming drivers: merge over whole task vectors, BatchNorm statistics, lazy safetensors, merge_models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from magic_pl.merging import MERGE_METHODS, merge, merge_models, merge_tensor, registry
from magic_pl.merging.registry import method_options
from magic_pl.merging.ties import ties
from magic_pl.statedict import (
    CheckpointError,
    LazyStateDict,
    LazyTaskVector,
    apply_task_vector,
    load_state_dict,
    save_state_dict,
)


def _model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(6, 3, 3, 3, generator=g).to(dtype),
        "bn.weight": torch.randn(6, generator=g).to(dtype),
        "bn.running_mean": torch.randn(6, generator=g).to(dtype),
        "bn.running_var": (torch.rand(6, generator=g) + 0.5).to(dtype),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.long),
        "fc.weight": torch.randn(5, 12, generator=g).to(dtype),
        "fc.bias": torch.randn(5, generator=g).to(dtype),
        "pos_embedding": torch.randn(4, 6, generator=g).to(dtype),
    }


def _tvs(k: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(k):
        m = _model(100 + i)
        del m["bn.num_batches_tracked"]
        out.append(m)
    return out


# methods merge() applies key by key without a pass over the whole model (LARV's needs the base and blocks:
# test_larv.py)
PER_TENSOR = sorted(n for n, m in MERGE_METHODS.items() if not m.prepass_required)


@pytest.mark.parametrize("method", PER_TENSOR)
def test_merge_applies_the_method_key_by_key(method):
    tvs = _tvs(2 if method == "slerp" else 3)
    out = merge(method, tvs, seed=5)
    assert list(out) == list(tvs[0])
    for key in ("conv.weight", "fc.weight", "fc.bias", "pos_embedding", "bn.weight"):
        opts = {"seed": 5} if "seed" in method_options(method) else {}
        expected = merge_tensor(method, [tv[key] for tv in tvs], name=key, **opts)
        assert torch.equal(out[key], expected), key
    assert torch.equal(merge(method, tvs, seed=5)["fc.weight"], out["fc.weight"])


def test_batchnorm_statistics_are_averaged_not_extrapolated():
    tvs = [
        {"bn.running_var": torch.full((3,), float(v)), "bn.weight": torch.full((3,), float(v))} for v in (1, 2, 3, 4)
    ]
    out = merge("task_arithmetic", tvs)
    assert torch.equal(out["bn.running_var"], torch.full((3,), 2.5))  # mean, not 0.3 * 10 = 3
    torch.testing.assert_close(out["bn.weight"], torch.full((3,), 3.0))  # the method still scales weights
    base = merge("ties", tvs, bn_stats="base")
    assert torch.equal(base["bn.running_var"], torch.zeros(3))
    with pytest.raises(ValueError, match="bn_stats.*average, base"):
        merge("ties", tvs, bn_stats="reestimate")


def test_merge_errors_name_the_key():
    tvs = _tvs(2)
    tvs[1]["fc.weight"] = torch.zeros(12, 5)
    with pytest.raises(CheckpointError, match=r"'fc\.weight'.*\(5, 12\).*\(12, 5\)"):
        merge("task_arithmetic", tvs)
    tvs = _tvs(2)
    del tvs[1]["fc.bias"]
    with pytest.raises(CheckpointError, match="task vector 1.*missing keys \\['fc.bias'\\]"):
        merge("weight_average", tvs)
    with pytest.raises(CheckpointError, match="K >= 1"):
        merge("weight_average", [])
    with pytest.raises(ValueError, match="unknown merge method 'avg'; valid methods: weight_average"):
        merge("avg", _tvs())
    with pytest.raises(ValueError, match="unknown option.*'density'.*'task_arithmetic'.*valid options: scale"):
        merge("task_arithmetic", _tvs(), density=0.5)
    with pytest.raises(ValueError, match="'density'.*valid options:.*p, scale, seed, then"):
        merge("dare", _tvs(), density=0.5)  # TA's options only, unless then="ties"
    merge("dare", _tvs(), then="ties", density=0.5)


def test_ties_global_topk_uses_one_threshold_per_task():
    g = torch.Generator().manual_seed(0)
    tvs = [{"big": torch.randn(100, generator=g) * 10, "small": torch.randn(100, generator=g) * 0.01} for _ in range(2)]
    out = merge("ties", tvs, global_topk=True, density=0.2)
    # Globally the top 20% of 200 entries per task all sit in "big", so "small" is trimmed away entirely.
    assert torch.equal(out["small"], torch.zeros(100))
    thresholds = []
    for tv in tvs:
        allmag = torch.cat([tv["big"].abs(), tv["small"].abs()]).sort(descending=True).values
        thresholds.append(float(allmag[40]))  # int(0.2 * 200) + 1 = 41 kept: the 41st largest magnitude
    assert torch.equal(out["big"], ties([tv["big"] for tv in tvs], thresholds=thresholds))
    per_tensor = merge("ties", tvs, density=0.2)
    assert int((per_tensor["small"] != 0).sum()) > 0


def test_merge_over_lazy_safetensors_equals_in_memory(tmp_path: Path):
    tvs = _tvs(3)
    paths = [save_state_dict(tv, tmp_path / f"tv{i}.safetensors") for i, tv in enumerate(tvs)]
    lazy = [load_state_dict(p) for p in paths]
    assert all(isinstance(sd, LazyStateDict) for sd in lazy)
    runs = [("ties", {}), ("ties", {"global_topk": True}), ("dare", {"then": "ties"}), ("tsv_m", {}), ("iso_cts", {})]
    for method, opts in runs:
        a, b = merge(method, lazy, seed=3, **opts), merge(method, tvs, seed=3, **opts)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (method, key)


@pytest.mark.parametrize(
    "method,opts", [("task_arithmetic", {}), ("ties", {"global_topk": True}), ("iso_c", {}), ("dare", {})]
)
def test_merge_models_streams_base_plus_merged_vector(tmp_path: Path, method, opts):
    base = _model(0)
    experts = [_model(i) for i in (1, 2, 3)]
    save_state_dict(base, tmp_path / "base.safetensors")
    for i, e in enumerate(experts):
        save_state_dict(e, tmp_path / f"e{i}.safetensors")
    paths = [tmp_path / f"e{i}.safetensors" for i in range(3)]
    merged = merge_models(tmp_path / "base.safetensors", paths, method, seed=1, **opts)
    tvs = [{k: e[k] - base[k] for k in base if base[k].is_floating_point()} for e in experts]
    expected = apply_task_vector(base, merge(method, tvs, seed=1, **opts))
    assert sorted(merged) == sorted(base)  # safetensors files list keys sorted
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)
    assert torch.equal(merged["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    mean_var = base["bn.running_var"] + sum(e["bn.running_var"] - base["bn.running_var"] for e in experts) / 3
    torch.testing.assert_close(merged["bn.running_var"], mean_var)


def test_merge_models_mixed_dtypes_keep_the_base_dtype():
    base = _model(0)
    experts = [_model(i, torch.bfloat16) for i in (1, 2)]
    merged = merge_models(base, experts, "task_arithmetic")
    assert merged["fc.weight"].dtype == torch.float32
    expected = base["fc.weight"] + 0.3 * sum(e["fc.weight"].float() - base["fc.weight"] for e in experts)
    torch.testing.assert_close(merged["fc.weight"], expected)
    half_base = _model(0, torch.bfloat16)
    assert merge_models(half_base, [_model(1), _model(2)], "weight_average")["fc.weight"].dtype == torch.bfloat16


def test_merge_models_validates_experts():
    base = _model(0)
    bad = _model(1)
    bad["fc.weight"] = torch.zeros(12, 5)
    with pytest.raises(CheckpointError, match="fc.weight"):
        merge_models(base, [_model(2), bad], "ties")


# Every registered method takes plain task vectors (K = 2 suits slerp and model_stock); the data-based merges
# (RegMean, RegMean++) are not in MERGE_METHODS and merge() refuses them before reading any tensor.
@pytest.mark.parametrize("method", PER_TENSOR)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_merge_refuses_a_non_finite_input_naming_task_and_key(method, bad):
    tvs = _tvs(2)
    tvs[1]["fc.weight"][2, 7] = bad
    label = "1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"
    # dare p=0.9, ties/della/breadcrumbs trims and consensus masks would drop the entry and return finite values
    with pytest.raises(CheckpointError, match=rf"^task vector 1: tensor 'fc\.weight' has {label} values$"):
        merge(method, tvs, seed=0)
    with pytest.raises(CheckpointError, match=rf"task vector 1: tensor 'fc\.weight' has {label}"):
        merge_tensor(method, [tv["fc.weight"] for tv in tvs], name="fc.weight")


def test_merge_refuses_non_finite_batchnorm_stats_and_base():
    tvs = _tvs(2)
    tvs[0]["bn.running_var"][1] = float("inf")
    # bn_stats="base" replaces the statistics by zeros: the Inf would vanish without the input check
    with pytest.raises(CheckpointError, match=r"task vector 0: tensor 'bn\.running_var' has 0 NaN and 1 Inf"):
        merge("ties", tvs, bn_stats="base")
    base = _model(0)
    base["fc.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match=r"the base model: tensor 'fc\.bias' has 1 NaN"):
        merge("slerp", _tvs(2), space="weights", base=base)


def test_merge_names_the_file_of_a_lazy_task_vector(tmp_path: Path):
    tvs = _tvs(3)
    tvs[2]["pos_embedding"][0, 0] = float("nan")
    lazy = [load_state_dict(save_state_dict(tv, tmp_path / f"tv{i}.safetensors")) for i, tv in enumerate(tvs)]
    with pytest.raises(CheckpointError, match=r"task vector 2 \(.*tv2\.safetensors\): tensor 'pos_embedding' has 1"):
        merge("dare", lazy, p=0.9)


def test_merge_checks_each_input_once(monkeypatch):
    """In-memory task vectors are checked per tensor as they are read; lazy task vectors that check themselves are
    not read a second time."""
    calls: list[str] = []
    real = registry.ensure_finite
    monkeypatch.setattr(registry, "ensure_finite", lambda t, key, where: (calls.append(where), real(t, key, where)))
    tvs = _tvs(2)
    merge("ties", tvs)
    assert sorted(calls) == sorted(["task vector 0", "task vector 1"] * len(tvs[0]))
    calls.clear()
    base, experts = _model(0), [_model(1), _model(2)]
    views = [LazyTaskVector(e, base) for e in experts]
    out = merge("ties", views)
    assert calls == [] and out.keys() == views[0].keys()
    merge("ties", [views[0], LazyTaskVector(experts[1], base, check_finite=False)])
    assert calls == ["task vector 1"] * len(views[0])
