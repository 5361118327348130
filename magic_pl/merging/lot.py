"""LOT Merging: Layer-wise Optimal Task vector merging, a data-based closed form that minimises the feature drift of
every layer on a few exemplars per task (Sun et al., "Towards Minimizing Feature Drift in Model Merging: Layer-wise
Task Vector Fusion for Adaptive Knowledge Integration", NeurIPS 2025, arXiv 2505.23859).

For each minimal computational unit ``l`` the paper solves (its Eq. 6, Algorithm 1 line 7)::

    T_l* = argmin_T  sum_k || f_l(X_k^l; W_pre^l + T) - f_l(X_k^l; W_pre^l + T_k^l) ||^2

where ``X_k^l`` are the inputs of unit ``l`` in *expert k* (``W_pre + T_k``) on task k's exemplars (Algorithm 1
lines 2-5). Three unit types have closed forms (§4): a matrix product (linear weights; convolutions as matrix products
of their unfolded inputs), an element-wise product (the scales of normalisation layers) and an element-wise addition
(biases and shifts). The merged model is ``W_pre + lambda T*`` (Eq. 15).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magic_pl.merging._common import MergeError
from magic_pl.merging.method import merge_method
from magic_pl.merging.options import Bounded, Scale
from magic_pl.merging.regmean import (
    Reduce,
    StateSource,
    _check_coverage,
    _check_finite,
    _key,
    _mean,
    _run,
    check_data_merge,
)
from magic_pl.statedict import all_finite, compute_dtype

__all__ = ["lot", "lot_units"]

#: Arguments of :func:`lot` that the front doors fill (not options of the registered method).
_CONTEXT = ("reduce", "dtype", "device", "progress")
_PAPER = "Sun et al., NeurIPS 2025, arXiv 2505.23859 (LOT Merging)"

#: The normalisation layers whose scale LOT merges by its element-wise-product rule (Eq. 12).
_NORMS: tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# --------------------------------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------------------------------
def _conv_ok(m: nn.Module) -> bool:
    """A 2-D convolution LOT writes as a matrix product of its unfolded input (``F.unfold`` reproduces it)."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def lot_units(model: nn.Module, keys: Iterable[str]) -> dict[str, nn.Module]:
    """The modules LOT merges in closed form: module name -> module.

    ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``, zero padding given as numbers) by the matrix-product rule,
    ``nn.LayerNorm`` / ``nn.RMSNorm`` with an affine scale by the element-wise-product rule; each only when its weight
    key is in ``keys`` (the task vectors' keys) and no other parameter name shares its weight (a tied weight has
    several inputs for one tensor, so it is averaged instead, as in RegMean).
    """
    keys = set(keys)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or _conv_ok(m) or isinstance(m, _NORMS)):
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and _key(name, "weight") in keys and uses.get(id(w), 0) == 1:
            out[name] = m
    return out


def _bias_key(name: str, m: nn.Module, keys: set, uses: Mapping[int, int]) -> Optional[str]:
    b = getattr(m, "bias", None)
    key = _key(name, "bias")
    return key if isinstance(b, Tensor) and key in keys and uses.get(id(b), 0) == 1 else None


class _Unit:
    """One unit's sums, held as views of one flat buffer so that one ``reduce`` call sums all of them.

    Matrix units (linear, conv): ``S = sum_k X_k^T X_k`` ``[in, in]`` and ``R = sum_k X_k^T X_k T_k^T`` ``[in, out]``
    (``T_k`` viewed as ``[out, in]``). Norm units: ``den = sum_k sum_x x_hat^2`` and ``num = sum_k sum_x x_hat^2 T_k``
    (shape of the scale). Both: ``bsum = sum_k n_k b_k`` for the bias (``n_k`` the rows the bias is added to).
    """

    def __init__(self, name: str, module: nn.Module, bias_key: Optional[str], dtype: torch.dtype,
                 device: torch.device):
        self.name, self.module, self.bias_key = name, module, bias_key
        self.weight_key = _key(name, "weight")
        w = module.weight
        self.matrix = not isinstance(module, _NORMS)
        if self.matrix:
            self.out = int(w.shape[0])
            self.inp = int(w[0].numel())
            shapes = {"S": (self.inp, self.inp), "R": (self.inp, self.out)}
        else:
            shapes = {"den": tuple(w.shape), "num": tuple(w.shape)}
        if bias_key is not None:
            shapes["bsum"] = tuple(module.bias.shape)
        self.shapes = shapes
        self.buffer = torch.zeros(sum(math.prod(s) for s in shapes.values()), dtype=dtype, device=device)
        self._views()

    def _views(self) -> None:
        at = 0
        self.stats: dict[str, Tensor] = {}
        for k, s in self.shapes.items():
            n = math.prod(s)
            self.stats[k] = self.buffer[at:at + n].view(s)
            at += n

    def reduce(self, fn: Reduce) -> None:
        self.buffer = fn(self.buffer)
        self._views()


