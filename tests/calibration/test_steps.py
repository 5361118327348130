"""Calibration steps: the registry, the step form of a setting (strings, dicts, objects), steps composed in order, and
the record naming each step."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model, weight_average
from torch import Tensor, nn

from magic_pl.calibration import PRESETS, STEPS, CalibrationSetting, CalibrationStep, register_step, resolve_setting
from magic_pl.calibration.lines import lines_scaling
from magic_pl.calibration.svc import singular_value_calibration


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _setup():
    torch.manual_seed(0)
    base = _Blocks().double()
    tvs = make_task_vectors(base, 3, scale=0.2)
    tau_ta = {k: 3 * 0.4 * v for k, v in weight_average(tvs).items()}  # Task Arithmetic, lambda = 0.4
    return base, tvs, tau_ta


def test_the_built_in_steps_are_registered():
    assert {n: STEPS[n].kind for n in ("wsc", "svc", "lines", "scale", "fsc", "featcal")} == {
        "wsc": "weight", "svc": "weight", "lines": "weight", "scale": "weight", "fsc": "feature",
        "featcal": "feature"}
    assert all(STEPS[n].name == n for n in STEPS)
    with pytest.raises(TypeError):
        STEPS["mine"] = STEPS["wsc"]  # read-only: register_step adds


def test_every_form_of_a_setting_is_the_same_setting():
    svc, fsc = STEPS["svc"](alpha=0.2), STEPS["fsc"](norm=2)
    same = [CalibrationSetting([svc, fsc]),
            CalibrationSetting([{"step": "svc", "alpha": "0.2"}, {"step": "fsc", "norm": 2}], alpha="10"),
            resolve_setting("svc+fsc:svc.alpha=0.2,fsc.norm=2"),
            resolve_setting({"steps": [{"step": "svc", "alpha": 0.2}, {"step": "fsc", "norm": "2"}]}),
            resolve_setting("dsc:weight_method=svc,svc_alpha=0.2,norm=2"),
            resolve_setting("dsc:weight_method=svc,svc.alpha=0.2,fsc.norm=2"),
            CalibrationSetting(space="dsc", weight_method="svc", svc_alpha=0.2, norm=2)]
    assert all(s == same[0] and hash(s) == hash(same[0]) for s in same)
    s = same[0]
    assert s.to_string() == "dsc:weight_method=svc,svc_alpha=0.2,norm=2"  # the space form: the steps fit it
    assert s.to_dict() == {"steps": [{"step": "svc", "alpha": 0.2},
                                     {"step": "fsc", "norm": 2.0, "mode": "parallel", "statistic": "mean_of_ratios",
                                      "granularity": "module", "gate": "none"}],
                           "sensitive": "none", "alpha": 10}
    assert (s.space, s.weight_method, s.uses_wsc, s.uses_data, s.step("svc") is svc) == ("dsc", "svc", True, True, True)
    assert (s.svc_alpha, s.norm, s.lines_beta, s.eps) == (0.2, 2.0, 0.5, 1e-8)  # flat keys read through (or default)
    with pytest.raises(AttributeError):
        s.sensitivity  # noqa: B018
    assert pickle.loads(pickle.dumps(s)) == s == copy.deepcopy(s)
    assert resolve_setting("wsc+fsc") == PRESETS["dsc"] and resolve_setting("svc") is PRESETS["svc"]


@pytest.mark.parametrize("spec", ["lines+svc+fsc:lines.beta=0,svc.alpha=0.5,fsc.gate=paper,sensitive=detect,alpha=3",
                                  "scale:scale.factor=0.25", "svc+lines", "scale+fsc:fsc.norm=inf"])
def test_settings_the_space_form_cannot_write_use_the_step_form(spec):
    s = resolve_setting(spec)
    assert s.to_string() == spec
    assert resolve_setting(s.to_string()) == s == resolve_setting(s.to_dict()) == CalibrationSetting(**s.to_dict())


def test_options_of_steps_a_space_lacks_are_checked_then_dropped():
    """A stored setting lists every field of the space form; the ones its steps do not have mean nothing."""
    assert CalibrationSetting(space="fsc", wsc_variant="joint", svc_alpha=0.3) == PRESETS["fsc"]
    assert resolve_setting("fsc:lines_beta=0.1").to_string() == "fsc"
    with pytest.raises(ValueError, match="'lines': beta"):
        resolve_setting("fsc:lines_beta=-1")
    with pytest.raises(TypeError, match="not both"):
        CalibrationSetting(["fsc"], space="dsc")
    with pytest.raises(TypeError, match="unexpected keyword argument 'norms'"):
        CalibrationSetting(space="fsc", norms=2)


def test_weight_steps_run_in_order_each_on_the_model_the_one_before_wrote():
    base, tvs, tau_ta = _setup()
    m = merged_model(base, tau_ta)
    rep = resolve_setting("lines+svc:svc.alpha=0.2").calibrate(base, m, tvs, tau_ta)
    tau_lines = lines_scaling(tau_ta, beta=0.5, task_vectors=tvs)
    want = merged_model(base, singular_value_calibration(tau_lines, tvs, alpha=0.2))
    for key, v in want.state_dict().items():  # the second step reads tau_m back from the model in float32
        torch.testing.assert_close(m.state_dict()[key], v, rtol=1e-5, atol=1e-6)
    only_lines = merged_model(base, tau_lines)
    assert not torch.allclose(m.state_dict()["layers.0.weight"], only_lines.state_dict()["layers.0.weight"])
    assert rep.space == "wsc" and rep.setting == "lines+svc:svc.alpha=0.2" and rep.row_scales == {}


def test_the_record_names_each_step():
    from magic_pl.lightning.pipeline import CalibrationRun

    base, tvs, tau_ta = _setup()
    # tensors written: LiNeS every weight and bias, SVC and WSC the four 2-D weights
    for spec, written in [("lines+svc", {"lines": 8, "svc": 4}), ("svc", {"svc": 4}),
                          ("wsc:sensitive=empty", {"wsc": 4})]:
        body = merged_model(base, tau_ta)
        run = CalibrationRun(resolve_setting(spec))
        run.bind(body, base.state_dict(), tvs, ["a", "b", "c"], tau_ta)
        assert {s["step"]: s["tensors"] for s in run.record.steps} == written and run.done
        assert [s["step"] for s in run.record.steps] == list(written)
        assert run.record.config["calibration_setting"] == resolve_setting(spec).to_dict()
        assert bool(run.record.wsc_scales) == ("wsc" in written)


def test_register_step_refuses_what_a_setting_could_not_hold():
    class Loose(CalibrationStep):
        name = "loose"

    @dataclass(frozen=True)
    class Reserved(CalibrationStep):
        name: ClassVar[str] = "dsc"

    @dataclass(frozen=True)
    class Spaced(CalibrationStep):
        name: ClassVar[str] = "a+b"

    @dataclass(frozen=True)
    class Taken(CalibrationStep):
        name: ClassVar[str] = "svc"

    @dataclass(frozen=True)
    class NoDefault(CalibrationStep):
        name: ClassVar[str] = "no_default"
        factor: float

    for cls, err in [(Loose, TypeError), (Reserved, ValueError), (Spaced, ValueError), (Taken, ValueError),
                     (NoDefault, TypeError)]:
        with pytest.raises(err):
            register_step(cls)
    assert "loose" not in STEPS and "no_default" not in STEPS and STEPS["svc"].__name__ == "SVCStep"
    with pytest.raises(ValueError, match="unknown calibration step 'nope'"):
        CalibrationSetting(["nope"])
    with pytest.raises(ValueError, match="is not the registered step"):
        CalibrationSetting([Taken()])
