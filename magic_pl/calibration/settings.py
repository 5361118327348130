"""Calibration settings: the one options object that says how to calibrate, and the one driver that applies it.

A :class:`CalibrationSetting` is an ordered list of registered calibration steps (:mod:`magic_pl.calibration.steps`)
and the sensitive-set policy they share: data-free weight steps (``wsc``: MAGIC's WSC; ``svc``: singular value
calibration; ``lines``: LiNeS; ``scale``: one constant), each on the merged task vector the one before it left, then
at most one feature step (``fsc``, or ``featcal``: FeatCal) measured on their result. Every front door (Python,
``MagicModule``, the callbacks, the CLI, the streaming path, the benchmark) takes one, written as

- a preset name of :data:`PRESETS` (``"fsc"``, ``"dsc"``, ``"auto"``, ...);
- the *space form* ``"space:key=value,..."``: ``space`` is ``none`` (no step), ``wsc`` (a data-free weight step),
  ``fsc`` (FSC) or ``dsc`` (the weight step, then FSC); ``weight_method`` picks the weight step (``wsc``, ``svc`` or
  ``lines``) and the flat keys ``wsc_variant``, ``eps``, ``svc_alpha``, ``lines_alpha``, ``lines_beta``,
  ``lines_depth``, ``norm``, ``mode``, ``statistic``, ``granularity``, ``gate`` set their steps' options
  (``"fsc:statistic=ratio_of_means,granularity=channel"``, ``"wsc:weight_method=svc,svc_alpha=0.2"``);
- the *step form* ``"step+step:step.option=value,..."``: the steps in order, each option named by its step
  (``"svc+fsc:svc.alpha=0.2,fsc.norm=2"``, ``"scale:scale.factor=0.8"``, ``"wsc+fsc:sensitive=detect"``);
- a dict of the space form's fields (YAML: ``calibration: {space: fsc, sensitive: detect}``) or of the step form's
  (``{steps: [{step: svc, alpha: 0.2}, fsc], sensitive: detect}``: a step is its name or ``{step: name, **options}``);
- or the object: ``CalibrationSetting(steps=[...], sensitive=..., alpha=...)``, or by the space form's fields
  ``CalibrationSetting(space="dsc", weight_method="svc")``.

In every form ``sensitive`` and ``alpha`` are the setting's own: the sensitive-set policy (:data:`SENSITIVE_POLICIES`,
used by WSC's gating and FSC's cap) and the size of a detected set. A value holding a comma (a LiNeS depth regex)
needs a dict. :meth:`CalibrationSetting.to_string` writes the space form when the steps fit it (the form every record
has used) and the step form otherwise, :meth:`~CalibrationSetting.to_dict` the step form's dict; :func:`resolve_setting`
reads each back to an equal setting. :meth:`CalibrationSetting.calibrate` runs the steps on a merged model and returns
one :class:`~magic_pl.calibration.fsc.CalibrationResult`; the Lightning layer runs the same steps
(:meth:`~CalibrationSetting.weight_space`, :meth:`~CalibrationSetting.feature_calibrator`,
:meth:`~CalibrationSetting.resolve_sensitive`)
with statistics collected in its predict loop.

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

import importlib
import math
import os
import pkgutil
from collections import ChainMap
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.calibration import wsc
from magic_pl.calibration.dsc import Batches, feed, merged_task_vector, write_task_vector
from magic_pl.calibration.fsc import CalibrationResult, FeatureSpaceCalibrator, FSCStep, StateSource, _state_of
from magic_pl.calibration.steps import STEPS, CalibrationStep, as_float, make_step
from magic_pl.statedict import apply_delta


def _register_steps() -> None:
    """Import every module of the calibration package: each registers its steps (``@register_step``) on import, so a
    new step's file needs no line anywhere else."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if module.name != "settings":
            importlib.import_module(f"{package}.{module.name}")


_register_steps()

