"""Per-task heads and the small wrappers that run a (merged) body with them.

- :class:`TaskModel`: ``head(features(body(*inputs)))`` for one task; the body is shared, never copied.
- :class:`MultiTaskModel`: ``forward(*inputs, task=name)`` dispatching to one :class:`TaskModel` per task.
- :class:`ZeroShotHead`: CLIP's zero-shot classifier, ``logits = normalize(f) @ W.T`` with ``W`` the normalised,
  template-averaged class text embeddings times ``exp(logit_scale)`` (Radford et al. 2021; Ilharco et al. 2023).
- :func:`zeroshot_weights`: builds ``W`` from class names and prompt templates with a CLIP text tower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magic_pl.calibration.modules import logits_of

__all__ = ["TaskModel", "MultiTaskModel", "ZeroShotHead", "zeroshot_weights", "extract_features", "logits_of"]


def extract_features(output: Any, key: Optional[str] = None) -> Tensor:
    """The tensor a head consumes from a body's output: ``output`` itself when it is a tensor, else the attribute or
    item ``key`` (e.g. ``"image_embeds"`` of a ``CLIPVisionModelWithProjection`` output)."""
    if isinstance(output, Tensor) and key is None:
        return output
    if key is None:
        raise TypeError(f"the body returned a {type(output).__name__}; say which field the head reads (output=...)")
    value = getattr(output, key, None)
    if value is None and isinstance(output, Mapping):
        value = output.get(key)
    if value is None:
        raise KeyError(f"the body's output ({type(output).__name__}) has no field {key!r}")
    return value


class TaskModel(nn.Module):
    """``head(body(*inputs, **kw)[output])``: a body shared between tasks followed by one task's head.

    Args:
        body: the (merged, calibrated) body; registered as a submodule (shared, not copied).
        head: the task's head module.
        output: the body output field the head reads (default ``None``: the body returns a tensor).
    """

    def __init__(self, body: nn.Module, head: nn.Module, output: Optional[str] = None):
        super().__init__()
        self.body, self.head, self.output = body, head, output

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.head(extract_features(self.body(*args, **kwargs), self.output))


class MultiTaskModel(nn.Module):
    """Dispatch to one model per task: ``forward(*inputs, task=name, **kw)`` returns that task's logits.

    The task models normally share one body, so this module's ``state_dict`` repeats the body per task; save with
    the adapter (:meth:`~magic_pl.models.base.MergeSetup.save`), not from here.
    """

    def __init__(self, task_models: Mapping[str, nn.Module]):
        super().__init__()
        if not task_models:
            raise ValueError("need at least one task model")
        self.task_names = list(task_models)
        self.models = nn.ModuleDict({_safe(t): m for t, m in task_models.items()})
        self._keys = {t: _safe(t) for t in task_models}

    def forward(self, *args: Any, task: str, **kwargs: Any) -> Tensor:
        try:
            key = self._keys[task]
        except KeyError:
            raise KeyError(f"unknown task {task!r}; tasks: {self.task_names}") from None
        return logits_of(self.models[key](*args, **kwargs))


def _safe(name: str) -> str:
    # ModuleDict keys cannot contain dots.
    return name.replace(".", "_")


class ZeroShotHead(nn.Module):
    """CLIP zero-shot classification head: ``logits = normalize(features) @ weight.T`` (+ ``bias``, zero).

    ``weight`` is ``[num_classes, dim]``: normalised class embeddings already multiplied by ``exp(logit_scale)``
    (the ``ClassificationHead`` of the task-vectors code, ``normalize=True``). Stored as an ordinary state dict
    (``weight``, ``bias``).
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, normalize: bool = True):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"zero-shot weight must be [num_classes, dim], got shape {tuple(weight.shape)}")
        self.normalize = normalize
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(
            bias.detach().clone() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype),
            requires_grad=False,
        )

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features.to(self.weight.dtype), self.weight, self.bias)


def _text_features(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    if isinstance(out, Tensor):
        return out
    for field in ("text_embeds", "pooler_output"):
        value = getattr(out, field, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"get_text_features returned a {type(out).__name__} without text embeddings")


@torch.no_grad()
def zeroshot_weights(
    clip_model: nn.Module,
    tokenizer: Callable[..., Any],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    apply_logit_scale: bool = True,
) -> Tensor:
    """Zero-shot classifier weights ``[num_classes, dim]`` (float32) from a CLIP model's text tower.

    For each class, embed every ``template.format(classname)``, L2-normalise, average over templates, normalise
    again; stack and (``apply_logit_scale``, default) multiply by ``exp(logit_scale)`` - the standard protocol of
    CLIP and the task-vectors benchmark.

    Args:
        clip_model: a ``transformers.CLIPModel`` (anything with ``get_text_features`` and ``logit_scale``).
        tokenizer: a Hugging Face tokenizer (called with ``padding=True, return_tensors="pt"``).
        classnames: class names in label order.
        templates: ``str.format`` patterns with one ``{}``.
        batch_size: prompts per text-tower batch (default 256).
        device: where to run the text tower (default: where ``clip_model`` is).
    """
    if not classnames:
        raise ValueError("need at least one class name")
    if not templates:
        raise ValueError("need at least one prompt template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class name, e.g. 'a photo of a {{}}.'; got {bad[:3]}")
    device = device or next(clip_model.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[i : i + batch_size], padding=True, truncation=True, return_tensors="pt")
        ids = tok["input_ids"].to(device)
        mask = tok.get("attention_mask")
        feats.append(_text_features(clip_model, ids, mask.to(device) if mask is not None else None).float())
    emb = F.normalize(torch.cat(feats), dim=-1).view(len(classnames), len(templates), -1)
    weights = F.normalize(emb.mean(dim=1), dim=-1)
    if apply_logit_scale:
        weights = weights * clip_model.logit_scale.exp().float()
    return weights.cpu()
