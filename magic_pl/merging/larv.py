"""LARV: data-free layer-wise adaptive rescaling of the task vectors before any per-tensor merge (Wang et al., "LARV:
Data-Free Layer-wise Adaptive Rescaling Veneer for Model Merging", arXiv 2602.09413).

A pass over the whole model (the method's prepass) gives each task ``k`` and block ``l`` a factor ``s_{k,l}`` from
the base's and the task vector's weight matrices; the per-tensor function multiplies each task vector's slice by its
factor and hands the rescaled slices to the ``then`` method (Iso-C by default, the paper's headline pairing).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from magic_pl.statedict import CheckpointError, ensure_finite, tensor_file

from ._common import prepare
from .basic import task_arithmetic, weight_average
from .breadcrumbs import breadcrumbs
from .consensus import consensus
from .method import Option, get_method, merge_method, then_option_specs
from .options import Interval, OneOf, Rule, _fail, _real
from .svd import iso_c, iso_cts, tsv_m
from .ties import ties

_PAPER = "Wang et al., 2026, arXiv 2602.09413"

#: Methods LARV hands its rescaled task vectors to (option ``then``): the data-free per-tensor rules. Iso-C first: the
#: default, and the one whose option defaults :func:`~magic_pl.merging.registry.method_options` lists first.
LARV_THEN: dict[str, Callable[..., Tensor]] = {
    "iso_c": iso_c, "task_arithmetic": task_arithmetic, "ties": ties, "tsv_m": tsv_m, "iso_cts": iso_cts,
    "weight_average": weight_average, "breadcrumbs": breadcrumbs, "consensus": consensus,
}
_THEN = OneOf(tuple(LARV_THEN))
#: LARV's own option names; a ``then`` option of the same name (Breadcrumbs' ``gamma``) is taken as ``then_<name>``.
_OWN = ("then", "key_scales", "gate", "tiers", "eta", "rho", "delta", "gamma", "depth")
#: Matrices with at most this many entries go through the SVD and the Gram products in float64, larger ones in
#: float32 (the paper's quantities are ratios of norms and entropies: float32 is plenty, and 2x cheaper).
_FLOAT64_MAX_NUMEL = 1 << 18


def _then_name(option: str) -> str:
    return f"then_{option}" if option in _OWN else option


def _then_options(options: Optional[Mapping[str, Any]]) -> dict[str, Option]:
    """The options of the ``then`` method (of every choice when ``options`` is ``None``), under their own names except
    ``then_gamma`` for Breadcrumbs' ``gamma``. TIES' ``thresholds`` are not among them (magnitudes of the task vectors
    before the rescaling), nor its ``global_topk``."""
    return then_option_specs("larv", LARV_THEN, options, rename=_then_name)


def _then_kwargs(then: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``then`` method's own options among LARV's (``then_gamma`` back to ``gamma``)."""
    own = get_method(then).options
    return {k: options[_then_name(k)] for k in own if _then_name(k) in options and k != "thresholds"}


def _then_rule(options: Mapping[str, Any]) -> None:
    """The ``then`` method's own combination rule (Breadcrumbs' ``gamma >= beta``) on its options."""
    spec = get_method(options["then"])
    if spec.check is not None:
        try:
            spec.check({**spec.defaults(), **_then_kwargs(spec.name, options)})
        except ValueError as err:
            renamed = [_then_name(k) for k in spec.options if _then_name(k) != k]
            note = f" ({', '.join(renamed)} under larv)" if renamed else ""
            raise ValueError(f"merge method 'larv' with then={spec.name!r}{note}: {err}") from None


class _Tiers(Rule):
    """Three finite positive factors (lowest, middle, highest tercile of the layer scores)."""

    def __call__(self, method: str, option: str, value: Any) -> tuple[float, float, float]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
            raise _fail(method, option, value, "must be three numbers (low, middle, high tier)")
        out = tuple(_real(method, option, v) for v in value)
        if any(v <= 0 for v in out):
            raise _fail(method, option, value, "must be positive")
        return out  # type: ignore[return-value]


