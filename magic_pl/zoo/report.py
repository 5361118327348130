"""Benchmark reports: markdown tables, CSV, JSON, a PNG chart and the calibration reports (every file atomic)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from magic_pl.jsonable import jsonable
from magic_pl.statedict import atomic_path

__all__ = ["write_reports", "markdown_report", "csv_report", "chart"]

_CAL_LABEL = {"none": "none", "wsc": "WSC", "fsc": "FSC", "dsc": "DSC", "bn": "BN re-est.", "bn+fsc": "BN + FSC",
              "svc": "SVC", "svc_fsc": "SVC + FSC", "lines": "LiNeS", "lines_fsc": "LiNeS + FSC"}
#: Rows tuned on the labelled validation split: key -> (label, how the chosen point is written).
_TUNED = {("task_arithmetic_tuned", "none"): ("task_arithmetic, scale tuned on val", lambda r: f"scale {r['scale']}"),
          ("task_arithmetic_tuned", "bn"): ("task_arithmetic, scale tuned on val, BN re-est.",
                                            lambda r: f"scale {r['scale']}"),
          ("lines_tuned", "lines"): ("task_arithmetic + LiNeS, (alpha, beta) tuned on val",
                                     lambda r: f"alpha {r['lines_alpha']:.3g}, beta {r['lines_beta']:.3g}")}


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _pct(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{digits}f}"


def _cell(row: Mapping[str, Any] | None, key: str = "avg") -> str:
    if row is None:
        return "-"
    s = _pct(row[key])
    std = row.get(f"{key}_std", 0.0)
    if row.get("draws", 1) > 1:
        s += f" ± {100 * std:.1f}"
    return s


def _index(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r["method"], r["calibration"]): r for r in rows}


def _calibrations(result: Mapping[str, Any]) -> list[str]:
    cals = list(result["config"]["calibrations"])
    if result.get("batchnorm") and result["config"].get("bn_reestimate"):
        cals += ["bn", "bn+fsc"]
    return cals


def _cal_header(c: str, result: Mapping[str, Any]) -> str:
    n = result["config"]["n_calib"]
    label = _CAL_LABEL.get(c, c)
    if c in ("fsc", "dsc", "bn+fsc"):
        label += f" n={n}"
    return label


def _main_table(result: Mapping[str, Any], key: str) -> list[str]:
    rows = _index(result["rows"])
    cals = _calibrations(result)
    lines = ["| method | " + " | ".join(_cal_header(c, result) for c in cals) + " |",
             "|---|" + "---|" * len(cals)]
    for m in result["config"]["methods"]:
        lines.append(f"| {m} | " + " | ".join(_cell(rows.get((m, c)), key) for c in cals) + " |")
    for row_key, (label, point) in _TUNED.items():
        r = rows.get(row_key)
        if r is not None:
            lines.append(f"| {label} ({point(r)}) | {_cell(r, key)} |" + " |" * (len(cals) - 1))
    for m, label in (("base", "base encoder + task heads"), ("expert", "experts, each on its own task (ceiling)")):
        r = rows.get((m, "none"))
        if r is not None:
            lines.append(f"| {label} | {_cell(r, key)} |" + " |" * (len(cals) - 1))
    return lines


def markdown_report(result: Mapping[str, Any]) -> str:
    """The human-readable report (tables in %; FSC/DSC cells are mean ± std over calibration draws)."""
    cfg = result["config"]
    names = cfg["tasks"]
    rows = _index(result["rows"])
    cals = _calibrations(result)
    v = result["versions"]
    t = result["timings"]
    own = "model" in result  # a run on the user's own experts (magic_pl.zoo.own): no suite, splits or fine-tuning
    out = [f"# magic-pl benchmark: `{result['suite']}`", "", result["description"] + ".", ""]
    draws = cfg["draws"]
    if own:
        src = ("the test sets (no calibration sets given: the paper's protocol)" if cfg["calibration_from_test"]
               else "the data module's calibration sets")
        out += [f"Average test accuracy (%) over {len(names)} tasks; merged body + each task's own head. Rows that "
                f"use data (FSC/DSC): {cfg['n_calib']} unlabelled sample(s) per task from {src}, mean ± std over "
                f"{draws} draws (data seeds {', '.join(map(str, cfg['draw_seeds']))}).", ""]
    else:
        src = "the test split (paper protocol)" if cfg["calibration_from_test"] else "a disjoint unlabelled split"
        out += [
            f"Average test accuracy (%) over {len(names)} tasks; merged encoder + each task's own head. FSC/DSC: "
            f"{cfg['n_calib']} unlabelled sample(s) per task from {src}, mean ± std over {draws} draws. "
            f"Sensitive set: {cfg['sensitive']}."
            + (f" BatchNorm: experts fine-tuned with {cfg['finetune'].get('batchnorm', 'train')} statistics; merges "
               f"take the {cfg['bn_stats']} of the experts' statistics." if result.get("batchnorm") else ""),
            "",
        ]
    out += _main_table(result, "avg")
    out += ["", "### Normalised accuracy (% of each expert's accuracy on its task, averaged)", ""]
    out += _main_table(result, "avg_normalized")
    gains = result["gains"]["over_uncalibrated"]
    gcals = [c for c in cals if c != "none"]
    if gains:
        cis = result["gains"].get("over_uncalibrated_ci95", {})
        out += ["", "### Gain over the uncalibrated merge (average accuracy, points; paired 95% bootstrap interval)",
                "", "| method | " + " | ".join(_cal_header(c, result) for c in gcals) + " |",
                "|---|" + "---|" * len(gcals)]

        def gain_cell(m: str, c: str) -> str:
            g = gains[m]
            if c not in g:
                return "-"
            ci = cis.get(m, {}).get(c)
            return f"{100 * g[c]:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")

        for m in gains:
            out.append(f"| {m} | " + " | ".join(gain_cell(m, c) for c in gcals) + " |")
        mean = result["gains"]["mean_over_methods"]
        out.append("| **mean** | " + " | ".join(f"{100 * mean[c]:+.1f}" if c in mean else "-" for c in gcals) + " |")
    tuned = rows.get(("task_arithmetic_tuned", "none"))
    if tuned is not None:
        out += ["", f"Best calibrated merge vs Task Arithmetic tuned on the validation split "
                    f"({_pct(tuned['avg'])}, scale {tuned['scale']}): "]
        tuned_rows = ("base", "expert") + tuple(m for m, _ in _TUNED)
        best = max((r for r in result["rows"] if r["method"] not in tuned_rows and r["calibration"] != "none"),
                   key=lambda r: r["avg"], default=None)
        if best is not None:
            ci = result["gains"].get("over_tuned_ta_ci95", {}).get(best["method"], {}).get(best["calibration"])
            out[-1] += (f"{best['method']} + {_CAL_LABEL.get(best['calibration'], best['calibration'])} "
                        f"{_pct(best['avg'])} ({100 * (best['avg'] - tuned['avg']):+.1f} points"
                        + (f", paired 95% interval [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "") + ").")
    out += ["", "### Per-task accuracy (%)", "",
            "| method | calibration | " + " | ".join(names) + " | avg | 95% CI (avg) |",
            "|---|---|" + "---|" * (len(names) + 2)]
    for r in result["rows"]:
        ci = r.get("avg_ci95") or [float("nan")] * 2
        out.append(f"| {r['method']} | {_CAL_LABEL.get(r['calibration'], r['calibration'])} | "
                   + " | ".join(_pct(r["per_task"][n]) for n in names)
                   + f" | {_pct(r['avg'])} | {_pct(ci[0])}-{_pct(ci[1])} |")
    if own:
        return "\n".join(out + _own_sections(result)) + "\n"
    out += ["", "### Tasks", "", "| task | classes | train | calib | val | test | chance | majority | base | expert |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    base, expert = rows.get(("base", "none")), rows.get(("expert", "none"))
    for task in result["tasks"]:
        s = task["splits"]
        n = task["name"]
        out.append(f"| {n} | {len(task['classes'])} | {s['train']['size']} | {s['calib']['size']} | "
                   f"{s['val']['size']} | {s['test']['size']} | {_pct(task['chance'])} | {_pct(task['majority'])} | "
                   f"{_pct(base['per_task'][n]) if base else '-'} | {_pct(expert['per_task'][n]) if expert else '-'} |")
    ft = cfg["finetune"]
    cached = all(e.get("cached") for e in result["experts"].values())
    out += [
        "",
        "### Setup",
        "",
        f"- Backbone: `{cfg['backbone'].get('backbone')}` ("
        + (f"weights sha256 `{cfg['backbone']['weights_sha256'][:12]}…`" if cfg["backbone"].get("weights_sha256")
           else f"base from our pretext: {cfg['backbone'].get('pretext', '?')}")
        + f"). Experts: {ft['steps']} steps, batch "
        f"{ft['batch_size']}, AdamW lr {ft['lr']}, head `{ft['head']}`, seed {ft['seed']} "
        f"({'loaded from the cache' if cached else 'fine-tuned in this run'}: `{result['expert_cache']}`).",
        f"- Merges: {', '.join(cfg['methods'])} (magic_pl.merging defaults); calibration settings: "
        + ", ".join(f"`{c}` = `{_setting_string(s)}`" for c, s in cfg["settings"].items()) + ".",
        f"- Timings (s): data {t.get('data_seconds')}, experts {t.get('experts_seconds')}, evaluation "
        f"{t.get('evaluate_seconds')}, total {t.get('total_seconds')} on {cfg['device']} with "
        f"{cfg['threads']} threads ({_trainer_line(cfg.get('trainer'))}).",
        f"- Versions: magic-pl {v.get('magic-pl', '?')}, torch {v.get('torch')}, transformers "
        f"{v.get('transformers', '-')}, Python {v.get('python')}.",
        f"- Reproduce: `python -m magic_pl.zoo --suite {result['suite']}"
        + (f" --n_calib {cfg['n_calib']}" if cfg["n_calib"] != 1 else "")
        + (f" --sensitive {cfg['sensitive']}" if cfg["sensitive"] != "none" else "") + "`.",
    ]
    return "\n".join(out) + "\n"


def _own_sections(result: Mapping[str, Any]) -> list[str]:
    """The tasks and setup sections of a run on the user's own experts (:mod:`magic_pl.zoo.own`)."""
    cfg, model, t, v = result["config"], result["model"], result["timings"], result["versions"]
    rows = _index(result["rows"])
    base, expert = rows.get(("base", "none")), rows.get(("expert", "none"))
    out = ["", "### Tasks", "", "| task | classes | calibration pool | test | chance | majority | base | expert |",
           "|---|---|---|---|---|---|---|---|"]
    for task in result["tasks"]:
        n = task["name"]
        out.append(f"| {n} | {task['classes'] or '-'} | {task['calibration_pool'] or '-'} | {task['test']} | "
                   f"{_pct(task['chance'])} | {_pct(task['majority'])} | "
                   f"{_pct(base['per_task'][n]) if base else '-'} | {_pct(expert['per_task'][n]) if expert else '-'} |")
    options = {m: {k: o for k, o in opts.items() if k != "seed"} for m, opts in cfg["merge_options"].items()}
    merges = ", ".join(m + (f" `{options[m]}`" if options.get(m) else "") for m in cfg["methods"])
    experts = ", ".join(f"{n} <- `{p}`" for n, p in model["experts"].items())
    out += [
        "",
        "### Setup",
        "",
        f"- Model: `{model['adapter']}`, base `{model['base']}`; experts: {experts}.",
        f"- Merges: {merges} (other options: magic_pl.merging defaults; seed {cfg['seed']}); calibration settings: "
        + ", ".join(f"`{c}` = `{_setting_string(s)}`" for c, s in cfg["settings"].items()) + ".",
        f"- Timings (s): loading {t.get('load_seconds')}, evaluation {t.get('evaluate_seconds')}, total "
        f"{t.get('total_seconds')} on {cfg['device']} with {cfg['threads']} threads "
        f"({_trainer_line(cfg.get('trainer'))}).",
        f"- Versions: magic-pl {v.get('magic-pl', '?')}, torch {v.get('torch')}, transformers "
        f"{v.get('transformers', '-')}, Python {v.get('python')}.",
        "- Reproduce a row with `magic-pl calibrate` (the same adapter under `model.init_args.adapter`, the same "
        "data): `--merge_method M --merge_options <results.json: config.merge_options.M> --calibration C`; for a row "
        f"that uses data, draw d: `--data.init_args.samples_per_task {cfg['n_calib']} --data.init_args.seed "
        "<data seed d>`.",
    ]
    return out


