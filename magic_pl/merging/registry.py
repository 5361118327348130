"""The streaming drivers ``merge`` (task vectors -> merged task vector) and ``merge_models`` (base + experts -> merged
model), both computed key by key (docs/method.md), and the option checks front doors call. Everything method-specific
comes from the registered :class:`~magic_pl.merging.method.MergeMethod`."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from magic_pl.statedict import (
    CheckpointError,
    LazyTaskVector,
    apply_delta,
    ensure_finite,
    is_batchnorm_stat,
    is_mergeable,
    iter_task_vectors,
    load_state_dict,
    tensor_file,
    validate_experts,
)

from ._common import MergeError, prepare, tmean
from .method import MergeMethod, get_method

#: ``fn(taus: Sequence[Tensor], *, name: str = "", **options) -> Tensor`` (float32, same shape as each tau). A
#: method that needs the base model's tensor (SLERP between full weights) also takes ``base: Tensor | None``; the
#: drivers pass it. ``name`` and ``base`` are context, not options.
MergeFn = Callable[..., Tensor]

BN_STATS_POLICIES = ("average", "base")


def method_options(method: str) -> dict[str, Any]:
    """Option names of ``method`` and their defaults (with options that depend on another option, every possible one:
    for ``dare``, its own plus those of every ``then`` method)."""
    return get_method(method).defaults()


def split_driver_args(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method options, driver arguments)``: front doors take one dict of merge options in which the merge
    drivers' own ``bn_stats`` and ``seed`` sit beside the method's options; the streamed paths pass them apart."""
    driver = {k: options[k] for k in ("bn_stats", "seed") if k in options}
    return {k: v for k, v in options.items() if k not in driver}, driver


def validate_merge_options(method: str, options: Mapping[str, Any], *, driver: bool = True) -> dict[str, Any]:
    """Check ``method``'s options before any tensor is read; return them normalised (numbers as float/int).

    Refuses, with a message naming the method and the option: unknown option names (listing the valid ones),
    non-numbers and non-finite numbers, and values outside the option's range (each option's rule is declared with
    the method: e.g. ``|scale| > 1e3``, ``density`` outside (0, 1], ``p`` outside [0, 1), ``t`` outside [0, 1], an
    invalid ``matrix_exclude`` regex), plus the combinations a method forbids (breadcrumbs' ``gamma < beta``;
    DELLA's ``density +/- epsilon`` outside (0, 1)). Cheap (no tensor, no file): front doors call it as early as they
    can. A data-based method (RegMean) takes its own options only.

    Args:
        method: a registered method (:data:`~magic_pl.merging.METHODS`).
        options: the caller's options; with ``driver`` they may include the drivers' own ``bn_stats`` and ``seed``
            (as front doors take them in one dict), checked and returned as they are.
        driver: accept the options only :func:`merge`/:func:`merge_models` handle (the method's driver options,
            e.g. ``global_topk`` for ``ties``, and ``bn_stats``, ``seed``); ``False`` for :func:`merge_tensor`.
    """
    spec = get_method(method)
    if spec.needs_data:
        if not driver:
            raise ValueError(f"{method!r} is a data-based merge of whole layers, not a per-tensor rule")
        return spec.validate(options)
    own = split_driver_args(options)[1] if driver else {}
    if "bn_stats" in own and own["bn_stats"] not in BN_STATS_POLICIES:
        raise ValueError(f"unknown bn_stats={own['bn_stats']!r}; valid: {', '.join(BN_STATS_POLICIES)}")
    if "seed" in own and (isinstance(own["seed"], bool) or not isinstance(own["seed"], int)):
        raise ValueError(f"merge option seed must be an integer, got {own['seed']!r}")
    out = spec.validate({k: v for k, v in options.items() if k not in own}, driver=driver)
    return {**out, **own}


def _check_task_count(spec: MergeMethod, k: int, options: Mapping[str, Any]) -> None:
    msg = spec.task_count_error(k, options)
    if msg:
        raise ValueError(msg)


