"""A merge method is one registered, self-describing object: :class:`MergeMethod`, made by :func:`merge_method`.

The decorated function is the method; its keyword-only parameters are its options, each with a default and a rule
(``typing.Annotated[float, Interval(0, 1)]``, see :mod:`magic_pl.merging.options`). The decorator's arguments are
its traits (paper, task counts, base, row separability, data, linear coefficients, driver options, option
combinations, composed steps). Front doors ask the object (:func:`get_method`) instead of branching on names::

    @merge_method(name="mean_of_two", paper="...", min_tasks=2, max_tasks=2, row_separable=True)
    def mean_of_two(taus, *, name: str = "", scale: Scale = 1.0) -> Tensor:
        ...

Registration is automatic: importing :mod:`magic_pl.merging` imports every module of the package.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

from .options import Rule

#: Keyword-only parameters of a per-tensor function that the drivers fill: ``name`` (the parameter's key) and
#: ``base`` (the base model's tensor). Not options.
PER_TENSOR_CONTEXT = ("name", "base")


@dataclass(frozen=True)
class Option:
    """One option: its default and its rule (``rule(method, option, value) -> normalised value``)."""

    default: Any
    rule: Rule


class Linear(NamedTuple):
    """A linear merge ``tau_m = sum_k weights[k] tau_k / divisor``; per-task coefficients ``weights[k] / divisor``.

    Kept as weights and a divisor (not only their quotients) so a caller can reproduce the method's own float
    arithmetic: task arithmetic is ``scale * sum_k tau_k``, the weight average ``sum_k tau_k / K``.
    """

    weights: tuple[float, ...]
    divisor: float = 1.0

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(w / self.divisor for w in self.weights)


#: ``(K, options) -> message or None``: why the method cannot merge K task vectors with these options (defaults
#: filled in).
TaskRule = Callable[[int, Mapping[str, Any]], Optional[str]]
#: ``(options) -> None``, raising ``ValueError``: a rule over several options (given with the defaults filled in).
CombinationCheck = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True, eq=False)
class MergeMethod:
    """A registered merge method (see :func:`merge_method` for the traits). Calling it calls ``fn``."""

    name: str
    fn: Callable[..., Any]
    paper: str
    options: Mapping[str, Option]
    min_tasks: int = 1
    max_tasks: Optional[int] = None
    task_rule: Optional[TaskRule] = None
    needs_base: Union[bool, Callable[[Mapping[str, Any]], bool]] = False
    row_separable: bool = False
    needs_data: bool = False
    linear: Optional[Callable[[int, Mapping[str, Any]], Linear]] = None
    prepass: Optional[Callable[..., dict[str, Any]]] = None
    prepass_required: bool = False
    #: the prepass takes ``base=`` (derived from its signature at registration)
    prepass_base: bool = False
    driver_options: Mapping[str, Option] = field(default_factory=dict)
    check: Optional[CombinationCheck] = None
    more_options: Optional[Callable[[Optional[Mapping[str, Any]]], Mapping[str, Option]]] = None
    steps: tuple[Callable[..., Any], ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    # ---- options ----------------------------------------------------------------------------------------------
    def option_specs(self, options: Optional[Mapping[str, Any]] = None, *, driver: bool = False) -> dict[str, Option]:
        """The options this method takes given the caller's ``options`` (``None``: every possible one, e.g. all of
        DARE's ``then`` methods'); with ``driver``, also those :func:`~magic_pl.merging.merge` handles."""
        specs = dict(self.options)
        if self.more_options is not None:
            for k, spec in self.more_options(options).items():
                specs.setdefault(k, spec)
        if driver:
            specs.update(self.driver_options)
        return specs

    def defaults(self) -> dict[str, Any]:
        """Option name -> default, for every option the method may take (driver options excluded)."""
        return {k: spec.default for k, spec in self.option_specs().items()}

    def validate(self, options: Mapping[str, Any], *, driver: bool = False) -> dict[str, Any]:
        """``options`` checked and normalised: unknown names refused (listing the valid ones), every value through
        its rule, then the method's combination check. Reads no tensor."""
        specs = self.option_specs(options, driver=driver)
        unknown = sorted(set(options) - set(specs))
        if unknown:
            hint = ""
            whole = [u for u in unknown if u in self.driver_options]
            if not driver and whole:
                hint = f" ({', '.join(whole)} needs all tensors: use merge()/merge_models(), not merge_tensor())"
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for merge method {self.name!r}; "
                f"valid options: {', '.join(sorted(specs)) or '(none)'}{hint}"
            )
        out = {k: specs[k].rule(self.name, k, v) for k, v in options.items()}
        if self.check is not None:
            self.check({**{k: s.default for k, s in specs.items()}, **out})
        return out

    # ---- traits -----------------------------------------------------------------------------------------------
    def uses_base(self, options: Mapping[str, Any]) -> bool:
        """Whether the per-tensor function needs the base model's tensor with these options."""
        if callable(self.needs_base):
            return bool(self.needs_base({**self.defaults(), **options}))
        return self.needs_base

    def task_count_error(self, k: int, options: Mapping[str, Any]) -> Optional[str]:
        """Why this method cannot merge ``k`` task vectors with ``options``, or ``None``."""
        if self.task_rule is not None:
            msg = self.task_rule(k, {**self.defaults(), **options})
            if msg:
                return msg
        lo, hi = self.min_tasks, self.max_tasks
        # K = 0 is a missing input, refused as such by the drivers and by every function's input check
        if 0 < k < lo or (hi is not None and k > hi):
            allowed = f"at least {lo}" if hi is None else f"exactly {lo}" if hi == lo else f"{lo} to {hi}"
            return f"merge method {self.name!r} needs {allowed} task vectors, got K = {k}"
        return None

    def linear_weights(self, k: int, options: Mapping[str, Any]) -> Linear:
        """The method's :class:`Linear` combination of ``k`` task vectors (options as the caller gives them);
        ``ValueError`` for a method that is not a linear combination."""
        if self.linear is None:
            raise ValueError(f"merge method {self.name!r} is not a linear combination of the task vectors; linear "
                             f"ones: {', '.join(n for n, m in METHODS.items() if m.linear is not None)}")
        return self.linear(k, {**self.defaults(), **options})


