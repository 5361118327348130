"""DSC and the magnitude-sensitive-layer probe with its JSON ranking (docs/method.md)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model, weight_average
from torch import nn

from magic_pl.calibration import (
    FeatureSpaceCalibrator,
    detect_sensitive_layers,
    dual_space_calibration,
    save_sensitivity,
    weight_space_calibration,
)
from magic_pl.calibration.sensitivity import (
    accuracy_score,
    load_sensitivity,
    output_divergence_score,
    sensitivity_scores,
)
from magic_pl.output import FILES_RECORD


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _setup(seed=0):
    torch.manual_seed(seed)
    base = _mlp()
    tvs = make_task_vectors(base, 3, scale=0.2, seed=seed)
    tau_m = weight_average(tvs)
    return base, tvs, tau_m, merged_model(base, tau_m)


def test_dsc_is_wsc_then_fsc_on_the_wsc_model():
    base, tvs, tau_m, merged = _setup()
    batches = {k: [torch.randn(2, 6)] for k in range(3)}
    sensitive = {"3.weight"}

    manual = merged_model(base, weight_space_calibration(tau_m, tvs, sensitive))
    cal = FeatureSpaceCalibrator(base, manual, tvs, sensitive=sensitive)
    for k, xs in batches.items():
        for x in xs:
            cal.update(k, x)
    want = cal.fold()

    report = dual_space_calibration(base, merged, tvs, None, batches, sensitive)
    assert report.coefficients == pytest.approx(want.coefficients, rel=1e-5)
    assert set(report.wsc_scales) == {"0.weight", "3.weight", "5.weight"}
    assert report.wsc_scales["0.weight"] > 1  # weight average shrinks; non-sensitive rows only grow
    for key, t in merged.state_dict().items():
        torch.testing.assert_close(t, manual.state_dict()[key], rtol=1e-5, atol=1e-6)
    # given tau_m explicitly and (task, batch) pairs: same result
    merged2 = merged_model(base, tau_m)
    pairs = [(k, (x,)) for k, xs in batches.items() for x in xs]
    report2 = dual_space_calibration(base, merged2, tvs, tau_m, pairs, sensitive)
    assert report2.coefficients == pytest.approx(report.coefficients, rel=1e-5)


def _labelled(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]


def test_sensitivity_probe_restores_the_model_and_matches_manual_drop():
    base, tvs, tau_m, merged = _setup(2)
    before = copy.deepcopy(merged.state_dict())
    score = accuracy_score(_labelled())
    drops = sensitivity_scores(merged, tau_m, score, factor=1.5)
    assert set(drops) == {k for k, _ in merged.named_parameters()}
    assert list(drops.values()) == sorted(drops.values(), reverse=True)
    for key, t in merged.state_dict().items():
        assert torch.equal(t, before[key])
    # one entry by hand
    key = "5.weight"
    probe = copy.deepcopy(merged)
    with torch.no_grad():
        probe.get_parameter(key).add_(0.5 * tau_m[key])
    assert drops[key] == pytest.approx(score(merged) - score(probe))


def test_label_free_score_ranks_the_tensor_that_moves_outputs_most():
    base, tvs, tau_m, merged = _setup(3)
    tau_m = {k: torch.zeros_like(v) for k, v in tau_m.items()}
    tau_m["5.weight"] = torch.randn(tau_m["5.weight"].shape, generator=torch.Generator().manual_seed(0))
    tau_m["3.bias"] = 0.01 * torch.ones_like(tau_m["3.bias"])  # small; every other tensor: zero, no drop
    data = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for metric in ("kl", "l2"):
        score = output_divergence_score(data, metric=metric)
        top = detect_sensitive_layers(lambda: merged, tau_m, score, alpha=2)
        assert top == ["5.weight", "3.bias"]
        score.reset()
        drops = sensitivity_scores(merged, tau_m, score)
        assert drops["0.weight"] == 0.0 and drops["5.weight"] > drops["3.bias"] > 0
    with pytest.raises(ValueError, match="metric"):
        output_divergence_score(data, metric="cos")


def test_sensitivity_json_roundtrip(tmp_path):
    ranking = {"a.weight": 0.1, "b.weight": 0.5, "c.bias": -0.2}
    path = save_sensitivity(tmp_path / "sub" / "sens.json", ranking, alpha=2, metadata={"score": "accuracy"})
    doc = json.loads(path.read_text())
    assert doc["sensitive"] == ["b.weight", "a.weight"] and doc["metadata"] == {"score": "accuracy"}
    assert load_sensitivity(path) == ["b.weight", "a.weight"]
    assert load_sensitivity(path, alpha=3) == ["b.weight", "a.weight", "c.bias"]
    save_sensitivity(path, ["x", "y"])  # a plain sensitive set overwrites atomically
    assert load_sensitivity(path) == ["x", "y"]
    # no temporary files left; the record of what magic-pl wrote there makes sens.json replaceable by a later run
    assert sorted(p.name for p in path.parent.iterdir()) == [FILES_RECORD, "sens.json"]
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a magic-pl sensitivity ranking"):
        load_sensitivity(tmp_path / "bad.json")
