"""MagicModule: merge / WSC / FSC through the Trainer equal the calibration core run by hand; exact test accuracy."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from tiny_models import Body, body_tasks
from torch import nn

from magic_pl.calibration import FeatureSpaceCalibrator, save_sensitivity, weight_space_calibration
from magic_pl.calibration.lines import lines_scaling
from magic_pl.lightning import MagicModule, RandomTaskDataset, TaskDataModule
from magic_pl.merging import merge, merge_models
from magic_pl.statedict import apply_task_vector, task_vector


@pytest.fixture
def setup3():
    return body_tasks()


def _trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False)


def _module(base, experts, heads, **kw) -> MagicModule:
    kw = {"merge_method": "task_arithmetic", "calibration": "dsc", **kw}  # the paper's recipe unless a test names one
    return MagicModule(model=copy.deepcopy(base), experts=experts, heads=heads, task_names=list("xyz"), **kw)


@pytest.mark.parametrize("calibration", ["none", "wsc", "lines"])
def test_data_free_calibrations_equal_the_core(setup3, calibration):
    base, experts, heads, data = setup3
    mod = _module(base, experts, heads, calibration=calibration, merge_method="ties", merge_options={"density": 0.5})
    if calibration == "lines":  # Body has no blocks: LiNeS says its beta does nothing
        with pytest.warns(UserWarning, match="no parameter name matches a block rule"):
            mod.build()
    else:
        mod.build()
    if calibration == "none":
        want = merge_models(base, experts, "ties", density=0.5)
    elif calibration == "lines":  # no blocks in Body: every tensor takes the paper's alpha
        taus = [task_vector(e, base) for e in experts]
        tau = lines_scaling(merge("ties", taus, density=0.5), beta=0.0, task_vectors=taus)  # beta: no blocks
        want = apply_task_vector(base.state_dict(), tau)
    else:
        taus = [task_vector(e, base) for e in experts]
        tau = weight_space_calibration(merge("ties", taus, density=0.5), taus)
        want = apply_task_vector(base.state_dict(), tau)
    got = mod.model.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-7)
    assert mod.calibration_record.deviation_before and mod.calibration_record.expert_norms


def test_dsc_predict_equals_core_and_test_accuracy_is_exact(setup3):
    base, experts, heads, data = setup3
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=2, seed=5, batch_size=4)
    mod = _module(base, experts, heads, calibration="dsc")
    trainer = _trainer()
    out = trainer.predict(mod, datamodule=dm, return_predictions=False)
    assert out is None and mod.run.done

    # the same pipeline by hand with the calibration core
    taus = [task_vector(e, base) for e in experts]
    tau = weight_space_calibration(merge("task_arithmetic", taus), taus)
    ref = copy.deepcopy(base).eval()
    ref.load_state_dict(apply_task_vector(base.state_dict(), tau))
    cal = FeatureSpaceCalibrator(base.state_dict(), ref, taus)
    calib = dm.calibration_dataset()
    for i in range(len(calib)):
        item = calib[i]
        cal.update(item["task"], item["inputs"][None])
    report = cal.fold()
    xi = mod.calibration_record.coefficients
    assert set(xi) == set(report.coefficients) == {"fc1", "norm", "fc2"}
    assert max(abs(xi[k] - report.coefficients[k]) for k in xi) <= 1e-6
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mod.model.state_dict()[key], value, rtol=1e-6, atol=1e-6)

    # exact per-task accuracy (odd test sets, mixed-task batches)
    results = trainer.test(mod, datamodule=dm, verbose=False)[0]
    for k, t in enumerate("xyz"):
        ds = data[t]
        with torch.no_grad():
            pred = heads[k](ref(ds.x)).argmax(-1)
        want = (pred == ds.y).double().mean().item()
        assert mod.calibration_record.metrics[f"test/acc/{t}"] == pytest.approx(want, abs=1e-12)
        assert results[f"test/acc/{t}"] == pytest.approx(want, abs=1e-6)
    avg = sum(mod.calibration_record.metrics[f"test/acc/{t}"] for t in "xyz") / 3
    assert mod.calibration_record.metrics["test/acc/avg"] == pytest.approx(avg)

    # after calibration predict returns class predictions
    preds = trainer.predict(mod, datamodule=dm)
    assert torch.cat(preds).dtype == torch.long and len(torch.cat(preds)) == 6


def test_sequential_mode_runs_and_sensitive_json_caps_xi(setup3, tmp_path):
    base, experts, heads, data = setup3
    path = save_sensitivity(tmp_path / "sens.json", ["fc2.weight"])
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=1)
    mod = _module(base, experts, heads, calibration="fsc:mode=sequential", sensitive=str(path),
                  merge_method="weight_average")
    _trainer().predict(mod, datamodule=dm, return_predictions=False)
    xi = mod.calibration_record.coefficients
    assert mod.sensitive == ["fc2.weight"] and xi["fc2"] <= 1.0
    assert xi["fc1"] > 1.0  # averaging shrinks the update: FSC scales it back up


def test_too_few_calibration_samples_fails_before_merging(setup3):
    base, experts, heads, data = setup3
    mod = _module(base, experts, heads)
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=1)
    fake = SimpleNamespace(world_size=4, global_rank=0, datamodule=dm)
    mod._trainer = fake  # what Lightning sets; setup reads world size and data from it
    with pytest.raises(ValueError, match=r"has 3 sample\(s\) but the run uses 4 processes"):
        mod.setup("predict")
    assert mod.model is None  # nothing was loaded or merged


def test_task_order_mismatch_is_rejected(setup3):
    base, experts, heads, data = setup3
    mod = _module(base, experts, heads, calibration="none")
    dm = TaskDataModule(list("zyx"), test=data)
    with pytest.raises(ValueError, match="task order"):
        _trainer().test(mod, datamodule=dm, verbose=False)


def test_constructor_errors():
    with pytest.raises(ValueError, match="exactly one of `adapter`"):
        MagicModule()
    with pytest.raises(ValueError, match="unknown calibration 'fcs': not a preset"):
        MagicModule(model=Body(), experts=[Body()], calibration="fcs")
    with pytest.raises(ValueError, match="adapter's own trust_pickle"):
        MagicModule(adapter=object(), trust_pickle=True)
    with pytest.raises(ValueError, match="eps"):
        MagicModule(model=Body(), experts=[Body()], calibration={"space": "wsc", "eps": float("nan")})


def test_validate_logs_per_task_accuracy_on_validation_sets(setup3):
    base, experts, heads, data = setup3
    dm = TaskDataModule(list("xyz"), val={"x": data["x"], "z": data["z"]})
    mod = _module(base, experts, heads, calibration="wsc")
    out = _trainer().validate(mod, datamodule=dm, verbose=False)[0]
    assert set(out) == {"val/acc/x", "val/acc/z", "val/acc/avg"}
    assert out["val/acc/avg"] == pytest.approx((out["val/acc/x"] + out["val/acc/z"]) / 2, abs=1e-6)


def test_auto_setting_predict_equals_core(setup3):
    """The recommended setting through Lightning (FSC capped on a set the label-free probe detects inside the predict
    loop) equals the core driver's, set and weights."""
    from dataclasses import replace

    from magic_pl.calibration.settings import AUTO, detect_label_free

    base, experts, heads, data = setup3
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=2, seed=5, batch_size=4)
    taus = [task_vector(e, base) for e in experts]
    calib = dm.calibration_dataset()
    batches = [(calib[i]["task"], calib[i]["inputs"][None]) for i in range(len(calib))]
    ref = copy.deepcopy(base).eval()
    ref.load_state_dict(apply_task_vector(base.state_dict(), merge("ties", taus, density=0.5)))
    found = detect_label_free(base.state_dict(), ref, taus, [b for _, b in batches], alpha=2)
    mod = _module(base, experts, heads, calibration={"space": "fsc", "sensitive": "detect", "alpha": 2},
                  merge_method="ties", merge_options={"density": 0.5})
    _trainer().predict(mod, datamodule=dm, return_predictions=False)
    assert mod.calibration_record.config["sensitive_detected"] == found
    report = replace(AUTO, alpha=2).calibrate(base.state_dict(), ref, taus, batches=batches)
    assert report.sensitive and all(report.coefficients[n] <= 1.0 for n in report.sensitive)
    assert mod.run.result.sensitive == report.sensitive and mod.run.result.setting == "fsc:sensitive=detect,alpha=2"
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mod.model.state_dict()[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("calibration", ["wsc", "dsc", "fsc:granularity=channel"])
def test_with_calibration_equals_a_module_built_with_that_setting(setup3, calibration):
    """One merge, several settings: a copy calibrated with a setting equals a fresh module with it (to 1e-6), and the
    source module keeps the uncalibrated merge."""
    base, experts, heads, data = setup3
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=2, seed=3, batch_size=4)
    options = dict(merge_method="ties", merge_options={"density": 0.5})
    merged = _module(base, experts, heads, calibration="none", **options)
    merged.build()
    before = {k: v.clone() for k, v in merged.model.state_dict().items()}
    fresh = _module(base, experts, heads, calibration=calibration, **options)
    copy_ = merged.with_calibration(calibration)
    assert copy_.calibration.to_string() == fresh.calibration.to_string()
    assert [s["step"] for s in copy_.calibration_record.steps][:2] == ["load", "merge"]
    for mod in (fresh, copy_):
        if mod.needs_calibration_data:
            _trainer().predict(mod, datamodule=dm, return_predictions=False)
        else:
            mod.build()
    got, want = copy_.model.state_dict(), fresh.model.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(got[k], before[k]) for k in before)  # it did calibrate ...
    assert all(torch.equal(merged.model.state_dict()[k], v) for k, v in before.items())  # ... a copy
    if fresh.calibration_record.coefficients:
        xi1, xi2 = fresh.calibration_record.coefficients, copy_.calibration_record.coefficients
        assert xi1.keys() == xi2.keys() and max(abs(xi1[k] - xi2[k]) for k in xi1) <= 1e-6


