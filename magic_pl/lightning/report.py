"""The calibration record and its files: JSON (xi, magnitude deviation, modules, inputs with hashes, config, timings)
and a PNG plot (docs/method.md).

*Magnitude deviation* of module ``l`` is ``||theta_l - theta0_l|| / mean_k ||tau_k,l||`` (Frobenius norm over the
module's floating tensors): 1 means the merged update is as large as an average expert's. Averaging shrinks it
(about ``1/sqrt(K)`` for orthogonal task vectors); MAGIC's calibration moves it back (Li et al., arXiv 2512.19320).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.calibration._names import module_of as _owner
from magic_pl.calibration.fsc import CalibrationResult
from magic_pl.calibration.sharding import is_sharded, local_part, sum_over_shards
from magic_pl.jsonable import jsonable
from magic_pl.output import sha256_path
from magic_pl.statedict import atomic_path, is_mergeable

__all__ = [
    "CalibrationRecord",
    "module_of",
    "module_sq_norms",
    "delta_norms",
    "expert_norms",
    "relative_deviation",
    "describe_source",
    "sha256_path",
    "sha256_state",
    "write_json",
    "plot_record",
    "xi_summary",
    "comparison_line",
    "pairing_line",
    "selection_line",
]


#: Module name used for tensors owned directly by the root module (e.g. a ViT's ``cls_token``).
ROOT = "(root)"


def module_of(key: str) -> str:
    """The owning module's name as reports show it: ``"a.b.weight" -> "a.b"``, :data:`ROOT` for a top-level tensor
    (the calibration core's :func:`~magic_pl.calibration._names.module_of`, with the root named)."""
    return _owner(key) or ROOT


def module_sq_norms(items: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    """Sum of squared entries per owning module, in float64 (first-seen module order)."""
    out: dict[str, float] = {}
    for key, t in items:
        m = module_of(key)
        out[m] = out.get(m, 0.0) + float(t.detach().double().pow(2).sum())
    return out


def _float_keys(state: Mapping[str, Tensor]) -> list[str]:
    return [k for k in state if is_mergeable(state[k])]


def delta_norms(current: Mapping[str, Tensor], base: Mapping[str, Tensor], keys: Optional[Sequence[str]] = None
                ) -> dict[str, float]:
    """``||current_l - base_l||`` per module over the shared floating keys (``keys``: restrict to these)."""
    keys = list(keys) if keys is not None else [k for k in _float_keys(current) if k in base]
    if not any(is_sharded(current[k]) for k in keys):
        def diffs() -> Iterable[tuple[str, Tensor]]:
            for k in keys:
                c = current[k]
                yield k, c.double() - base[k].to(c.device).double()

        return {m: math.sqrt(v) for m, v in module_sq_norms(diffs()).items()}
    # sharded weights (FSDP2): each rank sums its shards' squares, then one all-reduce over the shards
    local = []
    for k in keys:
        c, b = local_part(current[k], base[k])
        local.append(float((c.double() - b.to(c.device).double()).pow(2).sum()))
    totals = sum_over_shards(torch.tensor(local, dtype=torch.float64), [current[k] for k in keys]).tolist()
    out: dict[str, float] = {}
    for k, v in zip(keys, totals):
        out[module_of(k)] = out.get(module_of(k), 0.0) + v
    return {m: math.sqrt(v) for m, v in out.items()}


def expert_norms(task_vectors: Sequence[Mapping[str, Tensor]], keys: Optional[Sequence[str]] = None
                 ) -> dict[str, float]:
    """``mean_k ||tau_k,l||`` per module (reads each task vector key by key; lazy task vectors stream)."""
    totals: dict[str, float] = {}
    for tv in task_vectors:
        ks = list(keys) if keys is not None else list(tv.keys())
        for m, v in module_sq_norms((k, tv[k]) for k in ks).items():
            totals[m] = totals.get(m, 0.0) + math.sqrt(v)
    n = max(len(task_vectors), 1)
    return {m: v / n for m, v in totals.items()}


def relative_deviation(norms: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """``norms[m] / reference[m]`` for modules with a non-zero reference."""
    return {m: v / reference[m] for m, v in norms.items() if reference.get(m, 0.0) > 0.0}


# --------------------------------------------------------------------------------------------------------------------
# Inputs and hashes
# --------------------------------------------------------------------------------------------------------------------
def sha256_state(state: Mapping[str, Tensor]) -> str:
    """sha256 of a state dict's keys, dtypes, shapes and bytes (in key order)."""
    h = hashlib.sha256()
    for k in state:
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def describe_source(source: Any, *, hash_contents: bool = True) -> dict[str, Any]:
    """JSON description of a checkpoint source: path + sha256, a module/mapping + content hash, or a hub name."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.exists():
            return {"path": str(p.resolve()), "sha256": sha256_path(p) if hash_contents else None}
        return {"name": str(source), "sha256": None, "note": "not a local path (hub name?): not hashed"}
    if isinstance(source, nn.Module):
        state = {k: v for k, v in source.state_dict().items()}
        return {"module": type(source).__name__, "sha256": sha256_state(state) if hash_contents else None}
    if isinstance(source, Mapping):
        desc: dict[str, Any] = {"state_dict": type(source).__name__, "tensors": len(source)}
        files = sorted({str(p) for p in getattr(source, "_weight_map", {}).values()})
        if files:
            desc["files"] = [{"path": f, "sha256": sha256_path(f) if hash_contents else None} for f in files]
        elif hash_contents:
            desc["sha256"] = sha256_state(source)
        return desc
    return {"repr": repr(source)[:200]}


# --------------------------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationRecord:
    """What the merge and calibration steps did, filled in by them as they run (one per calibrated model).

    Steps append ``{"step": name, "seconds": s, ...}`` to ``steps``. ``deviation_before`` is the magnitude deviation
    of the model before any calibration (the merged model), ``deviation_after`` that of the final model. ``fsc`` holds
    the calibration core's :class:`~magic_pl.calibration.CalibrationResult` once FSC has folded (its coefficients and
    module lists are exposed as read-only attributes); ``wsc_scales`` the mean WSC row scale per tensor.
    """

    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)  # raw base/experts sources, described when written
    task_names: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    fsc: Optional[CalibrationResult] = None
    wsc_scales: dict[str, float] = field(default_factory=dict)
    expert_norms: dict[str, float] = field(default_factory=dict)
    deviation_before: dict[str, float] = field(default_factory=dict)
    deviation_after: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    comparison: Optional[dict[str, Any]] = None

    def add_step(self, step: str, seconds: float, **details: Any) -> None:
        self.steps.append({"step": step, "seconds": round(float(seconds), 6), **details})

    def set_fold(self, report: CalibrationResult) -> None:
        """Keep the FSC :class:`~magic_pl.calibration.CalibrationResult` (and its WSC scales, for DSC)."""
        self.fsc = report
        if report.wsc_scales:
            self.wsc_scales = dict(report.wsc_scales)

    @property
    def coefficients(self) -> dict[str, float]:
        """FSC xi per module (empty before FSC)."""
        return self.fsc.coefficients if self.fsc is not None else {}

    def _modules(self, name: str) -> list[str]:
        return list(getattr(self.fsc, name)) if self.fsc is not None else []

    folded = property(lambda self: self._modules("folded"), doc="modules folded by FSC")
    wrapped = property(lambda self: self._modules("wrapped"), doc="modules wrapped at runtime by FSC")
    unchanged = property(lambda self: self._modules("unchanged"), doc="modules with xi == 1")
    uncalibrated = property(lambda self: self._modules("uncalibrated"), doc="changed keys no module owns")
    sensitive = property(lambda self: self._modules("sensitive"), doc="modules capped as magnitude-sensitive")

    @property
    def task_ratios(self) -> dict[str, list[Optional[float]]]:
        return dict(self.fsc.task_ratios) if self.fsc is not None else {}

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.steps:
            out[s["step"]] = out.get(s["step"], 0.0) + float(s["seconds"])
        out["total"] = sum(out.values())
        return out

    def pairing(self) -> list[dict[str, str]]:
        """Which expert was taken for which task (experts pair with task names by position)."""
        experts = self.sources.get("experts") or []
        return [{"task": t, "expert": str(e) if isinstance(e, (str, os.PathLike)) else f"expert {i} (in memory)"}
                for i, (t, e) in enumerate(zip(self.task_names, experts))]

    def to_dict(self, *, hash_inputs: bool = True) -> dict[str, Any]:
        if self.sources:  # described (and hashed) once, then kept: reports are rewritten after test
            base = self.sources.get("base")
            experts = self.sources.get("experts") or []
            if base is not None and "base" not in self.inputs:
                self.inputs["base"] = describe_source(base, hash_contents=hash_inputs)
            if experts and "experts" not in self.inputs:
                self.inputs["experts"] = [describe_source(e, hash_contents=hash_inputs) for e in experts]
        inputs = dict(self.inputs)
        before, after = self.deviation_before, self.deviation_after

        def summary(d: Mapping[str, float]) -> Optional[float]:
            return sum(d.values()) / len(d) if d else None

        xi = list(self.coefficients.values())
        doc = {
            "format": "magic-pl/calibration-report",
            "version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": {"python": platform.python_version(), "torch": torch.__version__},
            "task_names": self.task_names,
            "pairing": self.pairing(),
            "config": self.config,
            "inputs": inputs,
            "timings": self.timings(),
            "steps": self.steps,
            "coefficients": self.coefficients,
            "coefficient_summary": (
                {"min": min(xi), "max": max(xi), "mean": sum(xi) / len(xi), "modules": len(xi)} if xi else {}
            ),
            "modules": {
                "folded": self.folded, "wrapped": self.wrapped, "unchanged": self.unchanged,
                "uncalibrated": self.uncalibrated, "sensitive": self.sensitive,
            },
            "task_ratios": self.task_ratios,
            "fsc_settings": ({k: getattr(self.fsc, k) for k in ("mode", "norm", "rounds", "statistic", "granularity",
                                                                 "gate")} if self.fsc is not None else {}),
            "wsc_scales": self.wsc_scales,
            "magnitude_deviation": {
                "definition": "||theta_l - theta0_l|| / mean_k ||tau_k,l|| per module",
                "before": before, "after": after,
                "mean_before": summary(before), "mean_after": summary(after),
            },
            "metrics": self.metrics,
            "comparison": jsonable(self.comparison) if self.comparison is not None else None,
            "outputs": self.outputs,
        }
        return jsonable(doc)


def write_report(record: CalibrationRecord, trainer: Any, path: Union[str, os.PathLike], *, hash_inputs: bool = True,
                 plot: bool = True, config: Optional[Mapping[str, Any]] = None,
                 timings: Optional[Mapping[str, float]] = None) -> Path:
    """Write the calibration report of ``record``: ``path`` (JSON: the record, ``config`` merged into its
    configuration, the trainer's processes, strategy, accelerator and precision, and extra ``timings``) and, with
    ``plot``, the PNG beside it. The one report writer of ``MagicTrainer.calibrate`` and the ``CalibrationReport``
    callback. Returns ``path``."""
    doc = record.to_dict(hash_inputs=hash_inputs)
    doc["config"] = {**doc.get("config", {}), **dict(config or {}),
                     "trainer": {"world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                                 "strategy": type(trainer.strategy).__name__,
                                 "accelerator": type(trainer.accelerator).__name__,
                                 "precision": str(trainer.precision)}}
    doc["timings"].update(timings or {})
    path = write_json(doc, path)
    if plot:
        plot_record(record, path.with_suffix(".png"))
    return path


def write_json(doc: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write ``doc`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def plot_record(record: CalibrationRecord, path: Union[str, os.PathLike], *, title: Optional[str] = None) -> Path:
    """PNG with xi per module (top) and the magnitude deviation before/after per module (bottom); Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(11, 7), constrained_layout=True)
    ax1, ax2 = fig.subplots(2, 1)
    names = list(record.coefficients)
    if names:
        ax1.plot(range(len(names)), [record.coefficients[n] for n in names], marker=".", lw=1, label="xi (FSC)")
        wrapped = set(record.wrapped)
        wi = [i for i, n in enumerate(names) if n in wrapped]
        if wi:
            ax1.scatter(wi, [record.coefficients[names[i]] for i in wi], color="tab:red", zorder=3, label="wrapped")
        ax1.legend(loc="best", fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no feature space calibration", ha="center", va="center", transform=ax1.transAxes)
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("xi")
    ax1.set_title(title or "MAGIC calibration coefficient per module")
    _ticks(ax1, names)
    mods = list(record.deviation_before) or list(record.deviation_after)
    if mods:
        if record.deviation_before:
            ax2.plot(range(len(mods)), [record.deviation_before.get(m, float("nan")) for m in mods], marker=".",
                     lw=1, label="before calibration (merged)")
        if record.deviation_after:
            ax2.plot(range(len(mods)), [record.deviation_after.get(m, float("nan")) for m in mods], marker=".",
                     lw=1, label="after calibration")
        ax2.legend(loc="best", fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no magnitude data", ha="center", va="center", transform=ax2.transAxes)
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("||theta - theta0|| / mean_k ||tau_k||")
    ax2.set_title("magnitude deviation per module")
    _ticks(ax2, mods)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _ticks(ax: Any, names: Sequence[str], max_labels: int = 48) -> None:
    if not names:
        return
    if len(names) <= max_labels:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel(f"module index (0..{len(names) - 1}, forward registration order)")


def comparison_line(comparison: dict[str, Any]) -> str:
    """``"accuracy: calibrated 0.681, uncalibrated merge 0.622 (gain +0.059, 95% CI [+0.031, +0.087]); experts on
    their own tasks 0.912"``: what the calibration did, next to what the run started from."""
    def avg(metrics: Any) -> str:
        value = (metrics or {}).get("test/acc/avg")
        return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"

    experts = [v for v in (comparison.get("experts_on_own_task") or {}).values() if isinstance(v, (int, float))]
    ci = comparison.get("gain_ci95")
    interval = f", 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and None not in ci else ""
    gain = comparison.get("gain")
    gain_text = f"gain {gain:+.3f}{interval}" if isinstance(gain, (int, float)) else "gain n/a"
    expert_text = f"{sum(experts) / len(experts):.3f}" if experts else "n/a"
    return (f"accuracy: calibrated {avg(comparison.get('calibrated'))}, uncalibrated merge "
            f"{avg(comparison.get('uncalibrated'))} ({gain_text}); experts on their own tasks {expert_text}")


def pairing_line(pairing: Sequence[dict[str, str]]) -> str:
    """``"tasks: a <- experts/a.safetensors, b <- experts/b.safetensors"``: experts pair with tasks by position, so the
    run says which it took for which."""
    return "tasks: " + ", ".join(f"{p['task']} <- {p['expert']}" for p in pairing)


def xi_summary(doc: dict[str, Any]) -> str:
    """``"xi: 24 modules, mean 1.31, min 0.92, max 1.84"`` from a calibration report's coefficients (or what was done
    instead when there are none)."""
    xi = [float(v) for v in (doc.get("coefficients") or {}).values()]
    if xi:
        return (f"xi: {len(xi)} modules, mean {sum(xi) / len(xi):.3g}, min {min(xi):.3g}, max {max(xi):.3g}")
    scales = doc.get("wsc_scales") or {}
    if scales:
        vals = [float(v) for v in scales.values()]
        return (f"xi: none (no feature space calibration); WSC rescaled {len(vals)} tensors, mean row scale "
                f"{sum(vals) / len(vals):.3g}")
    rewritten = (doc.get("modules") or {}).get("folded") or []
    if rewritten:  # a feature step without coefficients (FeatCal rewrites weights in closed form)
        from magic_pl.calibration.steps import STEPS

        steps = (doc.get("config") or {}).get("calibration_setting", {}).get("steps", [])
        name = next((s.get("step") for s in steps if isinstance(s, Mapping)
                     and getattr(STEPS.get(s.get("step")), "kind", "") == "feature"), "the feature step")
        return f"xi: none ({name} rewrote {len(rewritten)} modules in closed form)"
    return "xi: none (no calibration applied)"


def selection_line(selection: Mapping[str, Any], shown: int = 3) -> str:
    """``"selected: ties@dsc (distance to the experts 0.118; then tsv_m@dsc 0.131, ...)"``: what a label-free selection
    chose and what came next."""
    ranked = sorted(selection["scores"].items(), key=lambda kv: kv[1])
    rest = ", ".join(f"{label} {score:.3g}" for label, score in ranked[1:1 + shown])
    more = len(ranked) - 1 - shown
    return (f"selected: {ranked[0][0]} (distance to the experts {ranked[0][1]:.3g}"
            + (f"; then {rest}" if rest else "") + (f", and {more} more" if more > 0 else "") + ")")