def _setting_string(setting: Mapping[str, Any]) -> str:
    from magic_pl.calibration import resolve_setting

    return resolve_setting(dict(setting)).to_string()


def _trainer_line(trainer: Optional[Mapping[str, Any]]) -> str:
    if not trainer:
        return "plain torch"
    return (f"Lightning Trainer: {trainer['accelerator']}, {trainer['strategy']}, {trainer['world_size']} "
            f"process(es)")


def csv_report(result: Mapping[str, Any]) -> str:
    """One line per (method, calibration): per-task accuracies, average, std over draws, 95% CI, normalised."""
    names = result["config"]["tasks"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "calibration", "draws", *names, "avg", "avg_std", "avg_ci95_low", "avg_ci95_high",
                "avg_normalized", "avg_normalized_std", "calibration_seconds", "eval_seconds"])
    for r in result["rows"]:
        ci = r.get("avg_ci95") or [float("nan")] * 2
        w.writerow([r["method"], r["calibration"], r["draws"], *[f"{r['per_task'][n]:.4f}" for n in names],
                    f"{r['avg']:.4f}", f"{r['avg_std']:.4f}", f"{ci[0]:.4f}", f"{ci[1]:.4f}",
                    f"{r.get('avg_normalized', float('nan')):.4f}", f"{r.get('avg_normalized_std', 0.0):.4f}",
                    f"{r['calibration_seconds']:.2f}", f"{r['eval_seconds']:.2f}"])
    return buf.getvalue()


