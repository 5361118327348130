"""Magnitude-sensitive layers: MAGIC's probe (arXiv 2512.19320; docs/method.md).

Start from a merged model (the paper uses the weight average theta0 + mean_k tau_k). For each parameter tensor,
scale its tau_m by ``factor`` (paper: 1.1), measure how much a score on a proxy set drops, and keep the ``alpha``
(paper: 10) tensors with the largest drop. Scores: labelled accuracy (the paper's) or a label-free output divergence
from the unperturbed model. Rankings are saved to / loaded from JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magic_pl.calibration.modules import prediction_tensor

__all__ = [
    "ModelInputs",
    "ScoreFn",
    "accuracy_score",
    "detect_sensitive_layers",
    "load_sensitivity",
    "output_divergence_score",
    "save_sensitivity",
    "sensitivity_scores",
]

#: ``score_fn(model) -> float``; higher is better.
ScoreFn = Callable[[nn.Module], float]
ModelOrBuilder = Union[nn.Module, Callable[[], nn.Module]]

_FORMAT = "magic-pl/sensitivity"


class ModelInputs(NamedTuple):
    """One model call's positional and keyword arguments (a batch that needs both)."""

    args: tuple
    kwargs: dict


def _call(model: nn.Module, inputs: Any) -> Any:
    from magic_pl.calibration.dsc import call_with_batch  # the one batch-calling convention (dsc imports this module)

    return call_with_batch(model, inputs)


def accuracy_score(batches: Iterable[tuple[Any, Tensor]]) -> ScoreFn:
    """Labelled accuracy (the paper's score): ``batches`` of ``(inputs, labels)``; the argmax of the last dim of the
    model's logits is compared with ``labels``. The batches are materialised once (a list)."""
    data = list(batches)
    if not data:
        raise ValueError("accuracy_score needs at least one (inputs, labels) batch")

    @torch.no_grad()
    def score(model: nn.Module) -> float:
        correct = total = 0
        for inputs, labels in data:
            pred = prediction_tensor(_call(model, inputs)).argmax(-1)
            labels = labels.to(pred.device)
            correct += int((pred == labels).sum())
            total += labels.numel()
        return correct / total

    return score