def options_of(fn: Callable[..., Any], context: Sequence[str] = ()) -> dict[str, Option]:
    """The options of ``fn``: its keyword-only parameters not in ``context``, each with its default and the
    :class:`~magic_pl.merging.options.Rule` of its ``Annotated`` type. A parameter without a rule or a default is a
    bug of the method, reported when it is defined."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out: dict[str, Option] = {}
    for n, p in inspect.signature(fn).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or n in context:
            continue
        rules = [m for m in getattr(hints.get(n), "__metadata__", ()) if isinstance(m, Rule)]
        if len(rules) != 1 or p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__qualname__}: option {n!r} needs a default and one rule, e.g. "
                            f"`{n}: Annotated[float, Interval(0, 1)] = 0.5`")
        out[n] = Option(p.default, rules[0])
    return out


def then_option_specs(owner: str, choices: Sequence[str], options: Optional[Mapping[str, Any]], *,
                 rename: Callable[[str], str] = str) -> dict[str, Option]:
    """The options of the method ``owner`` hands its transformed task vectors to (its option ``then``, one of
    ``choices``): of the chosen one, or of every choice when ``options`` is ``None``, each under ``rename(name)``.
    TIES' ``thresholds`` are left out: magnitudes of the task vectors before the owner's step. For a method's
    ``more_options``."""
    if options is None:
        names = list(choices)
    else:
        then = get_method(owner).options["then"]
        names = [then.rule(owner, "then", options.get("then", then.default))]
    out: dict[str, Option] = {}
    for name in names:
        for k, spec in get_method(name).options.items():
            if k != "thresholds":
                out.setdefault(rename(k), spec)
    return out


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    *,
    name: str,
    paper: str,
    min_tasks: int = 1,
    max_tasks: Optional[int] = None,
    task_rule: Optional[TaskRule] = None,
    needs_base: Union[bool, Callable[[Mapping[str, Any]], bool]] = False,
    row_separable: bool = False,
    needs_data: bool = False,
    linear: Optional[Callable[[int, Mapping[str, Any]], Linear]] = None,
    prepass: Optional[Callable[..., dict[str, Any]]] = None,
    prepass_required: bool = False,
    check: Optional[CombinationCheck] = None,
    more_options: Optional[Callable[[Optional[Mapping[str, Any]]], Mapping[str, Option]]] = None,
    steps: Sequence[Callable[..., Any]] = (),
    context: Sequence[str] = PER_TENSOR_CONTEXT,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as merge method ``name``; the function is returned unchanged.

    A per-tensor function is ``fn(taus, *, name="", [base=None,] **options) -> Tensor`` (float32, scaling included).
    A data-based one (``needs_data``) is ``fn(base, model, task_vectors, batches, *, **options, **context)`` and
    returns whole task vectors.

    Args:
        name: the registry name front doors take.
        paper: the reference ("Authors, venue year, arXiv id").
        min_tasks, max_tasks: the K the method merges (``max_tasks=None``: no upper bound).
        task_rule: ``(K, options) -> message or None`` for K rules that depend on options (SLERP's ``space``) or
            need their own words; options come with the defaults filled in.
        needs_base: the function takes the base model's tensor (``base=``); a callable ``(options) -> bool`` (defaults
            filled in) when that depends on options.
        row_separable: output row i depends only on row i of the inputs, bit for bit whichever rows come along
            (elementwise rules): streaming may merge a large tensor block of rows by block of rows.
        needs_data: a data-based merge of whole models (RegMean): not a per-tensor rule, front doors run it on the
            calibration samples.
        linear: ``(K, options) -> Linear`` for a linear combination of the task vectors (the LoRA low-rank path
            merges factors with these coefficients); ``None`` otherwise. Options come with the defaults filled in.
        prepass: ``(task_vectors, keys, options, [base=...,] **driver_options) -> options``, a pass over every
            tensor that :func:`~magic_pl.merging.merge` and :func:`~magic_pl.merging.merge_models` run before the
            per-tensor calls when a driver option is given (TIES' ``global_topk`` thresholds), or always with
            ``prepass_required``; its keyword-only parameters other than ``base`` are the driver options, declared
            like the function's. A prepass with a ``base`` parameter gets the base model's tensors (key -> tensor);
            the per-tensor calls get the base only with ``needs_base``.
        prepass_required: the prepass always runs (its driver options' defaults apply): the method cannot merge a
            tensor without a pass over all of them (LARV's per-layer scales), so the per-tensor paths (streaming,
            layer by layer, into shards) refuse it.
        check: a rule over several options (Breadcrumbs' ``gamma >= beta``), raising ``ValueError``.
        more_options: ``(options or None) -> {name: Option}`` for options that depend on another option's value
            (DARE's ``then`` method's); ``None`` asks for every possible one.
        steps: the shared steps (:mod:`magic_pl.merging.steps`) the function composes, in order.
        context: keyword-only parameters that are not options (default ``("name", "base")``).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if prepass_required and prepass is None:
            raise TypeError(f"merge method {name!r}: prepass_required=True needs a prepass")
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice ({_REGISTRY[name].fn.__module__} and "
                             f"{fn.__module__})")
        _REGISTRY[name] = MergeMethod(
            name=name, fn=fn, paper=paper, options=options_of(fn, context), min_tasks=min_tasks, max_tasks=max_tasks,
            task_rule=task_rule, needs_base=needs_base, row_separable=row_separable, needs_data=needs_data,
            linear=linear, prepass=prepass, prepass_required=prepass_required,
            prepass_base=prepass is not None and "base" in inspect.signature(prepass).parameters,
            driver_options=options_of(prepass, ("base",)) if prepass is not None else {}, check=check,
            more_options=more_options, steps=tuple(steps),
        )
        return fn

    return register


class _View(Mapping[str, MergeMethod]):
    """A live, read-only view of the registry, in registration order, filtered by ``keep``."""

    def __init__(self, keep: Callable[[MergeMethod], bool], what: str) -> None:
        self._keep = keep
        self._what = what

    def __getitem__(self, name: str) -> MergeMethod:
        m = _REGISTRY.get(name) if isinstance(name, str) else None
        if m is None or not self._keep(m):
            raise KeyError(name)
        return m

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, m in _REGISTRY.items() if self._keep(m)])

    def __len__(self) -> int:
        return sum(1 for m in _REGISTRY.values() if self._keep(m))

    def __repr__(self) -> str:
        return f"<{self._what}: {', '.join(self)}>"


#: Every registered merge method: name -> :class:`MergeMethod`.
METHODS: Mapping[str, MergeMethod] = _View(lambda m: True, "merge methods")
#: The per-tensor methods (what :func:`~magic_pl.merging.merge` takes): name -> :class:`MergeMethod`.
MERGE_METHODS: Mapping[str, MergeMethod] = _View(lambda m: not m.needs_data, "per-tensor merge methods")
#: The data-based methods (RegMean, RegMean++): name -> :class:`MergeMethod`.
DATA_MERGE_METHODS: Mapping[str, MergeMethod] = _View(lambda m: m.needs_data, "data-based merge methods")


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; valid methods: {', '.join(METHODS)}") from None