def _ensure_finite_inputs(taus: Sequence[Tensor], key: str, sources: Sequence[Mapping[str, Tensor]] = (),
                          skip: Collection[int] = ()) -> None:
    """Refuse NaN/Inf in the K input slices of ``key``, naming the task vector (its index, and its file when its
    source in ``sources`` knows it) and the key; indices in ``skip`` come from sources that checked them already.
    Needed on inputs, not only outputs: DARE's random drop, TIES' and Breadcrumbs' trims and the consensus masks can
    discard the one bad entry and return a finite result."""
    for i, t in enumerate(taus):
        if i in skip or not isinstance(t, Tensor):  # a non-tensor is refused by the method's input check
            continue
        file = tensor_file(sources[i], key) if sources else None
        ensure_finite(t, key, f"task vector {i}" + (f" ({file})" if file is not None else ""))


def _checks_finite(tv: Mapping[str, Tensor]) -> bool:
    """Whether ``tv`` refuses NaN/Inf itself when a key is read (a :class:`LazyTaskVector` with ``check_finite``),
    so the driver need not look at its tensors again."""
    return isinstance(tv, LazyTaskVector) and tv.check_finite


def _check_output(method: str, key: str, out: Tensor) -> Tensor:
    """``out``, unless it holds NaN/Inf: then :class:`MergeError` naming the method and key."""
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise MergeError(
            f"merge method {method!r} produced {bad} non-finite value(s) for {key!r} (shape {tuple(out.shape)}); "
            "check that key's task vectors for NaN/Inf"
        )
    return out


def _run_method(method: str, fn: MergeFn, taus: Sequence[Tensor], key: str, options: Mapping[str, Any],
                base: Tensor | None) -> Tensor:
    """One method call with the key in every failure: LAPACK errors are re-raised naming the key, and a non-finite
    result raises :class:`MergeError` (NaN/Inf never passes silently)."""
    kwargs = dict(options)
    if base is not None:
        kwargs["base"] = base
    try:
        out = fn(taus, name=key, **kwargs)
    except torch.linalg.LinAlgError as err:
        raise MergeError(f"merge method {method!r} failed on {key!r}: {err}") from err
    return _check_output(method, key, out)


def merge_tensor(
    method: str, taus: Sequence[Tensor], *, name: str = "", base: Tensor | None = None, **options: Any
) -> Tensor:
    """Merge the K task-vector slices of one parameter with ``method`` (a key of :data:`MERGE_METHODS`).

    ``name`` is the parameter's key: it appears in error messages, seeds DARE's and DELLA's masks and selects which
    2-D tensors the SVD methods treat as matrices. ``base`` is the base model's tensor, needed only by methods that
    work on full weights (``slerp(space="weights")``). Returns a new float32 tensor; raises :class:`MergeError`
    naming the key when the result is not finite.
    """
    options = validate_merge_options(method, options, driver=False)
    spec = get_method(method)
    if not isinstance(taus, Tensor) and isinstance(taus, Sequence):
        _check_task_count(spec, len(taus), options)
        _ensure_finite_inputs(taus, name or "tensor")
    return _run_method(method, spec.fn, taus, name, options, base)


def _base_missing(method: str) -> ValueError:
    return ValueError(f"merge method {method!r} needs the base model's weights with these options: pass base= "
                      "(merge_models passes its base)")


def _base_tensor(base: Mapping[str, Tensor] | None, key: str, method: str) -> Tensor:
    if base is None:
        raise _base_missing(method)
    try:
        t = base[key].to(torch.float32)
    except KeyError:
        raise CheckpointError(f"the base model lacks key {key!r} of the task vectors") from None
    file = tensor_file(base, key)
    ensure_finite(t, key, "the base model" + (f" ({file})" if file is not None else ""))
    return t