class _Statistics:
    """LOT's sums for some units, filled by forward pre-hooks while expert ``task`` runs on task ``task``'s
    exemplars (the interface :func:`magic_pl.merging.regmean._run` drives: ``attach``, ``task``, ``mask``)."""

    def __init__(self, units: Mapping[str, _Unit], num_tasks: int, dtype: torch.dtype, device: torch.device):
        self.units = dict(units)
        self.names = list(self.units)
        self.dtype, self.device = dtype, device
        self.rows = [[0] * len(self.names) for _ in range(num_tasks)]  # python ints: exact at any count
        self.task: Optional[int] = None
        self.mask: Optional[Tensor] = None
        self.taus: dict[str, tuple[Tensor, Optional[Tensor]]] = {}  # the current task's T_k per unit

    def load(self, task_vector: Mapping[str, Tensor]) -> None:
        """Keep the current task's task vector of every unit (in the statistics' dtype, matrices as ``[out, in]``)."""
        self.taus = {}
        for n, u in self.units.items():
            w = task_vector[u.weight_key].to(device=self.device, dtype=self.dtype)
            if u.matrix:
                w = w.reshape(u.out, u.inp)
            b = (task_vector[u.bias_key].to(device=self.device, dtype=self.dtype)
                 if u.bias_key is not None else None)
            self.taus[n] = (w, b)

    def _rows(self, u: _Unit, x: Tensor) -> Tensor:
        """The unit's input as rows ``[n, features]`` (matrix units) or ``[n, *scale shape]`` (norms), padding
        positions dropped."""
        m = u.module
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:  # an unbatched image
                x = x.unsqueeze(0)
            x = x.to(device=self.device, dtype=self.dtype)
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, u.inp)  # (C, kh, kw) ordering: the weight's own
        mask = self.mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device) != 0]
        x = x.to(device=self.device, dtype=self.dtype)
        if u.matrix:
            return x.reshape(-1, u.inp)
        shape = tuple(m.weight.shape)
        if isinstance(m, nn.LayerNorm):
            x = F.layer_norm(x, shape, eps=m.eps)
        else:  # RMSNorm
            x = F.rms_norm(x, shape, eps=m.eps)
        return x.reshape(-1, *shape)

    def _hook(self, i: int, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.task is None:
                return None
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            u = self.units[name]
            rows = self._rows(u, x)
            tau, bias = self.taus[name]
            s = u.stats
            if u.matrix:
                s["S"].addmm_(rows.T, rows)
                s["R"].addmm_(rows.T, rows @ tau.T)
            else:
                q = rows.square().sum(0)
                s["den"].add_(q)
                s["num"].addcmul_(q, tau)
            if bias is not None:
                s["bsum"].add_(bias, alpha=float(rows.shape[0]))
            self.rows[self.task][i] += int(rows.shape[0])
            return None

        return hook

    def attach(self) -> list:
        return [u.module.register_forward_pre_hook(self._hook(i, n), with_kwargs=True)
                for i, (n, u) in enumerate(self.units.items())]

    def reduce(self, fn: Reduce) -> Tensor:
        """Apply ``fn`` once to every unit's buffer and once to the row counts; returns the counts ``[K, units]``."""
        for u in self.units.values():
            u.reduce(fn)
        return fn(torch.tensor(self.rows, dtype=torch.float64, device=self.device))


# --------------------------------------------------------------------------------------------------------------------
# Closed forms (§4)
# --------------------------------------------------------------------------------------------------------------------
def _pinv_solve(s: Tensor, r: Tensor) -> Tensor:
    """``S^+ R`` with ``S^+`` the Moore-Penrose inverse of the symmetric PSD ``S`` (Eq. 9), through its
    eigendecomposition; eigenvalues at most ``dim * eps * max|eigenvalue|`` count as zero (``torch.linalg.pinv``'s
    default cutoff for Hermitian matrices). The minimum-norm minimiser: no component along unexcited inputs."""
    evals, evecs = torch.linalg.eigh(s)
    top = float(evals.abs().max()) if evals.numel() else 0.0
    if top <= 0.0:
        return torch.zeros_like(r)
    keep = evals.abs() > top * s.shape[0] * torch.finfo(s.dtype).eps
    v = evecs[:, keep]
    return v @ ((v.T @ r) / evals[keep].unsqueeze(1))


def _solve(u: _Unit, rows: float) -> tuple[Tensor, Optional[Tensor]]:
    """The unit's ``T*`` (weight in the weight's shape, bias) from its reduced sums; ``rows``: its total rows."""
    s = u.stats
    if not all(all_finite(t) for t in s.values()):
        raise MergeError(f"LOT: the statistics of {u.name!r} are not finite (NaN/Inf in the activations?)")
    w = u.module.weight
    if u.matrix:
        weight = _pinv_solve(s["S"], s["R"]).T.reshape(w.shape)  # Eq. 9
    else:
        den = s["den"]
        # Eq. 12; a dimension no exemplar excites leaves T[d] free: the minimum-norm choice, 0 (as the pseudo-inverse)
        weight = torch.where(den > 0, s["num"] / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    bias = s["bsum"] / rows if "bsum" in s else None  # Eq. 14: the rows-weighted mean
    return weight, bias


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
@merge_method(name="lot", paper=_PAPER, needs_data=True, context=_CONTEXT)
@torch.no_grad()
def lot(
    base: StateSource,
    model: nn.Module,
    task_vectors: Sequence[Mapping[str, Tensor]],
    batches: Any,
    *,
    scale: Scale = 1.0,
    reduce: Optional[Reduce] = None,
    dtype: torch.dtype = torch.float64,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """LOT Merging (Sun et al., NeurIPS 2025, arXiv 2505.23859): merged task vector ``lambda T*`` (same keys as the
    task vectors), ``T*`` minimising each unit's feature drift on the exemplars in closed form (paper §4).

    Statistics come from *expert k* on task k's exemplars (Algorithm 1: the model holds ``theta0 + tau_k`` while task
    k's batches run), every unit measured independently (no merged layer feeds the next). With ``X_k`` a unit's input
    rows (every sample and position; for a convolution its unfolded patches) and ``T_k`` its task vector:

    * matrix product (``nn.Linear``, and ``nn.Conv2d`` as the matrix product of its unfolded input, §4 "convolution
      ... can be equivalently expressed as matrix multiplication"), Eq. 9:
      ``T* = (sum_k X_k^T X_k)^+ sum_k X_k^T X_k T_k`` (``T`` as ``[in, out]``; ``+`` the Moore-Penrose inverse).
      Where the exemplars leave input directions unexcited (rank-deficient ``sum_k X_k^T X_k``), the minimum-norm
      solution keeps the pretrained weights there.
    * element-wise product (the scale of ``nn.LayerNorm`` / ``nn.RMSNorm``, applied to the normalised input
      ``x_hat``), Eq. 12: ``T*[d] = sum_k sum_x x_hat[d]^2 T_k[d] / sum_k sum_x x_hat[d]^2`` (0 where the
      denominator is 0).
    * element-wise addition (biases of those layers, LayerNorm's shift), Eq. 14: ``sum_k n_k T_k / sum_k n_k`` with
      ``n_k`` the rows task k adds it to: the plain mean when every task has as many exemplar rows (the paper's
      setting); weighting by rows is what the objective Eq. 6 gives otherwise.

    The sums are plain sums over rows (``sum_k X_k^T X_k``, as Eq. 9 is written), not per-task means: a task with more
    rows weighs more. Every other task-vector key gets the mean task vector (times ``scale``): additive parameters
    outside these layers (CLIP's class and position embeddings), for which the addition rule gives the mean when
    every task has as many exemplars, and the parameters no rule here covers (embedding tables, the packed
    projections of ``nn.MultiheadAttention``, whose forward does not call a submodule, tied weights, other layer
    types). A unit some task's forward never calls is averaged too, with a warning.

    Defaults from the paper: ``scale`` (lambda, Eq. 15) 1.0, "setting lambda = 1 already yields competitive
    performance" (§4); its tables use lambda tuned on validation data, 1.2 for ViT-B/32 (82.7% on the 8 vision
    tasks) and 1.5 for ViT-L/14 (90.5%) (§6.3). The paper recommends 64 exemplars per task (16 already stable,
    §6.3 and Table 6), drawn from the training sets; pass them as ``batches``.

    Source: the paper's text (§3-§6, Algorithm 1, App. D); the copy consulted did not render its equations, so the
    forms above are the minimisers of the objectives its text states (squared feature drift of each unit type, with
    Eq. 9 named as the Moore-Penrose closed form); the authors' code (github.com/SunWenJu123/model-merging) could not
    be consulted.

    Args:
        base: the base weights ``theta0`` (a module or a mapping of tensors).
        model: the architecture; its weights are overwritten while measuring (``theta0 + tau_k`` written with
            :func:`~magic_pl.statedict.apply_delta`) and, on return, hold ``theta0 + lambda T*`` for every task-vector
            key (after an error, an intermediate state). Must not share tensors with ``base``. Run it in eval mode.
        task_vectors: K >= 1 mappings ``key -> tau_k`` with the same keys; each unit's ``tau_k`` is read when task
            k's batches start.
        batches: unlabelled exemplars per task (``magic_pl.calibration.dsc.Batches``, as for
            :func:`~magic_pl.merging.regmean.regmean`; group the pairs by task: the expert is rewritten on every
            change of task). Every task needs a batch. When a mapping batch carries a 2-D ``attention_mask``, padding
            positions are left out of the rows of token-shaped inputs.
        scale: lambda, the coefficient on ``T*`` (Eq. 15).
        reduce: sums a statistic over processes (e.g. an all-reduce on ``device``); applied once to each unit's
            buffer of sums and once to the row counts, after the single pass. Every statistic is a sum, so N
            processes that each see a shard of the exemplars compute the one-process result.
        dtype: accumulation and solve dtype (float64: the closed form solves with activation Gram matrices).
        device: where the statistics live and the solves run (default: the model's device).
        progress: show a tqdm progress bar.

    Memory: per matrix unit ``in^2 + in * out`` sums plus one task's ``T_k`` (``in * out``), in ``dtype``, whatever K
    is (no per-task Gram matrix is kept).

    Raises ``ValueError`` for an option out of range, a task without batches (naming it) or an unknown task index,
    :class:`~magic_pl.statedict.CheckpointError` for mismatched keys, and :class:`MergeError` for a non-finite result.
    """
    # ---- validation, before any tensor is read
    scale = Bounded()("lot", "scale", scale)
    K, keys, base_state, fn, device = check_data_merge("LOT", base, model, task_vectors, batches, reduce=reduce,
                                                       dtype=dtype, device=device, reusable=False)
    complete = reduce is None  # with reduce each process may hold only some tasks' samples: checked on the totals
    key_set = set(keys)

    from magic_pl.calibration.dsc import write_task_vector

    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    units = {n: _Unit(n, m, _bias_key(n, m, key_set, uses), dtype, device) for n, m in lot_units(model, keys).items()}
    stats = _Statistics(units, K, dtype, device)

    def switch(k: int) -> None:
        write_task_vector(base_state, model, task_vectors[k], keys, f"expert {k}")
        stats.load(task_vectors[k])

    _run(model, batches, stats, switch, K, "LOT statistics" if progress else None, complete)
    stats.taus = {}
    rows = stats.reduce(fn)
    if not complete and rows.numel():
        _check_coverage([k for k in range(K) if float(rows[k].sum()) == 0], " on any process")

    tau_m: dict[str, Tensor] = {}
    for i, (name, u) in enumerate(units.items()):
        if bool((rows[:, i] == 0).any()):
            missing = [k for k in range(K) if float(rows[k, i]) == 0]
            warnings.warn(f"LOT: unit {name!r} saw no inputs for task(s) {missing}; averaged instead")
            continue
        weight, bias = _solve(u, float(rows[:, i].sum()))
        for key, t in ((u.weight_key, weight), (u.bias_key, bias)):
            if key is not None and t is not None:
                out_dtype = compute_dtype(task_vectors[0][key].dtype)
                tau_m[key] = _check_finite(t.mul(scale).to(out_dtype).contiguous(), key, "LOT")
        u.buffer = torch.empty(0)  # free the unit's statistics
    for key in keys:
        if key not in tau_m:
            tau_m[key] = _check_finite(_mean(task_vectors, key).mul_(scale), key, "LOT")
    write_task_vector(base_state, model, tau_m, keys, "LOT-merged model")
    return {key: tau_m[key] for key in keys}
