"""Calibration settings: parsing, presets, and each space applied through a setting equals the direct call."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from calib_helpers import make_task_vectors, merged_model, weight_average
from magic_pl.calibration import (
    AUTO,
    PRESETS,
    CalibrationSetting,
    FeatureSpaceCalibrator,
    dual_space_calibration,
    resolve_setting,
    weight_space_calibration,
)


def test_strings_presets_and_round_trip():
    s = resolve_setting("fsc:statistic=ratio_of_means,norm=2,granularity=channel")
    assert (s.space, s.statistic, s.norm, s.granularity) == ("fsc", "ratio_of_means", 2.0, "channel")
    for name, preset in PRESETS.items():
        assert resolve_setting(preset.to_string()) == preset, name
    assert resolve_setting("fsc") == CalibrationSetting()  # the paper's
    assert resolve_setting("auto") is AUTO and AUTO == PRESETS["fsc_cap_detect"]
    assert AUTO.to_string() == "fsc:sensitive=detect"
    # run-wide options reach the plain paper names only
    assert resolve_setting("wsc", wsc_variant="joint").wsc_variant == "joint"
    assert resolve_setting("wsc_norm_match", wsc_variant="joint").wsc_variant == "norm_match"


@pytest.mark.parametrize("bad, match", [("fcs", "not a preset"), ("fsc:stat=x", "bad option"),
                                        ("fsc:gate=up", "gate='up'"), ("wsc:space=fsc", "bad option"),
                                        ("fsc:norm=3", "norm")])
def test_bad_settings_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_setting(bad)


def _setup():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).double()
    tvs = make_task_vectors(base, 3, scale=0.2)
    tau_m = weight_average(tvs)
    batches = {k: [torch.randn(2, 4, dtype=torch.float64)] for k in range(3)}
    return base, tvs, tau_m, batches


def test_each_space_equals_the_direct_call():
    base, tvs, tau_m, batches = _setup()
    # WSC (gated, empty set)
    m = merged_model(base, tau_m)
    rep = resolve_setting("wsc_gated").calibrate(base, m, tvs, tau_m)
    tau_w, scales = weight_space_calibration(tau_m, tvs, [], return_scales=True)
    for key, v in merged_model(base, tau_w).state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], v, rtol=0, atol=1e-12)
    assert rep.space == "wsc" and rep.setting == "wsc:sensitive=empty" and rep.coefficients == {}
    assert sorted(rep.row_scales) == sorted(scales)  # one result type: WSC's row scales included
    for key, v in scales.items():
        torch.testing.assert_close(rep.row_scales[key], v.float(), rtol=0, atol=0)
        assert rep.wsc_scales[key] == pytest.approx(float(v.float().mean()))
    # FSC, a variant
    m = merged_model(base, tau_m)
    rep = resolve_setting("fsc_rom").calibrate(base, m, tvs, tau_m, batches)
    ref = merged_model(base, tau_m)
    cal = FeatureSpaceCalibrator(base, ref, tvs, statistic="ratio_of_means")
    for k, bs in batches.items():
        cal.update(k, bs[0])
    assert cal.fold().coefficients == rep.coefficients
    for key, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], v, rtol=0, atol=0)
    # DSC
    m = merged_model(base, tau_m)
    rep = resolve_setting("dsc:gate=paper").calibrate(base, m, tvs, tau_m, batches)
    ref = merged_model(base, tau_m)
    want = dual_space_calibration(base, ref, tvs, tau_m, batches, gate="paper")
    assert rep.coefficients == want.coefficients and rep.wsc_scales == want.wsc_scales
    # none leaves the model alone
    m = merged_model(base, tau_m)
    before = copy.deepcopy(m.state_dict())
    rep = resolve_setting("none").calibrate(base, m, tvs, tau_m)
    assert rep.space == "none" and rep.coefficients == {} and rep.row_scales == {}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_missing_inputs_are_errors():
    base, tvs, tau_m, batches = _setup()
    with pytest.raises(ValueError, match="needs unlabelled batches"):
        AUTO.calibrate(base, merged_model(base, tau_m), tvs, tau_m)
    with pytest.raises(ValueError, match="needs a sensitive set"):
        PRESETS["wsc_gated_detect_labelled"].calibrate(base, merged_model(base, tau_m), tvs, tau_m)
    with pytest.raises(ValueError, match="detects sensitive layers"):
        PRESETS["wsc_gated_detect"].calibrate(base, merged_model(base, tau_m), tvs, tau_m)
    # a mapping policy -> set picks the policy's set
    got = PRESETS["wsc_gated_detect_labelled"].resolve_sensitive({"detect": ["0.weight"], "detect_labelled": ["2.weight"]})
    assert got == ["2.weight"]
    # a task without calibration samples is an error naming it, not xi from the other tasks
    with pytest.raises(ValueError, match="too few for: b"):
        resolve_setting("fsc").calibrate(base, merged_model(base, tau_m), tvs, tau_m, {0: batches[0], 2: batches[2]},
                                         task_names=["a", "b", "c"])


@pytest.mark.parametrize("spec, match", [({"space": "fsc", "alpha": -1}, "alpha"), ("fsc:eps=nan", "eps"),
                                         ("dsc:eps=0", "eps"), ({"space": "fsc", "sensitivity": "x"}, "unknown option")])
def test_non_finite_or_absurd_options_are_refused_by_name(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_setting(spec)


def test_auto_runs_the_label_free_probe_and_caps_its_set():
    """AUTO without a set detects one on the probe batches; the result equals FSC with that set passed explicitly."""
    from magic_pl.calibration import detect_sensitive_layers, output_divergence_score
    from magic_pl.calibration.settings import detect_label_free

    base, tvs, tau_m, batches = _setup()
    probe = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    found = detect_label_free(base, merged_model(base, tau_m), tvs, probe, alpha=2)
    # independent: the weight-average model probed with the library's scorer
    wa_model = merged_model(base, weight_average(tvs))
    assert found == detect_sensitive_layers(wa_model, weight_average(tvs), output_divergence_score(probe, metric="l2"),
                                            alpha=2)
    m = merged_model(base, {k: 2.0 * v for k, v in tau_m.items()})  # over-scaled: xi < 1 where measured
    rep = replace(AUTO, alpha=2).calibrate(base, m, tvs, tau_m, batches, probe_batches=probe)
    ref = merged_model(base, {k: 2.0 * v for k, v in tau_m.items()})
    want = CalibrationSetting(space="fsc", sensitive="detect").calibrate(base, ref, tvs, tau_m, batches,
                                                                          sensitive_set=found)
    assert rep.coefficients == want.coefficients and rep.sensitive == want.sensitive
    assert set(rep.sensitive) == {k.rpartition(".")[0] for k in found}
    assert all(rep.coefficients[name] <= 1.0 for name in rep.sensitive)


def test_svc_setting_equals_the_direct_call_and_composes_with_fsc():
    from magic_pl.calibration.svc import singular_value_calibration

    base, tvs, tau_m, batches = _setup()
    tau_ta = {k: 3.0 * v for k, v in tau_m.items()}  # TA-like: over-counted shared directions
    m = merged_model(base, tau_ta)
    rep = resolve_setting("wsc:weight_method=svc,svc_alpha=0.2").calibrate(base, m, tvs, tau_ta)
    want = merged_model(base, singular_value_calibration(tau_ta, tvs, alpha=0.2))
    for key, v in want.state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], v, rtol=0, atol=1e-12)
    assert rep.space == "wsc" and rep.row_scales == {}
    assert not torch.equal(m.state_dict()["0.weight"], merged_model(base, tau_ta).state_dict()["0.weight"])
    # svc_fsc: SVC, then FSC measured on the SVC-calibrated model
    m = merged_model(base, tau_ta)
    rep = PRESETS["svc_fsc"].calibrate(base, m, tvs, tau_ta, batches)
    ref = merged_model(base, singular_value_calibration(tau_ta, tvs))
    cal = FeatureSpaceCalibrator(base, ref, tvs)
    for k, bs in batches.items():
        cal.update(k, bs[0])
    assert cal.fold().coefficients == rep.coefficients
    with pytest.raises(ValueError, match="svc_alpha"):
        resolve_setting("wsc:weight_method=svc,svc_alpha=0")
