"""RegMean and RegMean++: data-based merges of linear layers through their input Gram matrices (see docs/method.md).

RegMean (Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models") merges every
``nn.Linear`` (weight ``W`` of shape ``[out, in]``) by the closed-form minimiser of ``sum_k ||X_k W^T - X_k W_k^T||^2``,
``X_k`` the inputs of that layer in expert k on task k's unlabelled samples::

    G_k  = X_k^T X_k / n_k                                  (mean Gram matrix, [in, in])
    G_k' = alpha G_k + (1 - alpha) diag(G_k)                (off-diagonal scaled by alpha = reduce_non_diagonal)
    tau_m^T = (sum_k G_k')^-1 sum_k G_k' tau_k^T

computed on task vectors (``W_m = W_0 + tau_m`` exactly, since ``(sum G')^-1 (sum G') W_0^T = W_0^T``). Biases and
every other parameter (embeddings, norms, convolutions) are the plain average of the task vectors. RegMean++
(arXiv 2508.03121) applies the same closed form block by block, the inputs of block b measured on the model whose
earlier blocks are already merged (see :func:`regmean`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.merging._common import MergeError, check_fraction
from magic_pl.merging.method import merge_method
from magic_pl.merging.options import Fraction, Names
from magic_pl.statedict import CheckpointError, all_finite, compute_dtype

__all__ = ["regmean", "regmean_blocks", "regmean_memory"]

#: Arguments of :func:`regmean` that the front doors fill (not options of the registered methods).
_CONTEXT = ("plus_plus", "reduce", "dtype", "device", "progress", "diagnostics")
_PAPER = "Jin et al., ICLR 2023, arXiv 2212.09849"

StateSource = Union[nn.Module, Mapping[str, Tensor]]
#: ``reduce(tensor) -> tensor``: the sum of a statistic over processes (e.g. an all-reduce); identity by default.
Reduce = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------------------------------
# Layers and blocks
# --------------------------------------------------------------------------------------------------------------------
def _key(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def _under(name: str, prefix: str) -> bool:
    """True when module or key ``name`` lies in module ``prefix`` ("" is the whole model)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _linear_layers(model: nn.Module, keys: Iterable[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` whose weight key is in ``keys`` and whose weight no other parameter name shares (a tied
    weight has several Gram matrices for one tensor, so it is averaged instead)."""
    keys = set(keys)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and _key(name, "weight") in keys and uses.get(id(m.weight), 0) == 1}


def _default_blocks(model: nn.Module) -> list[str]:
    """The children of every outermost ``nn.ModuleList`` (the transformer-layer stack of HF and open_clip models)."""
    out: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(_under(name, b) for b in out):
            out.extend(_key(name, child) for child, _ in m.named_children())
    return out


def regmean_blocks(model: nn.Module, keys: Iterable[str],
                   blocks: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
    """RegMean++'s merge steps: block name -> the RegMean-merged linear layers in it (unordered).

    ``blocks`` ``None``: the children of every outermost ``nn.ModuleList`` (transformer layers, as FusionBench merges
    CLIP's ``encoder.layers``); given: module names. A linear layer outside every block is a block of its own.
    ``keys``: the task vectors' keys (only linear layers whose weight is among them count).
    """
    modules = dict(model.named_modules())
    if blocks is None:
        names = _default_blocks(model)
    else:
        names = [str(b) for b in blocks]
        for b in names:
            if b not in modules:
                raise ValueError(f"block {b!r} is not a module of the model")
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if _under(a, b) or _under(b, a):
                    raise ValueError(f"blocks {a!r} and {b!r} overlap")
    steps: dict[str, list[str]] = {}
    for lin in _linear_layers(model, keys):
        owner = next((b for b in names if _under(lin, b)), lin)
        steps.setdefault(owner, []).append(lin)
    return steps


def regmean_memory(model: nn.Module, num_tasks: int, dtype: torch.dtype = torch.float64, *,
                   keys: Optional[Iterable[str]] = None, plus_plus: bool = False,
                   blocks: Optional[Sequence[str]] = None) -> int:
    """Bytes the Gram statistics need: ``sum over merged linear layers of in^2 * K * itemsize`` for RegMean (all
    layers are held until the single reduce); for RegMean++ the largest block's sum (one block at a time).

    ``keys``: the task vectors' keys (default: every key of the model).
    """
    keys = list(model.state_dict()) if keys is None else list(keys)
    itemsize = torch.empty((), dtype=dtype).element_size()
    linears = _linear_layers(model, keys)

    def cost(names: Iterable[str]) -> int:
        return sum(linears[n].in_features ** 2 for n in names) * int(num_tasks) * itemsize

    if not plus_plus:
        return cost(linears)
    return max((cost(v) for v in regmean_blocks(model, keys, blocks).values()), default=0)


# --------------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------------
def _mask_of(batch: Any) -> Optional[Tensor]:
    """A batch's 2-D ``attention_mask`` (``[batch, positions]``, nonzero = real token), if it has one (a mapping
    batch's, or the keyword arguments' of a :class:`~magic_pl.calibration.sensitivity.ModelInputs` call)."""
    from magic_pl.calibration.sensitivity import ModelInputs

    kwargs = batch.kwargs if isinstance(batch, ModelInputs) else batch
    if isinstance(kwargs, Mapping):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask
    return None


class _Grams:
    """Per-task sums of ``X^T X`` and row counts of the inputs of some linear layers, filled by forward pre-hooks.

    Sums, not means: the per-process sums and counts add up to the one-process statistics, and are divided only
    after the reduce.
    """

    def __init__(self, layers: Mapping[str, nn.Linear], num_tasks: int, dtype: torch.dtype, device: torch.device):
        self.layers = dict(layers)
        self.names = list(self.layers)
        self.dtype, self.device = dtype, device
        self.sums = {n: torch.zeros(num_tasks, m.in_features, m.in_features, dtype=dtype, device=device)
                     for n, m in self.layers.items()}
        self.rows = [[0] * len(self.names) for _ in range(num_tasks)]  # python ints: exact at any count
        self.task: Optional[int] = None
        self.mask: Optional[Tensor] = None

    def _hook(self, i: int, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.task is None:
                return None
            x = (args[0] if args else kwargs["input"]).detach()
            mask = self.mask
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device) != 0]
            x = x.reshape(-1, x.shape[-1]).to(device=self.device, dtype=self.dtype)
            self.sums[name][self.task].addmm_(x.T, x)
            self.rows[self.task][i] += x.shape[0]
            return None

        return hook

    def attach(self) -> list:
        return [m.register_forward_pre_hook(self._hook(i, n), with_kwargs=True)
                for i, (n, m) in enumerate(self.layers.items())]

    def reduce(self, fn: Reduce) -> Tensor:
        """Apply ``fn`` once to every Gram sum and once to the row counts; returns the counts ``[K, layers]``."""
        for n in self.names:
            self.sums[n] = fn(self.sums[n])
        return fn(torch.tensor(self.rows, dtype=torch.float64, device=self.device))


def _identity(t: Tensor) -> Tensor:
    return t


# --------------------------------------------------------------------------------------------------------------------
# Closed form
# --------------------------------------------------------------------------------------------------------------------
def _solve(sums: Tensor, rows: Tensor, taus: Callable[[int], Tensor], alpha: float, key: str,
           diagnostics: Optional[dict[str, Any]] = None) -> Tensor:
    """``tau_m^T = (sum_k G_k')^-1 sum_k G_k' tau_k^T`` for one layer, in the statistics' dtype (``sums`` is
    overwritten). Where ``sum_k G_k'`` is singular (an input direction no task excites), the minimiser closest to
    the average task vector. ``diagnostics``: filled with the layer's conditioning (see :func:`regmean`)."""
    K, d, _ = sums.shape
    dtype, device = sums.dtype, sums.device
    s = torch.zeros(d, d, dtype=dtype, device=device)
    r: Optional[Tensor] = None
    avg: Optional[Tensor] = None
    for k in range(K):
        g = sums[k].div_(rows[k].to(dtype))
        if alpha != 1.0:
            diag = g.diagonal().clone()
            g.mul_(alpha).diagonal().add_(diag, alpha=1.0 - alpha)
        s.add_(g)
        tau_t = taus(k).to(device=device, dtype=dtype).T
        r = g @ tau_t if r is None else r.addmm_(g, tau_t)
        avg = tau_t.clone() if avg is None else avg.add_(tau_t)
    assert r is not None and avg is not None
    avg.div_(K)
    if not (all_finite(s) and all_finite(r)):
        raise MergeError(f"RegMean: the input Gram matrices of {key!r} are not finite (NaN/Inf in the activations?)")
    if diagnostics is not None:
        evals = torch.linalg.eigvalsh(s)
        top, low = float(evals.max()), float(evals.min().clamp_min(0))
        diagnostics.update(rows=[int(n) for n in rows.tolist()], dim=d, condition=top / low if low > 0 else math.inf)
    chol, info = torch.linalg.cholesky_ex(s)
    eps = torch.finfo(dtype).eps
    # a pivot tiny against its diagonal entry means a numerically dependent direction: Cholesky would amplify noise
    if int(info) == 0 and bool((chol.diagonal() ** 2 > s.diagonal() * (d * eps)).all()):
        return torch.cholesky_solve(r, chol).T
    evals, evecs = torch.linalg.eigh(s)
    top = float(evals.max()) if d else 0.0
    if top <= 0.0:
        return avg.T
    keep = evals > top * d * eps
    v = evecs[:, keep]
    resid = r - s @ avg
    return (avg + v @ ((v.T @ resid) / evals[keep].unsqueeze(1))).T


def _mean(task_vectors: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """Mean of the task vectors' ``key`` in :func:`~magic_pl.statedict.compute_dtype` (float64 stays float64)."""
    first = task_vectors[0][key]
    acc = first.to(compute_dtype(first.dtype), copy=True)
    for tv in task_vectors[1:]:
        acc.add_(tv[key].to(device=acc.device, dtype=acc.dtype))
    return acc.div_(len(task_vectors))


def _check_finite(t: Tensor, key: str, what: str) -> Tensor:
    if not all_finite(t):
        raise MergeError(f"{what} produced non-finite values for {key!r} (NaN/Inf in the calibration activations?)")
    return t


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
def _task_index(k: Any, K: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < K:
        raise ValueError(f"calibration batch for task {k!r}; task indices are 0..{K - 1} (one per task vector)")
    return k


def _check_batches(batches: Any, K: int, reusable: bool, complete: bool = True) -> None:
    """Task indices valid; with ``complete`` (one process) every task has a batch; RegMean++ needs re-iterables."""
    if isinstance(batches, Mapping):
        for k in batches:
            _task_index(k, K)
        for k in range(K):
            if complete and k not in batches:
                raise ValueError(f"no calibration batches for task {k}")
            b = batches.get(k, ())
            if complete and hasattr(b, "__len__") and len(b) == 0:
                raise ValueError(f"no calibration batches for task {k}")
            if reusable and iter(b) is b:
                raise TypeError(f"RegMean++ reads the batches once per block: task {k}'s batches are a one-shot "
                                "iterator (pass a list or a DataLoader)")
    elif reusable and iter(batches) is batches:
        raise TypeError("RegMean++ reads the batches once per block: got a one-shot iterator of (task, batch) pairs "
                        "(pass a list or a mapping of lists/DataLoaders)")


def _run(model: nn.Module, batches: Any, grams: _Grams, switch: Callable[[int], None], K: int,
         progress: Optional[str], complete: bool = True) -> None:
    """Feed every batch (expert/merged weights swapped in by ``switch`` on each change of task) into the hooks."""
    from magic_pl.calibration.dsc import call_with_batch, task_batches

    counts = [0] * K
    current: Optional[int] = None
    pairs: Iterable = task_batches(batches)
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc=progress, leave=False)
    handles = grams.attach()
    try:
        for k, batch in pairs:
            k = _task_index(k, K)
            if k != current:
                switch(k)
                current = k
            grams.task, grams.mask = k, _mask_of(batch)
            call_with_batch(model, batch)
            grams.task = grams.mask = None
            counts[k] += 1
    finally:
        grams.task = grams.mask = None
        for h in handles:
            h.remove()
    _check_coverage([k for k in range(K) if counts[k] == 0] if complete else [])


def _check_coverage(missing: Sequence[int], where: str = "") -> None:
    if missing:
        raise ValueError(f"no calibration batches for task{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(str, missing))}{where}")


def _reduced_rows(grams: "_Grams", fn: Reduce, K: int, complete: bool) -> Tensor:
    """The row counts summed over processes; without ``complete`` (each process saw a shard) the coverage check
    runs here, on the totals."""
    rows = grams.reduce(fn)
    if not complete and rows.numel():
        _check_coverage([k for k in range(K) if float(rows[k].sum()) == 0], " on any process")
    return rows


def _first_calls(model: nn.Module, layers: Mapping[str, nn.Linear], batches: Any) -> list[str]:
    """The linear layers in the order one forward pass (on the first batch) first calls them."""
    from magic_pl.calibration.dsc import call_with_batch, task_batches

    order: list[str] = []

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        for _, batch in task_batches(batches):
            call_with_batch(model, batch)
            break
    finally:
        for h in handles:
            h.remove()
    return order


def check_data_merge(name: str, base: StateSource, model: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]],
                     batches: Any, *, reduce: Optional[Reduce], dtype: torch.dtype,
                     device: Optional[Union[str, torch.device]], reusable: bool
                     ) -> tuple[int, list[str], Mapping[str, Tensor], Reduce, torch.device]:
    """The checks every data-based merge (RegMean, LOT) makes before any tensor is read: K >= 1 task vectors with
    the same keys, all in the model and the base, a base that shares no memory with the model (overwritten while
    merging), batches for every task (``reusable``: read more than once). Returns ``(K, keys, base_state, reduce,
    device)`` with ``reduce`` the identity when none is given and ``device`` the model's when none is given; warns
    about a model in training mode."""
    if isinstance(task_vectors, (Tensor, Mapping)) or not isinstance(task_vectors, Sequence):
        raise TypeError(f"task_vectors must be a sequence of K mappings, got {type(task_vectors).__name__}")
    K = len(task_vectors)
    if K == 0:
        raise CheckpointError(f"{name} needs at least one task vector (K >= 1), got none")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"option dtype={dtype!r} must be a floating-point torch.dtype")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if base is model:
        raise ValueError("base must not be the model: the model's weights are overwritten while merging")
    complete = reduce is None  # with reduce each process may hold only some tasks' samples: checked on the totals
    _check_batches(batches, K, reusable=reusable, complete=complete)
    keys = list(task_vectors[0])
    key_set = set(keys)
    for k, tv in enumerate(task_vectors[1:], start=1):
        other = set(tv)
        if other != key_set:
            bad = sorted(key_set ^ other)[0]
            raise CheckpointError(f"task vector {k} and task vector 0 differ in keys (e.g. {bad!r})")
    model_state = model.state_dict()
    base_state = {k: v.detach() for k, v in base.state_dict().items()} if isinstance(base, nn.Module) else base
    for key in keys:
        if key not in model_state:
            raise CheckpointError(f"task-vector key {key!r} is not in the model")
        if key not in base_state:
            raise CheckpointError(f"task-vector key {key!r} is not in the base")
        b = base_state[key]
        if isinstance(base_state, dict) and isinstance(b, Tensor) and b.data_ptr() == model_state[key].data_ptr():
            raise ValueError(f"base tensor {key!r} shares memory with the model, whose weights are overwritten")
    fn = _identity if reduce is None else reduce
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    if any(m.training for m in model.modules()):
        warnings.warn(f"{name} on a model in training mode (dropout active); call model.eval() first")
    return K, keys, base_state, fn, torch.device(device)


@merge_method(name="regmean", paper=_PAPER, needs_data=True, context=_CONTEXT)
@torch.no_grad()
def regmean(
    base: StateSource,
    model: nn.Module,
    task_vectors: Sequence[Mapping[str, Tensor]],
    batches: Any,
    *,
    reduce_non_diagonal: Fraction = 0.95,
    plus_plus: bool = False,
    blocks: Annotated[Optional[Sequence[str]], Names()] = None,
    reduce: Optional[Reduce] = None,
    dtype: torch.dtype = torch.float64,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    diagnostics: Optional[dict[str, dict[str, Any]]] = None,
) -> dict[str, Tensor]:
    """RegMean (``plus_plus=False``) or RegMean++ merged task vector ``tau_m`` (same keys as the task vectors).

    Args:
        base: the base weights ``theta0`` (a module or a mapping of tensors).
        model: the architecture; its weights are overwritten while measuring (``theta0 + tau`` written with
            :func:`~magic_pl.statedict.apply_delta`) and, on return, hold the merged ``theta0 + tau_m`` for every
            task-vector key (other keys untouched; after an error, an intermediate state). Must not share tensors
            with ``base``. Run it in eval mode (dropout would make the Gram matrices random).
        task_vectors: K >= 1 mappings ``key -> tau_k`` with the same keys; read one key at a time.
        batches: unlabelled batches per task, ``magic_pl.calibration.dsc.Batches`` (``{task: iterable of batches}``
            or ``(task, batch)`` pairs; a mapping batch is called as ``model(**batch)``, a tuple as ``model(*batch)``,
            a tensor as ``model(batch)``). Every task needs a batch. The model is rewritten on every change of task,
            so group the pairs by task. RegMean++ reads them once per block (re-iterable: lists, DataLoaders).
        reduce_non_diagonal: alpha, the factor on the Gram matrices' off-diagonal entries (0.95, FusionBench's CLIP
            default; the paper tunes it; 1 is the plain formula, 0 keeps only the diagonal).
        plus_plus: RegMean++ (FusionBench ``regmean_plusplus``): blocks are merged in the order the forward pass
            reaches them; for block b the model holds the merged weights of everything outside b (earlier blocks
            already RegMean-merged, the rest averaged) and expert k's weights inside b, so block b's linear layers
            see expert k's block applied to the merged model's features of task k's data.
        blocks: RegMean++'s blocks (module names, see :func:`regmean_blocks`); default: the children of every
            outermost ``nn.ModuleList`` (transformer layers); a linear layer outside every block is its own block.
        reduce: sums a statistic over processes (e.g. an all-reduce of a tensor on ``device``). Applied once to every
            Gram sum and row count: after the single pass for RegMean, after each block for RegMean++ (the next block
            depends on it). Statistics are sums, divided after the reduce, so N processes that each see a shard of
            the samples compute the one-process result.
        dtype: accumulation and solve dtype (float64: activation Grams of transformers are ill-conditioned, with a
            few outlier features many orders above the rest, and the solve loses cond(sum G') digits; float32 halves
            :func:`regmean_memory` at that cost).
        device: where the statistics live and the solve runs (default: the model's device).
        progress: show tqdm progress bars.
        diagnostics: a dict to fill, per merged layer (its name), with ``rows`` (input rows per task: samples x
            positions), ``dim`` (its input width), ``condition`` (the 2-norm condition number of ``sum_k G_k'``: the
            solve loses about log10 of it in digits; ``inf`` if singular) and ``shift`` (``||tau_m - avg|| /
            ||avg||``, how far the closed form moves from the average task vector). Costs one eigen-decomposition
            per layer.

    Layers: every ``nn.Linear`` whose weight is in the task vectors and not tied to another parameter; its bias and
    every other key (embeddings, norms, convolutions, tied weights) get the average task vector, as in FusionBench.
    A layer that some task's forward never calls (e.g. an unused head, or one called only through its weight) is
    averaged too, with a warning. Rows: each call's input reshaped to ``[-1, in]`` (every sample and position);
    when a batch is a mapping with a 2-D ``attention_mask`` and a layer's input starts with the mask's
    ``[batch, positions]`` shape, only the positions where the mask is nonzero count (FusionBench counts padding
    too). ``G_k`` is the mean over rows, as FusionBench's running mean. A singular ``sum_k G_k'`` (an input
    direction no task excites; FusionBench's ``torch.inverse`` fails there) gives the minimiser closest to the
    average task vector: the pseudo-inverse on the excited subspace, the average on the rest.

    Raises ``ValueError`` for an option out of range, a task without batches (naming it) or an unknown task index,
    :class:`~magic_pl.statedict.CheckpointError` for mismatched keys, and :class:`MergeError` for a non-finite result.
    """
    # ---- validation, before any tensor is read
    alpha = check_fraction(reduce_non_diagonal, "reduce_non_diagonal")
    K, keys, base_state, fn, device = check_data_merge(
        "RegMean", base, model, task_vectors, batches, reduce=reduce, dtype=dtype, device=device, reusable=plus_plus)
    complete = reduce is None  # with reduce each process may hold only some tasks' samples: checked on the totals

    from magic_pl.calibration.dsc import write_task_vector

    linears = _linear_layers(model, keys)
    steps = regmean_blocks(model, keys, blocks) if plus_plus else {}
    tau_m: dict[str, Tensor] = {}

    def write(tau: Mapping[str, Tensor], which: Iterable[str], what: str) -> None:
        write_task_vector(base_state, model, tau, which, what)

    def merge_layers(grams: _Grams, rows: Tensor, what: str) -> None:
        for i, name in enumerate(grams.names):
            key = _key(name, "weight")
            if bool((rows[:, i] == 0).any()):
                missing = [k for k in range(K) if float(rows[k, i]) == 0]
                warnings.warn(f"{what}: layer {name!r} saw no inputs for task(s) {missing}; averaged instead")
                tau_m[key] = _check_finite(_mean(task_vectors, key), key, what)
                continue
            out_dtype = compute_dtype(task_vectors[0][key].dtype)
            layer = {} if diagnostics is not None else None
            merged = _solve(grams.sums[name], rows[:, i], lambda k, key=key: task_vectors[k][key], alpha, key, layer)
            tau_m[key] = _check_finite(merged.to(out_dtype).contiguous(), key, what)
            if layer is not None:
                avg = _mean(task_vectors, key).to(merged.dtype)
                layer["shift"] = float(torch.linalg.vector_norm(merged - avg) /
                                       torch.linalg.vector_norm(avg).clamp_min(torch.finfo(avg.dtype).tiny))
                diagnostics[name] = layer
            grams.sums[name] = torch.empty(0)  # free the layer's statistics

    if not plus_plus:
        grams = _Grams(linears, K, dtype, device)
        _run(model, batches, grams, lambda k: write(task_vectors[k], keys, f"expert {k}"), K,
             "RegMean statistics" if progress else None, complete)
        rows = _reduced_rows(grams, fn, K, complete)
        merge_layers(grams, rows, "RegMean")
        for key in keys:
            if key not in tau_m:
                tau_m[key] = _check_finite(_mean(task_vectors, key), key, "RegMean")
        write(tau_m, keys, "RegMean-merged model")
        return {key: tau_m[key] for key in keys}

    # ---- RegMean++: start from the average everywhere, then replace block by block
    for key in keys:
        tau_m[key] = _check_finite(_mean(task_vectors, key), key, "RegMean++")
    write(tau_m, keys, "averaged model")
    order = _first_calls(model, linears, batches)
    rank = {n: i for i, n in enumerate(order)}
    reached = [(b, [n for n in names if n in rank]) for b, names in steps.items()]
    reached = sorted(((b, sorted(names, key=rank.__getitem__)) for b, names in reached if names),
                     key=lambda item: rank[item[1][0]])
    unreached = [n for names in steps.values() for n in names if n not in rank]
    if unreached:
        warnings.warn(f"RegMean++: linear layers {unreached} are not called by the forward pass; averaged instead")
    it: Iterable = reached
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(reached, desc="RegMean++ blocks")
    for block, names in it:
        block_keys = [key for key in keys if _under(key.rpartition(".")[0], block)]
        grams = _Grams({n: linears[n] for n in names}, K, dtype, device)
        _run(model, batches, grams, lambda k, block_keys=block_keys: write(task_vectors[k], block_keys, f"expert {k}"),
             K, None, complete)
        rows = _reduced_rows(grams, fn, K, complete)
        merge_layers(grams, rows, "RegMean++")
        write(tau_m, block_keys, "RegMean++-merged model")
    return {key: tau_m[key] for key in keys}


@merge_method(name="regmean_plusplus", paper="Nguyen et al., 2025, arXiv 2508.03121 (RegMean++)", needs_data=True,
              context=_CONTEXT)
def regmean_plusplus(
    base: StateSource,
    model: nn.Module,
    task_vectors: Sequence[Mapping[str, Tensor]],
    batches: Any,
    *,
    reduce_non_diagonal: Fraction = 0.95,
    blocks: Annotated[Optional[Sequence[str]], Names()] = None,
    **context: Any,
) -> dict[str, Tensor]:
    """RegMean++: :func:`regmean` with ``plus_plus=True`` (same options and arguments)."""
    return regmean(base, model, task_vectors, batches, reduce_non_diagonal=reduce_non_diagonal, plus_plus=True,
                   blocks=blocks, **context)
