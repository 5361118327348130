"""The budget study on the tiny suite: the same draws for every recipe, RegMean in the pool, the report files."""

from __future__ import annotations

import json

import pytest

from magic_pl.zoo.budget import rebuild_budget_report, run_budget_study


def test_budget_study_on_the_tiny_suite(tiny, tmp_path):
    out = tmp_path / "budget"
    summary = run_budget_study(suites=["tiny"], budgets=[1, 3], methods=["ties", "weight_average", "regmean"],
                               calibrations=["none", "fsc"], draws=2, max_test=60, reference="ties",
                               cache_dir=str(tiny["cache"]), results_dir=str(out), bootstrap=100, progress=False)
    for name in ("budget.md", "budget.json", "budget.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "budget.json").read_text())["budgets"] == [1, 3]
    runs = summary["suites"]["tiny"]["runs"]
    for n in ("1", "3"):
        r = runs[n]
        assert {"ties/none", "ties/fsc", "regmean/none", "regmean/fsc"} <= set(r)
        # the labelled-validation references are tuned once, in the first budget's run
        assert ({"task_arithmetic_tuned/none", "lines_tuned/lines"} <= set(r)) == (n == "1")
        # the tiny encoder is convolutional: RegMean merges linear layers only, so it is the plain average
        assert r["regmean/none"]["avg"] == pytest.approx(r["weight_average/none"]["avg"], abs=1e-12)
        # data-based rows are compared with the uncalibrated reference merge, with a paired interval
        assert r["regmean/fsc"]["over"] == "ties/none"
        gain, ci = r["regmean/fsc"]["gain"], r["regmean/fsc"]["gain_ci95"]
        assert gain == pytest.approx(r["regmean/fsc"]["avg"] - r["ties/none"]["avg"])
        assert ci[0] <= gain <= ci[1]
        assert r["ties/none"]["gain"] == 0.0 and r["ties/fsc"]["over"] == "ties/none"
        if n == "1":  # the labelled references: over the uncalibrated reference merge
            assert r["task_arithmetic_tuned/none"]["gain"] == pytest.approx(
                r["task_arithmetic_tuned/none"]["avg"] - r["ties/none"]["avg"])
    # budget-independent rows do not move with n; the budget rows do see other samples
    assert runs["1"]["ties/none"]["avg"] == runs["3"]["ties/none"]["avg"]
    # (accuracies on 60 examples are coarse: FSC alone can land on the same count at both n, so every
    # sample-based row counts; BatchNorm re-estimation moves most with n)
    sampled = [k for k, v in runs["3"].items() if v["needs"] == "samples"]
    assert {"ties/fsc", "ties/bn", "weight_average/bn"} <= set(sampled)
    assert any(runs["1"][k]["avg"] != runs["3"][k]["avg"] for k in sampled)
    tiny_entry = summary["suites"]["tiny"]
    assert tiny_entry["tuned_ta"] == runs["1"]["task_arithmetic_tuned/none"]["avg"]
    assert tiny_entry["tuned_lines"] == runs["1"]["lines_tuned/lines"]["avg"]
    md = (out / "budget.md").read_text()
    assert "| regmean/fsc |" in md and "n=3" in md and "tuned LiNeS" in md
    # the report rebuilt from the runs' results.json is the study's own
    rebuilt = rebuild_budget_report([str(out / "tiny_n3"), str(out / "tiny_n1")], str(tmp_path / "rebuilt"),
                                    reference="ties")
    assert rebuilt["suites"]["tiny"]["runs"] == json.loads(json.dumps(runs))
    assert (tmp_path / "rebuilt" / "budget.md").read_text() == md
    assert tiny_entry["statistics_bytes"]["regmean"] == 0 and tiny_entry["statistics_bytes"]["fsc"] > 0
    assert "Statistics held" in md


def test_an_extension_study_runs_without_references_on_the_same_examples(tiny, tmp_path):
    first = run_budget_study(suites=["tiny"], budgets=[1], methods=["ties"], calibrations=["none"], draws=1,
                             max_test=60, reference="ties", cache_dir=str(tiny["cache"]),
                             results_dir=str(tmp_path / "a"), bootstrap=0, progress=False)
    extra = run_budget_study(suites=["tiny"], budgets=[1], methods=["ties"], calibrations=["none", "svc"], draws=1,
                             max_test=60, reference="ties", references=False, cache_dir=str(tiny["cache"]),
                             results_dir=str(tmp_path / "b"), bootstrap=0, progress=False)
    a, b = first["suites"]["tiny"], extra["suites"]["tiny"]
    assert b["tuned_ta"] is None and b["tuned_lines"] is None and "task_arithmetic_tuned/none" not in b["runs"]["1"]
    assert a["tuned_ta"] is not None
    # same test examples: the shared recipe has the same accuracy
    assert b["runs"]["1"]["ties/none"]["avg"] == a["runs"]["1"]["ties/none"]["avg"]
    assert "ties/svc" in b["runs"]["1"] and "tuned TA" not in (tmp_path / "b" / "budget.md").read_text()
    # one report from both: the extension's recipes join the study's at the same n, the references stay
    both = rebuild_budget_report([str(tmp_path / "a" / "tiny_n1"), str(tmp_path / "b" / "tiny_n1")],
                                 str(tmp_path / "both"), reference="ties")["suites"]["tiny"]
    assert both["tuned_ta"] == a["tuned_ta"]
    for recipe, study in (("ties/svc", b), ("task_arithmetic_tuned/none", a), ("ties/none", a)):
        for key in ("avg", "gain", "over"):
            assert both["runs"]["1"][recipe][key] == study["runs"]["1"][recipe][key], (recipe, key)


def test_the_budget_config_is_the_study_defaults():
    pytest.importorskip("yaml")
    from pathlib import Path

    from magic_pl.calibration import resolve_setting
    from magic_pl.merging import DATA_MERGE_METHODS, MERGE_METHODS
    from magic_pl.zoo.budget import BUDGET_CALIBRATIONS, BUDGET_MERGES, DEFAULT_BUDGETS
    from magic_pl.zoo.report import function_options

    path = Path(__file__).parents[2] / "configs" / "benchmark" / "budget.yaml"
    options = function_options(run_budget_study, "budget", ["--config", str(path)])
    assert options["budgets"] == DEFAULT_BUDGETS and options["methods"] == BUDGET_MERGES
    assert options["calibrations"] == BUDGET_CALIBRATIONS and options["draws"] == 3
    assert all(m in MERGE_METHODS or m in DATA_MERGE_METHODS for m in options["methods"])
    assert all(resolve_setting(c) for c in options["calibrations"])


def test_statistics_memory_is_the_closed_form():
    import torch.nn as nn

    from magic_pl.zoo.budget import statistics_memory

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    memory = statistics_memory(model, num_tasks=2)
    # float64 Gram sums in^2 per linear layer per task
    assert memory["regmean"] == (3 ** 2 + 4 ** 2) * 2 * 8
    assert memory["regmean_plusplus"] <= memory["regmean"]
    # [K, N] float32 numerator and denominator plus their float64 reduce-able copies; N = 2 modules or 4 + 2 channels
    assert memory["fsc"] == 2 * 2 * 2 * (4 + 8)
    assert memory["fsc_channel"] == 2 * 2 * (4 + 2) * (4 + 8)


def test_recommendations_pick_the_best_safe_recipe_per_budget():
    from magic_pl.zoo.budget import budget_recommendations

    def e(avg, needs, ci=None):
        return {"avg": avg, "needs": needs, "gain_ci95": ci}

    runs_a = {"1": {"m/none": e(0.60, "nothing"), "m/fsc": e(0.70, "samples", [0.01, 0.2]),
                    "m/risky": e(0.90, "samples", [-0.3, -0.1]), "ta_tuned/none": e(0.65, "labels")},
              "4": {"m/none": e(0.60, "nothing"), "m/fsc": e(0.50, "samples", [-0.2, 0.1])}}
    runs_b = {"1": {"m/none": e(0.80, "nothing"), "m/fsc": e(0.80, "samples", [-0.1, 0.1]),
                    "m/risky": e(0.90, "samples", [0.0, 0.1]), "ta_tuned/none": e(0.90, "labels")},
              "4": {"m/none": e(0.80, "nothing"), "m/fsc": e(0.70, "samples", [-0.2, 0.1])}}
    summary = {"budgets": [1, 4], "reference": "m", "suites": {"a": {"runs": runs_a}, "b": {"runs": runs_b}}}
    recs = {r["budget"]: r for r in budget_recommendations(summary)}
    assert recs["0"]["recipe"] == "m/none" and recs["0"]["mean"] == pytest.approx(0.70)
    # n = 1: risky has the best mean (0.90) but is significantly worse on suite a; fsc (0.75) is chosen
    assert recs["1"]["recipe"] == "m/fsc" and recs["1"]["mean"] == pytest.approx(0.75)
    assert recs["1"]["best_any"] == "m/risky" and not recs["1"]["best_any_safe"]
    # n = 4: fsc is safe but below the data-free merge, which counts at every n
    assert recs["4"]["recipe"] == "m/none" and recs["4"]["reference_mean"] == pytest.approx(0.70)
    assert recs["labelled val"]["recipe"] == "ta_tuned/none" and recs["labelled val"]["mean"] == pytest.approx(0.775)


def test_rebuild_names_a_truncated_run_and_writes_nothing(tmp_path):
    run = tmp_path / "runs" / "text_n4"
    run.mkdir(parents=True)
    (run / "results.json").write_text('{"suite": "text", "rows": [')
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=r"text_n4[/\\]results\.json: not a readable benchmark result"):
        rebuild_budget_report([str(run)], str(out))
    assert not out.exists()