def chart(result: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: methods x calibrations (average accuracy, std over draws), with base/expert/tuned-TA lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = _index(result["rows"])
    methods = result["config"]["methods"]
    cals = _calibrations(result)
    width = 0.8 / max(1, len(cals))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(methods) + 2), 4.2), dpi=120)
    x = np.arange(len(methods))
    for j, c in enumerate(cals):
        vals = [100 * rows[(m, c)]["avg"] if (m, c) in rows else np.nan for m in methods]
        errs = [100 * rows[(m, c)].get("avg_std", 0.0) if (m, c) in rows else 0.0 for m in methods]
        ax.bar(x + (j - (len(cals) - 1) / 2) * width, vals, width, yerr=errs, capsize=2,
               label=_cal_header(c, result))
    for (m, c), style, label in (((("base", "none")), ":", "base + heads"), (("expert", "none"), "--", "experts"),
                                 (("task_arithmetic_tuned", "none"), "-.", "TA tuned on val"),
                                 (("lines_tuned", "lines"), (0, (5, 1, 1, 1, 1, 1)), "TA + LiNeS tuned on val")):
        if (m, c) in rows:
            ax.axhline(100 * rows[(m, c)]["avg"], color="grey", linestyle=style, linewidth=1, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(methods, rotation=20, ha="right")
    ax.set_ylabel("average test accuracy (%)")
    lows = [100 * r["avg"] for r in result["rows"]]
    ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(lows) + 3))
    ax.set_title(f"magic-pl benchmark: {result['suite']} ({len(result['config']['tasks'])} tasks)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


#: The files :func:`write_reports` writes at the top of a results directory.
REPORT_FILES = {"markdown": "results.md", "csv": "results.csv", "json": "results.json", "chart": "results.png"}


def check_report_files(out_dir: Path) -> None:
    """Before any work: refuse a results directory whose report files are the user's, not magic-pl's
    (:func:`magic_pl.output.check_files`), so a benchmark never fails only once it is done."""
    from magic_pl.output import check_files

    check_files([Path(out_dir) / name for name in REPORT_FILES.values()])


def write_reports(result: dict[str, Any], reports: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Write ``results.md``, ``results.csv``, ``results.json``, ``results.png`` and ``calibration/*.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {key: out_dir / name for key, name in REPORT_FILES.items()}
    files["calibration"] = out_dir / "calibration"
    cal_dir = files["calibration"]
    cal_dir.mkdir(exist_ok=True)
    for key, rep in reports.items():
        _write_text(cal_dir / f"{_safe(key.replace('/', '__'))}.json", json.dumps(jsonable(rep), indent=1))
    _write_text(files["markdown"], markdown_report(result))
    _write_text(files["csv"], csv_report(result))
    chart(result, files["chart"])
    result["files"] = {k: str(v) for k, v in files.items()}
    _write_text(files["json"], json.dumps(jsonable(result), indent=1))
    return result["files"]


def write_texts(out_dir: Path, texts: Mapping[str, str]) -> None:
    """Write ``name -> text`` files under ``out_dir``, each atomically (a study rewrites them after every case)."""
    for name, text in texts.items():
        with atomic_path(Path(out_dir) / name) as tmp:
            Path(tmp).write_text(text)


def function_options(fn: Any, prog: str, argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The command line of a study: ``fn``'s keywords as flags plus ``--config`` (a YAML of them), parsed."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=(fn.__doc__ or prog).strip().splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(fn, as_positional=False)
    cfg = parser.parse_args(list(argv) if argv is not None else None)
    return {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