def test_with_calibration_refuses_a_calibrated_module(setup3):
    base, experts, heads, _ = setup3
    mod = _module(base, experts, heads, calibration="wsc")
    mod.build()
    with pytest.raises(RuntimeError, match="before this module is calibrated.*'wsc'"):
        mod.with_calibration("dsc")


def test_test_batches_with_positions_keep_per_example_correctness(setup3):
    """Batches carrying "index" give each example's correctness, in index order; the counts agree with it."""
    base, experts, heads, data = setup3

    class Indexed(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return {**self.ds[i], "index": torch.tensor(i)}

    dm = TaskDataModule(list("xyz"), test={t: Indexed(d) for t, d in data.items()}, batch_size=4)
    mod = _module(base, experts, heads, calibration="none")
    _trainer().test(mod, datamodule=dm, verbose=False)
    for k, t in enumerate("xyz"):
        with torch.no_grad():
            want = heads[k](mod.model(data[t].x)).argmax(-1) == data[t].y
        assert torch.equal(mod.example_correctness[t], want)
        assert mod.calibration_record.metrics[f"test/acc/{t}"] == pytest.approx(want.double().mean().item())


@pytest.mark.parametrize("method, calibration", [("regmean", "none"), ("regmean_plusplus", "none"),
                                                 ("regmean", "fsc")])
def test_regmean_through_predict_equals_the_pure_function(setup3, method, calibration):
    """A data-based merge through MagicModule: merged at the end of predict from the calibration samples (then, for
    "fsc", calibrated on the same samples), equal to magic_pl.merging.regmean (+ the FSC core) run by hand."""
    from magic_pl.merging import regmean

    base, experts, heads, data = setup3
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=3, seed=2, batch_size=4)
    mod = _module(base, experts, heads, merge_method=method, merge_options={"reduce_non_diagonal": 0.9},
                  calibration=calibration)
    assert mod.needs_calibration_data
    _trainer().predict(mod, datamodule=dm, return_predictions=False)
    assert mod.run.done and not mod.needs_calibration_data

    ref = copy.deepcopy(base).eval()
    taus = [task_vector(e, base) for e in experts]
    calib = dm.calibration_dataset()
    pairs = [(calib[i]["task"], (calib[i]["inputs"][None],)) for i in range(len(calib))]
    tau = regmean(base.state_dict(), ref, taus, pairs, reduce_non_diagonal=0.9, plus_plus=method.endswith("plusplus"))
    assert not torch.allclose(tau["fc1.weight"], sum(t["fc1.weight"] for t in taus) / 3)  # not just the average
    if calibration == "fsc":
        cal = FeatureSpaceCalibrator(base.state_dict(), ref, taus)
        for task, (x,) in pairs:
            cal.update(task, x)
        report = cal.fold()
        xi = mod.calibration_record.coefficients
        assert max(abs(xi[k] - report.coefficients[k]) for k in xi) <= 1e-6
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mod.model.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    steps = [s["step"] for s in mod.calibration_record.steps]
    assert steps[:2] == ["load", "merge"] and mod.calibration_record.deviation_before


