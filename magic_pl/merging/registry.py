"""Method registry and the streaming drivers ``merge`` (task vectors -> merged task vector) and ``merge_models``
(base + experts -> merged model), both computed key by key (DESIGN.md section 3)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from magic_pl.statedict import (
    CheckpointError,
    is_batchnorm_stat,
    is_mergeable,
    iter_task_vectors,
    load_state_dict,
    validate_experts,
)

from ._common import prepare, tmean
from .basic import task_arithmetic, weight_average
from .breadcrumbs import breadcrumbs
from .consensus import consensus
from .dare import DARE_THEN, dare
from .svd import iso_c, iso_cts, tsv_m
from .ties import global_magnitude_thresholds, ties

#: ``fn(taus: Sequence[Tensor], *, name: str = "", **options) -> Tensor`` (float32, same shape as each tau).
MergeFn = Callable[..., Tensor]

MERGE_METHODS: dict[str, MergeFn] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "breadcrumbs": breadcrumbs,
    "consensus": consensus,
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
}

BN_STATS_POLICIES = ("average", "base")

# Options handled by ``merge`` itself rather than by the per-tensor function.
_DRIVER_OPTIONS = {"ties": ("global_topk",)}


def _method(method: str) -> MergeFn:
    try:
        return MERGE_METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown merge method {method!r}; valid methods: {', '.join(MERGE_METHODS)}"
        ) from None


def _own_options(fn: MergeFn) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {
        n: p.default
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "name"
    }


def method_options(method: str) -> dict[str, Any]:
    """Option names of ``method`` and their defaults (for ``dare``, its own plus those of every ``then`` method)."""
    fn = _method(method)
    opts = _own_options(fn)
    if method == "dare":
        for then_fn in DARE_THEN.values():
            for k, v in _own_options(then_fn).items():
                if k != "thresholds":
                    opts.setdefault(k, v)
    return opts


def _check_options(method: str, options: Mapping[str, Any], *, driver: bool) -> None:
    """Raise ``ValueError`` listing the valid options when ``options`` holds one ``method`` does not take."""
    fn = _method(method)
    valid = set(_own_options(fn))
    if method == "dare":
        then = options.get("then", _own_options(fn)["then"])
        if then not in DARE_THEN:
            raise ValueError(f"dare: unknown then={then!r}; valid: {', '.join(sorted(DARE_THEN))}")
        valid |= set(_own_options(DARE_THEN[then])) - {"thresholds"}
    if driver:
        valid |= set(_DRIVER_OPTIONS.get(method, ()))
    unknown = sorted(set(options) - valid)
    if unknown:
        hint = ""
        if not driver and any(u in _DRIVER_OPTIONS.get(method, ()) for u in unknown):
            hint = " (global_topk needs all tensors: use merge()/merge_models(), not merge_tensor())"
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for merge method {method!r}; "
            f"valid options: {', '.join(sorted(valid)) or '(none)'}{hint}"
        )


def merge_tensor(method: str, taus: Sequence[Tensor], *, name: str = "", **options: Any) -> Tensor:
    """Merge the K task-vector slices of one parameter with ``method`` (a key of :data:`MERGE_METHODS`).

    ``name`` is the parameter's key: it appears in error messages, seeds DARE's masks and selects which 2-D tensors
    the SVD methods treat as matrices. Returns a new float32 tensor.
    """
    _check_options(method, options, driver=False)
    return MERGE_METHODS[method](taus, name=name, **options)


def _accepts_seed(method: str) -> bool:
    return "seed" in _own_options(_method(method))


def _iter_merged(
    method: str,
    items: Iterator[tuple[str, Sequence[Tensor]]],
    *,
    bn_stats: str,
    seed: int,
    options: dict[str, Any],
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, tau_m)`` for each ``(key, [tau_1..tau_K])``; BatchNorm statistics bypass the method."""
    fn = MERGE_METHODS[method]
    if _accepts_seed(method) and "seed" not in options:
        options = {**options, "seed": seed}
    for key, taus in items:
        if is_batchnorm_stat(key):
            ts = prepare(taus, key)
            yield key, (tmean(ts) if bn_stats == "average" else torch.zeros_like(ts[0]))
        else:
            out = fn(taus, name=key, **options)
            yield key, out


