"""``MagicTrainer.calibrate``'s comparison: the uncalibrated merge and every expert on the same test data, and the
calibration's gain with a paired interval, each equal to a separate evaluation."""

from __future__ import annotations

import json

import pytest

from magic_pl.lightning import MagicModule, MagicTrainer, RandomTaskDataset, TaskDataModule
from magic_pl.lightning.tiny_inputs import TinyTimmAdapter, build_tiny_timm


def _trainer() -> MagicTrainer:
    return MagicTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)


def _data() -> TaskDataModule:
    test = {t: RandomTaskDataset(12, (3, 16, 16), n, seed=i) for i, (t, n) in enumerate(zip("ab", (3, 4)))}
    return TaskDataModule(["a", "b"], test=test, samples_per_task=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_tiny_timm(tmp_path_factory.mktemp("cache"))


def _module(inputs, calibration: str = "dsc", experts=("a", "b")) -> MagicModule:
    adapter = TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs[e]) for e in experts],
                              task_names=list(experts))
    return MagicModule(adapter=adapter, calibration=calibration)


def test_calibrate_compares_with_the_uncalibrated_merge_and_the_experts(inputs, tmp_path):
    res = _trainer().calibrate(_module(inputs), datamodule=_data(), output_dir=str(tmp_path / "out"))
    comparison = res["comparison"]
    uncal = _trainer().calibrate(_module(inputs, "none"), datamodule=_data(), compare=False)["metrics"]
    assert comparison["calibrated"] == res["metrics"]
    assert comparison["uncalibrated"] == pytest.approx(uncal, abs=0)
    assert comparison["gain"] == pytest.approx(res["metrics"]["test/acc/avg"] - uncal["test/acc/avg"], abs=1e-12)
    low, high = comparison["gain_ci95"]
    assert low <= comparison["gain"] <= high
    # each expert alone (one task, scale 1: theta0 + tau_k), evaluated on its own task
    for task in "ab":
        alone = MagicModule(adapter=TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs[task])],
                                                    task_names=[task]),
                            merge_method="task_arithmetic", merge_options={"scale": 1.0}, calibration="none")
        data = TaskDataModule([task], test={task: _data().test_sets[task]}, samples_per_task=1)
        want = _trainer().calibrate(alone, datamodule=data, compare=False)["metrics"][f"test/acc/{task}"]
        assert comparison["experts_on_own_task"][task] == pytest.approx(want, abs=0)
    report = json.loads((tmp_path / "out" / "calibration_report.json").read_text())
    assert report["comparison"]["gain"] == pytest.approx(comparison["gain"], abs=1e-12)


def test_compare_false_skips_it(inputs):
    res = _trainer().calibrate(_module(inputs, "wsc"), datamodule=_data(), compare=False)
    assert res["comparison"] is None and res["metrics"]
