"""LiNeS: layer-increasing network scaling of a merged task vector (Wang et al., "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging", ICLR 2025).

The task vector of block ``l`` (1-based, of ``L``) is scaled by ``alpha + beta (l - 1) / (L - 1)``: shallow blocks,
which hold general features, keep little of the merge; deep blocks keep more. Parameters outside the blocks
(embeddings, stem, final norm, head) take ``alpha``, the shallowest factor, as in the authors' code.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from magic_pl.calibration.steps import CalibrationStep, register_step, unset
from magic_pl.statedict import is_batchnorm_stat

__all__ = ["LAYER_PATTERNS", "LiNeSStep", "layer_index", "lines_alpha", "lines_keys", "lines_scaling",
           "lines_factors"]

#: One depth rule per model family: a regex whose first group is the 0-based block index (``re.search``).
LAYER_PATTERNS: dict[str, str] = {
    "timm": r"(?:^|\.)blocks\.(\d+)\.",  # timm ViT / DeiT / ConvNeXt stages' blocks
    "open_clip": r"(?:^|\.)resblocks\.(\d+)\.",  # open_clip / OpenAI CLIP transformers
    "hf_encoder": r"(?:^|\.)encoder\.layer\.(\d+)\.",  # HF BERT, RoBERTa, ViT
    "clip": r"(?:^|\.)encoder\.layers\.(\d+)\.",  # HF CLIP vision / text towers
    "llama": r"(?:^|\.)model\.layers\.(\d+)\.",  # HF Llama, Mistral, Qwen2, Gemma
    "gpt2": r"(?:^|\.)h\.(\d+)\.",  # HF GPT-2
    "efficientnet": r"(?:^|\.)_blocks\.(\d+)\.",  # efficientnet_pytorch / efficientnet-lite-pytorch MBConv blocks
    "layers": r"(?:^|\.)layers\.(\d+)\.",  # any other ``layers.N.`` stack
}

Depth = Union[None, str, Callable[[str], Optional[int]]]


def _depth_fn(depth: Depth) -> Callable[[str], Optional[int]]:
    if callable(depth):
        return depth
    if depth is None:
        patterns = [re.compile(p) for p in LAYER_PATTERNS.values()]
    elif isinstance(depth, str):
        try:
            patterns = [re.compile(LAYER_PATTERNS.get(depth, depth))]
        except re.error as err:
            raise ValueError(f"lines_scaling: depth={depth!r} is neither a family ({', '.join(LAYER_PATTERNS)}) "
                             f"nor a valid regex: {err}") from None
        if patterns[0].groups < 1:
            raise ValueError(f"lines_scaling: depth regex {depth!r} needs a group capturing the block index")
    else:
        raise TypeError(
            f"lines_scaling: depth must be None, a family name, a regex or a callable, not {type(depth).__name__}"
        )

    def fn(key: str) -> Optional[int]:
        for p in patterns:
            m = p.search(key)
            if m:
                return int(m.group(1))
        return None

    return fn


def layer_index(key: str, depth: Depth = None) -> Optional[int]:
    """0-based block index of parameter ``key``, or ``None`` outside the blocks.

    ``depth``: ``None`` tries every :data:`LAYER_PATTERNS` rule (first match wins), a family name of
    :data:`LAYER_PATTERNS` or a regex (first group = index) uses that rule, a callable is used as is.
    """
    return _depth_fn(depth)(key)


def _scalable(sd: Mapping[str, Tensor], key: str) -> bool:
    dtype = getattr(sd, "dtype", None)  # lazy mappings report dtypes without reading the tensor
    dt = dtype(key) if callable(dtype) else sd[key].dtype
    return dt.is_floating_point and not is_batchnorm_stat(key)


def lines_keys(merged_tv: Mapping[str, Tensor]) -> list[str]:
    """The keys LiNeS scales: floating tensors other than BatchNorm running statistics (1-D tensors included)."""
    return [k for k in merged_tv if _scalable(merged_tv, k)]


def lines_alpha(merged_tv: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]], *,
                norm: str = "l1") -> float:
    """The paper's ``alpha`` for multi-task merging: ``||sum_k tau_k|| / (K ||tau_m||)`` over all scaled keys.

    For Task Arithmetic (``tau_m = lambda sum_k tau_k``) it is ``1 / (lambda K)``, so the shallowest block gets the
    plain average of the task vectors whatever lambda was. ``norm``: ``"l1"`` (default) or ``"l2"``; for a TA merge
    both give the same value.
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"lines_alpha: norm={norm!r} must be 'l1' or 'l2'")
    if len(task_vectors) == 0:
        raise ValueError("lines_alpha needs the task vectors (K >= 1), got none")
    p = 1 if norm == "l1" else 2
    summed, merged = 0.0, 0.0
    for key in merged_tv:
        if not _scalable(merged_tv, key):
            continue
        d = merged_tv[key]
        acc = torch.zeros(d.shape, dtype=torch.float64, device=d.device)
        for tv in task_vectors:
            acc += tv[key].to(device=d.device, dtype=torch.float64)
        summed += float(torch.linalg.vector_norm(acc, ord=p)) ** p
        merged += float(torch.linalg.vector_norm(d.to(torch.float64), ord=p)) ** p
    if merged == 0.0:
        raise ValueError(
            "lines_alpha: the merged task vector is zero; alpha = ||sum tau|| / (K ||tau_m||) is undefined"
        )
    return (summed / merged) ** (1.0 / p) / len(task_vectors)


