"""Calibration settings: parsing, presets, and every preset equal to its recipe computed independently (WSC, SVC
and LiNeS by their formulas, the sensitive set by the library's other probe, FSC by the calibrator run by hand)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model, weight_average
from torch import Tensor, nn

from magic_pl.calibration import (
    PRESETS,
    CalibrationSetting,
    FeatureSpaceCalibrator,
    detect_sensitive_layers,
    resolve_setting,
    weight_space_calibration,
)
from magic_pl.calibration.sensitivity import output_divergence_score
from magic_pl.calibration.settings import AUTO


def test_strings_presets_and_round_trip():
    s = resolve_setting("fsc:statistic=ratio_of_means,norm=2,granularity=channel")
    assert (s.space, s.statistic, s.norm, s.granularity) == ("fsc", "ratio_of_means", 2.0, "channel")
    for name, preset in PRESETS.items():
        assert resolve_setting(preset.to_string()) == preset, name
        assert resolve_setting(preset.to_dict()) == preset == CalibrationSetting(**preset.to_dict()), name
        assert hash(resolve_setting(preset.to_string())) == hash(preset), name
    assert resolve_setting("fsc") == CalibrationSetting()  # the paper's
    assert resolve_setting("auto") is AUTO and AUTO == PRESETS["fsc_cap_detect"]
    assert AUTO.to_string() == "fsc:sensitive=detect"
    # run-wide options reach the plain paper names only
    assert resolve_setting("wsc", wsc_variant="joint").wsc_variant == "joint"
    assert resolve_setting("wsc_norm_match", wsc_variant="joint").wsc_variant == "norm_match"


@pytest.mark.parametrize("bad, match", [("fcs", "not a preset"), ("fsc:stat=x", "bad option"),
                                        ("fsc:gate=up", "gate='up'"), ("wsc:space=fsc", "bad option"),
                                        ("fsc:norm=3", "norm"), ("svc+fcs", "not a preset"),
                                        ("svc:norm=2", "bad option 'norm=2'; options: svc.alpha, sensitive"),
                                        ("fsc:wsc.eps=1e-6", "step 'wsc', which it does not have"),
                                        ("fsc+svc", "must come last"), ("wsc+wsc", "'wsc' appears 2 times"),
                                        ("svc:svc.floor=1", "unknown option"), ("svc:alpha=0.2", "whole number")])
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
    # DSC: WSC by its formula, then FSC (WSC's rule on xi) measured by hand on that model
    m = merged_model(base, tau_m)
    rep = resolve_setting("dsc:gate=paper").calibrate(base, m, tvs, tau_m, batches)
    tau_w, lam = _wsc_by_hand(tau_m, tvs, ["0.weight", "2.weight"])
    ref = merged_model(base, tau_w)
    cal = FeatureSpaceCalibrator(base, ref, tvs, gate="paper")
    for k, bs in batches.items():
        cal.update(k, bs[0])
    want = cal.fold()
    assert rep.space == "dsc" and set(rep.coefficients) == set(want.coefficients)
    assert all(rep.coefficients[n] == pytest.approx(want.coefficients[n], abs=1e-6) for n in want.coefficients)
    assert min(want.coefficients.values()) >= 1.0  # the gate let xi only grow
    for key, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], v, rtol=1e-5, atol=1e-8)
    for key, v in lam.items():
        torch.testing.assert_close(rep.row_scales[key].double(), v, rtol=1e-5, atol=0)
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
    got = PRESETS["wsc_gated_detect_labelled"].resolve_sensitive(
        {"detect": ["0.weight"], "detect_labelled": ["2.weight"]}
    )
    assert got == ["2.weight"]
    # a task without calibration samples is an error naming it, not xi from the other tasks
    with pytest.raises(ValueError, match="too few for: b"):
        resolve_setting("fsc").calibrate(base, merged_model(base, tau_m), tvs, tau_m, {0: batches[0], 2: batches[2]},
                                         task_names=["a", "b", "c"])


@pytest.mark.parametrize("spec, match", [({"space": "fsc", "alpha": -1}, "alpha"), ("fsc:eps=nan", "eps"),
                                         ("dsc:eps=0", "eps"),
                                         ({"space": "fsc", "sensitivity": "x"}, "unknown option")])
def test_non_finite_or_absurd_options_are_refused_by_name(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_setting(spec)


def test_auto_runs_the_label_free_probe_and_caps_its_set():
    """AUTO without a set detects one on the probe batches; the result equals FSC with that set passed explicitly."""
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
    with pytest.raises(ValueError, match="'svc': alpha='0'"):
        resolve_setting("wsc:weight_method=svc,svc_alpha=0")


# --- every preset against its recipe, computed without the setting ------------------------------------------------
_WSC_KEYS = [f"layers.{i}.weight" for i in range(6)] + ["head.weight"]  # the 2-D weights WSC and SVC calibrate
_GIVEN = ["layers.1.weight", "head"]  # a labelled probe's set, given by the caller


class _Net(nn.Module):
    """Six blocks (``layers.N.``: LiNeS's depth rule) and 16 tensors, more than a detected set's 10."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(6)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(self.norm(x))


def _wsc_by_hand(tau: Mapping[str, Tensor], tvs: Sequence[Mapping[str, Tensor]], keys: Sequence[str],
                 variant: str = "paper", sensitive: Optional[Sequence[str]] = None
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """WSC row by row in float64 (MAGIC's formula; norm_match: mean task-row norm over the row's norm; joint: the
    least-squares alpha), gated by ``sensitive`` unless None. Returns tau and the row scales."""
    out, scales = dict(tau), {}
    for key in keys:
        d, a = tau[key].double(), torch.stack([tv[key].double() for tv in tvs])
        sens = sensitive is not None and (key in sensitive or key.rpartition(".")[0] in sensitive)
        lam = []
        for i in range(d.shape[0]):
            rows, row = a[:, i], d[i]
            r = rows.norm(dim=1).mean()
            if variant == "norm_match":
                li = r / row.norm()
            else:
                if variant == "joint":
                    al = torch.linalg.lstsq(rows.T, row).solution
                else:
                    al = rows @ row / (rows * rows).sum(1)
                res = row - al @ rows
                li = 1 / torch.sqrt((al * al).sum() + res.dot(res) / r**2 + 1e-8)
            if sensitive is not None and (li >= 1 if sens else li <= 1):
                li = torch.tensor(1.0, dtype=torch.float64)
            lam.append(li)
        scales[key] = torch.stack(lam)
        out[key] = d * scales[key][:, None]
    return out, scales


def _svc_by_hand(tau: Mapping[str, Tensor], tvs: Sequence[Mapping[str, Tensor]], alpha: float = 0.1
                 ) -> dict[str, Tensor]:
    """SVC in float64: gamma_r = K / sum_i max(alpha, <u_r^T tau_m, u_r^T tau_i> / ||u_r^T tau_i||^2)."""
    out = dict(tau)
    for key in _WSC_KEYS:
        m = tau[key].double()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        acc = sum(torch.clamp((u.T @ m * (u.T @ t)).sum(1) / (u.T @ t).pow(2).sum(1), min=alpha)
                  for t in (tv[key].double() for tv in tvs))
        out[key] = u @ torch.diag(len(tvs) / acc * s) @ vh
    return out


def _lines_by_hand(tau: Mapping[str, Tensor], tvs: Sequence[Mapping[str, Tensor]], beta: float = 0.5
                   ) -> dict[str, Tensor]:
    """LiNeS: block i of 6 times alpha + beta i / 5, the rest times alpha = ||sum_k tau_k||_1 / (K ||tau_m||_1)."""
    alpha = (sum(float(sum(tv[k].double() for tv in tvs).abs().sum()) for k in tau)
             / (len(tvs) * sum(float(v.double().abs().sum()) for v in tau.values())))
    return {k: v.double() * (alpha + (beta * int(k.split(".")[1]) / 5 if k.startswith("layers.") else 0.0))
            for k, v in tau.items()}


def _wsc(variant: str = "paper") -> Callable[..., dict[str, Tensor]]:
    return lambda tau, tvs, sens: _wsc_by_hand(tau, tvs, _WSC_KEYS, variant, sens)[0]


#: preset -> (its string, its weight step by hand, its FSC options, its sensitive set: None, [], "detect" or "given")
_RECIPES: dict[str, tuple[str, Optional[Callable[..., dict[str, Tensor]]], Optional[dict[str, Any]], Any]] = {
    "none": ("none", None, None, None),
    "wsc": ("wsc", _wsc(), None, None),
    "fsc": ("fsc", None, {}, None),
    "dsc": ("dsc", _wsc(), {}, None),
    "wsc_gated": ("wsc:sensitive=empty", _wsc(), None, []),
    "wsc_gated_detect": ("wsc:sensitive=detect", _wsc(), None, "detect"),
    "wsc_gated_detect_labelled": ("wsc:sensitive=detect_labelled", _wsc(), None, "given"),
    "wsc_norm_match": ("wsc:wsc_variant=norm_match", _wsc("norm_match"), None, None),
    "wsc_joint": ("wsc:wsc_variant=joint", _wsc("joint"), None, None),
    "fsc_sequential": ("fsc:mode=sequential", None, {"mode": "sequential"}, None),
    "fsc_channel": ("fsc:statistic=ratio_of_means,granularity=channel", None,
                    {"statistic": "ratio_of_means", "granularity": "channel"}, None),
    "fsc_rom": ("fsc:statistic=ratio_of_means", None, {"statistic": "ratio_of_means"}, None),
    "fsc_p2": ("fsc:norm=2", None, {"norm": 2}, None),
    "fsc_cap_detect": ("fsc:sensitive=detect", None, {}, "detect"),
    "fsc_gated": ("fsc:gate=paper", None, {"gate": "paper"}, None),
    "fsc_rom_gated": ("fsc:statistic=ratio_of_means,gate=paper", None,
                      {"statistic": "ratio_of_means", "gate": "paper"}, None),
    "svc": ("wsc:weight_method=svc", lambda tau, tvs, sens: _svc_by_hand(tau, tvs), None, None),
    "svc_fsc": ("dsc:weight_method=svc", lambda tau, tvs, sens: _svc_by_hand(tau, tvs), {}, None),
    "lines": ("wsc:weight_method=lines", lambda tau, tvs, sens: _lines_by_hand(tau, tvs), None, None),
    "lines_fsc": ("dsc:weight_method=lines", lambda tau, tvs, sens: _lines_by_hand(tau, tvs), {}, None),
    "auto": ("fsc:sensitive=detect", None, {}, "detect"),
}


@pytest.fixture(scope="module")
def net_setup():
    torch.manual_seed(0)
    base = _Net().double()
    tvs = make_task_vectors(base, 3, scale=0.2)
    # under-scaled, and off the task vectors' span (as a sparsifying merge is): every step has work to do
    g = torch.Generator().manual_seed(1)
    tau_m = {k: 0.6 * v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype)
             for k, v in weight_average(tvs).items()}
    batches = {k: [torch.randn(2, 4, dtype=torch.float64)] for k in range(3)}
    # the label-free probe by the library's other implementation: the weight average, its output L2 divergence
    wa = weight_average(tvs)
    probe = [b for k in range(3) for b in batches[k]]  # what calibrate() probes by default: the calibration batches
    detected = detect_sensitive_layers(merged_model(base, wa), wa, output_divergence_score(probe, metric="l2"))
    assert len(detected) == 10
    return base, tvs, tau_m, batches, detected


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_its_recipe_computed_independently(name, net_setup):
    string, weight_step, fsc_options, policy = _RECIPES[name]  # a new preset needs its recipe here
    base, tvs, tau_m, batches, detected = net_setup
    preset = PRESETS[name]
    assert preset.to_string() == string and resolve_setting(string) == preset
    assert resolve_setting(preset.to_dict()) == preset
    sens = detected if policy == "detect" else _GIVEN if policy == "given" else policy
    m = merged_model(base, tau_m)
    got = preset.calibrate(base, m, tvs, tau_m, batches, sensitive_set=_GIVEN if policy == "given" else None)
    want = merged_model(base, weight_step(tau_m, tvs, sens) if weight_step else tau_m)
    if fsc_options is not None:
        cal = FeatureSpaceCalibrator(base, want, tvs, sensitive=sens, **fsc_options)
        for k, bs in batches.items():
            cal.update(k, bs[0])
        coefficients = cal.fold().coefficients
        assert set(got.coefficients) == set(coefficients)
        assert all(got.coefficients[n] == pytest.approx(xi, abs=1e-6) for n, xi in coefficients.items())
    else:
        assert got.coefficients == {}
    changed = False
    for key, v in want.state_dict().items():
        # the weight steps compute in float32, the recipes in float64
        torch.testing.assert_close(m.state_dict()[key], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        changed |= not torch.equal(v, merged_model(base, tau_m).state_dict()[key])
    assert changed == (name != "none")
    assert got.space == preset.space and got.setting == string
