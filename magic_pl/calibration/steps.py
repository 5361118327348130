"""Calibration steps: the registered building blocks of a calibration setting.

A :class:`~magic_pl.calibration.settings.CalibrationSetting` is an ordered list of steps applied to a merged model:
data-free *weight* steps, each recomputing the merged task vector tau_m from the task vectors alone, then at most one
*feature* step, measured with unlabelled samples on the model the weight steps left (MAGIC's DSC order, arXiv
2512.19320). A step type is a frozen dataclass (settings are hashable): its registered ``name``, its options as typed
fields whose defaults are its paper's (checked, and strings from a setting string converted, in ``__post_init__``),
and how it runs: :meth:`CalibrationStep.apply` for a weight step, ``calibrator(...)`` returning a
:class:`~magic_pl.calibration.fsc.FeatureSpaceCalibrator` (or another calibrator, see
:meth:`CalibrationStep.calibrator`) for the feature step.

Built in, each registered by the module that holds its algorithm: ``wsc`` (:class:`~magic_pl.calibration.wsc.WSCStep`),
``svc`` (:class:`~magic_pl.calibration.svc.SVCStep`), ``lines`` (:class:`~magic_pl.calibration.lines.LiNeSStep`),
``scale`` (:class:`~magic_pl.calibration.scale.ScaleStep`) and the feature steps ``fsc``
(:class:`~magic_pl.calibration.fsc.FSCStep`) and ``featcal`` (:class:`~magic_pl.calibration.featcal.FeatCalStep`).
:data:`STEPS` maps names to types; :func:`register_step` adds one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import fields, is_dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Optional, TypeVar

from torch import Tensor, nn

from magic_pl.jsonable import jsonable

if TYPE_CHECKING:  # the feature step's types; fsc.py imports this module
    from magic_pl.calibration.fsc import FeatureSpaceCalibrator, StateSource

__all__ = ["STEPS", "CalibrationStep", "as_float", "make_step", "register_step", "unset"]

_REGISTRY: dict[str, type[CalibrationStep]] = {}
#: The registered step types, by name (read-only; :func:`register_step` adds to it).
STEPS: Mapping[str, type[CalibrationStep]] = MappingProxyType(_REGISTRY)
#: Heads of the space form that are not steps, so no step may take them as its name.
_RESERVED = ("none", "dsc")


class CalibrationStep:
    """Base of every calibration step: subclass it as a frozen dataclass whose fields all have defaults, set
    :attr:`name` (and :attr:`kind`), implement :meth:`apply` (a weight step) or ``calibrator`` (a feature step) and
    decorate it with :func:`register_step`."""

    #: The step's name in settings, strings (``"svc+fsc"``, ``"svc.alpha=0.2"``) and records.
    name: ClassVar[str] = ""
    #: ``"weight"``: data-free, runs on tau_m (:meth:`apply`); ``"feature"``: measured on unlabelled samples, last.
    kind: ClassVar[str] = "weight"
    #: A weight step whose result on a block of a tensor's rows is that block of its result on the whole model, so a
    #: streamed merge can apply it one key's row block at a time.
    row_separable: ClassVar[bool] = False

    def apply(self, merged_tv: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
              sensitive: Optional[Collection[str]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """A weight step on the merged task vector ``merged_tv`` (read one key at a time) and the K task vectors.

        ``sensitive``: the setting's sensitive set (``None``: no gating; steps that have no use for it ignore it).
        Returns the calibrated tensors of the keys this step changes (the caller writes ``theta0 + tensor`` into the
        model) and the per-row scales it applied, per tensor (empty for a step that scales no rows)."""
        raise NotImplementedError(f"calibration step {self.name!r} ({self.kind}) has no weight-space apply()")

    def calibrator(self, base: StateSource, merged: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                   sensitive: Optional[Collection[str]], *, modules: Optional[Sequence[str]] = None,
                   task_names: Optional[Sequence[str]] = None) -> FeatureSpaceCalibrator:
        """A feature step's calibrator on ``merged``; the caller feeds it unlabelled batches (``update``), then folds
        it (``fold() -> CalibrationResult``). FSC's is summed over processes through its statistics' metric; any other
        (FeatCal's) measures in passes of its own and offers ``finalize(reduce)``, given the sum over processes."""
        raise NotImplementedError(f"calibration step {self.name!r} ({self.kind}) has no feature calibrator()")

    def options(self) -> dict[str, Any]:
        """Every option, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        default = type(self)()
        return {k: v for k, v in self.options().items() if v != getattr(default, k)}

    def to_dict(self) -> dict[str, Any]:
        """``{"step": name, **options}``; an infinite number is written ``"inf"`` (JSON has no infinity)."""
        return {"step": self.name, **{k: jsonable(v) for k, v in self.options().items()}}

    # --- checks for __post_init__: each normalises one field or raises a ValueError naming the step and field ------
    def _choice(self, field: str, choices: Sequence[str]) -> None:
        if getattr(self, field) not in choices:
            raise self._bad(field, f"one of {tuple(choices)}")

    def _number(self, field: str, ok: Callable[[float], bool], rule: str, *, optional: bool = False) -> None:
        """``field`` as a finite float satisfying ``ok``; with ``optional``, ``None`` (or ``"none"``) stays None."""
        value = getattr(self, field)
        if optional and unset(value):
            object.__setattr__(self, field, None)
            return
        v = as_float(value)
        if not (math.isfinite(v) and ok(v)):
            raise self._bad(field, rule + (" or None" if optional else ""))
        object.__setattr__(self, field, v)

    def _flag(self, field: str) -> None:
        """``field`` as a bool; a setting string's ``true``/``false`` (``1``/``0``, ``yes``/``no``) converted."""
        value = getattr(self, field)
        if isinstance(value, str):
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
                value.strip().lower(), value)
        if not isinstance(value, bool):
            raise self._bad(field, "true or false")
        object.__setattr__(self, field, value)

    def _bad(self, field: str, rule: str) -> ValueError:
        return ValueError(f"calibration step {self.name!r}: {field}={getattr(self, field)!r} must be {rule}")