def lines_factors(
    keys: Sequence[str], *, alpha: float, beta: float, depth: Depth = None, num_layers: Optional[int] = None
) -> dict[str, float]:
    """The LiNeS factor of each key: ``alpha + beta * i / (L - 1)`` for block index ``i`` (0-based), ``alpha``
    outside the blocks. ``L`` is ``num_layers`` or, by default, the largest index found plus one (L = 1 gives
    ``alpha`` everywhere; with ``beta != 0`` and no key in a block, a warning says so: the names need a ``depth``
    rule)."""
    fn = _depth_fn(depth)
    idx = {k: fn(k) for k in keys}
    found = [i for i in idx.values() if i is not None]
    if not found and beta != 0 and keys:
        warnings.warn(f"LiNeS: no parameter name matches a block rule (e.g. {keys[0]!r}); every tensor is scaled by "
                      f"alpha and beta={beta:g} has no effect. Give depth= (lines.depth= or lines_depth= in a "
                      "calibration setting): a family of LAYER_PATTERNS or a regex",
                      stacklevel=2)
    if num_layers is None:
        num_layers = max(found) + 1 if found else 1
    elif isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"lines_scaling: num_layers={num_layers!r} must be an integer >= 1")
    out = {}
    for k, i in idx.items():
        if i is None:
            out[k] = alpha
            continue
        if i >= num_layers:
            raise ValueError(f"lines_scaling: {k!r} is in block {i} but num_layers={num_layers}")
        out[k] = alpha + (beta * i / (num_layers - 1) if num_layers > 1 else 0.0)
    return out