__all__ = ["SPACES", "SENSITIVE_POLICIES", "CalibrationSetting", "PRESETS", "AUTO", "resolve_setting",
           "apply_weight_steps", "detect_label_free", "SensitiveSet"]

#: The space form's heads: no step, a data-free weight step, FSC, or both (the weight step, then FSC).
SPACES: tuple[str, ...] = ("none", "wsc", "fsc", "dsc")
#: The weight steps the space form's ``weight_method`` can pick (any step fits the step form).
WEIGHT_METHODS: tuple[str, ...] = ("wsc", "svc", "lines")
#: Sensitive-set policies, the one meaning of "sensitive": ``none`` (WSC ungated, FSC uncapped; the default),
#: ``empty`` (the paper's gating with no sensitive tensor: WSC rows only grow), ``given`` (a set the caller passes: a
#: list of tensor/module names or a ranking JSON of :func:`~magic_pl.calibration.sensitivity.save_sensitivity`),
#: ``detect`` (the label-free probe on unlabelled calibration samples, run by :meth:`CalibrationSetting.calibrate`)
#: and ``detect_labelled`` (the paper's labelled probe; the caller runs it and passes the set). A given set also
#: serves ``detect``/``detect_labelled`` (a saved ranking is reused instead of probing again).
SENSITIVE_POLICIES: tuple[str, ...] = ("none", "empty", "given", "detect", "detect_labelled")
#: The space form's option keys, in the order it writes them: ``key -> (step, option)``; step ``""``: the setting's.
_FLAT: dict[str, tuple[str, str]] = {
    "svc_alpha": ("svc", "alpha"), "lines_alpha": ("lines", "alpha"), "lines_beta": ("lines", "beta"),
    "lines_depth": ("lines", "depth"), "wsc_variant": ("wsc", "variant"), "sensitive": ("", "sensitive"),
    "alpha": ("", "alpha"), "eps": ("wsc", "eps"), "norm": ("fsc", "norm"), "mode": ("fsc", "mode"),
    "statistic": ("fsc", "statistic"), "granularity": ("fsc", "granularity"), "gate": ("fsc", "gate"),
}
_POLICY_DEFAULTS: dict[str, Any] = {"sensitive": "none", "alpha": 10}

#: A sensitive set as callers give it: names, a ranking JSON path, or ``{policy: names}`` (several probes at once).
SensitiveSet = Union[Sequence[str], str, os.PathLike, Mapping[str, Sequence[str]], None]
#: A step as a setting takes it: the step, its registered name, or ``{"step": name, **options}``.
StepSpec = Union[CalibrationStep, str, Mapping[str, Any]]


