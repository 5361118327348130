"""The default recipe per budget is the committed out-of-sample study's pick, and every front door fills it the same
way."""

import json
from pathlib import Path

import pytest

from magic_pl.recommended import RECOMMENDATIONS, fill_recipe, recommended

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo" / "holdout" / "holdout.json"


def _picks() -> dict[int, str]:
    doc = json.loads(STUDY.read_text())
    return {int(b["budget"]): b["pick"] for b in doc["budgets"] if b["budget"].isdigit()}


def test_the_table_is_the_studys_pick_at_every_budget():
    picks = _picks()
    assert picks and 0 in picks
    for n, pick in picks.items():
        assert recommended(n).recipe == pick, n
    # between two measured budgets the smaller one's pick holds; every entry starts at a measured budget where the
    # pick changes (no redundant rows)
    assert [r.samples for r in RECOMMENDATIONS] == sorted({r.samples for r in RECOMMENDATIONS})
    assert all(r.samples in picks for r in RECOMMENDATIONS)
    assert all(a.recipe != b.recipe for a, b in zip(RECOMMENDATIONS, RECOMMENDATIONS[1:]))


def test_the_report_line_quotes_the_studys_report_half():
    doc = json.loads(STUDY.read_text())
    for b in doc["budgets"]:
        if not b["budget"].isdigit() or b["report"] is None:
            continue
        rec = recommended(int(b["budget"]))
        cells = ", ".join(f"{suite} {100 * acc:.1f}" for suite, acc in b["report"]["per_suite"].items())
        assert f"n = {b['budget']}: {cells}" in rec.report, b["budget"]


def test_budgets_between_and_beyond_the_measured_ones():
    last = RECOMMENDATIONS[-1]
    assert recommended(None) == last and recommended(10**6) == last
    assert recommended(0) == RECOMMENDATIONS[0]
    for n in range(0, 100):
        assert recommended(n) == max((r for r in RECOMMENDATIONS if r.samples <= n), key=lambda r: r.samples)
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="samples_per_task"):
            recommended(bad)


def test_fill_recipe_fills_only_what_is_missing():
    rec = recommended(1)
    assert fill_recipe("ties", "wsc", 1) == ("ties", "wsc", None)
    assert fill_recipe(None, None, 1) == (rec.merge_method, rec.calibration, rec)
    assert fill_recipe("ties", None, 1) == ("ties", rec.calibration, rec)
    assert fill_recipe(None, "wsc", 1) == (rec.merge_method, "wsc", rec)
