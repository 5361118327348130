"""Out-of-sample recommendation for the data-budget study: choose a recipe on one half of the test examples, report it
on the other half.

:func:`~magic_pl.zoo.budget.budget_recommendations` picks, per budget, the best recipe that is never significantly
below its starting merge, and reports the pick's accuracy on the same test examples it was picked on: the maximum of
many noisy means is biased upwards. :func:`out_of_sample` removes that bias. Per suite and task it splits the test
examples by a seeded permutation into a *selection* half and a *report* half (the same split for every recipe, draw
and budget; the benchmark evaluates every recipe on the same examples), recomputes every run's rows and paired gain
intervals on the selection half from the per-example correctness kept in ``results.json`` (no run again), applies the
very rule of :func:`budget_recommendations` there, and reports the pick on the report half: its accuracy per suite
and on average, the paired 95% bootstrap interval of its gain over the merge it starts from and over every other
recipe of that budget, and whether the target holds (on the report half: at least as good on average as every
single recipe of the budget, and not significantly below its starting merge on any suite). A label-free selector's
row (``select=True``) chose without labels, so it is only reported on the report half.

:func:`apply_rule` takes the study's recommendations to a configuration no rule saw (another suite, another set of
tasks) and reports the recommended recipe there as measured, win or lose, next to the best recipe and the reference.

``python -m magic_pl.zoo.holdout RUNS... --out DIR [--reference tsv_m] [--held-out RUNS...]`` writes ``holdout.md``
and ``holdout.json`` (a run is a benchmark results directory, its ``results.json``, or a folder searched for them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see magic_pl._entry

__all__ = ["HOLDOUT_FILES", "load_results", "split_examples", "restrict", "out_of_sample", "apply_rule",
           "holdout_markdown", "write_holdout", "main"]

#: The files :func:`write_holdout` writes.
HOLDOUT_FILES = {"markdown": "holdout.md", "json": "holdout.json"}
#: The row of a label-free selection (:func:`magic_pl.zoo.runner.selected_row`).
SELECTED = "selected/label-free"
#: Budget labels of :func:`~magic_pl.zoo.budget.budget_recommendations` that are not a number of samples.
_ANY_RUN = ("0", "labelled val")

Result = Union[Mapping[str, Any], str, os.PathLike]


def _key(row: Mapping[str, Any]) -> str:
    return f"{row['method']}/{row['calibration']}"


def load_results(results: Sequence[Result]) -> list[dict[str, Any]]:
    """``results.json`` dicts from dicts, ``results.json`` paths, run directories holding one, or folders searched
    (recursively, sorted) for them; every file is read before anything is computed."""
    out: list[dict[str, Any]] = []
    for item in results:
        if isinstance(item, Mapping):
            out.append(dict(item))
            continue
        path = Path(item)
        if path.is_dir():
            files = [path / "results.json"] if (path / "results.json").is_file() else sorted(path.rglob("results.json"))
            if not files:
                raise ValueError(f"{path}: no results.json in it or below it")
        else:
            files = [path]
        for f in files:
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{f}: not a readable benchmark result ({e})") from e
    if not out:
        raise ValueError("no benchmark results given")
    return out


# ---- runs and their per-example correctness ------------------------------------------------------------------------
@dataclass
class _Run:
    """One benchmark run: its budget, its results dict and every row's per-draw correctness (recipe -> draws)."""

    n: int
    result: dict[str, Any]
    correct: dict[str, list[dict[str, np.ndarray]]]


