"""The benchmark's door into the pipeline: a suite row (MagicModule built from the suite's inputs, calibrated through
``trainer.predict`` on the draw's samples) gives the weights of the Python driver on the same inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from magic_pl.calibration import resolve_setting
from magic_pl.merging import merge
from magic_pl.statedict import apply_task_vector, task_vector
from magic_pl.zoo.backbones import TinyCNNBackbone
from magic_pl.zoo.data import Task
from magic_pl.zoo.pipeline import SuiteData, suite_module
from magic_pl.zoo.runner import build_trainer


@pytest.fixture
def suite_inputs():
    torch.manual_seed(0)
    bb = TinyCNNBackbone(width=4)
    base = bb.build().eval()
    experts = []
    for i in range(2):
        g = torch.Generator().manual_seed(i + 1)
        experts.append({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else v
                        for k, v in base.state_dict().items()})
    tasks = []
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(10 + i)
        images = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
        task = Task(name, ["0", "1", "2"], images, torch.arange(30) % 3, [str(j) for j in range(30)])
        task.splits = {"test": np.arange(12), "calib": np.arange(12, 24), "val": np.arange(24, 30),
                       "train": np.arange(30)}
        tasks.append(task)
    heads = {"a": nn.Linear(bb.feature_dim(), 3), "b": nn.Linear(bb.feature_dim(), 3)}
    data = SuiteData(bb, tasks, {t.name: t.splits["calib"] for t in tasks}, batch_size=5)
    return bb, base, experts, heads, data


@pytest.mark.parametrize("calibration", ["dsc", "fsc:sensitive=detect", "wsc"])
def test_a_suite_row_equals_the_python_driver(suite_inputs, calibration):
    bb, base, experts, heads, data = suite_inputs
    picks = {"a": [14, 20], "b": [13]}
    sensitive = ["conv1.weight", "conv3.weight"] if "detect" in calibration else None
    merged = suite_module(base, experts, heads, ["a", "b"], "ties", {"density": 0.5, "bn_stats": "average"})
    merged.build()
    row = merged.with_calibration(calibration, sensitive=sensitive)
    setting = row.calibration
    if setting.uses_data:
        build_trainer().predict(row, datamodule=data.datamodule(picks), return_predictions=False)

    # the Python driver on the same inputs
    base_state = base.state_dict()
    taus = [task_vector(e, base_state) for e in experts]
    tau_m = merge("ties", taus, density=0.5, bn_stats="average")
    model = copy.deepcopy(base)
    model.load_state_dict(apply_task_vector(base_state, tau_m))
    batches = {k: data.batches(n, picks[n], torch.device("cpu")) for k, n in enumerate(("a", "b"))}
    result = resolve_setting(calibration).calibrate(base_state, model, taus, tau_m,
                                                    batches if setting.uses_data else None, sensitive)
    got, want = row.model.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
    if setting.uses_data:
        xi = row.run.result.coefficients
        assert xi.keys() == result.coefficients.keys() and len(xi) > 0
        assert max(abs(xi[k] - result.coefficients[k]) for k in xi) <= 1e-6

    # and its evaluation is the heads on the calibrated encoder, example by example
    build_trainer().test(row, datamodule=data.datamodule(), verbose=False)
    for name in ("a", "b"):
        split = data.test[name]
        with torch.no_grad():
            pred = heads[name](model(**bb.batch(split.prepared, np.arange(12), torch.device("cpu")))).argmax(-1)
        assert torch.equal(row.example_correctness[name], pred == split.labels)
