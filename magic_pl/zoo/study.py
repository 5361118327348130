"""Beyond the paper: every calibration variant on every suite and number of tasks K, against the
uncalibrated merges and against Task Arithmetic with its coefficient tuned on labelled validation data.

``python -m magic_pl.zoo.study`` runs :func:`run_study` (options = its keywords) and writes, under ``results_dir``:
``study.md`` (the summary tables), ``study.json``, ``study.png`` (heat map of mean gains) and one full benchmark
report per case (``<case>/results.md`` ...). Cases reuse the benchmark's expert cache, so after the main job only
merging, calibration and evaluation run.

Per case and calibration setting the study reports the gain in average test accuracy over the same merge left
uncalibrated, averaged over the merge methods, and over tuned TA, each with a paired 95% bootstrap interval (test
examples resampled, the same resample for both rows; the gain averaged over methods is bootstrapped per example).
A setting is *safe* on a case when no method's paired interval of its gain over the uncalibrated merge lies entirely
below zero.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see magic_pl.zoo.__main__

__all__ = ["StudyCase", "DEFAULT_CASES", "STUDY_CALIBRATIONS", "run_study", "summarise_case", "study_markdown"]

#: The settings compared (presets of :data:`magic_pl.calibration.PRESETS`; the first four are the paper's).
STUDY_CALIBRATIONS: list[str] = [
    "none", "wsc", "fsc", "dsc",
    "wsc_gated", "wsc_gated_detect", "wsc_gated_detect_labelled", "wsc_norm_match", "wsc_joint",
    "fsc_sequential", "fsc_channel", "fsc_rom", "fsc_p2", "fsc_cap_detect", "fsc_gated", "fsc_rom_gated",
]  # "auto" is fsc_cap_detect (magic_pl.calibration.settings.AUTO), measured once


@dataclass
class StudyCase:
    """One measured configuration: a suite, a subset of its tasks (``None``: all) and optionally a smaller test cap
    per task (``max_test``; ``None``: the suite's)."""

    suite: str
    tasks: Optional[list[str]] = None
    label: str = ""
    max_test: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.suite}_K{len(self.tasks)}" if self.tasks else f"{self.suite}_all"


#: Text at K = 3 and K = 5 (all its tasks; 300 test examples per task to keep 1,500 per case), vision at K = 4 (all).
DEFAULT_CASES: list[StudyCase] = [
    StudyCase("text", ["rt_sentiment", "debate_party", "convention_party"], "text_K3"),
    StudyCase("text", None, "text_K5", max_test=300),
    StudyCase("vision", None, "vision_K4"),
]


def summarise_case(result: dict[str, Any]) -> dict[str, Any]:
    """Per calibration: mean gain over the uncalibrated merge and over tuned TA (with intervals), the per-method
    gains and intervals, and whether the setting is safe (see the module docstring)."""
    gains = result["gains"]
    methods = result["config"]["methods"]
    rows = {(r["method"], r["calibration"]): r for r in result["rows"]}
    tuned = rows.get(("task_arithmetic_tuned", "none"))
    out: dict[str, Any] = {"tasks": result["config"]["tasks"], "methods": methods,
                           "test_examples": sum(t["splits"]["test"]["size"] for t in result["tasks"]),
                           "tuned_ta": tuned["avg"] if tuned else None,
                           "tuned_ta_scale": tuned.get("scale") if tuned else None,
                           "experts": rows[("expert", "none")]["avg"], "base": rows[("base", "none")]["avg"],
                           "uncalibrated_mean": sum(rows[(m, "none")]["avg"] for m in methods) / len(methods),
                           "settings": {}}
    for c in result["config"]["calibrations"]:
        entry: dict[str, Any] = {
            "setting": result["config"]["settings"][c],
            "mean_avg": sum(rows[(m, c)]["avg"] for m in methods) / len(methods),
            "over_tuned_ta": gains.get("mean_over_tuned_ta", {}).get(c),
            "over_tuned_ta_ci95": gains.get("mean_over_tuned_ta_ci95", {}).get(c),
        }
        if c != "none":
            per = {m: gains["over_uncalibrated"][m][c] for m in methods}
            cis = {m: gains["over_uncalibrated_ci95"][m].get(c) for m in methods}
            entry.update({
                "over_uncalibrated": gains["mean_over_methods"][c],
                "over_uncalibrated_ci95": gains.get("mean_over_methods_ci95", {}).get(c),
                "per_method": per, "per_method_ci95": cis,
                "significantly_worse": [m for m in methods if cis[m] is not None and cis[m][1] < 0],
                "significantly_better": [m for m in methods if cis[m] is not None and cis[m][0] > 0],
            })
            entry["safe"] = not entry["significantly_worse"]
        out["settings"][c] = entry
    return out


