"""Calibration settings: the one options object that says how to calibrate, and the one driver that applies it.

A :class:`CalibrationSetting` says which space to calibrate (``none``/``wsc``/``fsc``/``dsc``), which sensitive-set
policy to use, and every option of :func:`~magic_pl.calibration.wsc.weight_space_calibration` and
:class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator` that shapes the result. Every front door (Python,
``MagicModule``, the callbacks, the CLI, the streaming path, the benchmark) takes one, written as

- a preset name of :data:`PRESETS` (``"fsc"``, ``"dsc"``, ``"auto"``, ...),
- a ``"space:key=value,..."`` string (``"fsc:statistic=ratio_of_means,granularity=channel"``),
- a dict of fields (YAML: ``calibration: {space: fsc, sensitive: detect}``), or the object itself;

:func:`resolve_setting` turns each into a setting. :meth:`CalibrationSetting.calibrate` runs it on a merged model and
returns one :class:`~magic_pl.calibration.fsc.CalibrationResult` for every space; the Lightning layer runs the same
steps (:meth:`~CalibrationSetting.weight_space`, :meth:`~CalibrationSetting.feature_calibrator`,
:meth:`~CalibrationSetting.resolve_sensitive`) with statistics collected in its predict loop.

Presets (the paper's behaviour is ``"wsc"``/``"fsc"``/``"dsc"``, exactly as in MAGIC, arXiv 2512.19320):

- ``wsc_gated``: WSC with the paper's gating and an empty sensitive set (rows only grow);
  ``wsc_gated_detect`` / ``wsc_gated_detect_labelled``: gating with a sensitive set detected by the label-free or the
  labelled probe (see docs/method.md, "Magnitude-sensitive layers");
- ``wsc_norm_match`` / ``wsc_joint``: WSC that matches each row's norm to the mean task-row norm, or projects jointly;
- ``fsc_sequential``, ``fsc_channel`` (one xi per output channel), ``fsc_rom`` (ratio of means), ``fsc_p2``
  (p = 2), ``fsc_cap_detect`` (the paper's sensitive cap with a detected set), ``fsc_gated`` (WSC's rule on xi),
  ``fsc_rom_gated`` (ratio of means and WSC's rule);
- ``svc`` / ``svc_fsc``: singular value calibration (arXiv 2602.05536) as the data-free weight step, alone or
  followed by FSC;
- ``lines`` / ``lines_fsc``: LiNeS layer-increasing scaling (Wang et al., ICLR 2025) as the data-free weight step,
  alone or followed by FSC;
- ``auto``: the recommended setting; see :data:`AUTO` for what it is and the measurement behind it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.calibration.dsc import (
    Batches,
    apply_weight_space_calibration,
    feed,
    merged_task_vector,
    write_task_vector,
)
from magic_pl.calibration.fsc import (
    FSC_GATES,
    FSC_GRANULARITIES,
    FSC_MODES,
    FSC_STATISTICS,
    CalibrationResult,
    FeatureSpaceCalibrator,
    StateSource,
    _parse_norm,
    _state_of,
)
from magic_pl.calibration.lines import LAYER_PATTERNS, layer_index, lines_keys, lines_scaling
from magic_pl.calibration.wsc import WSC_VARIANTS, wsc_keys
from magic_pl.statedict import apply_delta

__all__ = ["SPACES", "SENSITIVE_POLICIES", "CalibrationSetting", "PRESETS", "AUTO", "resolve_setting",
           "detect_label_free", "SensitiveSet"]

#: Calibration spaces: nothing, weight space (data-free), feature space, both (the weight step then FSC).
SPACES: tuple[str, ...] = ("none", "wsc", "fsc", "dsc")
#: Data-free weight steps: MAGIC's WSC, SVC (singular value calibration) or LiNeS (layer-increasing scaling).
WEIGHT_METHODS: tuple[str, ...] = ("wsc", "svc", "lines")
#: Sensitive-set policies, the one meaning of "sensitive": ``none`` (WSC ungated, FSC uncapped; the default),
#: ``empty`` (the paper's gating with no sensitive tensor: WSC rows only grow), ``given`` (a set the caller passes: a
#: list of tensor/module names or a ranking JSON of :func:`~magic_pl.calibration.sensitivity.save_sensitivity`),
#: ``detect`` (the label-free probe on unlabelled calibration samples, run by :meth:`CalibrationSetting.calibrate`)
#: and ``detect_labelled`` (the paper's labelled probe; the caller runs it and passes the set). A given set also
#: serves ``detect``/``detect_labelled`` (a saved ranking is reused instead of probing again).
SENSITIVE_POLICIES: tuple[str, ...] = ("none", "empty", "given", "detect", "detect_labelled")

#: A sensitive set as callers give it: names, a ranking JSON path, or ``{policy: names}`` (several probes at once).
SensitiveSet = Union[Sequence[str], str, os.PathLike, Mapping[str, Sequence[str]], None]


@dataclass(frozen=True)
class CalibrationSetting:
    """One calibration recipe. Defaults are the paper's (MAGIC, arXiv 2512.19320).

    Attributes:
        space: ``"none"``, ``"wsc"``, ``"fsc"`` or ``"dsc"`` (``wsc``/``dsc``: the data-free weight step, then for
            ``dsc`` FSC on its result).
        weight_method: the data-free weight step: ``"wsc"`` (MAGIC's, default), ``"svc"`` (singular value
            calibration, arXiv 2602.05536 by MAGIC's authors;
            :func:`~magic_pl.calibration.svc.singular_value_calibration`) or ``"lines"`` (LiNeS, Wang et al.,
            ICLR 2025; :func:`~magic_pl.calibration.lines.lines_scaling`: the merged task vector of block ``l`` of
            ``L`` scaled by ``lines_alpha + lines_beta (l - 1) / (L - 1)``).
        svc_alpha: SVC's floor of each task's coefficient (0.1, FusionBench's setting for TA/TIES/averages).
        lines_alpha: LiNeS's factor of the first block and of everything outside the blocks. ``None`` (default): the
            paper's multi-task merging rule ``||sum_k tau_k||_1 / (K ||tau_m||_1)``
            (:func:`~magic_pl.calibration.lines.lines_alpha`), so the shallowest block gets the plain average of the
            task vectors (``1 / (lambda K)`` for Task Arithmetic with coefficient lambda). A number in [0, 1000] sets
            it.
        lines_beta: LiNeS's increase of the factor from the first to the last block, in [0, 1000] (default 0.5, the
            middle of the authors' search range [0, 1]; the paper tunes beta on labelled validation data, which the
            benchmark's ``lines_tuned`` row does).
        lines_depth: how a parameter name maps to its block: ``None`` (default: every
            :data:`~magic_pl.calibration.lines.LAYER_PATTERNS` rule, first match wins), a family name of that table
            (``"hf_encoder"``, ``"timm"``, ``"llama"``, ...) or a regex whose first group is the 0-based block index
            (a regex with a comma needs the dict form of the setting).
        wsc_variant: :data:`~magic_pl.calibration.wsc.WSC_VARIANTS` (``"paper"``).
        sensitive: :data:`SENSITIVE_POLICIES` (``"none"``).
        alpha: size of a detected sensitive set (paper: 10).
        eps: WSC's eps under the square root (1e-8).
        norm: FSC feature norm p (1).
        mode: FSC ``"parallel"`` (paper) or ``"sequential"``.
        statistic: FSC ``"mean_of_ratios"`` (paper) or ``"ratio_of_means"``.
        granularity: FSC ``"module"`` (paper) or ``"channel"``.
        gate: FSC ``"none"`` (paper) or ``"paper"`` (WSC's gating rule on xi).
    """

    space: str = "fsc"
    weight_method: str = "wsc"
    svc_alpha: float = 0.1
    lines_alpha: Optional[float] = None
    lines_beta: float = 0.5
    lines_depth: Optional[str] = None
    wsc_variant: str = "paper"
    sensitive: str = "none"
    alpha: int = 10
    eps: float = 1e-8
    norm: float = 1.0
    mode: str = "parallel"
    statistic: str = "mean_of_ratios"
    granularity: str = "module"
    gate: str = "none"

    def __post_init__(self) -> None:
        for name, value, choices in (("space", self.space, SPACES), ("weight_method", self.weight_method, WEIGHT_METHODS),
                                     ("wsc_variant", self.wsc_variant, WSC_VARIANTS),
                                     ("sensitive", self.sensitive, SENSITIVE_POLICIES), ("mode", self.mode, FSC_MODES),
                                     ("statistic", self.statistic, FSC_STATISTICS),
                                     ("granularity", self.granularity, FSC_GRANULARITIES),
                                     ("gate", self.gate, FSC_GATES)):
            if value not in choices:
                raise ValueError(f"calibration setting: {name}={value!r} is not one of {choices}")
        object.__setattr__(self, "norm", _parse_norm(self.norm))
        alpha = _number("alpha", self.alpha, lambda v: v.is_integer() and 0 <= v <= 10_000,
                        "a whole number of tensors in [0, 10000]")
        object.__setattr__(self, "alpha", int(alpha))
        object.__setattr__(self, "eps", _number("eps", self.eps, lambda v: 0 < v <= 1.0, "a finite number in (0, 1]"))
        object.__setattr__(self, "svc_alpha", _number("svc_alpha", self.svc_alpha, lambda v: 0 < v <= 1e3,
                                                      "a finite number in (0, 1000]"))
        lines_rule = "a finite number in [0, 1000]"
        if not _unset(self.lines_alpha):
            object.__setattr__(self, "lines_alpha", _number("lines_alpha", self.lines_alpha,
                                                            lambda v: 0 <= v <= 1e3, lines_rule + " or None"))
        else:
            object.__setattr__(self, "lines_alpha", None)
        object.__setattr__(self, "lines_beta", _number("lines_beta", self.lines_beta, lambda v: 0 <= v <= 1e3,
                                                       lines_rule))
        object.__setattr__(self, "lines_depth", _depth_rule(self.lines_depth))

    @property
    def uses_data(self) -> bool:
        """True for FSC and DSC (they need unlabelled samples)."""
        return self.space in ("fsc", "dsc")

    @property
    def uses_wsc(self) -> bool:
        return self.space in ("wsc", "dsc")

    @property
    def detects(self) -> bool:
        """True when the label-free probe must run (``sensitive="detect"``) unless a set is given."""
        return self.sensitive == "detect" and self.space != "none"

    def fsc_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator`."""
        return {"norm": self.norm, "mode": self.mode, "statistic": self.statistic, "granularity": self.granularity,
                "gate": self.gate}

    def wsc_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~magic_pl.calibration.wsc.weight_space_calibration`."""
        return {"variant": self.wsc_variant, "eps": self.eps}

    def to_string(self) -> str:
        """The shortest string that :func:`resolve_setting` maps back to this setting."""
        default = CalibrationSetting(space=self.space)
        diff = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self)
                if f.name != "space" and getattr(self, f.name) != getattr(default, f.name)]
        return self.space + (":" + ",".join(diff) if diff else "")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["norm"] = _fmt(self.norm)
        return out

    # --- the steps ----------------------------------------------------------------------------------------------
    def resolve_sensitive(self, given: SensitiveSet = None, detected: Optional[Sequence[str]] = None
                          ) -> Optional[list[str]]:
        """The sensitive collection WSC/FSC use under this setting's policy.

        ``given``: names, a ranking JSON path, or ``{policy: names}``; ``detected``: the set the label-free probe
        found. ``None`` means no gating and no cap; ``[]`` the paper's gating with nothing sensitive.
        """
        policy = self.sensitive
        if isinstance(given, Mapping):
            given = given.get(policy)
        if isinstance(given, (str, os.PathLike)):
            from magic_pl.calibration.sensitivity import load_sensitivity

            given = load_sensitivity(given)  # the set stored with the ranking
        if policy == "none":  # a given set turns the paper's gating and cap on
            return [str(s) for s in given] if given is not None else None
        if policy == "empty":
            if given is not None:
                raise ValueError(f"calibration {self.to_string()!r} has an empty sensitive set (sensitive='empty'); "
                                 "a given set contradicts it")
            return []
        if given is not None:
            return [str(s) for s in given]
        if policy == "detect" and detected is not None:
            return list(detected)
        raise ValueError(f"calibration {self.to_string()!r} needs a sensitive set: "
                         + ("give one (names or a ranking JSON)" if policy in ("given", "detect_labelled") else
                            "give unlabelled probe batches, or a set (names or a ranking JSON)"))

    def weight_space(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                     merged_tv: Optional[Mapping[str, Tensor]], sensitive: Optional[Collection[str]]
                     ) -> dict[str, Tensor]:
        """The data-free weight step written into ``merged`` (for ``wsc``/``dsc``; nothing otherwise): WSC (returns its
        row scales per tensor), SVC or LiNeS (return ``{}``: they rescale singular values or whole blocks, not rows;
        neither uses the sensitive set)."""
        if not self.uses_wsc:
            return {}
        if self.weight_method in ("svc", "lines"):
            tau = merged_tv if merged_tv is not None else merged_task_vector(base, merged)
            if self.weight_method == "svc":
                from magic_pl.calibration.svc import singular_value_calibration

                calibrated = singular_value_calibration(tau, task_vectors, alpha=self.svc_alpha)
                write_task_vector(base, merged, calibrated, wsc_keys(tau), "SVC-calibrated model")
            else:
                calibrated = lines_scaling(tau, beta=self.lines_beta, alpha=self.lines_alpha,
                                           task_vectors=task_vectors, depth=self.lines_depth)
                write_task_vector(base, merged, calibrated, lines_keys(tau), "LiNeS-scaled model")
            return {}
        return apply_weight_space_calibration(base, merged, task_vectors, merged_tv, sensitive, **self.wsc_options())

    def feature_calibrator(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                           sensitive: Optional[Collection[str]], *, modules: Optional[Sequence[str]] = None,
                           task_names: Optional[Sequence[str]] = None) -> FeatureSpaceCalibrator:
        """The FSC calibration core for this setting, on ``merged`` (statistics are fed by the caller)."""
        if not self.uses_data:
            raise ValueError(f"calibration {self.to_string()!r} does not use feature statistics")
        return FeatureSpaceCalibrator(base, merged, task_vectors, sensitive=sensitive, modules=modules,
                                      task_names=task_names, **self.fsc_options())

    def result(self, fold: Optional[CalibrationResult] = None, row_scales: Optional[Mapping[str, Tensor]] = None
               ) -> CalibrationResult:
        """The :class:`CalibrationResult` of this setting from its steps' outputs (an FSC fold and/or WSC scales)."""
        out = fold if fold is not None else CalibrationResult(norm=self.norm, mode=self.mode, statistic=self.statistic,
                                                              granularity=self.granularity, gate=self.gate, rounds=0)
        out.space, out.setting = self.space, self.to_string()
        if row_scales:
            out.row_scales = {k: v.detach().float().cpu() for k, v in row_scales.items()}
            out.wsc_scales = {k: float(v.float().mean()) for k, v in row_scales.items()}
        return out

    def calibrate(
        self,
        base: StateSource,
        merged: nn.Module,
        task_vectors: Sequence[Mapping[str, Tensor]],
        merged_tv: Optional[Mapping[str, Tensor]] = None,
        batches: Optional[Batches] = None,
        sensitive_set: SensitiveSet = None,
        *,
        probe_batches: Optional[Sequence[Any]] = None,
        modules: Optional[Sequence[str]] = None,
        task_names: Optional[Sequence[str]] = None,
    ) -> CalibrationResult:
        """Apply this setting to ``merged`` (in place) and return what it did.

        Args:
            base: the base model or its state dict.
            merged: the merged model theta0 + tau_m; modified in place.
            task_vectors: the K task vectors (mappings, read one key at a time).
            merged_tv: tau_m for WSC/DSC (``None`` computes ``merged - base`` per key).
            batches: unlabelled batches per task (FSC/DSC; :data:`~magic_pl.calibration.dsc.Batches`); every task
                must have at least one.
            sensitive_set: see :meth:`resolve_sensitive`. With ``sensitive="detect"`` and no set, the label-free
                probe runs here on ``probe_batches`` (default: the calibration batches): the ``alpha`` tensors whose
                tau scaled by 1.1 on the weight average theta0 + mean_k tau_k moves the model's outputs most (L2).
            modules: explicit FSC module names (default: automatic).
            task_names: names of the tasks, for error messages and the result.
        """
        if self.uses_data and batches is None:
            raise ValueError(f"calibration {self.to_string()!r} needs unlabelled batches per task")
        if self.space == "none":
            return self.result()
        base_state = _state_of(base)
        detected = None
        if self.detects and _pick(sensitive_set, self.sensitive) is None:
            source = probe_batches if probe_batches is not None else _flat(batches)
            if not source:
                raise ValueError(f"calibration {self.to_string()!r} detects sensitive layers: it needs unlabelled "
                                 "probe_batches (or calibration batches), or a given sensitive set")
            detected = detect_label_free(base_state, merged, task_vectors, source, alpha=self.alpha)
        sens = self.resolve_sensitive(sensitive_set, detected)
        scales = self.weight_space(base_state, merged, task_vectors, merged_tv, sens)
        fold = None
        if self.uses_data:
            calibrator = self.feature_calibrator(base_state, merged, task_vectors, sens, modules=modules,
                                                 task_names=task_names)
            feed(calibrator, batches)
            fold = calibrator.fold()
        return self.result(fold, scales)


def _number(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> float:
    """``value`` as a finite float satisfying ``ok``, else a ValueError naming the field and the rule."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"calibration setting: {name}={value!r} must be {rule}")
    return v


def _unset(value: Any) -> bool:
    """``None`` or its spelling in a ``"space:key=value"`` string."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))


def _depth_rule(depth: Any) -> Optional[str]:
    """``lines_depth`` checked by LiNeS's own rule: ``None``, a family of :data:`LAYER_PATTERNS` or a regex whose
    first group is the block index."""
    if _unset(depth):
        return None
    if not isinstance(depth, str):
        raise ValueError(f"calibration setting: lines_depth={depth!r} must be None, a family name "
                         f"({', '.join(LAYER_PATTERNS)}) or a regex")
    try:
        layer_index("", depth)
    except ValueError as err:
        raise ValueError(f"calibration setting: lines_depth={depth!r}: {err}") from None
    return depth


def _pick(given: SensitiveSet, policy: str) -> Any:
    return given.get(policy) if isinstance(given, Mapping) else given


def _flat(batches: Optional[Batches]) -> list[Any]:
    if batches is None:
        return []
    if isinstance(batches, Mapping):
        return [b for task_batches in batches.values() for b in task_batches]
    return [b for _, b in batches]


class _SummedL2:
    """Label-free probe score: minus the summed squared change of the outputs (mean over the last dim, summed over
    samples and positions) from the outputs recorded on the first call. A sum, so per-process scores add up."""

    def __init__(self, batches: Sequence[Any]):
        self.data = list(batches)
        self.reference: Optional[list[Tensor]] = None

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        from magic_pl.calibration.sensitivity import _call, _logits

        outs = [_logits(_call(model, inputs)).float() for inputs in self.data]
        if self.reference is None:
            self.reference = [o.detach() for o in outs]
            return 0.0
        return -sum(float((o - r).pow(2).mean(-1).double().sum()) for o, r in zip(outs, self.reference))


def detect_label_free(base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                      probe_batches: Sequence[Any], alpha: int = 10,
                      weight_average: Optional[Mapping[str, Tensor]] = None,
                      reduce: Optional[Callable[[Tensor], Tensor]] = None) -> list[str]:
    """The label-free magnitude-sensitivity probe on the weight average theta0 + mean_k tau_k (MAGIC's probe, made
    label-free; docs/method.md): the ``alpha`` (paper: 10) parameter tensors whose ``tau`` scaled by 1.1 moves the
    outputs on ``probe_batches`` most (squared L2 change, summed over samples). ``merged`` only provides the
    architecture (a copy is probed; it is not modified). ``weight_average``: a precomputed mean task vector (e.g. with
    another BatchNorm-statistics policy); default ``mean_k tau_k`` over every floating key. ``reduce``: sums the
    float64 per-tensor scores over processes (each process probes its own samples), so every process picks the same
    set as one process with all the samples. Ties keep model order."""
    import copy

    from magic_pl.calibration.sensitivity import sensitivity_scores

    base_state = _state_of(base)
    probe = copy.deepcopy(merged).eval()
    if weight_average is None:
        keys = [k for k, v in probe.state_dict().items()
                if v.dtype.is_floating_point and all(k in tv for tv in task_vectors)]
        wa = {k: sum(tv[k].float() for tv in task_vectors) / len(task_vectors) for k in keys}
    else:
        wa = dict(weight_average)
        keys = [k for k in wa if k in probe.state_dict()]
    with torch.no_grad():
        state = probe.state_dict()
        for k in keys:
            state[k].copy_(apply_delta(base_state[k].to(state[k].device), wa[k], key=k, name="weight average",
                                       out_dtype=state[k].dtype))
    params = [k for k, p in probe.named_parameters() if p.dtype.is_floating_point and k in wa]
    if probe_batches:
        drops = sensitivity_scores(probe, wa, _SummedL2(probe_batches), keys=params)
    else:  # this process has no probe samples; others do (reduce adds their scores)
        drops = {k: 0.0 for k in params}
    scores = torch.tensor([drops[k] for k in params], dtype=torch.float64)
    if reduce is not None:
        reduced = reduce(scores)
        scores = scores if reduced is None else reduced.to("cpu", torch.float64)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    order = sorted(range(len(params)), key=lambda i: (-float(scores[i]), i))
    return [params[i] for i in order[:alpha]]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:g}"
    return str(v)


#: The recommended setting: the paper's FSC with its sensitive cap on a set found by the label-free probe
#: (``fsc_cap_detect``). Of the 15 settings measured (text K = 3 and 5, vision K = 4; six merge methods; 3 draws),
#: it is the only one that no merge method of any case finds significantly worse than the uncalibrated merge (mean
#: gains +1.6, +1.4, +0.4 points). Ungated FSC/DSC gain more on text (up to +3.9) but lower weight averaging, task
#: arithmetic and TIES on the BatchNorm vision suite. README "Beyond the paper" has the tables.
AUTO = CalibrationSetting(space="fsc", sensitive="detect")

#: Named settings; the first four are the paper's.
PRESETS: dict[str, CalibrationSetting] = {
    "none": CalibrationSetting(space="none"),
    "wsc": CalibrationSetting(space="wsc"),
    "fsc": CalibrationSetting(space="fsc"),
    "dsc": CalibrationSetting(space="dsc"),
    "wsc_gated": CalibrationSetting(space="wsc", sensitive="empty"),
    "wsc_gated_detect": CalibrationSetting(space="wsc", sensitive="detect"),
    "wsc_gated_detect_labelled": CalibrationSetting(space="wsc", sensitive="detect_labelled"),
    "wsc_norm_match": CalibrationSetting(space="wsc", wsc_variant="norm_match"),
    "wsc_joint": CalibrationSetting(space="wsc", wsc_variant="joint"),
    "fsc_sequential": CalibrationSetting(space="fsc", mode="sequential"),
    "fsc_channel": CalibrationSetting(space="fsc", granularity="channel", statistic="ratio_of_means"),
    "fsc_rom": CalibrationSetting(space="fsc", statistic="ratio_of_means"),
    "fsc_p2": CalibrationSetting(space="fsc", norm=2.0),
    "fsc_cap_detect": CalibrationSetting(space="fsc", sensitive="detect"),
    "fsc_gated": CalibrationSetting(space="fsc", gate="paper"),
    "fsc_rom_gated": CalibrationSetting(space="fsc", statistic="ratio_of_means", gate="paper"),
    "svc": CalibrationSetting(space="wsc", weight_method="svc"),
    "svc_fsc": CalibrationSetting(space="dsc", weight_method="svc"),
    "lines": CalibrationSetting(space="wsc", weight_method="lines"),
    "lines_fsc": CalibrationSetting(space="dsc", weight_method="lines"),
    "auto": AUTO,
}


def resolve_setting(spec: "str | CalibrationSetting | Mapping[str, Any]", **defaults: Any) -> CalibrationSetting:
    """A :class:`CalibrationSetting` from a preset name (:data:`PRESETS`), a ``"space:key=value,..."`` string, a dict
    of fields or a setting.

    ``defaults`` (e.g. ``wsc_variant="norm_match"``) fill fields that the plain paper names (``"wsc"``, ``"fsc"``,
    ``"dsc"``) leave at their defaults, so a run-wide option applies to them; presets and explicit strings win.
    """
    if isinstance(spec, CalibrationSetting):
        return spec
    if isinstance(spec, Mapping):
        names = {f.name for f in fields(CalibrationSetting)}
        unknown = sorted(set(spec) - names)
        if unknown:
            raise ValueError(f"calibration setting: unknown option(s) {unknown}; options: {sorted(names)}")
        return CalibrationSetting(**dict(spec))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"calibration setting must be a name or 'space:key=value,...', got {spec!r}")
    if spec in ("wsc", "fsc", "dsc"):
        return replace(PRESETS[spec], **{k: v for k, v in defaults.items() if v is not None})
    if spec in PRESETS:
        return PRESETS[spec]
    space, _, rest = spec.partition(":")
    if space not in SPACES:
        raise ValueError(f"unknown calibration {spec!r}: not a preset ({', '.join(PRESETS)}) and {space!r} is not "
                         f"one of {SPACES}")
    kwargs: dict[str, Any] = {}
    names = {f.name for f in fields(CalibrationSetting)}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in names or key.strip() == "space":
            raise ValueError(f"calibration {spec!r}: bad option {item!r}; options: {sorted(names - {'space'})}")
        kwargs[key.strip()] = value.strip()
    return CalibrationSetting(space=space, **kwargs)
