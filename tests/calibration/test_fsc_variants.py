"""FSC beyond the paper: ratio of means, per-channel coefficients and WSC-style gating.

Each variant is checked against an independent computation of its formula and, for per-channel coefficients, the
folded model against the calibrated output ``f0 + xi_c (fm - f0)`` computed by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model, weight_average
from torch import nn

from magic_pl.calibration import FeatureSpaceCalibrator


def _setup(k: int = 3, seed: int = 0, scale_m: float = 0.3):
    torch.manual_seed(seed)
    base = nn.Linear(5, 4).double()
    tvs = make_task_vectors(base, k, scale=0.3, seed=seed)
    tau_m = {key: scale_m * sum(tv[key] for tv in tvs) for key in tvs[0]}
    return base, tvs, tau_m


def _deltas(base, tv, x):
    return x @ tv["weight"].double().T + tv["bias"].double()


def test_ratio_of_means_matches_independent_computation():
    base, tvs, tau_m = _setup()
    merged = merged_model(base, tau_m)
    xs = [torch.randn(2, 3, 5, dtype=torch.float64) for _ in tvs]
    cal = FeatureSpaceCalibrator(base, merged, tvs, norm=2, statistic="ratio_of_means")
    for k, x in enumerate(xs):
        cal.update(k, x)
    want = []
    for k, x in enumerate(xs):
        dk, dm = _deltas(base, tvs[k], x), _deltas(base, tau_m, x)
        want.append(dk.norm(dim=-1).sum() / dm.norm(dim=-1).sum())
    torch.testing.assert_close(cal.task_ratios()[:, 0].double(), torch.stack(want), rtol=1e-5, atol=0)
    mean_of_ratios = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, norm=2)
    for k, x in enumerate(xs):
        mean_of_ratios.update(k, x)
    # the two statistics differ on real data (otherwise the test could not tell them apart)
    assert abs(mean_of_ratios.coefficients()[""] - cal.coefficients()[""]) > 1e-3


def test_per_channel_coefficients_and_fold():
    base, tvs, tau_m = _setup(seed=3)
    merged = merged_model(base, tau_m)
    xs = [torch.randn(6, 5, dtype=torch.float64) for _ in tvs]
    for statistic in ("mean_of_ratios", "ratio_of_means"):
        m = copy.deepcopy(merged)
        cal = FeatureSpaceCalibrator(base, m, tvs, granularity="channel", statistic=statistic)
        for k, x in enumerate(xs):
            cal.update(k, x)
        assert cal.slots == {"": (0, 4)} and tuple(cal.ratio_sum.shape) == (3, 4)
        per_task = []
        for k, x in enumerate(xs):
            dk, dm = _deltas(base, tvs[k], x).abs(), _deltas(base, tau_m, x).abs()
            per_task.append(dk.sum(0) / dm.sum(0) if statistic == "ratio_of_means" else (dk / dm).mean(0))
        want = torch.stack(per_task).mean(0)
        got = cal.channel_coefficients()[""]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
        assert cal.coefficients()[""] == pytest.approx(float(want.mean()), rel=1e-5)
        report = cal.fold()
        assert report.folded == [""] and len(report.channel_coefficients[""]) == 4
        x = torch.randn(7, 5, dtype=torch.float64)
        f0, fm = base(x), merged(x)
        torch.testing.assert_close(m(x), f0 + got.double() * (fm - f0), rtol=1e-9, atol=1e-12)


def test_per_channel_conv_batchnorm_embedding_fold_exact():
    torch.manual_seed(4)
    base = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1)
    ).double().eval()
    with torch.no_grad():
        base[1].running_mean.uniform_(-0.5, 0.5)
        base[1].running_var.uniform_(0.5, 2.0)
    tvs = make_task_vectors(base, 2, scale=0.2, seed=4)
    merged = merged_model(base, weight_average(tvs))
    cal = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, granularity="channel", statistic="ratio_of_means")
    for k in range(2):
        cal.update(k, torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert cal.slots == {"0": (0, 3), "1": (3, 6), "3": (6, 8)}
    # sequential reference: each module's output replaced by f0 + xi_c (fm - f0) with xi over channel dim 1
    xi = cal.channel_coefficients()
    model = cal.merged
    cal.fold()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    h = x
    for i, (b, m) in enumerate(zip(base, merged)):
        f0, fm = b(h), m(h)
        if str(i) in xi:
            h = f0 + xi[str(i)].double().view(1, -1, 1, 1) * (fm - f0)
        else:
            h = fm
    torch.testing.assert_close(model(x), h, rtol=1e-6, atol=1e-9)

    emb = nn.Embedding(10, 4).double()
    etvs = make_task_vectors(emb, 2, scale=0.2, seed=5)
    em = merged_model(emb, weight_average(etvs))
    ecal = FeatureSpaceCalibrator(emb, em, etvs, granularity="channel")
    ecal.update(0, torch.tensor([[1, 2, 3]]))
    ecal.update(1, torch.tensor([[4, 5]]))
    assert ecal.slots == {"": (0, 4)}  # columns of the embedding
    exi = ecal.channel_coefficients()[""].double()
    ecal.fold()
    idx = torch.tensor([0, 7, 9])
    torch.testing.assert_close(em(idx), emb(idx) + exi * (merged_model(emb, weight_average(etvs))(idx) - emb(idx)))


def test_paper_gate_only_scales_up_non_sensitive_and_down_sensitive():
    torch.manual_seed(6)
    base = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    tvs = make_task_vectors(base, 2, scale=0.2, seed=6)
    big = {k: 3.0 * v for k, v in weight_average(tvs).items()}  # over-scaled merge: measured xi < 1
    x = [torch.randn(4, 4, dtype=torch.float64) for _ in range(2)]
    free, gated = (FeatureSpaceCalibrator(base, merged_model(base, big), tvs, gate=g) for g in ("none", "paper"))
    for cal in (free, gated):
        for k in range(2):
            cal.update(k, x[k])
    assert all(v < 1 for v in free.coefficients().values())
    assert all(v == 1.0 for v in gated.coefficients().values())  # gated: nothing shrinks
    small = {k: 0.2 * v for k, v in weight_average(tvs).items()}  # under-scaled: xi > 1, sensitive "2" capped
    gs = FeatureSpaceCalibrator(base, merged_model(base, small), tvs, gate="paper", sensitive=["2"])
    fs = FeatureSpaceCalibrator(base, merged_model(base, small), tvs, sensitive=["2"])
    for cal in (gs, fs):
        for k in range(2):
            cal.update(k, x[k])
    assert gs.coefficients()["0"] == pytest.approx(fs.coefficients()["0"]) and fs.coefficients()["0"] > 1
    assert gs.coefficients()["2"] == 1.0 == fs.coefficients()["2"]


def test_bad_variant_names_are_rejected():
    base, tvs, tau_m = _setup()
    for kw in ({"statistic": "median"}, {"granularity": "row"}, {"gate": "up"}):
        with pytest.raises(ValueError, match=list(kw)[0]):
            FeatureSpaceCalibrator(base, merged_model(base, tau_m), tvs, **kw)


def test_per_channel_sequential_and_sum_across_processes():
    torch.manual_seed(7)
    base = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)).double()
    tvs = make_task_vectors(base, 2, scale=0.2, seed=7)
    merged = merged_model(base, weight_average(tvs))
    xs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]
    seq = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, mode="sequential", granularity="channel")
    for k in range(2):
        seq.update(k, xs[k])
    seq_xi = seq.channel_coefficients()
    # by hand: layer 0 from the uncalibrated input, layer 2 from layer 0's calibrated output
    one = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, granularity="channel")
    for k in range(2):
        one.update(k, xs[k])
    torch.testing.assert_close(seq_xi["0"], one.channel_coefficients()["0"])
    assert not torch.allclose(seq_xi["2"], one.channel_coefficients()["2"])
    # two "processes" summing statistics give the one-process coefficients
    a = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, granularity="channel", statistic="ratio_of_means")
    b = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, granularity="channel", statistic="ratio_of_means")
    whole = FeatureSpaceCalibrator(base, copy.deepcopy(merged), tvs, granularity="channel", statistic="ratio_of_means")
    a.update(0, xs[0][:2]); b.update(0, xs[0][2:]); b.update(1, xs[1])  # noqa: E702
    whole.update(0, xs[0]); whole.update(1, xs[1])  # noqa: E702
    a.load_statistics(a.ratio_sum + b.ratio_sum, a.ratio_count + b.ratio_count)
    for name, v in whole.channel_coefficients().items():
        torch.testing.assert_close(a.channel_coefficients()[name], v, rtol=1e-6, atol=0)
