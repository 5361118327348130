"""The ``scale`` step: theta0 + factor * tau_m by its closed form; factor 1 leaves the model as merged."""

from __future__ import annotations

import copy

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model, weight_average
from torch import nn

from magic_pl.calibration import FeatureSpaceCalibrator, resolve_setting


def _setup(dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.GELU(), nn.Linear(6, 3)).to(dtype).eval()
    tvs = make_task_vectors(base, 3, scale=0.2)
    return base, tvs, weight_average(tvs)


def test_scale_is_base_plus_factor_times_tau_m():
    base, tvs, tau_m = _setup()
    m = merged_model(base, tau_m)
    rep = resolve_setting("scale:scale.factor=0.7").calibrate(base, m, tvs, tau_m)
    for key, v in m.state_dict().items():
        b = base.state_dict()[key]
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):  # statistics, not weights
            assert torch.equal(v, merged_model(base, tau_m).state_dict()[key])
        else:
            torch.testing.assert_close(v, b + 0.7 * tau_m[key], rtol=0, atol=1e-12)
    assert rep.space == "wsc" and rep.setting == "scale:scale.factor=0.7" and rep.row_scales == {}


def test_factor_one_leaves_the_merge_bit_for_bit():
    base, tvs, tau_m = _setup(torch.float32)
    m = merged_model(base, tau_m)
    before = copy.deepcopy(m.state_dict())
    resolve_setting("scale").calibrate(base, m, tvs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_scale_is_lines_without_depth_on_a_float32_model():
    base, tvs, tau_m = _setup(torch.float32)
    a, b = merged_model(base, tau_m), merged_model(base, tau_m)
    resolve_setting("scale:scale.factor=1.5").calibrate(base, a, tvs, tau_m)
    resolve_setting("wsc:weight_method=lines,lines_alpha=1.5,lines_beta=0").calibrate(base, b, tvs, tau_m)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_scale_then_fsc_measures_the_scaled_model():
    base, tvs, tau_m = _setup()
    batches = {k: [torch.randn(4, 4, dtype=torch.float64)] for k in range(3)}
    m = merged_model(base, tau_m)
    setting = resolve_setting({"steps": [{"step": "scale", "factor": 2.0}, "fsc"]})
    rep = setting.calibrate(base, m, tvs, tau_m, batches)
    scaled = {k: v if "running" in k else 2.0 * v for k, v in tau_m.items()}  # BatchNorm statistics stay merged
    cal = FeatureSpaceCalibrator(base, merged_model(base, scaled), tvs)
    for k, bs in batches.items():
        cal.update(k, bs[0])
    want = cal.fold().coefficients
    assert rep.space == "dsc" and set(rep.coefficients) == set(want)
    assert all(rep.coefficients[n] == pytest.approx(xi, abs=1e-9) for n, xi in want.items())
    plain = resolve_setting("fsc").calibrate(base, merged_model(base, tau_m), tvs, tau_m, batches).coefficients
    assert all(abs(rep.coefficients[n] - plain[n]) > 1e-3 for n in plain)  # FSC measured the scaled model


@pytest.mark.parametrize("bad", ["scale:scale.factor=-1", "scale:scale.factor=nan", "scale:scale.factor=x"])
def test_a_factor_outside_its_range_is_refused(bad):
    with pytest.raises(ValueError, match="'scale': factor="):
        resolve_setting(bad)
