"""The model card (``README.md``) written next to a calibrated model: what was merged and how, the xi summary and the
measured accuracies, with Hugging Face's metadata header so the Hub shows it as a merge of the base."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from magic_pl.jsonable import jsonable
from magic_pl.lightning.report import CalibrationRecord, xi_summary

__all__ = ["model_card"]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _source(value: Any) -> str:
    return str(value) if isinstance(value, (str, os.PathLike)) else "in memory"


def model_card(record: CalibrationRecord, *, metrics: Optional[Mapping[str, float]] = None,
               recipe: Optional[str] = None, library: Optional[str] = None) -> str:
    """A model card for the model ``record`` describes.

    Args:
        record: the run's :class:`~magic_pl.lightning.report.CalibrationRecord` (merge, calibration, pairing, xi and,
            when it was evaluated, the comparison with the uncalibrated merge and the experts).
        metrics: the calibrated model's test metrics (``test/acc/<task>``), when it was evaluated.
        recipe: the recipe file's text, quoted in the card as it was given.
        library: the ``library_name`` of the metadata header (``"transformers"``, ``"timm"``); none by default.
    """
    import yaml

    config = record.config or {}
    base = record.sources.get("base")
    header: dict[str, Any] = {"tags": ["merge", "magic-pl"]}
    if library:
        header["library_name"] = library
    if isinstance(base, (str, os.PathLike)):
        header["base_model"] = str(base)
    method, options = config.get("merge_method", "?"), config.get("merge_options") or {}
    calibration = config.get("calibration")
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             "# Merged and calibrated with magic-pl", "",
             f"A training-free merge of {len(record.task_names)} fine-tuned experts into their base"
             + (f" `{base}`" if isinstance(base, (str, os.PathLike)) else "") + " with magic-pl "
             "(merging, then MAGIC magnitude calibration, arXiv 2512.19320).", "",
             f"- merge method: `{method}`" + (f", options `{jsonable(options)}`" if options else ""),
             f"- calibration: `{calibration}`" if calibration is not None else "- calibration: none",
             f"- {xi_summary({'coefficients': record.coefficients, 'wsc_scales': record.wsc_scales})}", ""]
    comparison = record.comparison or {}
    uncal = comparison.get("uncalibrated") or {}
    experts = comparison.get("experts_on_own_task") or {}
    metrics = dict(metrics or {})
    lines += ["## Tasks", "", "| task | expert | calibrated | uncalibrated merge | expert on its task |",
              "|---|---|---|---|---|"]
    for pair in record.pairing():
        task = pair["task"]
        lines.append(f"| {task} | `{_source(pair['expert'])}` | {_fmt(metrics.get(f'test/acc/{task}'))} | "
                     f"{_fmt(uncal.get(f'test/acc/{task}'))} | {_fmt(experts.get(task))} |")
    if metrics:
        gain, ci = comparison.get("gain"), comparison.get("gain_ci95")
        lines += ["", f"Average test accuracy: calibrated {_fmt(metrics.get('test/acc/avg'))}, uncalibrated merge "
                  f"{_fmt(uncal.get('test/acc/avg'))}"
                  + (f" (gain {gain:+.4f}" + (f", paired 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and None not in ci
                                                else "") + ")" if isinstance(gain, (int, float)) else "") + "."]
    else:
        lines += ["", "Not evaluated: no test data was given."]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
    lines += ["", "The calibration report (`calibration_report.json`, xi per module) is written next to this "
              "model's directory.", ""]
    return "\n".join(lines)
