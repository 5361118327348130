"""The calibration-variant study on the tiny suite: summary numbers recomputed from the case results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magic_pl.zoo.study import StudyCase, run_study
from magic_pl.zoo.vision_data import TINY_TASKS


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cases = [StudyCase("tiny", list(TINY_TASKS)[:2]), StudyCase("tiny", None, "tiny_all")]
    summary = run_study(cases, calibrations=["wsc", "fsc", "auto"], methods=["weight_average", "ties"], draws=2,
                        cache_dir=str(root / "cache"), results_dir=str(root / "out"), bootstrap=100,
                        sensitive_alpha=2, progress=False)
    return summary, root / "out"


def test_study_writes_reports_and_case_results(study):
    summary, out = study
    assert list(summary["cases"]) == ["tiny_K2", "tiny_all"]
    assert summary["calibrations"] == ["none", "wsc", "fsc", "auto"]
    for name in ("study.md", "study.json", "study.png", "tiny_K2/results.json", "tiny_all/results.md"):
        assert (out / name).is_file(), name
    md = (out / "study.md").read_text()
    assert "| auto |" in md and "## Across cases" in md
    assert json.loads((out / "study.json").read_text())["cases"]["tiny_K2"]["tasks"] == list(TINY_TASKS)[:2]


def test_study_summary_matches_the_case_results(study):
    summary, out = study
    for label, case in summary["cases"].items():
        result = json.loads((out / label / "results.json").read_text())
        rows = {(r["method"], r["calibration"]): r["avg"] for r in result["rows"]}
        tuned = rows[("task_arithmetic_tuned", "none")]
        assert case["tuned_ta"] == pytest.approx(tuned)
        for c, e in case["settings"].items():
            accs = [rows[(m, c)] for m in case["methods"]]
            assert e["mean_avg"] == pytest.approx(np.mean(accs))
            assert e["over_tuned_ta"] == pytest.approx(np.mean(accs) - tuned)
            if c == "none":
                continue
            gains = [rows[(m, c)] - rows[(m, "none")] for m in case["methods"]]
            assert e["over_uncalibrated"] == pytest.approx(np.mean(gains))
            worse = [m for m, ci in e["per_method_ci95"].items() if ci[1] < 0]
            assert e["significantly_worse"] == worse and e["safe"] == (not worse)
