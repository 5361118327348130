"""The out-of-sample recommendation on the tiny suite: the split, the pick against the study's rule recomputed
independently from the stored correctness, report-half values, the held-out configuration and the files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magic_pl.lightning.metrics import bootstrap_ci
from magic_pl.zoo.budget import budget_recommendations, run_budget_study, summarise_budget
from magic_pl.zoo.holdout import (
    SELECTED,
    apply_rule,
    load_results,
    main,
    out_of_sample,
    restrict,
    split_examples,
    write_holdout,
)
from magic_pl.zoo.runner import decode_correctness

BOOTSTRAP = 100
METHODS = ["ties", "weight_average", "regmean"]


@pytest.fixture(scope="module")
def study(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("holdout") / "budget"
    summary = run_budget_study(suites=["tiny"], budgets=[1, 3], methods=METHODS, calibrations=["none", "fsc"],
                               draws=2, max_test=60, reference="ties", tune_lines=False, cache_dir=str(tiny["cache"]),
                               results_dir=str(out), bootstrap=BOOTSTRAP, progress=False)
    dirs = [str(out / "tiny_n1"), str(out / "tiny_n3")]
    results = load_results(dirs)
    holdout = out_of_sample(dirs, "ties", seed=0, bootstrap=BOOTSTRAP)
    return {"summary": summary, "dirs": dirs, "results": results, "holdout": holdout, "out": out}


def _correct(row):
    return decode_correctness(row["correctness"])


def _mean_correct(row, idx=None):
    """Per task: correctness averaged over the row's draws, on ``idx[task]`` (default all examples)."""
    draws = _correct(row)
    return {n: np.mean([d[n] if idx is None else d[n][idx[n]] for d in draws], axis=0) for n in draws[0]}


def _acc(row, idx=None):
    """Mean over draws of the task-averaged accuracy, by numpy means of the stored correctness."""
    draws = _correct(row)
    return float(np.mean([np.mean([(c if idx is None else c[idx[n]]).mean() for n, c in d.items()])
                          for d in draws]))


def _rows(result):
    return {f"{r['method']}/{r['calibration']}": r for r in result["rows"]}


def _halves(holdout, suite="tiny"):
    sel, rep = {}, {}
    for task, s in holdout["split"][suite].items():
        n = s["selection_count"] + s["report_count"]
        sel[task] = np.array(s["selection"])
        rep[task] = np.setdiff1d(np.arange(n), sel[task])
    return sel, rep


def test_persisted_correctness_reproduces_every_row(study):
    for result in study["results"]:
        names = result["config"]["tasks"]
        for key, row in _rows(result).items():
            draws = _correct(row)
            assert len(draws) == row["draws"], key
            assert all(len(d[n]) == 60 and d[n].dtype == bool for d in draws for n in names), key
            per_draw = np.array([[d[n].mean() for n in names] for d in draws])
            assert float(per_draw.mean(1).mean()) == row["avg"], key  # exactly, not approximately
            assert per_draw.mean(1).tolist() == row["draw_avgs"], key
            assert dict(zip(names, per_draw.mean(0).tolist())) == row["per_task"], key


def test_split_is_disjoint_seeded_and_covers_every_example(study):
    holdout = study["holdout"]
    sel, rep = _halves(holdout)
    for task in sel:
        assert len(sel[task]) == 30 and len(rep[task]) == 30
        assert not set(sel[task]) & set(rep[task])
        assert sorted(np.concatenate([sel[task], rep[task]]).tolist()) == list(range(60))
    split = split_examples({t: 60 for t in sel}, "tiny", seed=0)
    assert all(np.array_equal(split[t][0], sel[t]) and np.array_equal(split[t][1], rep[t]) for t in sel)
    other = split_examples({t: 60 for t in sel}, "tiny", seed=1)
    assert any(not np.array_equal(other[t][0], sel[t]) for t in sel)
    # tasks are split independently (the same count, different permutations)
    assert len({tuple(s) for s in sel.values()}) == len(sel)
    with pytest.raises(ValueError, match="fraction"):
        split_examples({"a": 10}, "tiny", fraction=1.0)