def _iter_merged(
    spec: MergeMethod,
    items: Iterator[tuple[str, Sequence[Tensor]]],
    *,
    bn_stats: str,
    seed: int,
    options: dict[str, Any],
    base: Mapping[str, Tensor] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, tau_m)`` for each ``(key, [tau_1..tau_K])``; BatchNorm statistics bypass the method."""
    method = spec.name
    if "seed" in spec.options and "seed" not in options:
        options = {**options, "seed": seed}
    wants_base = spec.uses_base(options)
    for key, taus in items:
        if is_batchnorm_stat(key):
            ts = prepare(taus, key)
            yield key, (_check_output(method, key, tmean(ts)) if bn_stats == "average" else torch.zeros_like(ts[0]))
        else:
            b = _base_tensor(base, key, method) if wants_base else None
            yield key, _run_method(method, spec.fn, taus, key, options, b)


def _prepare_driver(method: str, bn_stats: str, options: dict[str, Any]
                    ) -> tuple[MergeMethod, dict[str, Any], dict[str, Any]]:
    """The method, its per-tensor options and its driver options (for :attr:`MergeMethod.prepass`), validated."""
    spec = get_method(method)
    if spec.needs_data:
        raise ValueError(f"{method!r} is a data-based merge: it needs the model and unlabelled samples per task; use "
                         f"magic_pl.merging.get_method({method!r})(base, model, task_vectors, batches) or "
                         f"MagicModule(merge_method={method!r}) with calibration data (trainer.predict)")
    options = validate_merge_options(method, {**options, "bn_stats": bn_stats}, driver=True)
    options.pop("bn_stats")
    driver = {k: options.pop(k) for k in list(options) if k in spec.driver_options}
    return spec, options, driver


def _runs_prepass(spec: MergeMethod, driver: Mapping[str, Any]) -> bool:
    return spec.prepass is not None and bool(driver or spec.prepass_required)


def _run_prepass(spec: MergeMethod, task_vectors: Sequence[Mapping[str, Tensor]], keys: list[str],
                 options: dict[str, Any], driver: dict[str, Any], base: Mapping[str, Tensor] | None
                 ) -> dict[str, Any]:
    """``options`` after the method's pass over every key (:attr:`MergeMethod.prepass`): run when a driver option is
    given or the method requires it; a prepass that takes the base gets it as ``base=``."""
    if not _runs_prepass(spec, driver):
        return options
    extra = {"base": base} if spec.prepass_base else {}
    return spec.prepass(task_vectors, keys, options, **extra, **driver)


def merge(
    method: str,
    task_vectors: Sequence[Mapping[str, Tensor]],
    *,
    bn_stats: str = "average",
    seed: int = 0,
    base: Mapping[str, Tensor] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Merge K task vectors into ``tau_m`` (scaling coefficient included), one parameter at a time.

    Only the K slices of the current key are resident, so :class:`~magic_pl.statedict.LazyStateDict` inputs stream
    from disk. BatchNorm running statistics never go through the method: ``bn_stats="average"`` gives
    ``mean_k tau_k``, ``"base"`` gives zeros (keep the base's statistics).

    Args:
        method: a key of :data:`MERGE_METHODS`.
        task_vectors: K mappings with the same keys and shapes (float tensors).
        bn_stats: ``"average"`` (default) or ``"base"``.
        seed: seed for randomised methods (DARE, DELLA); ignored by the others.
        base: the base model's tensors (key -> tensor), read one key at a time; needed only by methods that work on
            full weights (``slerp`` with ``space="weights"``) or on the base's layers (``larv``); checked before
            any tensor is read.
        **options: the method's options (see :func:`method_options`), validated by :func:`validate_merge_options`
            before any tensor is read. ``ties`` also takes ``global_topk=True``: one magnitude threshold per task over
            all non-BatchNorm tensors, computed in a first pass; ``larv`` always makes such a pass (per-layer
            scales, from the task vectors and ``base``).

    Returns:
        key -> float32 tensor, in the key order of ``task_vectors[0]``.

    Raises:
        MergeError: a merged tensor is not finite, or the method's linear algebra failed (the message names the key).
    """
    spec, options, driver = _prepare_driver(method, bn_stats, options)
    _seed_ok(seed)
    task_vectors = list(task_vectors)
    if len(task_vectors) == 0:
        raise CheckpointError("need at least one task vector (K >= 1), got none")
    _check_task_count(spec, len(task_vectors), options)
    if base is None and (spec.uses_base(options) or (spec.prepass_base and _runs_prepass(spec, driver))):
        # before any tensor is read
        raise _base_missing(method)
    keys = list(task_vectors[0].keys())
    key_set = set(keys)
    for i, tv in enumerate(task_vectors[1:], start=1):
        other = set(tv.keys())
        if other != key_set:
            missing, extra = sorted(key_set - other), sorted(other - key_set)
            raise CheckpointError(
                f"task vector {i} does not match task vector 0: missing keys {missing[:5]}, extra keys {extra[:5]}"
            )
    options = _run_prepass(spec, task_vectors, [k for k in keys if not is_batchnorm_stat(k)], options, driver, base)
    checked = {i for i, tv in enumerate(task_vectors) if _checks_finite(tv)}

    def items() -> Iterator[tuple[str, list[Tensor]]]:
        # each input tensor is checked as it is read, once (lazy task vectors check themselves)
        for key in keys:
            taus = [tv[key] for tv in task_vectors]
            _ensure_finite_inputs(taus, key, task_vectors, skip=checked)
            yield key, taus

    return dict(_iter_merged(spec, items(), bn_stats=bn_stats, seed=seed, options=options, base=base))


