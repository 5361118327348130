"""Named calibration settings: the paper's MAGIC, the variants of issue 7 and the recommended ``"auto"`` setting.

A :class:`CalibrationSetting` says which space to calibrate (``none``/``wsc``/``fsc``/``dsc``) and every option of
:func:`~magic_pl.calibration.wsc.weight_space_calibration` and
:class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator` that shapes the result. Settings are written as short strings
(``"fsc"``, ``"dsc"``, ``"fsc:statistic=ratio_of_means,granularity=channel"``) or looked up by preset name
(:data:`PRESETS`); :func:`calibrate` applies one to a merged model.

Presets (the paper's behaviour is ``"wsc"``/``"fsc"``/``"dsc"``, exactly as in MAGIC, arXiv 2512.19320):

- ``wsc_gated``: WSC with the paper's gating and an empty sensitive set (rows only grow);
  ``wsc_gated_detect`` / ``wsc_gated_detect_labelled``: gating with a sensitive set detected by the label-free or the
  labelled probe (DESIGN.md 2.4);
- ``wsc_norm_match`` / ``wsc_joint``: WSC that matches each row's norm to the mean task-row norm, or projects jointly;
- ``fsc_sequential``, ``fsc_channel`` (one xi per output channel), ``fsc_rom`` (ratio of means), ``fsc_p2``
  (p = 2), ``fsc_cap_detect`` (the paper's sensitive cap with a detected set), ``fsc_gated`` (WSC's rule on xi),
  ``fsc_rom_gated`` (ratio of means and WSC's rule);
- ``auto``: the recommended setting; see :data:`AUTO` for what it is and the measurement behind it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from magic_pl.calibration.dsc import Batches, apply_weight_space_calibration, dual_space_calibration, feed
from magic_pl.calibration.fsc import (
    FSC_GATES,
    FSC_GRANULARITIES,
    FSC_MODES,
    FSC_STATISTICS,
    CalibrationReport,
    FeatureSpaceCalibrator,
    StateSource,
    _parse_norm,
)
from magic_pl.calibration.wsc import WSC_VARIANTS

__all__ = ["SPACES", "SENSITIVE_POLICIES", "CalibrationSetting", "PRESETS", "AUTO", "resolve_setting",
           "detect_label_free"]

#: Calibration spaces: nothing, weight space (data-free), feature space, both (WSC then FSC).
SPACES: tuple[str, ...] = ("none", "wsc", "fsc", "dsc")
#: Sensitive-set policies: ``none`` (WSC ungated, FSC uncapped; the default), ``empty`` (the paper's gating with no
#: sensitive tensor), ``detect`` (a set from :func:`~magic_pl.calibration.sensitivity.detect_sensitive_layers`, which
#: the caller passes to :meth:`CalibrationSetting.calibrate`; ``detect_labelled`` asks the caller for the set of the
#: labelled probe, the paper's, ``detect`` for a label-free one).
SENSITIVE_POLICIES: tuple[str, ...] = ("none", "empty", "detect", "detect_labelled")


@dataclass(frozen=True)
class CalibrationSetting:
    """One calibration recipe. Defaults are the paper's (MAGIC, arXiv 2512.19320).

    Attributes:
        space: ``"none"``, ``"wsc"``, ``"fsc"`` or ``"dsc"``.
        wsc_variant: :data:`~magic_pl.calibration.wsc.WSC_VARIANTS` (``"paper"``).
        sensitive: :data:`SENSITIVE_POLICIES` (``"none"``).
        norm: FSC feature norm p (1).
        mode: FSC ``"parallel"`` (paper) or ``"sequential"``.
        statistic: FSC ``"mean_of_ratios"`` (paper) or ``"ratio_of_means"``.
        granularity: FSC ``"module"`` (paper) or ``"channel"``.
        gate: FSC ``"none"`` (paper) or ``"paper"`` (WSC's gating rule on xi).
    """

    space: str = "fsc"
    wsc_variant: str = "paper"
    sensitive: str = "none"
    norm: float = 1.0
    mode: str = "parallel"
    statistic: str = "mean_of_ratios"
    granularity: str = "module"
    gate: str = "none"

    def __post_init__(self) -> None:
        for name, value, choices in (("space", self.space, SPACES), ("wsc_variant", self.wsc_variant, WSC_VARIANTS),
                                     ("sensitive", self.sensitive, SENSITIVE_POLICIES), ("mode", self.mode, FSC_MODES),
                                     ("statistic", self.statistic, FSC_STATISTICS),
                                     ("granularity", self.granularity, FSC_GRANULARITIES),
                                     ("gate", self.gate, FSC_GATES)):
            if value not in choices:
                raise ValueError(f"calibration setting: {name}={value!r} is not one of {choices}")
        object.__setattr__(self, "norm", _parse_norm(self.norm))

    @property
    def uses_data(self) -> bool:
        """True for FSC and DSC (they need unlabelled samples)."""
        return self.space in ("fsc", "dsc")

    @property
    def uses_wsc(self) -> bool:
        return self.space in ("wsc", "dsc")

    def fsc_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator`."""
        return {"norm": self.norm, "mode": self.mode, "statistic": self.statistic, "granularity": self.granularity,
                "gate": self.gate}

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

    def calibrate(
        self,
        base: StateSource,
        merged: nn.Module,
        task_vectors: Sequence[Mapping[str, Tensor]],
        merged_tv: Optional[Mapping[str, Tensor]] = None,
        batches: Optional[Batches] = None,
        sensitive_set: Optional[Collection[str]] = None,
        *,
        probe_batches: Optional[Sequence[Any]] = None,
        alpha: int = 10,
    ) -> Optional[CalibrationReport]:
        """Apply this setting to ``merged`` (in place) and return the FSC/DSC report (``None`` for none/WSC).

        Args:
            base, merged, task_vectors, merged_tv: as in :func:`~magic_pl.calibration.dsc.dual_space_calibration`
                (``merged_tv`` is needed by WSC and DSC; ``None`` computes ``merged - base``).
            batches: unlabelled batches per task (FSC/DSC).
            sensitive_set: the detected sensitive tensors/modules, or a mapping policy -> set. With
                ``sensitive="detect"`` and no set, the label-free probe runs here (DESIGN.md 2.4): the ``alpha``
                (paper: 10) tensors whose tau is scaled by 1.1 on the weight average theta0 + mean_k tau_k change the
                model's outputs most (L2) on ``probe_batches`` (default: the calibration batches). The benchmark
                probes with 8 unlabelled samples per task. ``detect_labelled`` needs the set from the caller.
        """
        from magic_pl.calibration.fsc import _state_of

        if self.space == "none":
            return None
        if self.uses_data and batches is None:
            raise ValueError(f"calibration {self.to_string()!r} needs unlabelled batches per task")
        if self.sensitive == "detect" and sensitive_set is None:
            source = probe_batches if probe_batches is not None else _flat(batches)
            if not source:
                raise ValueError("sensitive='detect' needs unlabelled probe_batches (or batches) to run the probe")
            sensitive_set = detect_label_free(base, merged, task_vectors, source, alpha=alpha)
        sens = self.sensitive_set(sensitive_set)
        base_state = _state_of(base)
        if self.space == "dsc":
            return dual_space_calibration(base_state, merged, task_vectors, merged_tv, batches, sens,
                                          variant=self.wsc_variant, **self.fsc_options())
        if self.space == "fsc":
            cal = FeatureSpaceCalibrator(base_state, merged, task_vectors, sensitive=sens, **self.fsc_options())
            feed(cal, batches)
            return cal.fold()
        apply_weight_space_calibration(base_state, merged, task_vectors, merged_tv, sens, variant=self.wsc_variant)
        return None

    def sensitive_set(self, detected: Optional[Collection[str]]) -> Optional[list[str]]:
        """The sensitive collection passed to WSC/FSC under this setting's policy."""
        if self.sensitive == "none":
            return None
        if self.sensitive == "empty":
            return []
        if isinstance(detected, Mapping):  # {policy: set}, e.g. both probes
            detected = detected.get(self.sensitive)
        if detected is None:
            raise ValueError("this calibration setting detects magnitude-sensitive layers: pass sensitive_set "
                             "(magic_pl.calibration.detect_sensitive_layers)")
        return list(detected)


def _flat(batches: Optional[Batches]) -> list[Any]:
    if batches is None:
        return []
    if isinstance(batches, Mapping):
        return [b for task_batches in batches.values() for b in task_batches]
    return [b for _, b in batches]


def detect_label_free(base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                      probe_batches: Sequence[Any], alpha: int = 10,
                      weight_average: Optional[Mapping[str, Tensor]] = None) -> list[str]:
    """The label-free magnitude-sensitivity probe (DESIGN.md 2.4) on the weight average: the ``alpha`` parameter
    tensors whose ``tau`` scaled by 1.1 moves the outputs on ``probe_batches`` most (L2). ``merged`` only provides the
    architecture (a copy is probed; it is not modified). ``weight_average``: a precomputed mean task vector (e.g.
    with another BatchNorm-statistics policy); default ``mean_k tau_k`` over every floating key."""
    import copy

    from magic_pl.calibration.fsc import _state_of
    from magic_pl.calibration.sensitivity import detect_sensitive_layers, output_divergence_score

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
            state[k].copy_((base_state[k].to(state[k].device, torch.float32) + wa[k].to(state[k].device)).to(state[k].dtype))
    return detect_sensitive_layers(probe, wa, output_divergence_score(list(probe_batches), metric="l2"), alpha=alpha)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:g}"
    return str(v)


#: The recommended setting (issue 7): the paper's FSC with its sensitive cap on a set found by the label-free probe
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