class _OutputDivergence:
    """Label-free score: minus the mean (or summed) divergence of the model's outputs from the reference outputs,
    which are recorded on the first call (the unperturbed model in :func:`sensitivity_scores`)."""

    def __init__(self, batches: Iterable[Any], metric: str, reduction: str = "mean"):
        if metric not in ("kl", "l2"):
            raise ValueError(f"output divergence metric must be 'kl' or 'l2', got {metric!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"output divergence reduction must be 'mean' or 'sum', got {reduction!r}")
        self.data = list(batches)
        if not self.data:
            raise ValueError("output_divergence_score needs at least one batch")
        self.metric, self.reduction = metric, reduction
        self.reference: Optional[list[Tensor]] = None

    def reset(self) -> None:
        """Forget the reference outputs (the next call records new ones)."""
        self.reference = None

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        outs = [prediction_tensor(_call(model, inputs)).float() for inputs in self.data]
        if self.reference is None:
            self.reference = [o.detach().cpu() for o in outs]
            return 0.0
        total, n = 0.0, 0
        for out, ref in zip(outs, self.reference):
            ref = ref.to(out.device)
            if self.metric == "kl":  # KL(p_ref || p) per position, summed over classes
                div = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            else:
                div = (out - ref).pow(2).mean(-1)
            # a sum is accumulated in float64: per-process sums must add up to the one-process score
            total += float(div.double().sum()) if self.reduction == "sum" else float(div.sum())
            n += div.numel()
        return -total if self.reduction == "sum" else -total / max(n, 1)


def output_divergence_score(batches: Iterable[Any], metric: str = "kl", reduction: str = "mean") -> ScoreFn:
    """Label-free score (docs/method.md): minus the divergence of the model's outputs on unlabelled ``batches`` from
    the outputs recorded on the first call (the unperturbed model). ``metric``: ``"kl"`` (default; KL of the reference
    softmax to the perturbed one, per position) or ``"l2"`` (mean squared difference over the last dim).
    ``reduction``: ``"mean"`` over samples and positions (default) or ``"sum"`` (adds up across processes, as the
    probe of :func:`~magic_pl.calibration.settings.detect_label_free` needs). Call ``.reset()`` on the returned object
    to reuse it for another model."""
    return _OutputDivergence(batches, metric, reduction)


def _build(model_builder_or_model: ModelOrBuilder) -> nn.Module:
    if isinstance(model_builder_or_model, nn.Module):
        return model_builder_or_model
    if callable(model_builder_or_model):
        model = model_builder_or_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model builder returned a {type(model).__name__}, not an nn.Module")
        return model
    raise TypeError("expected an nn.Module or a callable returning one")


@torch.no_grad()
def sensitivity_scores(
    model_builder_or_model: ModelOrBuilder,
    merged_tv: Mapping[str, Tensor],
    score_fn: ScoreFn,
    factor: float = 1.1,
    *,
    keys: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """Score drop per parameter tensor when its tau_m is scaled by ``factor`` (paper: 1.1), sorted largest first.

    The model (theta0 + tau_m) is perturbed one tensor at a time in place and restored exactly afterwards.

    Args:
        model_builder_or_model: the merged model, or a callable building it.
        merged_tv: tau_m (only the tensors probed are read).
        score_fn: ``score_fn(model) -> float``, higher is better; first called on the unperturbed model.
        factor: scale applied to one tensor's tau_m (default 1.1, MAGIC paper).
        keys: parameter names to probe (default: every floating parameter present in ``merged_tv``).
    """
    model = _build(model_builder_or_model)
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    if keys is None:
        keys = [k for k, p in params.items() if p.dtype.is_floating_point and k in merged_tv]
    for k in keys:
        if k not in params:
            raise KeyError(f"{k!r} is not a parameter of {type(model).__name__}")
        if k not in merged_tv:
            raise KeyError(f"the merged task vector lacks {k!r}")
    try:
        reference = float(score_fn(model))
        drops: dict[str, float] = {}
        for k in keys:
            p = params[k]
            original = p.detach().clone()
            tau = merged_tv[k].to(device=p.device, dtype=torch.float32)
            p.copy_((original.float() + (factor - 1.0) * tau).to(p.dtype))
            try:
                drops[k] = reference - float(score_fn(model))
            finally:
                p.copy_(original)
    finally:
        model.train(was_training)
    return dict(sorted(drops.items(), key=lambda kv: kv[1], reverse=True))


def detect_sensitive_layers(
    model_builder_or_model: ModelOrBuilder,
    merged_tv: Mapping[str, Tensor],
    score_fn: ScoreFn,
    alpha: int = 10,
    factor: float = 1.1,
    *,
    keys: Optional[Sequence[str]] = None,
) -> list[str]:
    """The ``alpha`` (paper: 10) parameter tensors whose score drops most when their tau_m is scaled by ``factor``
    (paper: 1.1); see :func:`sensitivity_scores`. Ties keep model order."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    ranking = sensitivity_scores(model_builder_or_model, merged_tv, score_fn, factor, keys=keys)
    return list(ranking)[:alpha]


def _write_atomic(path: Path, text: str) -> None:
    try:
        from magic_pl.statedict import atomic_path
    except ImportError:  # pragma: no cover - statedict always has it in this repo
        atomic_path = None
    if atomic_path is not None:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)  # pragma: no cover
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # pragma: no cover
    with os.fdopen(fd, "w") as f:  # pragma: no cover
        f.write(text)
    os.replace(tmp, path)  # pragma: no cover


def save_sensitivity(
    path: Union[str, os.PathLike],
    ranking: Union[Mapping[str, float], Sequence[str]],
    *,
    alpha: Optional[int] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a ranking atomically as JSON.

    Args:
        ranking: ``{name: score drop}`` (from :func:`sensitivity_scores`; written sorted by drop) or a list of names
            (the sensitive set itself).
        alpha: size of the sensitive set stored with it (default: all names for a list, 10 for a score mapping).
        metadata: extra JSON-serialisable information (score, factor, merge method, ...).
    """
    if isinstance(ranking, Mapping):
        items = sorted(((str(k), float(v)) for k, v in ranking.items()), key=lambda kv: kv[1], reverse=True)
        entries = [{"name": k, "drop": v} for k, v in items]
        alpha = 10 if alpha is None else alpha
    else:
        names = [str(k) for k in ranking]
        entries = [{"name": k, "drop": None} for k in names]
        alpha = len(names) if alpha is None else alpha
    doc = {
        "format": _FORMAT,
        "version": 1,
        "alpha": int(alpha),
        "sensitive": [e["name"] for e in entries[:alpha]],
        "ranking": entries,
        "metadata": dict(metadata or {}),
    }
    path = Path(path)
    _write_atomic(path, json.dumps(doc, indent=2) + "\n")
    return path


def sensitive_names(given: Union[str, os.PathLike, Sequence[str], None],
                    alpha: Optional[int] = None) -> Optional[list[str]]:
    """A given sensitive set as names: a list of tensor/module names, or a ranking JSON written by
    :func:`save_sensitivity` (its stored set, or its top ``alpha``); ``None`` stays ``None``."""
    if given is None:
        return None
    if isinstance(given, (str, os.PathLike)):
        return load_sensitivity(given, alpha=alpha)
    return [str(s) for s in given]


def load_sensitivity(path: Union[str, os.PathLike], alpha: Optional[int] = None) -> list[str]:
    """Read a file written by :func:`save_sensitivity`: the stored sensitive set, or the top ``alpha`` of the
    ranking."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read sensitivity ranking {path}: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or "ranking" not in doc:
        raise ValueError(f"{path} is not a magic-pl sensitivity ranking (expected format {_FORMAT!r})")
    if alpha is None:
        return list(doc["sensitive"])
    return [e["name"] for e in doc["ranking"][:alpha]]