def _seed_ok(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed={seed!r} must be an integer")


def _dtype_of(sd: Mapping[str, Tensor], key: str) -> torch.dtype:
    dtype = getattr(sd, "dtype", None)
    return dtype(key) if callable(dtype) else sd[key].dtype


def merge_models(
    base: Any,
    experts: Sequence[Any],
    method: str,
    *,
    bn_stats: str = "average",
    seed: int = 0,
    check_finite: bool = True,
    **options: Any,
) -> dict[str, Tensor]:
    """Merge expert checkpoints of one base: ``theta0 + tau_m`` in the base's dtypes, streaming key by key.

    Args:
        base, experts: anything :func:`~magic_pl.statedict.load_state_dict` accepts (paths, mappings, modules);
            safetensors files are read lazily, one tensor at a time.
        method, bn_stats, seed, **options: as in :func:`merge` (the base is passed to methods that need it).
        check_finite: refuse NaN/Inf in the base and experts (checked in the read that builds each task vector, no
            extra pass) and in the merged model (default ``True``).

    Returns:
        A full state dict: float keys ``base + tau_m`` (float32 arithmetic, float64 for float64 bases), integer/bool
        buffers copied from the base.
    """
    spec, options, driver = _prepare_driver(method, bn_stats, options)
    _seed_ok(seed)
    _check_task_count(spec, len(experts), options)
    base_sd = load_state_dict(base)
    expert_sds = [load_state_dict(e) for e in experts]
    validate_experts(base_sd, expert_sds, check_finite=False)  # structure; values are checked as they are read
    if _runs_prepass(spec, driver):
        float_keys = [k for k in base_sd if is_mergeable(_dtype_of(base_sd, k)) and not is_batchnorm_stat(k)]
        views = [LazyTaskVector(e, base_sd, check_finite=check_finite) for e in expert_sds]
        options = _run_prepass(spec, views, float_keys, options, driver, base_sd)
    out: dict[str, Tensor] = {}
    merged = _iter_merged(
        spec, iter_task_vectors(base_sd, expert_sds, check_finite=check_finite), bn_stats=bn_stats, seed=seed,
        options=options, base=base_sd
    )
    pending = next(merged, None)
    for key in base_sd:
        b = base_sd[key]
        if pending is not None and pending[0] == key:
            out[key] = apply_delta(b, pending[1], key=key, name=f"{method} merge")
            pending = next(merged, None)
        else:
            out[key] = b.clone()
    if pending is not None:  # iter_task_vectors walks the base's keys in order, so this cannot happen
        raise RuntimeError(f"merge_models: merged key {pending[0]!r} out of order")
    return out