class _Depth(Rule):
    """``None``, a family name of :data:`~magic_pl.calibration.lines.LAYER_PATTERNS`, a regex whose first group is
    the block index, or a callable ``key -> index or None``."""

    def __call__(self, method: str, option: str, value: Any) -> Any:
        from magic_pl.calibration.lines import LAYER_PATTERNS  # here: magic_pl.calibration imports the merging package

        if value is None or callable(value):
            return value
        if not isinstance(value, str):
            raise _fail(method, option, value, "must be None, a family name, a regex or a callable")
        try:
            groups = re.compile(LAYER_PATTERNS.get(value, value)).groups
        except re.error as err:
            raise _fail(method, option, value, f"is neither a family ({', '.join(LAYER_PATTERNS)}) nor a valid regex "
                                               f"({err})") from None
        if groups < 1:
            raise _fail(method, option, value, "needs a regex group capturing the block index")
        return value


class _KeyScales(Rule):
    """``None``, or key -> one positive finite factor per task."""

    def __call__(self, method: str, option: str, value: Any) -> Optional[dict[str, list[float]]]:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise _fail(method, option, value, "must be a mapping key -> per-task factors, or None")
        out = {}
        for key, factors in value.items():
            if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
                raise _fail(method, option, value, f"must map {key!r} to a non-empty sequence of numbers")
            out[key] = [_real(method, option, f) for f in factors]
        return out


# --------------------------------------------------------------------------------------------------------------------
# The paper's per-matrix quantities
# --------------------------------------------------------------------------------------------------------------------
def _dtype_for(m: Tensor) -> torch.dtype:
    return torch.float64 if m.numel() <= _FLOAT64_MAX_NUMEL else torch.float32


def as_layer_matrix(t: Tensor) -> Optional[Tensor]:
    """The matrix LARV measures: a 2-D weight as it is, a conv weight ``[out, in, k...]`` as ``[out, -1]``; ``None``
    for 1-D tensors (biases, norms), scalars and empty tensors."""
    if t.dim() < 2 or t.numel() == 0:
        return None
    return t.reshape(t.shape[0], -1)