def _decode(result: Mapping[str, Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    from magic_pl.zoo.runner import decode_correctness

    out = {}
    for row in result["rows"]:
        if "correctness" not in row:
            raise ValueError(
                f"suite {result.get('suite')!r} (n_calib={result['config'].get('n_calib')}): row {_key(row)!r} keeps "
                "no per-example correctness (a results.json written before it was kept); run the benchmark again")
        out[_key(row)] = decode_correctness(row["correctness"])
    return out


def _group(results: Sequence[Mapping[str, Any]]) -> dict[str, list[_Run]]:
    """suite -> its runs, by budget (stable within one budget: a later run's recipe replaces an earlier one's, as in
    :func:`~magic_pl.zoo.budget.add_run`); the runs of one suite must share their test examples."""
    groups: dict[str, list[_Run]] = {}
    for r in results:
        groups.setdefault(r["suite"], []).append(_Run(int(r["config"]["n_calib"]), dict(r), _decode(r)))
    for suite, runs in groups.items():
        runs.sort(key=lambda run: run.n)
        first = runs[0]

        def examples(run: _Run) -> tuple[Any, ...]:
            cfg = run.result["config"]
            counts = {n: len(c) for n, c in next(iter(run.correct.values()))[0].items()}
            tests = [t["splits"]["test"] for t in run.result.get("tasks", [])]
            return cfg["tasks"], cfg.get("max_test"), cfg.get("seed"), counts, tests

        for run in runs[1:]:
            if examples(run) != examples(first):
                raise ValueError(
                    f"the runs of suite {suite!r} at n={first.n} and n={run.n} were evaluated on different test "
                    "examples (tasks, max_test, seed or test split differ); an out-of-sample split needs the same")
    return dict(sorted(groups.items()))


def split_examples(examples: Mapping[str, int], suite: str, *, seed: int = 0, fraction: float = 0.5
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: (selection, report) indices of its ``examples[task]`` test examples, a seeded permutation cut at
    ``round(fraction * count)`` (both sorted, disjoint, together every example). The seed mixes ``seed`` with the
    suite and task names, so a task's split never depends on which other tasks or suites are analysed."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    out = {}
    for task, count in examples.items():
        k = int(round(fraction * count))
        if not 0 < k < count:
            raise ValueError(f"task {task!r} of suite {suite!r}: {count} test examples cannot be split at "
                             f"fraction {fraction} into two non-empty halves")
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{suite}/{task}".encode())])
        perm = rng.permutation(count)
        out[task] = (np.sort(perm[:k]), np.sort(perm[k:]))
    return out


def restrict(result: Mapping[str, Any], indices: Mapping[str, np.ndarray], *, bootstrap: int = 1000, seed: int = 0
             ) -> dict[str, Any]:
    """``result`` (a ``results.json`` dict) as if each task's test split held only ``indices[task]``: every row's
    accuracies, interval and stored correctness, and the gains with their paired intervals, recomputed by the
    benchmark's own code (:meth:`~magic_pl.zoo.runner._Row.summary`, ``_gains``) from the stored correctness; timings
    and settings are kept. ``subset`` records the example counts."""
    return _restrict(result, _decode(result), indices, bootstrap, seed)[0]


def _restrict(result: Mapping[str, Any], correct: Mapping[str, list[dict[str, np.ndarray]]],
              indices: Mapping[str, np.ndarray], bootstrap: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from magic_pl.zoo.runner import _gains, _Row

    raw = []
    for r in result["rows"]:
        row = _Row(r["method"], r["calibration"])
        row.draws = [{n: c[indices[n]] for n, c in d.items()} for d in correct[_key(r)]]
        # the run's costs stay the run's (a subset of the examples does not change them)
        row.calib_seconds = [r.get("calibration_seconds", 0.0)] * len(row.draws)
        row.eval_seconds = [r.get("eval_seconds", 0.0)] * len(row.draws)
        row.scores = list(r.get("selection_scores", []))
        raw.append(row)
    experts = next((row for row in raw if (row.method, row.calibration) == ("expert", "none")), None)
    expert_acc = {n: float(c.mean()) for n, c in experts.draws[0].items()} if experts else None
    rows = [{**r, **{k: v for k, v in row.summary(expert_acc, bootstrap, seed).items()
                     if k not in ("calibration_seconds", "eval_seconds")}}
            for r, row in zip(result["rows"], raw)]
    out = {**result, "rows": rows, "gains": _gains(rows, result["config"]["methods"], raw, bootstrap, seed),
           "subset": {"examples": {n: int(len(i)) for n, i in indices.items()}}}
    out.pop("files", None)  # not the run's files: a recomputation
    return out, {_key(r): row.draws for r, row in zip(result["rows"], raw)}


def _summary(groups: Mapping[str, Sequence[_Run]], reference: str) -> dict[str, Any]:
    """The budget study's summary of these runs (:func:`~magic_pl.zoo.budget.add_run`, as
    :func:`~magic_pl.zoo.budget.rebuild_budget_report` joins runs); the label-free selection's row is filed as
    ``needs="selection"``, which the rule never chooses."""
    from magic_pl.zoo.budget import _new_summary, add_run

    runs = [run for g in groups.values() for run in g]
    methods = list(dict.fromkeys(m for run in runs for m in run.result["config"]["methods"]))
    calibrations = list(dict.fromkeys(c for run in runs for c in run.result["config"]["calibrations"]))
    first = runs[0].result["config"]
    summary = _new_summary(sorted({run.n for run in runs}), methods, calibrations, first["draws"],
                           first.get("max_test"), reference)
    for suite, g in groups.items():
        for run in g:
            add_run(summary, suite, run.n, run.result, statistics=False)
    return summary


class _Lookup:
    """Per suite, the runs a budget's recipe is read from, as :func:`~magic_pl.zoo.budget.budget_recommendations`
    reads them: a budget's own run where it has the recipe, else the first budget's run that has it (data-free and
    labelled recipes are the same at every n); at one n, the last run given wins."""

    def __init__(self, groups: Mapping[str, Sequence[_Run]]):
        self.by_n: dict[str, dict[int, dict[str, _Run]]] = {}
        for suite, runs in groups.items():
            table = self.by_n.setdefault(suite, {})
            for run in runs:
                table.setdefault(run.n, {}).update({k: run for k in run.correct})

    def run(self, suite: str, budget: str, recipe: str) -> Optional[_Run]:
        table = self.by_n[suite]
        if budget not in _ANY_RUN and recipe in table.get(int(budget), {}):
            return table[int(budget)][recipe]
        return next((t[recipe] for _, t in sorted(table.items()) if recipe in t), None)

    def mean_correct(self, suite: str, budget: str, recipe: str) -> Optional[dict[str, np.ndarray]]:
        """Per task, the recipe's correctness averaged over its draws (what the paired intervals resample)."""
        run = self.run(suite, budget, recipe)
        if run is None:
            return None
        draws = run.correct[recipe]
        return {n: np.mean([d[n] for d in draws], axis=0) for n in draws[0]}


def _accuracy(mc: Mapping[str, np.ndarray]) -> float:
    """The task-averaged accuracy of mean-over-draws correctness (equal to the mean over draws of the rows' averages:
    every draw has the same examples)."""
    return float(np.mean([c.mean() for c in mc.values()]))


def _paired(a: Mapping[str, Mapping[str, np.ndarray]], b: Mapping[str, Mapping[str, np.ndarray]], bootstrap: int,
            seed: int) -> tuple[float, Optional[list[float]]]:
    """Gain of ``a`` over ``b`` (suite -> task -> mean-over-draws correctness) averaged over suites of task
    averages, and its paired 95% bootstrap interval (examples resampled within each task, the same for both). With
    one suite this is the benchmark's own paired interval (``_gains``): the same call, the same seed."""
    from magic_pl.lightning.metrics import bootstrap_ci

    suites = list(a)
    diff = {(s, n): a[s][n].astype(np.float64) - b[s][n] for s in suites for n in a[s]}
    gain = float(np.mean([np.mean([diff[(s, n)].mean() for n in a[s]]) for s in suites]))
    if bootstrap <= 0:
        return gain, None
    # bootstrap_ci averages its entries equally and divides each by its weight: weights S * T_s / L turn that into
    # the mean over suites of each suite's task average (L entries, T_s tasks in suite s)
    total = len(diff)
    weights = ({(s, n): len(suites) * len(a[s]) / total for s, n in diff} if len(suites) > 1 else None)
    return gain, list(bootstrap_ci(diff, samples=bootstrap, seed=seed, weights=weights))


def _compare(lookup: _Lookup, suites: Sequence[str], budget: str, recipe: str, other: str, bootstrap: int,
             seed: int) -> dict[str, Any]:
    """``recipe`` against ``other`` at ``budget``: the paired gain and interval on average over the suites and on
    each suite."""
    a = {s: lookup.mean_correct(s, budget, recipe) for s in suites}
    b = {s: lookup.mean_correct(s, budget, other) for s in suites}
    gain, ci = _paired(a, b, bootstrap, seed)
    per_suite = {}
    for s in suites:
        g, c = _paired({s: a[s]}, {s: b[s]}, bootstrap, seed)
        per_suite[s] = {"gain": g, "ci95": c}
    return {"gain": gain, "ci95": ci, "per_suite": per_suite}


def _below(ci: Optional[Sequence[float]]) -> bool:
    """Significantly below zero: the interval's upper end is negative (the rule's ``safe``, negated)."""
    return bool(ci) and ci[1] < 0


def _measure(lookup: _Lookup, summary: Mapping[str, Any], rec: Mapping[str, Any], recipe: Optional[str],
             reference: str, bootstrap: int, seed: int) -> Optional[dict[str, Any]]:
    """``recipe`` at ``rec``'s budget on the examples ``lookup`` holds: accuracy per suite and on average, the paired
    gain over the merge it starts from per suite, over the best recipe there, the reference, and every other
    candidate of the budget; whether it is the best (ties count) and safe on every suite."""
    budget, candidates = rec["budget"], list(rec["candidates"])
    suites = list(summary["suites"])
    if recipe is None or any(lookup.run(s, budget, recipe) is None for s in suites):
        return None
    means = {k: float(np.mean([_accuracy(lookup.mean_correct(s, budget, k)) for s in suites])) for k in candidates}
    best = max(candidates, key=lambda k: means[k])
    per_suite = {s: _accuracy(lookup.mean_correct(s, budget, recipe)) for s in suites}
    over_start = {}
    for s in suites:
        start = _entry(summary, s, budget, recipe)["over"]
        base = lookup.mean_correct(s, budget, start)
        g, ci = (_paired({s: lookup.mean_correct(s, budget, recipe)}, {s: base}, bootstrap, seed) if base
                 else (None, None))
        over_start[s] = {"over": start, "gain": g, "ci95": ci}
    ref = f"{reference}/none"
    out = {"recipe": recipe, "per_suite": per_suite, "mean": float(np.mean(list(per_suite.values()))),
           "over_start": over_start, "best": best, "best_mean": means[best],
           "reference": ref, "reference_mean": means.get(ref),
           "versus": {k: _compare(lookup, suites, budget, recipe, k, bootstrap, seed)
                      for k in candidates if k != recipe},
           "candidate_means": means}
    # ties count: a pick equal to the best mean is as good as it (float sums of equal counts can differ in the last bit)
    out["as_good_as_every_recipe"] = bool(round(out["mean"], 9) >= round(means[best], 9))
    out["safe_on_every_suite"] = not any(_below(v["ci95"]) for v in over_start.values())
    return out


def _entry(summary: Mapping[str, Any], suite: str, budget: str, recipe: str) -> dict[str, Any]:
    """The summary entry (``summarise_budget``) of ``recipe`` at ``budget`` on ``suite``, found as the rule finds it."""
    runs = summary["suites"][suite]["runs"]
    if budget not in _ANY_RUN and recipe in runs.get(budget, {}):
        return runs[budget][recipe]
    return next(run[recipe] for run in runs.values() if recipe in run)


def _selector(lookup: _Lookup, groups: Mapping[str, Sequence[_Run]], budget: str, pick: Optional[str],
              reference: str, best: Optional[str], bootstrap: int, seed: int) -> Optional[dict[str, Any]]:
    """The label-free selection's row at ``budget`` (a number of samples) on every suite that has it: accuracy per
    suite and on average, its per-draw choices and its paired gains over the pick, the best recipe and the
    reference (on the suites that have it)."""
    if budget in _ANY_RUN:
        return None
    suites = [s for s in groups if SELECTED in lookup.by_n[s].get(int(budget), {})]
    if not suites:
        return None
    per_suite = {s: _accuracy(lookup.mean_correct(s, budget, SELECTED)) for s in suites}
    choices = {s: next(r for r in lookup.by_n[s][int(budget)][SELECTED].result["rows"]
                       if _key(r) == SELECTED).get("choices") for s in suites}
    out = {"suites": suites, "per_suite": per_suite, "mean": float(np.mean(list(per_suite.values()))),
           "choices": choices, "versus": {}}
    for name, other in (("pick", pick), ("best", best), ("reference", f"{reference}/none")):
        if other and all(lookup.run(s, budget, other) for s in suites):
            out["versus"][name] = {"recipe": other,
                                   **_compare(lookup, suites, budget, SELECTED, other, bootstrap, seed)}
    return out


# ---- the analyses --------------------------------------------------------------------------------------------------
def out_of_sample(results: Sequence[Result], reference: str, seed: int = 0, fraction: float = 0.5,
                  bootstrap: int = 1000, held_out: Optional[Sequence[Result]] = None) -> dict[str, Any]:
    """Choose each budget's recipe on a selection part of the test examples and report it on the rest.

    Args:
        results: the study's benchmark runs (``results.json`` dicts or paths; several suites, several budgets; a
            run's budget is its ``n_calib``); every row must keep its per-example correctness.
        reference: the uncalibrated merge data-based merges are compared with (the study's ``reference``).
        seed: seed of the split (mixed with suite and task names) and of the bootstrap resamples.
        fraction: share of each task's test examples in the selection half (0.5).
        bootstrap: resamples of the paired 95% intervals (1000; 0: none, every recipe then counts as safe).
        held_out: runs of a configuration no rule saw; the picks made on the selection half (the recommendation)
            are applied there (:func:`apply_rule`).

    Returns:
        ``{"reference", "seed", "fraction", "bootstrap", "split", "in_sample", "budgets", "held_out"}``: ``split``
        per suite and task the selection indices and both counts; ``in_sample`` the rule on all examples (what the
        study reports); ``budgets`` per budget the pick made on the selection half (``selection``: the rule's entry
        there), its measurement on the report half (``report``; ``None`` when no recipe was safe), ``target`` and
        the label-free selection's report-half row (``selector``, where the runs have one).
    """
    from magic_pl.zoo.budget import budget_recommendations

    groups = _group(load_results(results))
    splits = {}
    selection: dict[str, list[_Run]] = {}
    report: dict[str, list[_Run]] = {}
    for suite, runs in groups.items():
        counts = {n: len(c) for n, c in next(iter(runs[0].correct.values()))[0].items()}
        splits[suite] = split_examples(counts, suite, seed=seed, fraction=fraction)
        for part, store in ((0, selection), (1, report)):
            idx = {n: s[part] for n, s in splits[suite].items()}
            store[suite] = [_Run(run.n, *_restrict(run.result, run.correct, idx, bootstrap, seed)) for run in runs]
    in_sample = budget_recommendations(_summary(groups, reference))
    picked = budget_recommendations(_summary(selection, reference))
    report_summary = _summary(report, reference)
    lookup = _Lookup(report)
    budgets = []
    for rec in picked:
        measured = _measure(lookup, report_summary, rec, rec["recipe"], reference, bootstrap, seed)
        target = {"as_good_as_every_recipe": bool(measured and measured["as_good_as_every_recipe"]),
                  "safe_on_every_suite": bool(measured and measured["safe_on_every_suite"])}
        target["holds"] = target["as_good_as_every_recipe"] and target["safe_on_every_suite"]
        in_rec = next((r for r in in_sample if r["budget"] == rec["budget"]), None)
        budgets.append({"budget": rec["budget"], "pick": rec["recipe"], "selection": rec, "report": measured,
                        "target": target, "in_sample_pick": in_rec["recipe"] if in_rec else None,
                        "selector": _selector(lookup, report, rec["budget"], rec["recipe"], reference,
                                              measured["best"] if measured else None, bootstrap, seed)})
    out = {"reference": reference, "seed": int(seed), "fraction": float(fraction), "bootstrap": int(bootstrap),
           "split": {suite: {n: {"selection": s[0].tolist(), "selection_count": int(len(s[0])),
                                 "report_count": int(len(s[1]))} for n, s in sp.items()}
                     for suite, sp in splits.items()},
           "runs": {suite: [run.n for run in runs] for suite, runs in groups.items()},
           "in_sample": in_sample, "budgets": budgets, "held_out": None}
    if held_out is not None:
        out["held_out"] = apply_rule(out, held_out, bootstrap=bootstrap, seed=seed)
    return out


def apply_rule(recommendations: Union[Sequence[Mapping[str, Any]], Mapping[str, Any]], results: Sequence[Result],
               *, reference: Optional[str] = None, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """A study's recommendations applied to a configuration no rule saw (``results``: its runs): per budget there,
    the recommended recipe's accuracy as measured on all its test examples (win or lose) next to the best recipe of
    that budget there and the uncalibrated reference, with paired 95% intervals of the gains over both and over the
    merge it starts from.

    Args:
        recommendations: :func:`~magic_pl.zoo.budget.budget_recommendations` entries (``budget``, ``recipe``), or an
            :func:`out_of_sample` result (its picks made on the selection half: the recommendation it reports and
            the one magic-pl ships, :mod:`magic_pl.recommended`).
        results: the configuration's runs (``results.json`` dicts or paths).
        reference: the uncalibrated reference merge (default: the ``out_of_sample`` result's).
        bootstrap, seed: the paired intervals' resamples and seed.
    """
    from magic_pl.zoo.budget import budget_recommendations

    if isinstance(recommendations, Mapping):
        reference = reference or recommendations.get("reference")
        recommendations = [{"budget": b["budget"], "recipe": b["pick"]} for b in recommendations["budgets"]]
    if not reference:
        raise ValueError("give the reference merge (reference=...)")
    recommended = {str(r["budget"]): r.get("recipe") for r in recommendations}
    groups = _group(load_results(results))
    summary = _summary(groups, reference)
    lookup = _Lookup(groups)
    rows = []
    for rec in budget_recommendations(summary):
        recipe = recommended.get(rec["budget"])
        entry: dict[str, Any] = {"budget": rec["budget"], "recipe": recipe, "rule_here": rec["recipe"]}
        if rec["budget"] not in recommended:
            entry["note"] = "the study made no recommendation at this budget"
        elif recipe is None:
            entry["note"] = "the study recommended no recipe at this budget"
        measured = _measure(lookup, summary, rec, recipe, reference, bootstrap, seed)
        if measured is None and recipe is not None:
            entry["note"] = "the recommended recipe was not measured on every suite of this configuration"
        entry["measured"] = measured
        if measured is not None:
            entry["wins"] = measured["as_good_as_every_recipe"]
            entry["safe"] = measured["safe_on_every_suite"]
        else:  # the bar without the recipe
            entry["best"], entry["best_mean"], entry["reference_mean"] = (rec["best_any"], rec["best_any_mean"],
                                                                        rec["reference_mean"])
        rows.append(entry)
    return {"reference": reference, "suites": list(groups), "runs": {s: [r.n for r in g] for s, g in groups.items()},
            "budgets": rows}


# ---- the report ----------------------------------------------------------------------------------------------------
def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _gain(g: Optional[float], ci: Optional[Sequence[float]]) -> str:
    if g is None:
        return "-"
    s = f"{100 * g:+.1f}"
    if ci:
        s += f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
    return s


def holdout_markdown(result: Mapping[str, Any]) -> str:
    """The out-of-sample report: per budget the pick, its report-half accuracy and paired gains, the target; the
    label-free selection; the held-out configuration."""
    suites = list(result["split"])
    counts = ", ".join(f"{s}: {sum(v['selection_count'] for v in sp.values())} / "
                       f"{sum(v['report_count'] for v in sp.values())}" for s, sp in result["split"].items())
    ref = f"{result['reference']}/none"
    out = ["# magic-pl: out-of-sample recommendation per budget", "",
           f"Each task's test examples split by a seeded permutation (seed {result['seed']}, {result['fraction']:g} "
           f"to selection; the same split for every recipe, draw and budget; selection / report examples: {counts}). "
           "The recipe is chosen on the selection half by the study's rule (among recipes never significantly below "
           "the merge they start from on any suite, the best mean over the suites) and reported on the report half. "
           f"Accuracies in %, gains in points with paired 95% bootstrap intervals ({result['bootstrap']} resamples). "
           "Target: on the report half the pick is at least as good on average as every recipe of its budget and not "
           "significantly below its starting merge on any suite.", "",
           "| unlabelled samples per task | pick (selection half) | pick on all examples | "
           + " | ".join(suites) + " | mean | over its start | best on report half (mean) | pick - best | "
           f"uncalibrated {result['reference']} | pick - {result['reference']} | target |",
           "|---|---|---|" + "---|" * (len(suites) + 7)]
    for b in result["budgets"]:
        m = b["report"]
        if m is None:
            out.append(f"| {b['budget']} | - | {b['in_sample_pick'] or '-'} | " + " | ".join("-" for _ in suites)
                       + " | - | - | - | - | - | - | no |")
            continue
        out.append(f"| {b['budget']} | {b['pick']} | {b['in_sample_pick'] or '-'} | "
                   + _measured_cells(m, suites, ref, "the pick") + f" | {'yes' if b['target']['holds'] else 'no'} |")
    out.append("")
    selectors = [b for b in result["budgets"] if b.get("selector")]
    if selectors:
        out += ["## Label-free selection (chosen without labels: reported on the report half only)", "",
                "| unlabelled samples per task | suites | mean | selection - pick | selection - best | selection - "
                f"{result['reference']} | choices |", "|---|---|---|---|---|---|---|"]
        for b in selectors:
            sel = b["selector"]
            cells = [_gain(sel["versus"][k]["gain"], sel["versus"][k]["ci95"]) if k in sel["versus"] else "-"
                     for k in ("pick", "best", "reference")]
            choices = "; ".join(f"{s}: {', '.join(c or [])}" for s, c in sel["choices"].items())
            out.append(f"| {b['budget']} | " + ", ".join(f"{s} {_pct(v)}" for s, v in sel["per_suite"].items())
                       + f" | {_pct(sel['mean'])} | " + " | ".join(cells) + f" | {choices} |")
        out.append("")
    held = result.get("held_out")
    if held:
        out += [held_out_markdown(held)]
    return "\n".join(out) + "\n"


def _measured_cells(m: Mapping[str, Any], suites: Sequence[str], ref: str, itself: str) -> str:
    """The cells both tables give a measured recipe: per suite, mean, gain over its start, the best recipe, the gap
    to it and to the reference (``0 (itself)`` where the recipe is that one)."""
    start = "; ".join(f"{s} {_gain(v['gain'], v['ci95'])}" for s, v in m["over_start"].items())
    vs_best, vs_ref = m["versus"].get(m["best"]), m["versus"].get(ref)
    same_ref = f"0 ({itself})" if m["reference_mean"] is not None else "-"
    return (" | ".join(_pct(m["per_suite"][s]) for s in suites)
            + f" | {_pct(m['mean'])} | {start} | {m['best']} ({_pct(m['best_mean'])}) | "
            + (_gain(vs_best["gain"], vs_best["ci95"]) if vs_best else f"0 ({itself})")
            + f" | {_pct(m['reference_mean'])} | "
            + (_gain(vs_ref["gain"], vs_ref["ci95"]) if vs_ref else same_ref))


def held_out_markdown(held: Mapping[str, Any]) -> str:
    """The table of :func:`apply_rule`: the recommended recipe on a configuration no rule saw, win or lose."""
    suites = held["suites"]
    out = [f"## Held-out configuration ({', '.join(suites)}): the study's recommendation applied, as measured", "",
           "| unlabelled samples per task | recommended | " + " | ".join(suites) + " | mean | over its start | "
           "best here (mean) | recommended - best | uncalibrated " + held["reference"] + " | recommended - "
           + held["reference"] + " | rule here |", "|---|---|" + "---|" * (len(suites) + 7)]
    ref = f"{held['reference']}/none"
    for b in held["budgets"]:
        m = b["measured"]
        if m is None:
            out.append(f"| {b['budget']} | {b['recipe'] or '-'} | " + " | ".join("-" for _ in suites)
                       + f" | - | - | {b.get('best', '-')} ({_pct(b.get('best_mean'))}) | - | "
                       f"{_pct(b.get('reference_mean'))} | - | {b['rule_here'] or '-'} |")
            continue
        out.append(f"| {b['budget']} | {b['recipe']} | " + _measured_cells(m, suites, ref, "recommended")
                   + f" | {b['rule_here'] or '-'} |")
    out.append("")
    return "\n".join(out)


def write_holdout(result: Mapping[str, Any], out_dir: Union[str, os.PathLike]) -> dict[str, str]:
    """Write ``holdout.md`` and ``holdout.json`` under ``out_dir`` (each atomically, recorded as magic-pl's; a file
    there that magic-pl did not write is refused before either is written). Returns their paths."""
    from magic_pl.jsonable import jsonable
    from magic_pl.output import check_files
    from magic_pl.zoo.report import write_texts

    out = Path(out_dir)
    files = {k: out / name for k, name in HOLDOUT_FILES.items()}
    check_files(list(files.values()))
    out.mkdir(parents=True, exist_ok=True)
    write_texts(out, {HOLDOUT_FILES["markdown"]: holdout_markdown(result),
                      HOLDOUT_FILES["json"]: json.dumps(jsonable(result), indent=1)})
    return {k: str(v) for k, v in files.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m magic_pl.zoo.holdout RUNS... --out DIR [--reference R] [--held-out RUNS...]``"""
    parser = argparse.ArgumentParser(prog="python -m magic_pl.zoo.holdout",
                                     description="Out-of-sample recommendation per budget: chosen on one half of the "
                                                 "test examples, reported on the other.")
    parser.add_argument("runs", nargs="+", help="benchmark runs: results.json files, run directories, or folders "
                                                "searched for them")
    parser.add_argument("--out", required=True, help="where holdout.md and holdout.json go")
    parser.add_argument("--reference", default="tsv_m", help="the uncalibrated reference merge (default tsv_m)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the bootstrap (0)")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of examples in the selection half (0.5)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--held-out", nargs="+", default=None,
                        help="runs of a configuration no rule saw: the recommendation applied there")
    args = parser.parse_args(argv)
    from magic_pl.output import check_files

    check_files([Path(args.out) / name for name in HOLDOUT_FILES.values()])  # before any work
    result = out_of_sample(args.runs, args.reference, seed=args.seed, fraction=args.fraction,
                           bootstrap=args.bootstrap, held_out=args.held_out)
    files = write_holdout(result, args.out)
    print(Path(files["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