def test_restricting_to_every_example_is_the_run_itself(study):
    result = study["results"][0]
    everything = {n: np.arange(60) for n in result["config"]["tasks"]}
    again = restrict(result, everything, bootstrap=BOOTSTRAP, seed=0)
    for key, row in _rows(result).items():
        r = _rows(again)[key]
        for field in ("avg", "per_task", "draw_avgs", "avg_ci95", "avg_std"):
            assert r[field] == row[field], (key, field)
    assert again["gains"]["over_uncalibrated_ci95"] == result["gains"]["over_uncalibrated_ci95"]
    assert again["gains"]["data_merges_over"] == result["gains"]["data_merges_over"]


def test_pick_is_the_rule_on_an_independent_selection_half_summary(study):
    holdout = study["holdout"]
    sel, _ = _halves(holdout)
    # the study's own summary gives each recipe's kind and starting merge (neither depends on the examples)
    runs = {}
    for result in study["results"]:
        n = str(result["config"]["n_calib"])
        rows = _rows(result)
        entries = {}
        for k, e in summarise_budget(result, "ties").items():
            ci = None
            if e["gain_ci95"] is not None:  # paired in the run: paired again, on the selection half
                a, b = _mean_correct(rows[k], sel), _mean_correct(rows[e["over"]], sel)
                ci = list(bootstrap_ci({t: a[t] - b[t] for t in a}, samples=BOOTSTRAP, seed=0))
            entries[k] = {"avg": _acc(rows[k], sel), "needs": e["needs"], "gain_ci95": ci}
        runs[n] = entries
    summary = {"budgets": [1, 3], "reference": "ties", "suites": {"tiny": {"runs": runs}}}
    expected = {r["budget"]: r for r in budget_recommendations(summary)}
    got = {b["budget"]: b for b in holdout["budgets"]}
    assert set(got) == set(expected) == {"0", "1", "3", "labelled val"}
    for budget, rec in expected.items():
        assert got[budget]["pick"] == rec["recipe"], budget
        assert got[budget]["selection"]["mean"] == pytest.approx(rec["mean"], abs=1e-12)
        assert got[budget]["selection"]["best_any"] == rec["best_any"]
        assert got[budget]["selection"]["candidates"] == rec["candidates"]
    # the in-sample pick is the study's own recommendation
    study_recs = {r["budget"]: r["recipe"] for r in budget_recommendations(study["summary"])}
    assert {b["budget"]: b["in_sample_pick"] for b in holdout["budgets"]} == study_recs


def test_report_half_values_are_numpy_means_of_the_stored_correctness(study):
    holdout = study["holdout"]
    _, rep = _halves(holdout)
    by_n = {str(r["config"]["n_calib"]): _rows(r) for r in study["results"]}

    def row(budget, recipe):  # a budget's own run, else the first that has it (data-free, labelled recipes)
        if budget in by_n and recipe in by_n[budget]:
            return by_n[budget][recipe]
        return next(rows[recipe] for rows in by_n.values() if recipe in rows)

    checked = 0
    for b in holdout["budgets"]:
        m = b["report"]
        assert m is not None and m["recipe"] == b["pick"]
        assert m["per_suite"]["tiny"] == pytest.approx(_acc(row(b["budget"], b["pick"]), rep), abs=1e-12)
        assert m["mean"] == m["per_suite"]["tiny"]  # one suite
        means = {k: _acc(row(b["budget"], k), rep) for k in b["selection"]["candidates"]}
        assert m["candidate_means"] == pytest.approx(means, abs=1e-12)
        assert m["best_mean"] == pytest.approx(max(means.values()), abs=1e-12)
        assert m["reference_mean"] == pytest.approx(means["ties/none"], abs=1e-12)
        assert b["target"]["as_good_as_every_recipe"] == (m["mean"] >= max(means.values()) - 1e-9)
        # paired gains over every other recipe: the difference of the means, the interval around it
        a = _mean_correct(row(b["budget"], b["pick"]), rep)
        for other, v in m["versus"].items():
            assert v["gain"] == pytest.approx(means[b["pick"]] - means[other], abs=1e-12), other
            o = _mean_correct(row(b["budget"], other), rep)
            ci = list(bootstrap_ci({t: a[t] - o[t] for t in a}, samples=BOOTSTRAP, seed=0))
            assert v["ci95"] == pytest.approx(ci, abs=1e-12) and v["per_suite"]["tiny"]["ci95"] == v["ci95"]
            checked += 1
        start = m["over_start"]["tiny"]
        assert start["gain"] == pytest.approx(means[b["pick"]] - means[start["over"]], abs=1e-12)
        assert b["target"]["safe_on_every_suite"] == (start["ci95"] is None or start["ci95"][1] >= 0)
        assert b["target"]["holds"] == (b["target"]["as_good_as_every_recipe"] and
                                        b["target"]["safe_on_every_suite"])
    assert checked > 10
    assert all(b["selector"] is None for b in holdout["budgets"])  # the study ran no label-free selection