def effective_rank(a: Tensor) -> float:
    """``r_eff(A) = exp(H)``, ``H = -sum_j p_j log p_j``, ``p_j = sigma_j(A)^2 / ||A||_F^2`` (LARV, arXiv
    2602.09413). Singular values in float64 for small matrices (at most 2^18 entries), float32 otherwise. An all-zero
    matrix has ``r_eff = 1``."""
    m = as_layer_matrix(a)
    if m is None:
        raise ValueError(f"effective_rank needs a matrix (or a conv weight), got shape {tuple(a.shape)}")
    s2 = torch.linalg.svdvals(m.to(_dtype_for(m))).to(torch.float64).pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 1.0
    p = s2[s2 > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def commutator_conflict(a: Tensor, d: Tensor) -> float:
    """``0.5 (||A D^T - D A^T||_F + ||A^T D - D^T A||_F) / (||A||_F ||D||_F)`` (LARV, arXiv 2602.09413); 0 when either
    norm is below 1e-10.

    Computed from the Gram products of the smaller side (``X = A D^T`` or ``Y = A^T D``, never a rows x rows matrix of
    a tall one): ``||A D^T - D A^T||^2 = 2 tr((A^T A)(D^T D)) - 2 tr((A^T D)^2)`` and
    ``||A^T D - D^T A||^2 = 2 ||A^T D||^2 - 2 tr((A^T D)^2)`` (and their transposes for a wide matrix).
    """
    a2, d2 = as_layer_matrix(a), as_layer_matrix(d)
    if a2 is None or d2 is None or a2.shape != d2.shape:
        raise ValueError(f"commutator_conflict needs two matrices of one shape, got {tuple(a.shape)}, {tuple(d.shape)}")
    dtype = _dtype_for(a2)
    a2, d2 = a2.to(dtype), d2.to(dtype)
    na, nd = float(torch.linalg.matrix_norm(a2).double()), float(torch.linalg.matrix_norm(d2).double())
    if na < 1e-10 or nd < 1e-10:
        return 0.0
    if a2.shape[0] < a2.shape[1]:  # wide: the m x m side is the small one; the two terms swap roles
        a2, d2 = a2.T, d2.T
    ga, gd, y = a2.T @ a2, d2.T @ d2, a2.T @ d2  # n x n, n = the smaller side
    tr_y2 = float((y * y.T).sum().double())
    first = 2.0 * float((ga * gd).sum().double()) - 2.0 * tr_y2  # ||A D^T - D A^T||^2 (gd is symmetric)
    second = 2.0 * float((y * y).sum().double()) - 2.0 * tr_y2  # ||A^T D - D^T A||^2
    # cancellation can leave a rounding-size negative value where the commutator is 0
    return 0.5 * (math.sqrt(max(first, 0.0)) + math.sqrt(max(second, 0.0))) / (na * nd)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def layer_scores(e: Sequence[float], c: Sequence[float], layers: Sequence[int], num_layers: int, *,
                 eta: float = 1.0, rho: float = 0.5) -> np.ndarray:
    """``score_l = e_l^eta ((l + 1) / L)^rho / (1 + softplus(z_l))``, ``z = (c - mean c) / std c`` (population std;
    std < 1e-8 divides by 1), over the blocks ``layers`` (0-based) of one task (LARV, arXiv 2602.09413)."""
    e_, c_ = np.asarray(e, dtype=np.float64), np.asarray(c, dtype=np.float64)
    std = float(c_.std())
    z = (c_ - c_.mean()) / (std if std >= 1e-8 else 1.0)
    depth = (np.asarray(layers, dtype=np.float64) + 1.0) / num_layers
    return e_ ** eta * depth ** rho / (1.0 + _softplus(z))


def gate_scores(scores: np.ndarray, *, gate: str = "tiered", tiers: Sequence[float] = (0.5, 0.75, 1.0),
                delta: float = 0.5, gamma: float = 3.0) -> np.ndarray:
    """One task's factors from its layer scores. ``"tiered"``: terciles of the scores (``torch.quantile`` at 1/3 and
    2/3); ``score <= q1`` -> ``tiers[0]``, ``<= q2`` -> ``tiers[1]``, else ``tiers[2]``. ``"continuous"``:
    ``1 + delta tanh(gamma (score - 1))``."""
    s = np.asarray(scores, dtype=np.float64)
    if gate == "continuous":
        return 1.0 + delta * np.tanh(gamma * (s - 1.0))
    if gate != "tiered":
        raise ValueError(f"larv: unknown gate={gate!r}; valid: 'tiered', 'continuous'")
    q = torch.quantile(torch.from_numpy(s), torch.tensor([1.0 / 3.0, 2.0 / 3.0], dtype=torch.float64))
    q1, q2 = float(q[0]), float(q[1])
    return np.where(s <= q1, tiers[0], np.where(s <= q2, tiers[1], tiers[2])).astype(np.float64)


# --------------------------------------------------------------------------------------------------------------------
# The pass over the whole model
# --------------------------------------------------------------------------------------------------------------------
def _shape(sd: Mapping[str, Tensor], key: str) -> Optional[tuple[int, ...]]:
    """The shape of ``sd[key]`` without reading it when ``sd`` can tell (lazy mappings), else ``None``."""
    shape = getattr(sd, "shape", None)
    return tuple(shape(key)) if callable(shape) else None


def _read(sd: Mapping[str, Tensor], key: str, where: str) -> Tensor:
    t = sd[key].detach().to("cpu", torch.float32)
    file = tensor_file(sd, key)
    ensure_finite(t, key, where + (f" ({file})" if file is not None else ""))
    return t


Depth = Union[None, str, Callable[[str], Optional[int]]]


def larv_scales(
    task_vectors: Sequence[Mapping[str, Tensor]],
    keys: Sequence[str],
    base: Mapping[str, Tensor],
    *,
    gate: str = "tiered",
    tiers: Sequence[float] = (0.5, 0.75, 1.0),
    eta: float = 1.0,
    rho: float = 0.5,
    delta: float = 0.5,
    gamma: float = 3.0,
    depth: Depth = None,
) -> dict[str, list[float]]:
    """LARV's factor of every key for each task: key -> ``[s_{1,l}, ..., s_{K,l}]`` for a key in block ``l``, ones
    for a key outside the blocks. Reads one key's base tensor and K slices at a time.

    Per task ``k`` and block ``l`` (over the block's matrices: 2-D weights, conv weights as ``[out, -1]``):
    ``e = mean(r_eff(theta0_W) / (r_eff(tau_k_W) + 1e-8))`` (0 when all of them are zero in ``tau_k``),
    ``c = mean(commutator_conflict(theta0_W, tau_k_W))``; a block without a matrix has ``e = c = 0``. The scores
    (:func:`layer_scores`) and the gate (:func:`gate_scores`) run over the blocks present; ``L`` is the largest block
    index plus one. Blocks are found by :func:`~magic_pl.calibration.lines.layer_index` with ``depth``.
    """
    from magic_pl.calibration.lines import layer_index

    keys = list(keys)
    blocks: dict[int, list[str]] = {}
    for key in keys:
        i = layer_index(key, depth)
        if i is not None:
            blocks.setdefault(i, []).append(key)
    if not blocks:
        example = f" (e.g. {keys[0]!r})" if keys else ""
        raise ValueError(f"larv: no parameter name is in a block{example} with depth={depth!r}; LARV rescales per "
                         "transformer/conv block: give the depth option, a family of "
                         "magic_pl.calibration.lines.LAYER_PATTERNS or a regex whose first group is the block index")
    n_tasks = len(task_vectors)
    layers = sorted(blocks)
    num_layers = layers[-1] + 1
    ratio = np.zeros((n_tasks, len(layers)))
    conflict = np.zeros((n_tasks, len(layers)))
    n_mats = np.zeros(len(layers))
    nonzero = np.zeros((n_tasks, len(layers)), dtype=bool)
    for j, layer in enumerate(layers):
        for key in blocks[layer]:
            shape = _shape(task_vectors[0], key)
            if shape is not None and (len(shape) < 2 or 0 in shape):
                continue  # a bias or norm: not read here
            try:
                a = _read(base, key, "the base model")
            except KeyError:
                raise CheckpointError(f"the base model lacks key {key!r} of the task vectors") from None
            a = as_layer_matrix(a)
            if a is None:
                continue
            r_base = effective_rank(a)
            n_mats[j] += 1
            for k, tv in enumerate(task_vectors):
                d = as_layer_matrix(_read(tv, key, f"task vector {k}"))
                if d is None or d.shape != a.shape:
                    raise CheckpointError(f"task vector {k}: {key!r} has shape {tuple(tv[key].shape)}, the base "
                                          f"{tuple(base[key].shape)}")
                nonzero[k, j] |= bool(d.any())
                ratio[k, j] += r_base / (effective_rank(d) + 1e-8)
                conflict[k, j] += commutator_conflict(a, d)
    per = np.maximum(n_mats, 1.0)
    e = np.where(nonzero, ratio / per, 0.0)
    c = conflict / per
    out: dict[str, list[float]] = {key: [1.0] * n_tasks for key in keys}
    factors = [gate_scores(layer_scores(e[k], c[k], layers, num_layers, eta=eta, rho=rho), gate=gate, tiers=tiers,
                           delta=delta, gamma=gamma) for k in range(n_tasks)]
    for j, layer in enumerate(layers):
        for key in blocks[layer]:
            out[key] = [float(factors[k][j]) for k in range(n_tasks)]
    return out


def _larv_prepass(
    task_vectors: Sequence[Mapping[str, Tensor]],
    keys: list[str],
    options: dict[str, Any],
    *,
    base: Optional[Mapping[str, Tensor]] = None,
    gate: Annotated[str, OneOf(("tiered", "continuous"))] = "tiered",
    tiers: Annotated[Sequence[float], _Tiers()] = (0.5, 0.75, 1.0),
    eta: Annotated[float, Interval(0.0, 10.0)] = 1.0,
    rho: Annotated[float, Interval(0.0, 10.0)] = 0.5,
    delta: Annotated[float, Interval(0.0, 1.0)] = 0.5,
    gamma: Annotated[float, Interval(0.0, 100.0)] = 3.0,
    depth: Annotated[Depth, _Depth()] = None,
) -> dict[str, Any]:
    """The pass :func:`~magic_pl.merging.merge` and :func:`~magic_pl.merging.merge_models` always run for LARV: the
    factors of :func:`larv_scales`, given to every per-tensor call as ``key_scales``."""
    if base is None:
        raise ValueError("merge method 'larv' needs the base model's weights: pass base= (merge_models passes its "
                         "base)")
    if options.get("key_scales") is not None:
        raise ValueError("larv: key_scales are computed by the pass over the model; pass them to merge_tensor only")
    scales = larv_scales(task_vectors, keys, base, gate=gate, tiers=tiers, eta=eta, rho=rho, delta=delta, gamma=gamma,
                         depth=depth)
    return {**options, "key_scales": scales}


@merge_method(
    name="larv",
    paper=_PAPER,
    prepass=_larv_prepass,
    prepass_required=True,
    check=_then_rule,
    more_options=_then_options,
)
def larv(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    then: Annotated[str, _THEN] = "iso_c",
    key_scales: Annotated[Optional[Mapping[str, Sequence[float]]], _KeyScales()] = None,
    **then_options: Any,
) -> Tensor:
    """LARV (Wang et al., "LARV: Data-Free Layer-wise Adaptive Rescaling Veneer for Model Merging", arXiv
    2602.09413): multiply each task vector's tensors in block ``l`` by ``s_{k,l}``, then merge with ``then``.

    The factors come from a pass over the whole model (:func:`larv_scales`; ``merge``/``merge_models`` run it, with
    the base model), per task ``k`` and block ``l`` (0-based, of ``L``), over the block's weight matrices ``W``:

    - ``r_eff(A) = exp(-sum_j p_j log p_j)``, ``p_j = sigma_j(A)^2 / ||A||_F^2`` (all-zero matrix: 1);
    - ``e = mean_W r_eff(theta0_W) / (r_eff(tau_k_W) + 1e-8)`` (0 for a block whose task vector is zero);
    - ``c = mean_W 0.5 (||A D^T - D A^T||_F + ||A^T D - D^T A||_F) / (||A||_F ||D||_F)``, ``A = theta0_W``,
      ``D = tau_k_W`` (0 when a norm is below 1e-10);
    - ``z = (c - mean_l c) / std_l c`` (population std; below 1e-8: divided by 1);
    - ``score = e^eta ((l + 1) / L)^rho / (1 + softplus(z))``;
    - gate ``"tiered"`` (default; the paper reports tiered gates as the most robust): the task's score terciles
      ``q1, q2`` (``torch.quantile``); ``score <= q1`` -> ``tiers[0]``, ``<= q2`` -> ``tiers[1]``, else ``tiers[2]``.
      Gate ``"continuous"`` (the paper's ablation): ``s = 1 + delta tanh(gamma (score - 1))``.

    Tensors outside the blocks (embeddings, heads, final norms) keep factor 1; every tensor of a block (weights,
    biases, norms) takes the block's factor.

    Options of the pass (``merge``/``merge_models`` only):
        gate: ``"tiered"`` (default) or ``"continuous"``.
        tiers: the three tier factors, default ``(0.5, 0.75, 1.0)``. This default is ours, not the paper's: the text
            available to us does not give its tier values, and the paper amplifies deep layers modestly; ours never
            amplifies, it damps the low-score blocks.
        eta, rho: exponents of the effective-rank contrast and of the depth term (defaults 1.0 and 0.5).
        delta, gamma: the continuous gate's amplitude and slope (defaults 0.5 and 3.0).
        depth: how a key maps to its block (:func:`~magic_pl.calibration.lines.layer_index`): ``None`` (every family
            of ``LAYER_PATTERNS``), a family name, a regex whose first group is the block index, or a callable.

    Args:
        then: the per-tensor merge of the rescaled task vectors (default ``"iso_c"``, Iso-C + LARV, the paper's
            headline pairing); one of ``iso_c``, ``task_arithmetic``, ``ties``, ``tsv_m``, ``iso_cts``,
            ``weight_average``, ``breadcrumbs``, ``consensus``.
        key_scales: key -> the K factors of that key (the pass's result; give it to call this function or
            ``merge_tensor`` directly).
        **then_options: options of the ``then`` method with its defaults (e.g. ``scale``); Breadcrumbs' ``gamma`` is
            ``then_gamma`` (``gamma`` is the continuous gate's).
    """
    if then not in LARV_THEN:
        raise ValueError(f"larv: unknown then={then!r}; valid: {', '.join(LARV_THEN)}")
    if key_scales is None:
        raise ValueError("merge method 'larv' rescales each block by factors from a pass over the whole model; "
                         "merge_tensor() sees one tensor: use merge()/merge_models(), or pass key_scales=")
    if name not in key_scales:
        raise ValueError(f"larv: no factors for key {name!r} in key_scales")
    factors = key_scales[name]
    ts = prepare(taus, name)
    if len(factors) != len(ts):
        raise ValueError(f"larv: {len(factors)} factors for {len(ts)} task vectors (key {name!r})")
    scaled = [t if float(f) == 1.0 else t * float(f) for t, f in zip(ts, factors)]
    kwargs = {(k[len("then_"):] if k.startswith("then_") and k[len("then_"):] in _OWN else k): v
              for k, v in then_options.items()}
    return LARV_THEN[then](scaled, name=name, **kwargs)