@dataclass(frozen=True, init=False)
class CalibrationSetting:
    """One calibration recipe: its steps, in order, and the sensitive-set policy they share. Defaults are the paper's
    (MAGIC, arXiv 2512.19320); ``CalibrationSetting()`` is FSC.

    Args:
        steps: the steps (:class:`~magic_pl.calibration.steps.CalibrationStep` objects, registered names, or
            ``{"step": name, **options}``): data-free weight steps, then at most one feature step; each name once.
            ``None``: built from ``space_form``.
        sensitive: :data:`SENSITIVE_POLICIES` (``"none"``).
        alpha: the size of a detected sensitive set, a whole number in [0, 10000] (10, the paper's).
        space_form: instead of ``steps``, the space form's fields (module docstring): ``space`` (``"fsc"``),
            ``weight_method`` (``"wsc"``) and the flat option keys. Options of steps the space lacks are checked,
            then dropped (a stored setting lists them all).

    The flat option keys read as attributes too (``setting.norm``, ``setting.lines_beta``, ...): the option of this
    setting's step, or its default when the setting has no such step.
    """

    steps: tuple[CalibrationStep, ...]
    sensitive: str = "none"
    alpha: int = 10

    def __init__(self, steps: Optional[Iterable[StepSpec]] = None, sensitive: str = "none", alpha: int = 10,
                 **space_form: Any) -> None:
        if steps is None:
            steps = _space_steps(**space_form)
        elif space_form:
            raise TypeError(f"CalibrationSetting: give steps or the space form's fields ({', '.join(space_form)}), "
                            "not both")
        if isinstance(steps, (str, Mapping)) or not isinstance(steps, Iterable):
            raise TypeError(f"CalibrationSetting: steps must be a sequence of steps, got {steps!r}")
        built = tuple(_step_of(s) for s in steps)
        names = [s.name for s in built]
        for i, s in enumerate(built):
            if names.count(s.name) > 1:
                raise ValueError(f"calibration setting: step {s.name!r} appears {names.count(s.name)} times")
            if s.kind == "feature" and i != len(built) - 1:
                raise ValueError(f"calibration setting: the feature step {s.name!r} must come last (it measures the "
                                 f"model the weight steps leave), got {'+'.join(names)}")
        if sensitive not in SENSITIVE_POLICIES:
            raise ValueError(f"calibration setting: sensitive={sensitive!r} is not one of {SENSITIVE_POLICIES}")
        size = as_float(alpha)
        if not (math.isfinite(size) and size.is_integer() and 0 <= size <= 10_000):
            raise ValueError(f"calibration setting: alpha={alpha!r} must be a whole number of tensors in [0, 10000]")
        object.__setattr__(self, "steps", built)
        object.__setattr__(self, "sensitive", sensitive)
        object.__setattr__(self, "alpha", int(size))

    # --- what the setting holds -------------------------------------------------------------------------------------
    def step(self, name: str) -> Optional[CalibrationStep]:
        """The step called ``name``, or ``None``."""
        return next((s for s in self.steps if s.name == name), None)

    @property
    def weight_steps(self) -> tuple[CalibrationStep, ...]:
        """The data-free weight steps, in order."""
        return tuple(s for s in self.steps if s.kind == "weight")

    @property
    def feature_step(self) -> Optional[CalibrationStep]:
        """The feature step (the last), or ``None``."""
        return self.steps[-1] if self.steps and self.steps[-1].kind == "feature" else None

    @property
    def space(self) -> str:
        """``"none"`` (no step), ``"wsc"`` (weight steps only), ``"fsc"`` (the feature step only) or ``"dsc"``."""
        if not self.steps:
            return "none"
        if self.feature_step is None:
            return "wsc"
        return "dsc" if len(self.steps) > 1 else "fsc"

    @property
    def weight_method(self) -> str:
        """The weight steps' names joined by ``+``; ``"wsc"`` (the space form's default) when there is none."""
        return "+".join(s.name for s in self.weight_steps) or "wsc"

    @property
    def uses_data(self) -> bool:
        """True with a feature step (it needs unlabelled samples)."""
        return self.feature_step is not None

    @property
    def uses_wsc(self) -> bool:
        """True with a data-free weight step (any, not only WSC)."""
        return bool(self.weight_steps)

    @property
    def detects(self) -> bool:
        """True when the label-free probe must run (``sensitive="detect"``) unless a set is given."""
        return self.sensitive == "detect" and bool(self.steps)

    def __getattr__(self, name: str) -> Any:
        # the space form's flat option keys: this setting's option, or the default of a step it lacks
        step, option = _FLAT.get(name, ("", ""))
        if not step:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.step(step) or STEPS[step](), option)

    def fsc_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator` (FSC's defaults without
        it)."""
        return (self.step("fsc") or FSCStep()).options()

    def wsc_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~magic_pl.calibration.wsc.weight_space_calibration` (WSC's defaults without
        it)."""
        return (self.step("wsc") or wsc.WSCStep()).options()

    # --- its forms --------------------------------------------------------------------------------------------------
    def to_string(self) -> str:
        """The shortest string of its form that :func:`resolve_setting` maps back to this setting: the space form when
        the steps fit it (``"dsc:gate=paper"``, as records have always written it), else the step form
        (``"svc+fsc:svc.alpha=0.2"``). Options at their defaults are left out."""
        return self._space_form() or self._step_form()

    def to_dict(self) -> dict[str, Any]:
        """The step form's dict: ``{"steps": [{"step": name, **options}, ...], "sensitive": ..., "alpha": ...}``."""
        return {"steps": [s.to_dict() for s in self.steps], "sensitive": self.sensitive, "alpha": self.alpha}

    def _policy_changed(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k, default in _POLICY_DEFAULTS.items() if getattr(self, k) != default}

    def _space_form(self) -> Optional[str]:
        """The space form, or ``None`` when the steps do not fit it."""
        weight, feature = self.weight_steps, self.feature_step
        if (len(weight) > 1 or any(s.name not in WEIGHT_METHODS for s in weight)
                or (feature is not None and feature.name != "fsc")):
            return None
        changed = {"": self._policy_changed(), **{s.name: s.changed() for s in self.steps}}
        if any((step, option) not in _FLAT.values() for step, options in changed.items() for option in options):
            return None  # an option without a flat key
        items = [f"weight_method={weight[0].name}"] if weight and weight[0].name != "wsc" else []
        items += [f"{key}={_fmt(changed[step][option])}" for key, (step, option) in _FLAT.items()
                  if option in changed.get(step, {})]
        return self.space + (":" + ",".join(items) if items else "")

    def _step_form(self) -> str:
        items = [f"{s.name}.{k}={_fmt(v)}" for s in self.steps for k, v in s.changed().items()]
        items += [f"{k}={_fmt(v)}" for k, v in self._policy_changed().items()]
        return "+".join(s.name for s in self.steps) + (":" + ",".join(items) if items else "")

    # --- the steps --------------------------------------------------------------------------------------------------
    def resolve_sensitive(self, given: SensitiveSet = None, detected: Optional[Sequence[str]] = None
                          ) -> Optional[list[str]]:
        """The sensitive collection WSC/FSC use under this setting's policy.

        ``given``: names, a ranking JSON path, or ``{policy: names}``; ``detected``: the set the label-free probe
        found. ``None`` means no gating and no cap; ``[]`` the paper's gating with nothing sensitive.
        """
        policy = self.sensitive
        if isinstance(given, Mapping):
            given = given.get(policy)
        from magic_pl.calibration.sensitivity import sensitive_names

        given = sensitive_names(given)  # names, or the set stored with a ranking JSON
        if policy == "none":  # a given set turns the paper's gating and cap on
            return given
        if policy == "empty":
            if given is not None:
                raise ValueError(f"calibration {self.to_string()!r} has an empty sensitive set (sensitive='empty'); "
                                 "a given set contradicts it")
            return []
        if given is not None:
            return given
        if policy == "detect" and detected is not None:
            return list(detected)
        raise ValueError(f"calibration {self.to_string()!r} needs a sensitive set: "
                         + ("give one (names or a ranking JSON)" if policy in ("given", "detect_labelled") else
                            "give unlabelled probe batches, or a set (names or a ranking JSON)"))

    def weight_space(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                     merged_tv: Optional[Mapping[str, Tensor]], sensitive: Optional[Collection[str]],
                     on_step: Optional[Callable[[CalibrationStep, list[str]], None]] = None) -> dict[str, Tensor]:
        """The weight steps (:func:`apply_weight_steps`) written into ``merged`` in place: each tensor a step changes
        becomes ``theta0 +`` its calibrated tau_m in the tensor's dtype, and the next step reads ``merged - theta0``.
        ``merged_tv``: tau_m before the first (``None``: ``merged - base`` per key); ``on_step(step, keys written)``
        runs after each. Returns the per-row scales applied, per tensor."""
        base_state = _state_of(base)

        def write(step: CalibrationStep, calibrated: dict[str, Tensor]) -> Mapping[str, Tensor]:
            write_task_vector(base_state, merged, calibrated, calibrated, f"{step.name}-calibrated model")
            if on_step is not None:
                on_step(step, list(calibrated))
            return merged_task_vector(base_state, merged)

        tau = merged_tv if merged_tv is not None else merged_task_vector(base_state, merged)
        return apply_weight_steps(self.weight_steps, tau, task_vectors, sensitive, write)[1]

    def feature_calibrator(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                           sensitive: Optional[Collection[str]], *, modules: Optional[Sequence[str]] = None,
                           task_names: Optional[Sequence[str]] = None) -> FeatureSpaceCalibrator:
        """The feature step's calibration core on ``merged`` (statistics are fed by the caller)."""
        step = self.feature_step
        if step is None:
            raise ValueError(f"calibration {self.to_string()!r} does not use feature statistics")
        return step.calibrator(base, merged, task_vectors, sensitive, modules=modules, task_names=task_names)

    def result(self, fold: Optional[CalibrationResult] = None, row_scales: Optional[Mapping[str, Tensor]] = None
               ) -> CalibrationResult:
        """The :class:`CalibrationResult` of this setting from its steps' outputs (an FSC fold and/or WSC scales)."""
        out = fold if fold is not None else CalibrationResult(rounds=0, **self.fsc_options())
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
            merged_tv: tau_m for the weight steps (``None`` computes ``merged - base`` per key).
            batches: unlabelled batches per task (a feature step; :data:`~magic_pl.calibration.dsc.Batches`); every
                task must have at least one.
            sensitive_set: see :meth:`resolve_sensitive`. With ``sensitive="detect"`` and no set, the label-free
                probe runs here on ``probe_batches`` (default: the calibration batches): the ``alpha`` tensors whose
                tau scaled by 1.1 on the weight average theta0 + mean_k tau_k moves the model's outputs most (L2).
            modules: explicit FSC module names (default: automatic).
            task_names: names of the tasks, for error messages and the result.
        """
        if self.uses_data and batches is None:
            raise ValueError(f"calibration {self.to_string()!r} needs unlabelled batches per task")
        if not self.steps:
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


def apply_weight_steps(steps: Sequence[CalibrationStep], merged_tv: Mapping[str, Tensor],
                       task_vectors: Sequence[Mapping[str, Tensor]], sensitive: Optional[Collection[str]],
                       write: Optional[Callable[[CalibrationStep, dict[str, Tensor]], Mapping[str, Tensor]]] = None
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Data-free weight steps, in order, on the merged task vector ``merged_tv``: the one application every front
    door uses (in memory, Lightning, streamed row blocks, LoRA factors).

    Each step reads what the one before left: ``write(step, calibrated)`` stores a step's tensors and returns tau_m
    as stored (a model rounds ``theta0 + tau`` to its dtype); without it, ``merged_tv`` overlaid with them. Returns the
    last calibrated tensor of every key a step changed, and the per-row scales applied, per tensor."""
    tau, out, scales = merged_tv, {}, {}
    for step in steps:
        calibrated, step_scales = step.apply(tau, task_vectors, sensitive)
        out.update(calibrated)
        scales.update(step_scales)
        tau = write(step, calibrated) if write is not None else ChainMap(calibrated, tau)
    return out, scales


