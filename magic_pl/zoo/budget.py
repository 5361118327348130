"""Few unlabelled samples, best use: every data-based recipe at the same budget of ``n`` unlabelled samples per task.

``python -m magic_pl.zoo.budget --config configs/benchmark/budget.yaml`` runs :func:`run_budget_study`: for every
suite and budget ``n`` one benchmark run (:func:`~magic_pl.zoo.runner.run_benchmark`, the shipped Lightning
pipeline) with

- the strongest data-free merges of the pool, uncalibrated and with FSC, DSC, ``auto`` and per-channel FSC;
- RegMean and RegMean++ (data-based merges from the same samples), alone and followed by FSC (and the other
  settings);
- BatchNorm re-estimation on the same ``n`` images per task (BatchNorm suites; alone and followed by FSC);
- the references: the uncalibrated merges (no data), and Task Arithmetic and LiNeS with their coefficients tuned on
  the labelled validation split (tuned TA, tuned LiNeS).

At a given ``n`` every method sees the same draws (the benchmark seeds a draw by task and draw index, not by
method). Per recipe: the mean accuracy over draws, the paired 95% bootstrap interval of its gain over the
uncalibrated merge it starts from (test examples resampled; for RegMean: over the uncalibrated strongest merge), and
its cost (seconds of merging + calibration per run, and the statistics' memory). Writes ``budget.md``,
``budget.json``, ``budget.png`` (accuracy against ``n`` per recipe, one panel per suite) and one benchmark report per
run under ``results_dir``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see magic_pl._entry

__all__ = ["DEFAULT_BUDGETS", "BUDGET_MERGES", "BUDGET_CALIBRATIONS", "run_budget_study", "summarise_budget",
           "statistics_memory", "add_run", "rebuild_budget_report", "budget_recommendations", "budget_markdown"]

#: Unlabelled samples per task.
DEFAULT_BUDGETS: list[int] = [1, 4, 16, 64]
#: The strongest data-free merges of the text and vision tables (TSV-M best uncalibrated on text, TIES second; both
#: within a point of the best on vision), and the data-based merges.
BUDGET_MERGES: list[str] = ["ties", "tsv_m", "regmean", "regmean_plusplus"]
#: The settings compared at every budget (``fsc_channel``: per-channel xi).
BUDGET_CALIBRATIONS: list[str] = ["none", "fsc", "dsc", "auto", "fsc_channel"]


def _row(result: dict[str, Any], method: str, calibration: str) -> Optional[dict[str, Any]]:
    return next((r for r in result["rows"] if r["method"] == method and r["calibration"] == calibration), None)


def summarise_budget(result: dict[str, Any], reference: str) -> dict[str, Any]:
    """One run's recipes: ``{recipe: {avg, std, ci95, gain, gain_ci95, over, needs, seconds}}``; gains are paired,
    over the uncalibrated merge a recipe starts from (``reference`` for the data-based merges); ``needs``:
    ``"nothing"`` (data-free: the same at every n), ``"samples"``, ``"labels"``, or ``"selection"`` for the
    label-free selection's row (a choice among the run's recipes, not a recipe the study may recommend)."""
    from magic_pl.calibration import resolve_setting

    gains = result["gains"]
    settings = result["config"].get("settings", {})
    out: dict[str, Any] = {}
    for r in result["rows"]:
        m, c = r["method"], r["calibration"]
        if m in ("base", "expert"):
            continue
        data_based = m in gains.get("data_merges_over", {})
        if (m, c) == ("selected", "label-free"):  # magic_pl.zoo.runner.selected_row
            needs = "selection"
        elif m not in result["config"]["methods"]:
            needs = "labels"  # tuned on the labelled validation split
        elif data_based or (c not in settings and c != "none"):  # RegMean; bn, bn+fsc: re-estimated on the samples
            needs = "samples"
        else:
            needs = "samples" if c != "none" and resolve_setting(settings[c]).uses_data else "nothing"
        start = reference if data_based or m not in gains["over_uncalibrated"] else m
        if data_based:
            gain, ci = gains["data_merges_over"][m][c][reference]
        elif m in result["config"]["methods"] and c == "none":
            gain, ci = 0.0, None
        elif c in gains["over_uncalibrated"].get(m, {}):
            gain, ci = gains["over_uncalibrated"][m][c], gains["over_uncalibrated_ci95"][m][c]
        else:  # a reference row (tuned TA, tuned LiNeS): over the uncalibrated reference merge, unpaired
            ref = _row(result, reference, "none")
            gain, ci = (r["avg"] - ref["avg"] if ref else None), None
        out[f"{m}/{c}"] = {"method": m, "calibration": c, "avg": r["avg"], "std": r.get("avg_std", 0.0),
                           "ci95": r.get("avg_ci95"), "gain": gain, "gain_ci95": ci, "over": f"{start}/none",
                           "needs": needs,
                           "seconds": r.get("calibration_seconds", 0.0) + r.get("merge_seconds", 0.0)}
    return out


def statistics_memory(encoder: Any, num_tasks: int) -> dict[str, int]:
    """Bytes of the statistics each data-based recipe holds for ``encoder`` and ``num_tasks`` tasks; none depends on
    the budget ``n`` (all are running sums).

    ``fsc`` / ``fsc_channel``: the float32 ``[K, N]`` numerator and denominator of
    :class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator` (N: calibrated modules, or all their channels) plus the
    float64 reduce-able copy of :class:`~magic_pl.lightning.metrics.FSCStatistics`; ``regmean`` /
    ``regmean_plusplus``: :func:`~magic_pl.merging.regmean.regmean_memory` (float64 Gram sums; RegMean++ one block at
    a time).
    """
    from magic_pl.calibration.fsc import FeatureSpaceCalibrator
    from magic_pl.merging.regmean import regmean_memory

    state = encoder.state_dict()
    out: dict[str, int] = {}
    for name, granularity in (("fsc", "module"), ("fsc_channel", "channel")):
        cal = FeatureSpaceCalibrator(state, encoder, [state] * num_tasks, granularity=granularity)
        out[name] = 2 * cal.ratio_sum.numel() * (4 + 8)
    out["regmean"] = regmean_memory(encoder, num_tasks)
    out["regmean_plusplus"] = regmean_memory(encoder, num_tasks, plus_plus=True)
    return out


def run_budget_study(
    suites: Sequence[str] = ("text", "vision"),
    budgets: Sequence[int] = tuple(DEFAULT_BUDGETS),
    methods: Optional[list[str]] = None,
    calibrations: Optional[list[str]] = None,
    draws: int = 3,
    max_test: Optional[int] = 300,
    reference: str = "tsv_m",
    tune_lines: bool = True,
    references: bool = True,
    cache_dir: Optional[str] = None,
    results_dir: str = "results/budget",
    bootstrap: int = 1000,
    seed: int = 0,
    trainer: Optional[dict[str, Any]] = None,
    progress: bool = True,
    select: bool = False,
) -> dict[str, Any]:
    """Run every suite at every budget and write the study (see the module docstring). Returns the summary.

    Args:
        suites: benchmark suites (default text and vision).
        budgets: unlabelled samples per task (default :data:`DEFAULT_BUDGETS`).
        methods: merges (default :data:`BUDGET_MERGES`).
        calibrations: settings (default :data:`BUDGET_CALIBRATIONS`).
        draws: draws of the samples per budget (3).
        max_test: test examples per task (seeded subsample; default 300 to keep the study's cost down; ``None``: the
            suite's test split).
        reference: the uncalibrated merge the data-based merges are compared with (default ``tsv_m``).
        tune_lines: add tuned LiNeS (the labelled-validation reference next to tuned TA; both are tuned once per
            suite, in the first budget's run).
        references: add the labelled-validation references at all (``False``: a study that extends another one on
            the same test examples and draws, e.g. more recipes, and needs no second tuning).
        cache_dir, bootstrap, seed, trainer, progress: as in :func:`~magic_pl.zoo.runner.run_benchmark`.
        results_dir: where the study and its runs' reports go.
        select: add the label-free selection's row to every run (:func:`~magic_pl.zoo.runner.run_benchmark`'s
            ``select``: on each draw, the recipe whose outputs on that draw's samples are closest to the experts').
    """
    from magic_pl.lightning.data import check_count
    from magic_pl.zoo.runner import check_run_counts, run_benchmark
    from magic_pl.zoo.suites import get_suite

    methods = list(methods) if methods is not None else list(BUDGET_MERGES)
    calibrations = list(calibrations) if calibrations is not None else list(BUDGET_CALIBRATIONS)
    if reference not in methods:
        raise ValueError(f"reference {reference!r} must be one of the methods {methods}")
    if not budgets:
        raise ValueError("budgets is empty: give the unlabelled samples per task to compare")
    for n in budgets:
        check_count("budgets", n, 1)
    # every suite's runs are checked before the first one starts (a late run would otherwise fail hours in)
    for suite in suites:
        check_run_counts(get_suite(suite), n_calib=max(budgets), draws=draws, bn_samples=max(budgets),
                         max_test=max_test, bootstrap=bootstrap)
    out_dir = Path(results_dir)
    summary = _new_summary(budgets, methods, calibrations, draws, max_test, reference)
    for suite in suites:
        for i, n in enumerate(budgets):
            # the labelled-validation references do not depend on n: tuned once, in the first run
            result = run_benchmark(suite, methods=methods, calibrations=calibrations, n_calib=int(n), draws=draws,
                                   bn_samples=int(n), tune_ta=i == 0 and references,
                                   tune_lines=i == 0 and references and tune_lines,
                                   max_test=max_test, cache_dir=cache_dir,
                                   results_dir=str(out_dir / f"{suite}_n{n}"), bootstrap=bootstrap, seed=seed,
                                   trainer=trainer, progress=progress, select=select)
            add_run(summary, suite, int(n), result)
            write_budget_report(summary, out_dir)
    return summary


def _new_summary(budgets: Sequence[int], methods: list[str], calibrations: list[str], draws: int,
                 max_test: Optional[int], reference: str) -> dict[str, Any]:
    return {"budgets": [int(n) for n in budgets], "methods": list(methods), "calibrations": list(calibrations),
            "draws": int(draws), "max_test": max_test, "reference": reference, "suites": {}, "timings": {}}


def add_run(summary: dict[str, Any], suite: str, n: int, result: dict[str, Any], *, statistics: bool = True) -> None:
    """Add one benchmark run (``suite`` at budget ``n``; the ``results.json`` dict) to a study's summary; a run at an
    ``n`` already there adds its recipes to that budget's. The run that holds the labelled-validation references (the
    first, by default) fills them in. ``statistics=False`` skips the statistics' memory (it builds the suite's
    encoder; a summary made only to apply :func:`budget_recommendations` does not need it)."""
    from magic_pl.zoo.suites import get_suite

    entry = summary["suites"].setdefault(suite, {"runs": {}, "tuned_ta": None, "tuned_lines": None})
    # a second run at the same n (a study's extension on the same examples and draws) adds its recipes
    entry["runs"].setdefault(str(n), {}).update(summarise_budget(result, summary["reference"]))
    entry["runs"] = {k: entry["runs"][k] for k in sorted(entry["runs"], key=int)}
    tuned_ta, tuned_lines = _row(result, "task_arithmetic_tuned", "none"), _row(result, "lines_tuned", "lines")
    if tuned_ta:
        entry["tuned_ta"] = tuned_ta["avg"]
    if tuned_lines:
        entry["tuned_lines"] = tuned_lines["avg"]
    if "tasks" not in entry:
        entry["experts"] = _row(result, "expert", "none")["avg"]
        entry["tasks"] = result["config"]["tasks"]
        if statistics:
            encoder = get_suite(suite).build_backbone().build()
            entry["statistics_bytes"] = statistics_memory(encoder, len(entry["tasks"]))
    summary["timings"].setdefault(f"{suite}_n{n}", []).append(result["timings"])  # one entry per run at that n


def write_budget_report(summary: dict[str, Any], out_dir: Path) -> None:
    """``budget.md``, ``budget.json`` and ``budget.png`` of a summary, under ``out_dir`` (atomic writes)."""
    from magic_pl.jsonable import jsonable
    from magic_pl.zoo.report import write_texts

    write_texts(out_dir, {"budget.md": budget_markdown(summary),
                          "budget.json": json.dumps(jsonable(summary), indent=1)})
    budget_chart(summary, out_dir / "budget.png")


def rebuild_budget_report(run_dirs: Sequence[str], results_dir: str, *, reference: str = "tsv_m") -> dict[str, Any]:
    """Rebuild a study's report from finished runs: ``run_dirs`` are benchmark results directories named
    ``<suite>_n<n>`` (as :func:`run_budget_study` writes them; e.g. two studies' runs, one per suite, or a study
    and its extension on the same examples). Returns the summary and writes it under ``results_dir``."""
    import re

    runs = []
    for d in run_dirs:
        match = re.fullmatch(r"(.+)_n(\d+)", Path(d).name)
        if match is None:
            raise ValueError(f"{d!r} is not a budget run directory (<suite>_n<n>)")
        path = Path(d) / "results.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:  # every run is read before anything is written
            raise ValueError(f"{path}: not a readable benchmark result ({e})") from e
        runs.append((match.group(1), int(match.group(2)), result))
    if not runs:
        raise ValueError("no run directories given")
    config = runs[0][2]["config"]
    budgets = sorted({n for _, n, _ in runs})
    methods = list(dict.fromkeys(m for _, _, r in runs for m in r["config"]["methods"]))
    calibrations = list(dict.fromkeys(c for _, _, r in runs for c in r["config"]["calibrations"]))
    summary = _new_summary(budgets, methods, calibrations, config["draws"], config.get("max_test"), reference)
    for suite, n, result in sorted(runs, key=lambda r: (r[0], r[1])):
        add_run(summary, suite, n, result)
    write_budget_report(summary, Path(results_dir))
    return summary


def budget_recommendations(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per budget, the recipe to recommend: among the recipes measured on every suite (data-free ones count at every
    n: they are the same there) and never significantly below the merge they start from on any suite (paired 95%
    interval of the gain above zero or straddling it), the best mean over the suites; next to it the best recipe of
    any kind at that budget (the bar it must reach) and the uncalibrated reference merge. The first entry (n = 0) is
    data-free; the last uses the labelled validation split. ``candidates``: every recipe the budget compared.
    """
    suites = summary["suites"]

    def recipes(n: Optional[str], needs: tuple[str, ...]) -> dict[str, dict[str, dict[str, Any]]]:
        """recipe -> suite -> entry, for the recipes of budget ``n`` (``None``: any) that need only ``needs``."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for suite, entry in suites.items():
            for k_n, run in entry["runs"].items():
                for k, e in run.items():
                    if e["needs"] in needs and (e["needs"] != "samples" or k_n == n):
                        out.setdefault(k, {}).setdefault(suite, e)
        return {k: v for k, v in out.items() if len(v) == len(suites)}

    def safe(per_suite: dict[str, dict[str, Any]]) -> bool:
        return all(not (e.get("gain_ci95") and e["gain_ci95"][1] < 0) for e in per_suite.values())

    def mean(per_suite: dict[str, dict[str, Any]]) -> float:
        return sum(e["avg"] for e in per_suite.values()) / len(per_suite)

    def pick(n: Optional[str], label: str, needs: tuple[str, ...]) -> Optional[dict[str, Any]]:
        pool = recipes(n, needs)
        if not pool:
            return None
        safe_pool = {k: v for k, v in pool.items() if safe(v)}
        best = max(pool, key=lambda k: mean(pool[k]))
        chosen = max(safe_pool, key=lambda k: mean(safe_pool[k])) if safe_pool else None
        ref = f"{summary['reference']}/none"
        return {"budget": label, "recipe": chosen, "per_suite": {s: pool[chosen][s]["avg"] for s in suites}
                if chosen else {}, "mean": mean(pool[chosen]) if chosen else None, "best_any": best,
                "best_any_mean": mean(pool[best]), "best_any_safe": safe(pool[best]),
                "reference_mean": mean(pool[ref]) if ref in pool else None, "candidates": sorted(pool)}

    out = [pick(None, "0", ("nothing",))]
    out += [pick(str(n), str(n), ("nothing", "samples")) for n in summary["budgets"]]
    out.append(pick(None, "labelled val", ("nothing", "labels")))
    return [r for r in out if r is not None]


def _pts(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def budget_markdown(summary: dict[str, Any]) -> str:
    """Per suite: recipes x budgets, mean accuracy and the paired gain over the merge each starts from."""
    budgets = [str(n) for n in summary["budgets"]]
    out = ["# magic-pl: unlabelled samples per task, best use", "",
           f"Mean test accuracy (%) over {summary['draws']} draws of n unlabelled samples per task (the same draws for "
           "every recipe at a given n); in brackets the gain in points over the uncalibrated merge the recipe starts "
           f"from (RegMean rows: over uncalibrated `{summary['reference']}`), * where its paired 95% bootstrap "
           "interval excludes zero. Test examples per task: "
           f"{summary['max_test'] or 'the suite split'}.", ""]
    for suite, entry in summary["suites"].items():
        runs = entry["runs"]
        recipes = list(dict.fromkeys(k for n in budgets if n in runs for k in runs[n]))
        labels = (("tuned_ta", "tuned TA"), ("tuned_lines", "tuned LiNeS"))
        refs = [f"experts {100 * entry['experts']:.1f}"] + [
            f"{label} {100 * entry[key]:.1f}" for key, label in labels if entry.get(key) is not None]
        out += [f"## {suite} ({len(entry['tasks'])} tasks; {', '.join(refs)})", "",
                "| recipe | " + " | ".join(f"n={n}" for n in budgets if n in runs) + " | seconds (n=max) |",
                "|---|" + "---|" * (sum(n in runs for n in budgets) + 1)]
        for k in recipes:
            cells = []
            for n in budgets:
                if n not in runs:
                    continue
                e = runs[n].get(k)
                if e is None:
                    cells.append("-")
                    continue
                ci = e.get("gain_ci95")
                star = "*" if ci and (ci[0] > 0 or ci[1] < 0) else ""
                cells.append(f"{100 * e['avg']:.1f} ({_pts(e['gain'])}{star})")
            last = next(runs[n][k] for n in reversed(budgets) if n in runs and k in runs[n])
            out.append(f"| {k} | " + " | ".join(cells) + f" | {last.get('seconds', 0.0):.1f} |")
        out.append("")
        memory = entry.get("statistics_bytes")
        if memory:
            out += ["Statistics held (MB, the same at every n): "
                    + ", ".join(f"{k} {v / 2 ** 20:.3g}" for k, v in memory.items()) + ".", ""]
    recs = budget_recommendations(summary)
    if recs and len(summary["suites"]) > 0:
        names = list(summary["suites"])
        out += ["## Recommendation per budget", "",
                "Among recipes never significantly below the merge they start from on any suite, the best mean over "
                f"the suites ({', '.join(names)}); data-free recipes count at every n. 'best of any kind': the bar.",
                "", "| unlabelled samples per task | recipe | " + " | ".join(names) + " | mean | best of any kind "
                "(mean) | uncalibrated " + summary["reference"] + " |", "|---|---|" + "---|" * (len(names) + 3)]
        for r in recs:
            cells = [f"{100 * r['per_suite'][s]:.1f}" if r["recipe"] else "-" for s in names]
            best = f"{r['best_any']} ({100 * r['best_any_mean']:.1f}{'' if r['best_any_safe'] else ', not safe'})"
            ref = "-" if r["reference_mean"] is None else f"{100 * r['reference_mean']:.1f}"
            mean = "-" if r["mean"] is None else f"{100 * r['mean']:.1f}"
            out.append(f"| {r['budget']} | {r['recipe'] or '-'} | " + " | ".join(cells) + f" | {mean} | {best} | "
                       f"{ref} |")
        out.append("")
    return "\n".join(out) + "\n"


def budget_chart(summary: dict[str, Any], path: Path) -> None:
    """Accuracy against n (log scale) per recipe, one panel per suite: one colour per merge, one line style and marker
    per setting; a data-free recipe measured at one n is drawn flat (it is the same at every n); tuned TA dashed and
    tuned LiNeS dotted in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from magic_pl.statedict import atomic_path

    suites = summary["suites"]
    recipes = [r for e in suites.values() for n in e["runs"] for r in e["runs"][n].values()]
    methods = list(dict.fromkeys(r["method"] for r in recipes))
    settings = list(dict.fromkeys(r["calibration"] for r in recipes))
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: colours(i % colours.N) for i, m in enumerate(methods)}
    styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "v"), ("-", "D"), ("--", "x"), ("-.", "P"), (":", "*")]
    style = {c: styles[i % len(styles)] for i, c in enumerate(settings)}
    legend_width = 4.0  # inches on the right for the shared legend
    width = 6.5 * len(suites) + legend_width
    fig, axes = plt.subplots(1, len(suites), figsize=(width, 4.5), dpi=120, squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (suite, entry) in zip(axes[0], suites.items()):
        runs = entry["runs"]
        ns = [int(n) for n in runs]
        for k in dict.fromkeys(k for n in runs for k in runs[n]):
            pts = [(int(n), 100 * runs[n][k]["avg"]) for n in runs if k in runs[n]]
            first = next(runs[n][k] for n in runs if k in runs[n])
            # labelled references are the black lines below; the label-free selection is a choice, not a recipe
            if first["needs"] in ("labels", "selection"):
                continue
            if len(pts) == 1 and first["needs"] == "nothing" and len(ns) > 1:
                pts = [(n, pts[0][1]) for n in ns]
            ls, marker = style[first["calibration"]]
            (line,) = ax.plot(*zip(*pts), ls=ls, marker=marker, ms=3.5, lw=1.2, c=colour[first["method"]], label=k)
            handles.setdefault(k, line)
        for key, ls, name in (("tuned_ta", "--", "tuned TA (labelled val)"),
                              ("tuned_lines", ":", "tuned LiNeS (labelled val)")):
            if entry.get(key) is not None:
                handles.setdefault(name, ax.axhline(100 * entry[key], ls=ls, c="k", lw=1, label=name))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("unlabelled samples per task")
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(suite)
        ax.grid(alpha=0.3)
    # one legend for every panel: a recipe measured on one suite only still gets its entry
    fig.legend(list(handles.values()), list(handles), fontsize=6, ncol=2, loc="center right")
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - legend_width / width, 1.0))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m magic_pl.zoo.budget [--suites ...] [--budgets ...] ...``"""
    from magic_pl.zoo.report import function_options

    options = function_options(run_budget_study, "python -m magic_pl.zoo.budget", argv)
    run_budget_study(**options)
    print(open(Path(options.get("results_dir") or "results/budget") / "budget.md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