def test_data_based_merge_options_are_checked_up_front(setup3):
    base, experts, heads, _ = setup3
    with pytest.raises(ValueError, match=r"reduce_non_diagonal=1.5 must lie in \[0, 1\]"):
        _module(base, experts, heads, merge_method="regmean", merge_options={"reduce_non_diagonal": 1.5})
    with pytest.raises(ValueError, match=r"unknown option.*'scale'.*'regmean'"):
        _module(base, experts, heads, merge_method="regmean", merge_options={"scale": 0.3})
    with pytest.raises(ValueError, match="data-based merge"):
        merge("regmean", [task_vector(e, base) for e in experts])


@pytest.mark.parametrize("where", ["nan_one_sample", "nan_all_samples", "inf_one_sample"])
@pytest.mark.parametrize("calibration", ["fsc", "fsc:statistic=ratio_of_means", "dsc:granularity=channel"])
def test_nonfinite_calibration_data_fails_predict_naming_task_and_module(setup3, calibration, where):
    """NaN/Inf in one task's calibration samples stops the predict loop with an error naming the task and the
    module, instead of xi from the other tasks only (or 1)."""
    from magic_pl.calibration.fsc import CalibrationDataError

    base, experts, heads, _ = setup3
    calib = {t: RandomTaskDataset(3, (6,), n, seed=20 + i) for i, (t, n) in enumerate(zip("xyz", (3, 4, 2)))}
    x = calib["y"].x
    if where == "nan_one_sample":
        x[1, 3] = float("nan")
    elif where == "nan_all_samples":
        x[:] = float("nan")
    else:
        x[2, 0] = float("inf")
    dm = TaskDataModule(list("xyz"), test=calib, samples_per_task=None, batch_size=4)  # every sample calibrates
    mod = _module(base, experts, heads, calibration=calibration)
    with pytest.raises(CalibrationDataError) as info:
        _trainer().predict(mod, datamodule=dm, return_predictions=False)
    msg = str(info.value)
    assert "task 'y'" in msg and "module 'fc1'" in msg and "check the calibration inputs" in msg, msg
    assert not mod.run.done


def test_magic_module_matches_prefixed_classifier_experts_to_a_bare_model():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    base = {k: v.clone() for k, v in body.state_dict().items()}
    experts = [{**{f"bert.{k}": v + d for k, v in base.items()}, "classifier.weight": torch.ones(2, 4)}
               for d in (0.1, 0.3)]
    mod = MagicModule(model=body, experts=experts, merge_method="task_arithmetic", merge_options={"scale": 1.0},
                      calibration="none")
    mod.build()
    for k, v in mod.model.state_dict().items():  # base + (0.1 + 0.3), the heads left out
        torch.testing.assert_close(v, base[k] + 0.4, rtol=0, atol=1e-6)