def _space_steps(space: str = "fsc", weight_method: str = "wsc", **options: Any) -> tuple[CalibrationStep, ...]:
    """The steps of the space form's fields; every option is checked, those of steps the space lacks are dropped."""
    if space not in SPACES:
        raise ValueError(f"calibration setting: space={space!r} is not one of {SPACES}")
    if weight_method not in WEIGHT_METHODS:
        raise ValueError(f"calibration setting: weight_method={weight_method!r} is not one of {WEIGHT_METHODS}")
    per_step: dict[str, dict[str, Any]] = {step: {} for step, _ in _FLAT.values() if step}
    for key, value in options.items():
        step, option = _FLAT.get(key, ("", ""))
        if not step:
            raise TypeError(f"CalibrationSetting got an unexpected keyword argument {key!r}")
        per_step[step][option] = value
    built = {name: make_step(name, **kw) for name, kw in per_step.items()}
    order = {"none": (), "wsc": (weight_method,), "fsc": ("fsc",), "dsc": (weight_method, "fsc")}[space]
    return tuple(built[name] for name in order)


def _step_of(spec: StepSpec) -> CalibrationStep:
    if isinstance(spec, CalibrationStep):
        if STEPS.get(spec.name) is not type(spec):
            raise ValueError(f"calibration setting: {type(spec).__name__} is not the registered step {spec.name!r}")
        return spec
    if isinstance(spec, str):
        return make_step(spec)
    if isinstance(spec, Mapping) and "step" in spec:
        options = dict(spec)
        return make_step(options.pop("step"), **options)
    raise ValueError(f"calibration setting: a step is a step name ({', '.join(STEPS)}), {{'step': name, **options}} "
                     f"or a CalibrationStep, got {spec!r}")


