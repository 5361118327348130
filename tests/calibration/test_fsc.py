"""FSC (docs/method.md, FSC): known answers, an independent computation, statistics, modes and edge cases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model, weight_average
from torch import nn

from magic_pl.calibration import FeatureSpaceCalibrator
from magic_pl.calibration.taskvectors import LazyTaskVector


def _linear_setup(c: float, k: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(6, 4)
    tau = make_task_vectors(base, 1, scale=0.1, seed=seed)[0]
    tvs = [dict(tau) for _ in range(k)]
    merged = merged_model(base, {key: c * v for key, v in tau.items()})
    return base, merged, tvs


@pytest.mark.parametrize("norm", [1, 2, "inf"])
def test_known_answer_single_linear(norm):
    c = 2.5
    base, merged, tvs = _linear_setup(c)
    cal = FeatureSpaceCalibrator(base, merged, tvs, norm=norm)
    for k in range(3):
        cal.update(k, torch.randn(5, 6))
    assert cal.module_names == [""]
    assert cal.coefficients()[""] == pytest.approx(1 / c, rel=1e-5)
    report = cal.fold()
    assert report.folded == [""]
    for key, t in merged.state_dict().items():  # folded: theta0 + tau_m / c = theta0 + tau
        torch.testing.assert_close(t, base.state_dict()[key] + tvs[0][key], rtol=1e-5, atol=1e-6)


def test_tau_m_scaled_gives_inverse_scale_everywhere_on_affine_units():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3
    ).eval()
    tau = make_task_vectors(base, 1, scale=0.02)[0]
    merged = merged_model(base, {k: 1.2 * v for k, v in tau.items()}).eval()
    cal = FeatureSpaceCalibrator(base, merged, [tau, tau])
    cal.update(0, torch.randn(1, 3, 32, 32))
    cal.update(1, torch.randn(1, 3, 32, 32))
    for name, xi in cal.coefficients().items():
        assert xi == pytest.approx(1 / 1.2, rel=1e-4), name


def _manual_ratio(w0, b0, wk, bk, wm, bm, x, p):
    dk = x @ (wk - w0).T + (bk - b0)
    dm = x @ (wm - w0).T + (bm - b0)
    r = torch.linalg.vector_norm(dk, ord=p, dim=-1) / torch.linalg.vector_norm(dm, ord=p, dim=-1)
    return r.mean()


def test_matches_independent_computation_with_positions():
    torch.manual_seed(1)
    base = nn.Linear(5, 3).double()
    tvs = make_task_vectors(base, 3, scale=0.3, seed=1)
    tau_m = {k: 0.3 * sum(tv[k] for tv in tvs) for k in tvs[0]}
    merged = merged_model(base, tau_m)
    xs = [torch.randn(2, 4, 5, dtype=torch.float64) for _ in range(3)]  # [batch, positions, features]
    cal = FeatureSpaceCalibrator(base, merged, tvs, norm=2)
    for k, x in enumerate(xs):
        cal.update(k, x)
    w0, b0 = base.weight.detach(), base.bias.detach()
    wm, bm = merged.weight.detach(), merged.bias.detach()
    want = [
        _manual_ratio(w0, b0, w0 + tvs[k]["weight"].double(), b0 + tvs[k]["bias"].double(), wm, bm, xs[k], 2)
        for k in range(3)
    ]
    assert cal.ratio_count[:, 0].tolist() == [8.0, 8.0, 8.0]
    torch.testing.assert_close(cal.task_ratios()[:, 0].double(), torch.stack(want), rtol=1e-5, atol=0)
    assert cal.coefficients()[""] == pytest.approx(float(torch.stack(want).mean()), rel=1e-5)


def test_conv_norm_over_channels():
    torch.manual_seed(2)
    base = nn.Conv2d(2, 3, 1, bias=False)
    tvs = make_task_vectors(base, 2, scale=0.3, seed=2)
    merged = merged_model(base, weight_average(tvs))
    x = torch.randn(1, 2, 4, 4)
    cal = FeatureSpaceCalibrator(base, merged, tvs)
    cal.update(0, x)
    w0 = base.weight.detach()
    dk = nn.functional.conv2d(x, tvs[0]["weight"])
    dm = nn.functional.conv2d(x, merged.weight.detach() - w0)
    want = (dk.abs().sum(1) / dm.abs().sum(1)).mean()
    assert cal.ratio_count[0, 0] == 16  # 1 sample x 4 x 4 positions
    assert cal.task_ratios()[0, 0].item() == pytest.approx(want.item(), rel=1e-5)


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x, use_b: bool = True):
        h = self.a(x)
        return self.b(h) if use_b else h


def test_unseen_modules_tasks_and_sensitive_cap():
    torch.manual_seed(3)
    base = TwoBranch()
    tvs = make_task_vectors(base, 3, scale=0.1, seed=3)
    merged = merged_model(base, {k: 0.25 * sum(tv[k] for tv in tvs) for k in tvs[0]})
    cal = FeatureSpaceCalibrator(base, merged, tvs, sensitive=["b.weight"])
    cal.update(0, torch.randn(2, 4))
    cal.update(1, torch.randn(2, 4), use_b=False)  # task 1 never reaches b; task 2 sends nothing
    coeffs = cal.coefficients()
    r = cal.task_ratios()
    assert coeffs["unused"] == 1.0
    assert math.isnan(r[2, 0]) and math.isnan(r[1, 1])
    assert coeffs["a"] == pytest.approx(float(r[:2, 0].mean()), rel=1e-6)
    assert float(r[0, 1]) > 1 and coeffs["b"] == 1.0  # capped
    with pytest.raises(ValueError, match=r"every task; too few for: task 2 \(0\)"):
        cal.fold()  # a task without samples must not silently take xi from the others
    cal.update(2, torch.randn(1, 4), use_b=False)
    report = cal.fold()
    assert report.sensitive == ["b"] and "unused" in report.unchanged
    assert report.task_ratios["unused"] == [None, None, None]


def test_task_index_errors():
    base, merged, tvs = _linear_setup(2.0)
    cal = FeatureSpaceCalibrator(base, merged, tvs)
    with pytest.raises(IndexError, match="task_index 3 is out of range.*3 task vectors"):
        cal.update(3, torch.randn(1, 6))
    with pytest.raises(IndexError, match="out of range"):
        cal.update(-1, torch.randn(1, 6))
    with pytest.raises(ValueError, match="integer"):
        cal.update(0.5, torch.randn(1, 6))
    cal.update(torch.tensor(1), torch.randn(1, 6))  # a 0-d tensor from a batch is fine
    with pytest.raises(ValueError, match="K >= 1"):
        FeatureSpaceCalibrator(base, merged, [])
    with pytest.raises(ValueError, match="norm"):
        FeatureSpaceCalibrator(base, merged, tvs, norm=3)
    with pytest.raises(KeyError, match="task vector 0 lacks 'bias'"):
        FeatureSpaceCalibrator(base, merged, [{"weight": tvs[0]["weight"]}])


def test_single_task_identical_and_zero_task_vectors():
    torch.manual_seed(4)
    base = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.LayerNorm(5), nn.Linear(5, 2))
    tv = make_task_vectors(base, 1, scale=0.1, seed=4)[0]
    x = torch.randn(3, 4)
    # K = 1, merged = the expert: xi = 1
    cal = FeatureSpaceCalibrator(base, merged_model(base, tv), [tv])
    cal.update(0, x)
    for xi in cal.coefficients().values():
        assert xi == pytest.approx(1.0, abs=1e-5)
    # identical experts merged by their weight average: xi = 1
    cal = FeatureSpaceCalibrator(base, merged_model(base, tv), [tv, tv, tv])
    for k in range(3):
        cal.update(k, x)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in cal.coefficients().values())
    # zero task vectors: every ratio is 0/0 -> 1, nothing changes
    zero = {k: torch.zeros_like(v) for k, v in tv.items()}
    merged = merged_model(base, zero)
    cal = FeatureSpaceCalibrator(base, merged, [zero, zero])
    cal.update(0, x)
    cal.update(1, x)
    assert set(cal.coefficients().values()) == {1.0}
    report = cal.fold()
    assert report.folded == [] and len(report.unchanged) == 3
    for key, t in merged.state_dict().items():
        assert torch.equal(t, base.state_dict()[key])


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_inference_mode_and_no_grad_give_the_same_statistics():
    torch.manual_seed(5)
    base = _mlp()
    tvs = make_task_vectors(base, 2, scale=0.2, seed=5)
    merged = merged_model(base, weight_average(tvs))
    xs = [torch.randn(4, 6) for _ in range(2)]
    results = []
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        m = copy.deepcopy(merged)
        with ctx():
            cal = FeatureSpaceCalibrator(base, m, tvs)
            for k, x in enumerate(xs):
                cal.update(k, x)
            report = cal.fold()
        assert not cal.ratio_sum.is_inference()
        out = m(xs[0]).sum()
        out.backward()  # the folded model trains normally afterwards
        results.append((cal.ratio_sum.clone(), report.coefficients))
    for stats, coeffs in results[1:]:
        torch.testing.assert_close(stats, results[0][0])
        assert coeffs == results[0][1]


def test_statistics_sum_across_processes():
    torch.manual_seed(6)
    base = _mlp()
    tvs = make_task_vectors(base, 3, scale=0.2, seed=6)
    merged = merged_model(base, weight_average(tvs))
    batches = [(k, torch.randn(2, 6)) for k in (0, 1, 2, 0, 2)]
    whole = FeatureSpaceCalibrator(base, merged, tvs)
    for k, x in batches:
        whole.update(k, x)
    ranks = [FeatureSpaceCalibrator(base, merged, tvs) for _ in range(2)]
    for i, (k, x) in enumerate(batches):
        ranks[i % 2].update(k, x)
    total_sum = ranks[0].ratio_sum + ranks[1].ratio_sum
    total_count = ranks[0].ratio_count + ranks[1].ratio_count
    ranks[0].load_statistics(total_sum, total_count)
    assert ranks[0].ratio_sum.dtype == torch.float32 and ranks[0].ratio_sum.shape == (3, 4)
    assert ranks[0].coefficients() == pytest.approx(whole.coefficients(), rel=1e-6)
    # finalize(reduce=...) does the same through a callable (the Lightning all-reduce)
    other = ranks[1]
    other.finalize(reduce=lambda stacked: torch.stack([total_sum, total_count]))
    assert other.coefficients() == pytest.approx(whole.coefficients(), rel=1e-6)
    with pytest.raises(ValueError, match="expected \\(3, 4\\)"):
        whole.load_statistics(torch.zeros(2, 4), torch.zeros(2, 4))


def test_bf16_model_statistics_float32():
    torch.manual_seed(7)
    base = _mlp()
    tvs = make_task_vectors(base, 2, scale=0.2, seed=7)
    merged = merged_model(base, weight_average(tvs))
    xs = [torch.randn(8, 6) for _ in range(2)]
    ref = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs)
    base16, merged16 = copy.deepcopy(base).bfloat16(), copy.deepcopy(merged).bfloat16()
    cal = FeatureSpaceCalibrator(base16, merged16, tvs)
    for k, x in enumerate(xs):
        ref.update(k, x)
        with torch.inference_mode():
            cal.update(k, x.bfloat16())
    assert cal.ratio_sum.dtype == torch.float32
    for name, xi in cal.coefficients().items():
        assert xi == pytest.approx(ref.coefficients()[name], rel=0.05)
    report = cal.fold()
    assert all(p.dtype == torch.bfloat16 for p in merged16.parameters())
    assert len(report.folded) == 4


def test_sequential_mode_definition():
    torch.manual_seed(8)
    base = _mlp()
    tvs = make_task_vectors(base, 2, scale=0.3, seed=8)
    merged = merged_model(base, weight_average(tvs))
    xs = [torch.randn(4, 6) for _ in range(2)]

    par = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs)
    one = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, mode="sequential", max_rounds=1)
    seq_model = copy.deepcopy(merged)
    seq = FeatureSpaceCalibrator(base, seq_model, tvs, mode="sequential", tol=0.0)
    for k, x in enumerate(xs):
        par.update(k, x)
        one.update(k, x)
        with torch.inference_mode():  # stored inference tensors are replayed later, outside inference mode
            seq.update(k, x.clone())
    assert one.coefficients() == par.coefficients()  # round 1 is the parallel measurement
    got = seq.coefficients()
    assert seq.rounds <= len(seq.module_names) + 1

    # the definition, module by module: calibrate the earlier modules (fold), measure the next one on that model
    names = [u for u in par.module_names]
    model = copy.deepcopy(merged)
    want = {}
    for name in names:
        cal = FeatureSpaceCalibrator(base, model, tvs, modules=[name])
        for k, x in enumerate(xs):
            cal.update(k, x)
        want[name] = cal.coefficients()[name]
        cal.fold()
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(par.coefficients(), rel=1e-3)
    report = seq.fold()
    assert report.mode == "sequential" and report.rounds == seq.rounds
    x = torch.randn(3, 6)
    torch.testing.assert_close(seq_model(x), model(x), rtol=1e-5, atol=1e-6)


def test_lazy_task_vectors_and_state_dict_base(tmp_path):
    from magic_pl.statedict import load_state_dict, save_state_dict

    torch.manual_seed(9)
    base = _mlp()
    tvs = make_task_vectors(base, 2, scale=0.2, seed=9)
    experts = []
    for i, tv in enumerate(tvs):
        path = save_state_dict(merged_model(base, tv).state_dict(), tmp_path / f"e{i}.safetensors")
        experts.append(load_state_dict(path))
    base_path = save_state_dict(base.state_dict(), tmp_path / "base.safetensors")
    base_sd = load_state_dict(base_path)
    lazy = [LazyTaskVector(e, base_sd) for e in experts]
    assert set(lazy[0]) == set(tvs[0]) and "0.weight" in lazy[0]
    merged = merged_model(base, weight_average(tvs))
    x = torch.randn(4, 6)
    a = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs)
    b = FeatureSpaceCalibrator(base_sd, copy.deepcopy(merged), lazy)
    for k in range(2):
        a.update(k, x)
        b.update(k, x)
    assert b.coefficients() == pytest.approx(a.coefficients(), rel=1e-6)


def test_fold_closes_the_calibrator_and_root_wrap_error():
    base, merged, tvs = _linear_setup(2.0)
    cal = FeatureSpaceCalibrator(base, merged, tvs)
    for k in range(3):
        cal.update(k, torch.randn(2, 6))
    cal.fold()
    with pytest.raises(RuntimeError, match="already folded"):
        cal.update(0, torch.randn(2, 6))
    mha0 = nn.MultiheadAttention(4, 2, batch_first=True)
    tv = make_task_vectors(mha0, 2, scale=0.2)
    mham = merged_model(mha0, weight_average(tv))
    cal = FeatureSpaceCalibrator(mha0, mham, tv)
    x = torch.randn(1, 3, 4)
    cal.update(0, x, x, x)
    cal.update(1, x, x, x)
    with pytest.raises(ValueError, match="root module"):
        cal.fold()


def test_linear_shortcut_equals_general_path_float64():
    torch.manual_seed(10)
    base = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.LayerNorm(5)
    ).double()
    tvs = make_task_vectors(base, 3, scale=0.2, seed=10)
    merged = merged_model(base, {k: 0.3 * sum(tv[k] for tv in tvs) for k in tvs[0]})
    xs = [torch.randn(2, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    fast = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, mode="sequential", tol=0.0)
    slow = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, mode="sequential", tol=0.0)
    assert all(u.linear for u in fast.units)
    for u in slow.units:
        u.linear = False
    for k, x in enumerate(xs):
        fast.update(k, x)
        slow.update(k, x)
    assert fast.coefficients() == pytest.approx(slow.coefficients(), rel=1e-6)  # statistics are float32
    torch.testing.assert_close(fast.task_ratios(), slow.task_ratios(), rtol=1e-6, atol=0)


def test_inplace_module_rejected_and_training_mode_warns():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4))
            self.inplace = True

        def forward(self, x):
            return x.mul_(self.gamma)

    base = nn.Sequential(nn.Linear(4, 4), Scale())
    tvs = make_task_vectors(base, 1, scale=0.1)
    with pytest.raises(ValueError, match="'1' \\(Scale\\) modifies its input in place"):
        FeatureSpaceCalibrator(base, merged_model(base, tvs[0]), tvs)
    base = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    tvs = make_task_vectors(base, 1, scale=0.1)
    merged = merged_model(base, tvs[0]).train()
    cal = FeatureSpaceCalibrator(base, merged, tvs)
    with pytest.warns(UserWarning, match="training mode"):
        cal.update(0, torch.randn(2, 4))


# --- non-finite calibration data: an error naming the task and the module, never a silent ratio of 1 ------------------
# Each front door is fed task "a" clean and task "b" poisoned (or absent); every door must raise CalibrationDataError.

def _poisoned_batches(where: str) -> dict[int, torch.Tensor]:
    """Task 0 ("a") clean; task 1 ("b") with NaN/Inf in one sample, in all samples, or with no samples at all."""
    g = torch.Generator().manual_seed(11)
    xs = {k: torch.randn(3, 6, generator=g) for k in range(2)}
    if where == "nan_one_sample":
        xs[1][1, 2] = float("nan")
    elif where == "nan_all_samples":
        xs[1][:] = float("nan")
    elif where == "inf_one_sample":
        xs[1][0, 0] = float("inf")
    elif where == "no_samples":
        del xs[1]
    return xs


def _nonfinite_setup(statistic: str, granularity: str, mode: str = "parallel"):
    torch.manual_seed(12)
    base = _mlp()
    tvs = make_task_vectors(base, 2, scale=0.2, seed=12)
    merged = merged_model(base, weight_average(tvs))
    return FeatureSpaceCalibrator(base, merged, tvs, statistic=statistic, granularity=granularity, mode=mode,
                                  task_names=["a", "b"])


def _feed_calibrator(cal, xs):
    for k, x in xs.items():
        cal.update(k, x)
    return cal.fold()


def _feed_collector(cal, xs, deferred):
    from magic_pl.lightning.statistics import FeatureStatisticsCollector

    collector = FeatureStatisticsCollector(cal)
    assert cal.raise_at_update  # one process: raise at the update that meets the NaN
    if deferred:  # as on several processes: nothing raises before the sum, the one check after it does
        cal.raise_at_update = False
    for k, x in xs.items():
        collector.update(torch.full((x.shape[0],), k), x)  # per-sample task ids, fed one sample at a time
    return collector.finish()


FRONT_DOORS = {
    "calibrator": _feed_calibrator,
    "calibrator_sequential": _feed_calibrator,  # measured in finalize, on the stored batches
    "collector": lambda cal, xs: _feed_collector(cal, xs, deferred=False),  # the Lightning front door
    "collector_deferred": lambda cal, xs: _feed_collector(cal, xs, deferred=True),
}


@pytest.mark.parametrize("where", ["nan_one_sample", "nan_all_samples", "inf_one_sample", "no_samples"])
@pytest.mark.parametrize("door", list(FRONT_DOORS))
@pytest.mark.parametrize("granularity", ["module", "channel"])
@pytest.mark.parametrize("statistic", ["mean_of_ratios", "ratio_of_means"])
def test_nonfinite_or_missing_calibration_data_is_an_error_naming_task_and_module(statistic, granularity, door, where):
    from magic_pl.calibration.fsc import CalibrationDataError

    mode = "sequential" if door == "calibrator_sequential" else "parallel"
    cal = _nonfinite_setup(statistic, granularity, mode)
    before = {k: v.clone() for k, v in cal.merged.state_dict().items()}
    with pytest.raises(CalibrationDataError) as info:
        FRONT_DOORS[door](cal, _poisoned_batches(where))
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    if where == "no_samples":
        assert "too few for: b (0)" in msg
    else:
        assert "task 'b'" in msg and "task 'a'" not in msg, msg  # the poisoned task, and only it
        assert "module '0'" in msg and "check the calibration inputs" in msg, msg  # the first module it reached
        assert ("NaN" in msg) or ("Inf" in msg)
    # nothing was folded
    assert all(torch.equal(v, before[k]) for k, v in cal.merged.state_dict().items())


def test_nonfinite_error_raises_at_the_update_and_leaves_the_statistics_usable():
    from magic_pl.calibration.fsc import CalibrationDataError

    cal = _nonfinite_setup("mean_of_ratios", "module")
    xs = _poisoned_batches("nan_one_sample")
    cal.update(0, xs[0])
    snapshot = cal.ratio_sum.clone(), cal.ratio_count.clone()
    with pytest.raises(CalibrationDataError, match=r"task 'b' .* module '0' \(NaN in .* at 1 position\(s\)\)"):
        cal.update(1, xs[1])
    assert torch.equal(cal.ratio_sum, snapshot[0]) and torch.equal(cal.ratio_count, snapshot[1])
    assert cal.task_samples.tolist() == [3, 0]  # the batch that raised is not counted
    cal.update(1, xs[1][[0, 2]])  # the clean samples of the same task
    report = cal.fold()
    assert all(math.isfinite(v) for v in report.coefficients.values())
    assert report.samples_per_task == [3, 2]


def test_nonfinite_statistics_are_caught_after_the_sum_on_every_process():
    """What a process whose own data was finite sees after the sum over processes: the same error, for the same task
    and module (the NaN another process measured survives the sum)."""
    from magic_pl.calibration.fsc import CalibrationDataError

    xs = _poisoned_batches("nan_one_sample")
    ranks = [_nonfinite_setup("ratio_of_means", "module") for _ in range(2)]
    for cal in ranks:
        cal.raise_at_update = False
    ranks[0].update(0, xs[0])
    ranks[1].update(1, xs[1])  # only this "process" saw the NaN
    total = torch.stack([ranks[0].ratio_sum + ranks[1].ratio_sum, ranks[0].ratio_count + ranks[1].ratio_count])
    messages = []
    for cal in ranks:
        with pytest.raises(CalibrationDataError) as info:
            cal.finalize(reduce=lambda stacked: total)
        messages.append(str(info.value))
    assert all("task 'b'" in m and "module '0'" in m for m in messages)
    assert "not from this process's samples" in messages[0] and "at 1 position(s)" in messages[1]
    # coefficients() never silently drops the task either
    with pytest.raises(CalibrationDataError, match="task 'b'"):
        ranks[1].coefficients()


@pytest.mark.parametrize("granularity", ["module", "channel"])
@pytest.mark.parametrize("statistic", ["mean_of_ratios", "ratio_of_means"])
@pytest.mark.parametrize("unchanged", ["every_expert", "merge_only"])
def test_module_left_unchanged_by_merging_keeps_xi_one(statistic, granularity, unchanged):
    """0/0 (the experts and the merge leave layer "2" as the base) and x/0 (the experts change it, the merge does
    not): finite features, so xi = 1 there, not an error; the other layers get their measured xi."""
    torch.manual_seed(13)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    tvs = make_task_vectors(base, 2, scale=0.2, seed=13)
    if unchanged == "every_expert":
        tvs = [{k: torch.zeros_like(v) if k.startswith("2.") else v for k, v in tv.items()} for tv in tvs]
    tau_m = {k: torch.zeros_like(v) if k.startswith("2.") else 0.4 * (tvs[0][k] + tvs[1][k]) for k, v in tvs[0].items()}
    xs = [torch.randn(4, 6, dtype=torch.float64) for _ in range(2)]
    cal = FeatureSpaceCalibrator(base, merged_model(base, tau_m), tvs, statistic=statistic, granularity=granularity)
    for k, x in enumerate(xs):
        cal.update(k, x)
    report = cal.fold()
    assert report.coefficients["2"] == 1.0 and "2" in report.unchanged
    # layer 0 by hand: |dh| per channel (channel granularity) or its L1 norm (module), per task, then the mean
    per_task = []
    for k, x in enumerate(xs):
        dk = (x @ tvs[k]["0.weight"].double().T + tvs[k]["0.bias"].double()).abs()
        dm = (x @ tau_m["0.weight"].double().T + tau_m["0.bias"].double()).abs()
        if granularity == "module":
            dk, dm = dk.sum(-1, keepdim=True), dm.sum(-1, keepdim=True)
        per_task.append(dk.sum(0) / dm.sum(0) if statistic == "ratio_of_means" else (dk / dm).mean(0))
    want = torch.stack(per_task).mean(0)
    assert report.coefficients["0"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert math.isfinite(report.coefficients["0"]) and report.coefficients["0"] != 1.0