def test_files_are_written_and_the_entry_point_rebuilds_them(study, tmp_path):
    holdout = study["holdout"]
    files = write_holdout(holdout, tmp_path / "h")
    stored = json.loads((tmp_path / "h" / "holdout.json").read_text())
    assert stored["budgets"][1]["pick"] == holdout["budgets"][1]["pick"]
    assert stored["split"]["tiny"] == holdout["split"]["tiny"]
    md = (tmp_path / "h" / "holdout.md").read_text()
    assert files["markdown"].endswith("holdout.md") and "out-of-sample" in md
    for b in holdout["budgets"]:
        assert f"| {b['budget']} | {b['pick']} |" in md
    write_holdout(holdout, tmp_path / "h")  # magic-pl's own files are replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holdout.md").write_text("my notes")
    from magic_pl.output import OutputError

    with pytest.raises(OutputError):
        write_holdout(holdout, tmp_path / "mine")
    assert (tmp_path / "mine" / "holdout.md").read_text() == "my notes"
    # the command line: the study's folder searched for its runs gives the same report
    assert main([str(study["out"]), "--out", str(tmp_path / "cli"), "--reference", "ties",
                 "--bootstrap", str(BOOTSTRAP)]) == 0
    assert json.loads((tmp_path / "cli" / "holdout.json").read_text()) == stored


def test_runs_without_correctness_are_refused(study):
    old = json.loads(json.dumps(study["results"][0]))
    for r in old["rows"]:
        r.pop("correctness")
    with pytest.raises(ValueError, match="no per-example correctness"):
        out_of_sample([old], "ties", bootstrap=0)