def _prepare_driver(method: str, bn_stats: str, options: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    _check_options(method, options, driver=True)
    if bn_stats not in BN_STATS_POLICIES:
        raise ValueError(f"unknown bn_stats={bn_stats!r}; valid: {', '.join(BN_STATS_POLICIES)}")
    options = dict(options)
    global_topk = bool(options.pop("global_topk", False))
    if global_topk and options.get("thresholds") is not None:
        raise ValueError("ties: pass either global_topk=True or thresholds, not both")
    return options, global_topk


def merge(
    method: str,
    task_vectors: Sequence[Mapping[str, Tensor]],
    *,
    bn_stats: str = "average",
    seed: int = 0,
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
        seed: seed for randomised methods (DARE); ignored by the others.
        **options: the method's options (see :func:`method_options`). ``ties`` also takes ``global_topk=True``: one
            magnitude threshold per task over all non-BatchNorm tensors, computed in a first pass.

    Returns:
        key -> float32 tensor, in the key order of ``task_vectors[0]``.
    """
    options, global_topk = _prepare_driver(method, bn_stats, options)
    task_vectors = list(task_vectors)
    if len(task_vectors) == 0:
        raise CheckpointError("need at least one task vector (K >= 1), got none")
    keys = list(task_vectors[0].keys())
    key_set = set(keys)
    for i, tv in enumerate(task_vectors[1:], start=1):
        other = set(tv.keys())
        if other != key_set:
            missing, extra = sorted(key_set - other), sorted(other - key_set)
            raise CheckpointError(
                f"task vector {i} does not match task vector 0: missing keys {missing[:5]}, extra keys {extra[:5]}"
            )
    if global_topk:
        method_keys = [k for k in keys if not is_batchnorm_stat(k)]
        options["thresholds"] = global_magnitude_thresholds(task_vectors, method_keys, options.get("density", 0.2))
    items = ((key, [tv[key] for tv in task_vectors]) for key in keys)
    return dict(_iter_merged(method, items, bn_stats=bn_stats, seed=seed, options=options))


def _dtype_of(sd: Mapping[str, Tensor], key: str) -> torch.dtype:
    dtype = getattr(sd, "dtype", None)
    return dtype(key) if callable(dtype) else sd[key].dtype


class _TaskVectorView(Mapping[str, Tensor]):
    """Lazy ``expert - base`` over the base's float keys (used by the global TIES pre-pass of ``merge_models``)."""

    def __init__(self, base: Mapping[str, Tensor], expert: Mapping[str, Tensor], keys: Sequence[str]):
        self._base, self._expert, self._keys = base, expert, list(keys)

    def __getitem__(self, key: str) -> Tensor:
        return self._expert[key].to(torch.float32) - self._base[key].to(torch.float32)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


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
        method, bn_stats, seed, **options: as in :func:`merge`.
        check_finite: validate that no expert tensor holds NaN/Inf (reads every tensor once more).

    Returns:
        A full state dict: float keys ``base + tau_m`` (float32 arithmetic, cast to the base dtype), integer/bool
        buffers copied from the base.
    """
    options, global_topk = _prepare_driver(method, bn_stats, options)
    base_sd = load_state_dict(base)
    expert_sds = [load_state_dict(e) for e in experts]
    validate_experts(base_sd, expert_sds, check_finite=check_finite)
    if global_topk:
        float_keys = [k for k in base_sd if is_mergeable(_dtype_of(base_sd, k)) and not is_batchnorm_stat(k)]
        views = [_TaskVectorView(base_sd, e, float_keys) for e in expert_sds]
        options["thresholds"] = global_magnitude_thresholds(views, float_keys, options.get("density", 0.2))
    out: dict[str, Tensor] = {}
    merged = _iter_merged(method, iter_task_vectors(base_sd, expert_sds), bn_stats=bn_stats, seed=seed, options=options)
    pending = next(merged, None)
    for key in base_sd:
        b = base_sd[key]
        if pending is not None and pending[0] == key:
            out[key] = (b.to(torch.float32) + pending[1]).to(b.dtype)
            pending = next(merged, None)
        else:
            out[key] = b.clone()
    if pending is not None:  # iter_task_vectors walks the base's keys in order, so this cannot happen
        raise RuntimeError(f"merge_models: merged key {pending[0]!r} out of order")
    return out