def _pick(given: SensitiveSet, policy: str) -> Any:
    return given.get(policy) if isinstance(given, Mapping) else given


def _flat(batches: Optional[Batches]) -> list[Any]:
    if batches is None:
        return []
    if isinstance(batches, Mapping):
        return [b for task_batches in batches.values() for b in task_batches]
    return [b for _, b in batches]


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

    from magic_pl.calibration.sensitivity import output_divergence_score, sensitivity_scores

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
        drops = sensitivity_scores(probe, wa, output_divergence_score(probe_batches, "l2", reduction="sum"),
                                   keys=params)
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
    """A value as a setting string writes it: floats short (``0.1``, ``1e-08``, ``inf``) yet exact."""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


#: The recommended setting: the paper's FSC with its sensitive cap on a set found by the label-free probe
#: (``fsc_cap_detect``). Of the 15 settings measured (text K = 3 and 5, vision K = 4; six merge methods; 3 draws),
#: it is the only one that no merge method of any case finds significantly worse than the uncalibrated merge (mean
#: gains +1.6, +1.4, +0.4 points). Ungated FSC/DSC gain more on text (up to +3.9) but lower weight averaging, task
#: arithmetic and TIES on the BatchNorm vision suite. README "Beyond the paper" has the tables.
AUTO = CalibrationSetting(["fsc"], sensitive="detect")