T = TypeVar("T", bound=CalibrationStep)


def register_step(cls: type[T]) -> type[T]:
    """Class decorator: add a :class:`CalibrationStep` type to :data:`STEPS` under its ``name`` (lowercase letters,
    digits and ``_``; not ``none`` or ``dsc``). Registering another class under a taken name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, CalibrationStep)):
        raise TypeError(f"register_step: {cls!r} is not a CalibrationStep subclass")
    if not (is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"register_step: {cls.__name__} must be a frozen dataclass (settings are hashable)")
    name = cls.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in _RESERVED:
        raise ValueError(f"register_step: {cls.__name__}.name={name!r} must be lowercase letters, digits and '_', "
                         f"and not one of {_RESERVED}")
    if cls.kind not in ("weight", "feature"):
        raise ValueError(f"register_step: {cls.__name__}.kind={cls.kind!r} must be 'weight' or 'feature'")
    prev = _REGISTRY.get(name)
    if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register_step: step {name!r} is already {prev.__module__}.{prev.__qualname__}")
    cls()  # every option has a default: the defaults are the step's identity and the fallback of a setting's fields
    _REGISTRY[name] = cls
    return cls


def make_step(name: str, **options: Any) -> CalibrationStep:
    """A step of the registered type ``name`` with ``options`` (unknown names are a ValueError listing the known)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown calibration step {name!r}; steps: {', '.join(sorted(_REGISTRY))}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"calibration step {name!r}: unknown option(s) {unknown}; options: {known}")
    return cls(**options)


def as_float(value: Any) -> float:
    """``value`` as a float; NaN when it is none (so every check of a finite range refuses it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def unset(value: Any) -> bool:
    """``None`` or its spelling in a setting string."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