def lines_scaling(
    merged_tv: Mapping[str, Tensor],
    *,
    beta: float,
    alpha: Optional[float] = None,
    task_vectors: Optional[Sequence[Mapping[str, Tensor]]] = None,
    depth: Depth = None,
    num_layers: Optional[int] = None,
    norm: str = "l1",
) -> dict[str, Tensor]:
    """LiNeS of a merged task vector: block ``l`` (1-based, of ``L``) scaled by ``alpha + beta (l - 1) / (L - 1)``,
    parameters outside the blocks by ``alpha``.

    Args:
        beta: the increase from the first to the last block. The paper tunes it on validation data for merging
            (the authors' grid is [0, 1]); no default.
        alpha: the first block's factor. ``None`` (default): the paper's multi-task merging rule
            ``||sum_k tau_k|| / (K ||tau_m||)`` (:func:`lines_alpha`; needs ``task_vectors``), which is ``1/(lambda K)``
            for Task Arithmetic with coefficient lambda. Pass a number to set it (the paper's single-task setting uses
            ``alpha = lambda``, ``beta = 1 - lambda``).
        task_vectors: the K task vectors, needed when ``alpha`` is ``None``.
        depth: how a key maps to its block (see :func:`layer_index`; default: every known family's rule).
        num_layers: ``L``; default: the largest block index found plus one.
        norm: the norm of the ``alpha`` rule, ``"l1"`` (default) or ``"l2"``.

    Returns:
        A new mapping with every key: floating tensors scaled (float32 arithmetic, the input dtype), BatchNorm
        running statistics and integer buffers unchanged (the merge already averages the statistics; scaling them
        is no rescaling of a layer's weights). Unlike WSC/SVC, 1-D tensors are scaled too: the paper scales the whole
        task vector of a block.
    """
    for name, v in (("beta", beta), ("alpha", alpha)):
        if v is not None and (isinstance(v, bool) or not math.isfinite(float(v))):
            raise ValueError(f"lines_scaling: {name}={v!r} must be a finite number")
    if alpha is None:
        if task_vectors is None:
            raise ValueError("lines_scaling: alpha=None (the paper's merging rule) needs task_vectors=")
        alpha = lines_alpha(merged_tv, task_vectors, norm=norm)
    keys = lines_keys(merged_tv)
    factors = lines_factors(keys, alpha=float(alpha), beta=float(beta), depth=depth, num_layers=num_layers)
    out: dict[str, Tensor] = {}
    for key in merged_tv:
        d = merged_tv[key]
        f = factors.get(key)
        out[key] = d if f is None else (d.to(torch.float32) * f).to(d.dtype)
    return out


@register_step
@dataclass(frozen=True)
class LiNeSStep(CalibrationStep):
    """The calibration step ``lines``: :func:`lines_scaling` of tau_m (LiNeS, Wang et al., ICLR 2025): block ``l`` of
    ``L`` scaled by ``alpha + beta (l - 1) / (L - 1)``; it has no use for a sensitive set.

    Attributes:
        alpha: the factor of the first block and of everything outside the blocks, in [0, 1000]. ``None`` (default):
            the paper's multi-task merging rule ``||sum_k tau_k||_1 / (K ||tau_m||_1)`` (:func:`lines_alpha`), so the
            shallowest block gets the plain average of the task vectors (``1 / (lambda K)`` for Task Arithmetic).
        beta: the increase from the first to the last block, in [0, 1000] (0.5, the middle of the authors' search
            range [0, 1]; the paper tunes it on labelled validation data).
        depth: how a parameter name maps to its block: ``None`` (default: every :data:`LAYER_PATTERNS` rule, first
            match wins), a family of that table (``"hf_encoder"``, ``"timm"``, ...) or a regex whose first group is
            the 0-based block index (one with a comma needs the dict form of a setting).
    """

    name: ClassVar[str] = "lines"
    # the default alpha is a norm ratio over the whole model and L its deepest block: no key's rows stand alone
    row_separable: ClassVar[bool] = False
    alpha: Optional[float] = None
    beta: float = 0.5
    depth: Optional[str] = None

    def __post_init__(self) -> None:
        self._number("alpha", lambda v: 0 <= v <= 1e3, "a finite number in [0, 1000]", optional=True)
        self._number("beta", lambda v: 0 <= v <= 1e3, "a finite number in [0, 1000]")
        if unset(self.depth):
            object.__setattr__(self, "depth", None)
            return
        if not isinstance(self.depth, str):
            raise self._bad("depth", f"None, a family name ({', '.join(LAYER_PATTERNS)}) or a regex")
        try:
            layer_index("", self.depth)
        except ValueError as err:
            raise ValueError(f"calibration step 'lines': depth={self.depth!r}: {err}") from None

    def apply(self, merged_tv: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
              sensitive: Optional[Collection[str]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        calibrated = lines_scaling(merged_tv, beta=self.beta, alpha=self.alpha, task_vectors=task_vectors,
                                   depth=self.depth)
        return {k: calibrated[k] for k in lines_keys(merged_tv)}, {}