#: Named settings; the first four are the paper's.
PRESETS: dict[str, CalibrationSetting] = {
    "none": CalibrationSetting([]),
    "wsc": CalibrationSetting(["wsc"]),
    "fsc": CalibrationSetting(["fsc"]),
    "dsc": CalibrationSetting(["wsc", "fsc"]),
    "wsc_gated": CalibrationSetting(["wsc"], sensitive="empty"),
    "wsc_gated_detect": CalibrationSetting(["wsc"], sensitive="detect"),
    "wsc_gated_detect_labelled": CalibrationSetting(["wsc"], sensitive="detect_labelled"),
    "wsc_norm_match": CalibrationSetting([wsc.WSCStep(variant="norm_match")]),
    "wsc_joint": CalibrationSetting([wsc.WSCStep(variant="joint")]),
    "fsc_sequential": CalibrationSetting([FSCStep(mode="sequential")]),
    "fsc_channel": CalibrationSetting([FSCStep(granularity="channel", statistic="ratio_of_means")]),
    "fsc_rom": CalibrationSetting([FSCStep(statistic="ratio_of_means")]),
    "fsc_p2": CalibrationSetting([FSCStep(norm=2.0)]),
    "fsc_cap_detect": CalibrationSetting(["fsc"], sensitive="detect"),
    "fsc_gated": CalibrationSetting([FSCStep(gate="paper")]),
    "fsc_rom_gated": CalibrationSetting([FSCStep(statistic="ratio_of_means", gate="paper")]),
    "svc": CalibrationSetting(["svc"]),
    "svc_fsc": CalibrationSetting(["svc", "fsc"]),
    "lines": CalibrationSetting(["lines"]),
    "lines_fsc": CalibrationSetting(["lines", "fsc"]),
    "auto": AUTO,
}