def _pts(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _ci(ci: Optional[Sequence[float]]) -> str:
    return "" if not ci else f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _setting_string(options: dict[str, Any]) -> str:
    from magic_pl.calibration import CalibrationSetting

    return CalibrationSetting(**options).to_string()


def study_markdown(summary: dict[str, Any]) -> str:
    """The study's tables: per case, every setting's mean gain over the uncalibrated merges and over tuned TA."""
    from magic_pl.calibration.settings import AUTO

    cases = summary["cases"]
    first = next(iter(cases.values()), {"settings": {}})
    names_of_auto = [c for c, e in first["settings"].items() if _setting_string(e["setting"]) == AUTO.to_string()]
    out = ["# magic-pl study: calibration variants vs uncalibrated merges and tuned Task Arithmetic", "",
           "Gains in average test accuracy (points), averaged over the merge methods, with paired 95% bootstrap "
           "intervals. *Worse* lists the methods whose own paired interval lies below zero (a setting with none is "
           "safe on that case). Calibration samples: "
           f"{summary['n_calib']} unlabelled per task, {summary['draws']} draws. The recommended setting `auto` "
           f"(`magic_pl.calibration.settings.AUTO`) is `{AUTO.to_string()}`"
           + (f" (row {', '.join(names_of_auto)})." if names_of_auto else "."), ""]
    for label, case in cases.items():
        out += [f"## {label}: {len(case['tasks'])} tasks ({', '.join(case['tasks'])}; {case['test_examples']} test "
                f"examples)", "",
                f"Base {100 * case['base']:.1f}, experts {100 * case['experts']:.1f}, uncalibrated merges (mean over "
                f"{len(case['methods'])} methods) {100 * case['uncalibrated_mean']:.1f}, tuned TA "
                f"{100 * case['tuned_ta']:.1f} (scale {case['tuned_ta_scale']}).", "",
                "| setting | options | mean acc. | gain over uncalibrated | gain over tuned TA | worse | better |",
                "|---|---|---|---|---|---|---|"]
        for c, e in case["settings"].items():
            out.append(f"| {c} | `{_setting_string(e['setting'])}` | {100 * e['mean_avg']:.1f} | "
                       + (_pts(e.get("over_uncalibrated")) + _ci(e.get("over_uncalibrated_ci95")) if c != "none"
                          else "-")
                       + f" | {_pts(e['over_tuned_ta'])}{_ci(e['over_tuned_ta_ci95'])} | "
                       + (", ".join(e.get("significantly_worse", [])) or "-") + " | "
                       + (", ".join(e.get("significantly_better", [])) or "-") + " |")
        out.append("")
    out += ["## Across cases", "", "| setting | " + " | ".join(f"{c} vs uncal. / vs tuned TA" for c in cases)
            + " | safe everywhere |", "|---|" + "---|" * (len(cases) + 1)]
    names = list(next(iter(cases.values()))["settings"])
    for c in names:
        cells = []
        for case in cases.values():
            e = case["settings"].get(c, {})
            cells.append(f"{_pts(e.get('over_uncalibrated'))} / {_pts(e.get('over_tuned_ta'))}")
        safe = all(case["settings"].get(c, {}).get("safe", True) for case in cases.values())
        out.append(f"| {c} | " + " | ".join(cells) + f" | {'yes' if safe else 'no'} |")
    return "\n".join(out) + "\n"


def study_chart(summary: dict[str, Any], path: Path) -> None:
    """Heat map: settings x cases, mean gain over the uncalibrated merges (left) and over tuned TA (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from magic_pl.statedict import atomic_path

    cases = summary["cases"]
    names = [c for c in next(iter(cases.values()))["settings"]]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(cases), 0.38 * len(names) + 1.6), dpi=120)
    for ax, key, title in ((axes[0], "over_uncalibrated", "gain over uncalibrated (points)"),
                           (axes[1], "over_tuned_ta", "gain over tuned TA (points)")):
        grid = np.array([[100 * (case["settings"][c].get(key) or 0.0) for case in cases.values()] for c in names])
        lim = max(1.0, float(np.abs(grid).max()))
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for i in range(len(names)):
            for j in range(len(cases)):
                ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(list(cases), rotation=20)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_study(
    cases: Optional[list[StudyCase]] = None,
    calibrations: Optional[list[str]] = None,
    methods: Optional[list[str]] = None,
    n_calib: int = 1,
    draws: int = 3,
    cache_dir: Optional[str] = None,
    results_dir: str = "results/study",
    sensitive_alpha: int = 10,
    bootstrap: int = 1000,
    seed: int = 0,
    trainer: Optional[dict[str, Any]] = None,
    threads: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every case (default :data:`DEFAULT_CASES`) with every setting (default :data:`STUDY_CALIBRATIONS`) and
    write the study report. Returns the summary (also ``study.json``). ``trainer``: Lightning ``Trainer`` options
    of every case's benchmark run (see :func:`~magic_pl.zoo.runner.run_benchmark`)."""
    from magic_pl.jsonable import jsonable
    from magic_pl.zoo.report import write_texts
    from magic_pl.zoo.runner import run_benchmark

    cases = list(cases) if cases is not None else list(DEFAULT_CASES)
    calibrations = list(calibrations) if calibrations is not None else list(STUDY_CALIBRATIONS)
    if "none" not in calibrations:
        calibrations = ["none"] + calibrations
    out_dir = Path(results_dir)
    summary: dict[str, Any] = {"n_calib": n_calib, "draws": draws, "calibrations": calibrations, "cases": {},
                               "case_specs": [asdict(c) for c in cases], "timings": {}}
    for case in cases:
        result = run_benchmark(case.suite, tasks=case.tasks, methods=methods, calibrations=calibrations,
                               n_calib=n_calib, draws=draws, cache_dir=cache_dir,
                               results_dir=str(out_dir / case.label), sensitive_alpha=sensitive_alpha,
                               bn_reestimate=False, tune_ta=True, max_test=case.max_test, bootstrap=bootstrap,
                               seed=seed, trainer=trainer, threads=threads, progress=progress)
        summary["cases"][case.label] = summarise_case(result)
        summary["timings"][case.label] = result["timings"]
        summary.setdefault("versions", result["versions"])
        # after every case, so an interrupted study keeps the finished cases' summary
        write_texts(out_dir, {"study.md": study_markdown(summary),
                              "study.json": json.dumps(jsonable(summary), indent=1)})
        study_chart(summary, out_dir / "study.png")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m magic_pl.zoo.study [--cases ...] [--draws 3] ...``"""
    from magic_pl.zoo.report import function_options

    options = function_options(run_study, "python -m magic_pl.zoo.study", argv)
    if options.get("cases") is not None:
        options["cases"] = [c if isinstance(c, StudyCase) else StudyCase(**c) for c in options["cases"]]
    run_study(**options)
    print(open(Path(options.get("results_dir") or "results/study") / "study.md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