def test_held_out_configuration_and_label_free_selection(study, tiny, tmp_path):
    from magic_pl.zoo import run_benchmark

    # two of the four tasks (K = 2), one budget, with the label-free selection: a configuration no rule saw
    tasks = study["results"][0]["config"]["tasks"][:2]
    other = run_benchmark("tiny", tasks=tasks, methods=METHODS, calibrations=["none", "fsc"], n_calib=1, draws=2,
                          bn_samples=1, tune_ta=False, max_test=60, select=True, cache_dir=str(tiny["cache"]),
                          results_dir=str(tmp_path / "k2"), bootstrap=BOOTSTRAP, progress=False)
    rows = _rows(other)
    scored = {k: r for k, r in rows.items() if "selection_scores" in r}
    assert scored and all(len(r["selection_scores"]) == 2 for r in scored.values())
    applied = apply_rule(study["holdout"], [str(tmp_path / "k2")])
    got = {b["budget"]: b for b in applied["budgets"]}
    assert {"0", "1"} <= set(got) and "3" not in got  # the budgets this configuration measured
    recommended = {b["budget"]: b["pick"] for b in study["holdout"]["budgets"]}  # the selection half's, as shipped
    for budget, b in got.items():
        assert b["recipe"] == recommended[budget]
        m = b["measured"]
        if b["recipe"] not in rows:
            assert m is None and "not measured" in b["note"]
            continue
        # as measured on all its examples, win or lose
        assert m["per_suite"]["tiny"] == pytest.approx(_acc(rows[b["recipe"]]), abs=1e-12)
        means = {k: _acc(rows[k]) for k in m["candidate_means"]}
        assert SELECTED not in means  # the selection is no recipe the rule compares
        assert m["best_mean"] == pytest.approx(max(means.values()), abs=1e-12)
        assert m["reference_mean"] == pytest.approx(_acc(rows["ties/none"]), abs=1e-12)
        assert b["wins"] == (m["mean"] >= max(means.values()) - 1e-9)
    # the selection chose without labels: reported on the report half only, next to the pick
    alone = out_of_sample([other], "ties", bootstrap=BOOTSTRAP, held_out=[str(tmp_path / "k2")])
    _, rep = _halves(alone)
    b1 = next(b for b in alone["budgets"] if b["budget"] == "1")
    sel = b1["selector"]
    assert sel["per_suite"]["tiny"] == pytest.approx(_acc(rows[SELECTED], rep), abs=1e-12)
    assert sel["choices"]["tiny"] == rows[SELECTED]["choices"] and len(sel["choices"]["tiny"]) == 2
    assert sel["versus"]["reference"]["gain"] == pytest.approx(
        _acc(rows[SELECTED], rep) - _acc(rows["ties/none"], rep), abs=1e-12)
    assert SELECTED not in b1["selection"]["candidates"]
    md = write_holdout(alone, tmp_path / "alone")["markdown"]
    text = open(md).read()
    assert "Label-free selection" in text and "Held-out configuration" in text


def test_two_suites_average_over_suites_of_task_averages(study):
    # the same runs under a second suite name: another split (seeded by suite and task), the same recipes
    copies = [{**json.loads(json.dumps(r)), "suite": "tiny_copy"} for r in study["results"]]
    both = out_of_sample(study["results"] + copies, "ties", bootstrap=BOOTSTRAP)
    _, rep_a = _halves(both, "tiny")
    _, rep_b = _halves(both, "tiny_copy")
    assert any(not np.array_equal(rep_a[t], rep_b[t]) for t in rep_a)
    by_n = {str(r["config"]["n_calib"]): _rows(r) for r in study["results"]}
    for b in both["budgets"]:
        m = b["report"]
        if m is None:
            continue
        row = by_n.get(b["budget"], {}).get(b["pick"]) or next(
            rows[b["pick"]] for rows in by_n.values() if b["pick"] in rows)
        expected = {"tiny": _acc(row, rep_a), "tiny_copy": _acc(row, rep_b)}
        assert m["per_suite"] == pytest.approx(expected, abs=1e-12)
        assert m["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
        for v in m["versus"].values():
            assert v["gain"] == pytest.approx(np.mean([p["gain"] for p in v["per_suite"].values()]), abs=1e-12)
            if v["ci95"]:
                assert v["ci95"][0] <= v["gain"] + 1e-12 and v["gain"] - 1e-12 <= v["ci95"][1]


def test_paired_interval_weights_suites_equally():
    from magic_pl.zoo.holdout import _paired

    # suite a: 1 task, every example +1; suite b: 3 tasks, every example 0 -> mean over suites 0.5 whatever is drawn
    # (a pooled mean over the 4 tasks would give 0.25)
    ones, zeros = np.ones(20), np.zeros(20)
    a = {"a": {"t": ones}, "b": {"u": zeros, "v": zeros, "w": zeros}}
    b = {"a": {"t": zeros}, "b": {"u": zeros, "v": zeros, "w": zeros}}
    gain, ci = _paired(a, b, 200, 0)
    assert gain == pytest.approx(0.5) and ci == pytest.approx([0.5, 0.5])
    assert _paired(a, b, 0, 0) == (pytest.approx(0.5), None)