def resolve_setting(spec: "str | CalibrationSetting | Mapping[str, Any]", **defaults: Any) -> CalibrationSetting:
    """A :class:`CalibrationSetting` from a preset name (:data:`PRESETS`), a space-form or step-form string, a dict
    of either form's fields, or a setting (see the module docstring).

    ``defaults`` (space-form fields, e.g. ``wsc_variant="norm_match"``; ``None`` values are ignored) fill the fields
    that the plain paper names (``"wsc"``, ``"fsc"``, ``"dsc"``) leave at their defaults, so a run-wide option applies
    to them; presets and explicit strings win.
    """
    if isinstance(spec, CalibrationSetting):
        return spec
    if isinstance(spec, Mapping):
        known = ("steps", "sensitive", "alpha") if "steps" in spec else ("space", "weight_method", *_FLAT)
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise ValueError(f"calibration setting: unknown option(s) {unknown}; options: {sorted(known)}")
        return CalibrationSetting(**dict(spec))
    if not isinstance(spec, str) or not spec:
        raise ValueError("calibration setting must be a name, 'space:key=value,...' or "
                         f"'step+step:step.option=value,...', got {spec!r}")
    if spec in ("wsc", "fsc", "dsc"):
        return CalibrationSetting(space=spec, **{k: v for k, v in defaults.items() if v is not None})
    if spec in PRESETS:
        return PRESETS[spec]
    return _parse(spec)


def _parse(spec: str) -> CalibrationSetting:
    """A space-form (``"dsc:gate=paper"``) or step-form (``"svc+fsc:svc.alpha=0.2"``) string; a space form may name
    options by their step too (``"dsc:fsc.gate=paper"``)."""
    head, _, rest = spec.partition(":")
    names = head.split("+")
    space_form = head in SPACES
    if not space_form and not all(n in STEPS for n in names):
        raise ValueError(f"unknown calibration {spec!r}: not a preset ({', '.join(PRESETS)}), a space "
                         f"({', '.join(SPACES)}) or steps joined by '+' ({', '.join(sorted(STEPS))})")
    policy: dict[str, str] = {}
    flat: dict[str, str] = {}
    per_step: dict[str, dict[str, str]] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = (part.strip() for part in item.partition("="))
        step, dot, option = key.partition(".")
        if eq and key in _POLICY_DEFAULTS:
            policy[key] = value
        elif eq and space_form and (key == "weight_method" or key in _FLAT):
            flat[key] = value
        elif eq and dot and step in STEPS:
            per_step.setdefault(step, {})[option] = value
        else:
            known = (["weight_method", *_FLAT, "or step.option (e.g. fsc.norm)"] if space_form else
                     [f"{n}.{option}" for n in names for option in STEPS[n]().options()] + [*_POLICY_DEFAULTS])
            raise ValueError(f"calibration {spec!r}: bad option {item!r}; options: {', '.join(known)}")
    steps = list(_space_steps(head, **flat)) if space_form else [make_step(n) for n in names]
    for name, options in per_step.items():
        i = next((i for i, s in enumerate(steps) if s.name == name), None)
        if i is None:
            raise ValueError(f"calibration {spec!r}: options for step {name!r}, which it does not have")
        steps[i] = make_step(name, **{**steps[i].options(), **options})
    return CalibrationSetting(steps, **policy)
