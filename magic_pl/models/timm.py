"""timm models of any architecture: the classifier-free body is merged, each expert's classifier head is kept per task.

The body is ``timm.create_model(name, num_classes=0)`` (pooled features out). Head keys are found from the model's
``pretrained_cfg["classifier"]`` (``"fc"``, ``"head"``, ``"head.fc"``, ``("head", "head_dist")`` for distilled
models, ...). Expert checkpoints are ordinary timm state dicts (``.pth``/``.pt``/``.bin``, read with
``weights_only=True`` unless ``trust_pickle``) or ``.safetensors`` files (read lazily).

Saved layout (:meth:`TimmAdapter.save`), all written atomically::

    out/
      config.json              architecture, model kwargs, per-task num_classes
      model.safetensors        the calibrated body: loads into timm.create_model(name, num_classes=0)
      heads/<task>.safetensors each task's head tensors under their timm keys (e.g. fc.weight)
      <task>.safetensors       (full_checkpoints=True) body + head: an ordinary timm checkpoint for
                               timm.create_model(name, num_classes=n); .pth when the experts came as torch files
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.models.base import (
    KeyView,
    MergeSetup,
    ModelAdapter,
    PrefixView,
    default_task_names,
    find_tied_keys,
    tensor_shape,
)
from magic_pl.models.heads import TaskModel
from magic_pl.output import OutputLocation, check_task_names, child_path
from magic_pl.statedict import CheckpointError, StateDict, load_state_dict, save_state_dict

__all__ = ["TimmAdapter", "DistilledHead", "classifier_names", "load_timm_saved"]

#: Names of the files a timm output holds besides ``<task>.safetensors``: no task may take them.
TIMM_OUTPUT_NAMES = ("model", "heads", "config")

PathLike = Union[str, os.PathLike]
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier module name(s) of a timm model (``pretrained_cfg["classifier"]``; default ``("head",)``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cls = cfg.get("classifier", "head")
    return tuple(cls) if isinstance(cls, (list, tuple)) else (str(cls),)


class DistilledHead(nn.Module):
    """Two heads averaged at inference, as timm's distilled models (DeiT) do: ``(head(x) + head_dist(x)) / 2``."""

    def __init__(self, heads: dict[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict({k.replace(".", "_"): v for k, v in heads.items()})

    def forward(self, x: Tensor) -> Tensor:
        outs = [h(x) for h in self.heads.values()]
        return sum(outs) / len(outs)


def _unwrap(sd: StateDict, body_keys: set[str]) -> StateDict:
    """Strip a training wrapper prefix (``module.``, ``model.``, ``_orig_mod.``) when every key carries it and the body
    keys do not."""
    keys = list(sd.keys())
    for prefix in _WRAPPER_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys) and not any(k.startswith(prefix) for k in body_keys):
            return PrefixView(sd, prefix)
    return sd


class TimmAdapter(ModelAdapter):
    """timm checkpoints -> :class:`~magic_pl.models.base.MergeSetup` (body merged, heads per task).

    Args:
        model_name: timm architecture, e.g. ``"vit_base_patch16_224"`` or ``"resnet50"``.
        experts: one fine-tuned checkpoint per task (timm state dict file or ``.safetensors``).
        base: the pretrained checkpoint the experts were fine-tuned from. Default ``None``: timm's pretrained
            weights (``pretrained=True`` needed then; that downloads unless timm's cache has them).
        pretrained: load timm's pretrained weights for the base when ``base`` is not given (default ``False``).
        task_names: one name per expert (default: the expert file names).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"img_size": 32}``); default none.
        trust_pickle: read torch checkpoints with full pickle (only for files you trust); default ``False``.
    """

    def __init__(
        self,
        model_name: str,
        experts: list[str],
        base: Optional[str] = None,
        pretrained: bool = False,
        task_names: Optional[list[str]] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        trust_pickle: bool = False,
    ):
        if not experts:
            raise ValueError("need at least one expert checkpoint")
        if base is None and not pretrained:
            raise ValueError(
                "the base model is needed: pass base=<checkpoint of the pretrained model> or pretrained=True "
                "(timm's pretrained weights)"
            )
        self.model_name = model_name
        self.expert_paths = [str(e) for e in experts]
        self.base_path = str(base) if base is not None else None
        self.pretrained = pretrained
        self.task_names = default_task_names(self.expert_paths, task_names, reserved=TIMM_OUTPUT_NAMES)
        self.model_kwargs = dict(model_kwargs or {})
        self.trust_pickle = trust_pickle

    # ----------------------------------------------------------------------------------------------------------------
    def create_body(self, pretrained: bool = False) -> nn.Module:
        """``timm.create_model(model_name, num_classes=0, **model_kwargs)``."""
        import timm

        return timm.create_model(self.model_name, pretrained=pretrained, num_classes=0, **self.model_kwargs)

    def _head_module(self, num_classes: int) -> nn.Module:
        """A fresh head for ``num_classes`` (built on the meta device, then materialised on CPU)."""
        import timm

        try:
            with torch.device("meta"):
                full = timm.create_model(self.model_name, pretrained=False, num_classes=num_classes,
                                         **self.model_kwargs)
        except Exception:  # some timm models do real work at init; fall back to CPU
            full = timm.create_model(self.model_name, pretrained=False, num_classes=num_classes, **self.model_kwargs)
        names = classifier_names(full)
        mods = {n: full.get_submodule(n) for n in names}
        for m in mods.values():
            m.to_empty(device="cpu")
        return next(iter(mods.values())) if len(mods) == 1 else DistilledHead(mods)

    def _split(self, sd: StateDict, body_keys: set[str], classifiers: tuple[str, ...], name: str
               ) -> tuple[StateDict, dict[str, Tensor]]:
        """(body view, head tensors) of one checkpoint; clear errors for foreign keys."""
        sd = _unwrap(sd, body_keys)
        head_keys = [k for k in sd if any(k.startswith(c + ".") for c in classifiers)]
        other = [k for k in sd if k not in body_keys and k not in head_keys]
        if other:
            raise CheckpointError(
                f"{name} does not match timm architecture {self.model_name!r}: it has {len(other)} key(s) neither in "
                f"the body nor in the classifier {classifiers}, e.g. {other[:5]}"
            )
        return KeyView(sd, [k for k in sd if k in body_keys]), {k: sd[k] for k in head_keys}

    def _build_head(self, head_sd: dict[str, Tensor], classifiers: tuple[str, ...], name: str) -> nn.Module:
        if not head_sd:
            return nn.Identity()
        weight_key = f"{classifiers[0]}.weight"
        if weight_key not in head_sd:
            raise CheckpointError(f"{name}: classifier tensor {weight_key!r} missing (head keys: {sorted(head_sd)})")
        head = self._head_module(int(head_sd[weight_key].shape[0]))
        if isinstance(head, DistilledHead):
            local = {f"heads.{k.split('.', 1)[0].replace('.', '_')}.{k.split('.', 1)[1]}": v
                     for k, v in head_sd.items()}
        else:
            local = {k[len(classifiers[0]) + 1:]: v for k, v in head_sd.items()}
        try:
            head.load_state_dict(local, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{name}: classifier head does not fit {self.model_name!r}: {err}") from err
        return head.eval()

    def _check_shapes(self, sd: StateDict, body_shapes: dict[str, tuple[int, ...]], name: str) -> None:
        """Raise naming the first body key whose shape differs (both shapes), from headers where ``sd`` is lazy."""
        for k in sd:
            want, got = body_shapes[k], tuple(tensor_shape(sd, k))
            if want != got:
                raise CheckpointError(
                    f"{name}: shape mismatch for {k!r}: checkpoint {got} vs timm {self.model_name!r} {want} "
                    f"(model_kwargs={self.model_kwargs}): a different architecture or width?"
                )

    def setup(self) -> MergeSetup:
        body = self.create_body(pretrained=self.pretrained and self.base_path is None)
        classifiers = classifier_names(body)
        body_shapes = {k: tuple(v.shape) for k, v in body.state_dict().items()}
        body_keys = set(body_shapes)
        if self.base_path is not None:
            base_sd = load_state_dict(self.base_path, trust_pickle=self.trust_pickle)
            base_body, _ = self._split(base_sd, body_keys, classifiers, f"base {self.base_path}")
            missing = sorted(body_keys - set(base_body.keys()))
            if missing:
                raise CheckpointError(
                    f"base {self.base_path} lacks {len(missing)} key(s) of timm {self.model_name!r}, e.g. {missing[:5]}"
                )
            self._check_shapes(base_body, body_shapes, f"base {self.base_path}")
            body.load_state_dict({k: base_body[k] for k in base_body}, strict=True)
        body.eval()
        experts: list[StateDict] = []
        heads: dict[str, nn.Module] = {}
        tied = find_tied_keys(body)
        for path, task in zip(self.expert_paths, self.task_names):
            name = f"expert {task!r} ({path})"
            sd = load_state_dict(path, trust_pickle=self.trust_pickle)
            body_view, head_sd = self._split(sd, body_keys, classifiers, name)
            # the body first: an expert of another width would otherwise be blamed on its classifier head
            self._check_shapes(body_view, body_shapes, name)
            experts.append(KeyView(body_view, [k for k in body_view if k not in tied]))
            heads[task] = self._build_head(head_sd, classifiers, name)
        setup = MergeSetup(
            base=body, experts=experts, task_names=list(self.task_names), heads=heads, tied=tied, adapter=self,
            metadata={"family": "timm", "model_name": self.model_name, "classifier": list(classifiers),
                      "experts": list(self.expert_paths), "base": self.base_path},
        )
        setup.validate()
        return setup

    # ----------------------------------------------------------------------------------------------------------------
    def task_model(self, setup: MergeSetup, body: nn.Module, task: str) -> nn.Module:
        return TaskModel(body, setup.heads[task])

    def _head_state(self, setup: MergeSetup, task: str) -> dict[str, Tensor]:
        head = setup.heads[task]
        classifiers = tuple(setup.metadata.get("classifier") or ("head",))
        if isinstance(head, nn.Identity):
            return {}
        if isinstance(head, DistilledHead):
            out = {}
            for c in classifiers:
                sub = head.heads[c.replace(".", "_")]
                out.update({f"{c}.{k}": v for k, v in sub.state_dict().items()})
            return out
        return {f"{classifiers[0]}.{k}": v for k, v in head.state_dict().items()}

    def save(self, setup: MergeSetup, body: nn.Module, path: PathLike, *, full_checkpoints: bool = True,
             dtype: Optional[str] = None, overwrite: bool = False, **options: Any) -> Path:
        """Write the calibrated body, the heads and (``full_checkpoints``, default ``True``) one ordinary timm
        checkpoint per task; see the module docstring for the layout. ``dtype``: cast floating tensors as they are
        written (e.g. ``"bfloat16"``; default: as held). ``path`` is replaced only when empty, a previous magic-pl
        output, or with ``overwrite``. Returns ``path``."""
        from magic_pl.models._hf import resolve_dtype

        if options:
            raise TypeError(f"unknown save option(s) for timm: {sorted(options)}")
        target = resolve_dtype(dtype)

        def cpu(v: Tensor) -> Tensor:
            v = v.detach().cpu()
            return v.to(target) if isinstance(target, torch.dtype) and v.is_floating_point() else v

        inputs = [*self.expert_paths, *([self.base_path] if self.base_path else [])]
        out = OutputLocation(path, overwrite=overwrite, inputs=inputs).check()
        body_sd = {k: cpu(v) for k, v in body.state_dict().items()}
        torch_format = all(Path(p).suffix in {".pth", ".pt", ".bin", ".ckpt"} for p in self.expert_paths)
        ext = ".pth" if torch_format else ".safetensors"
        config = {
            "architecture": self.model_name,
            "model_kwargs": self.model_kwargs,
            "classifier": setup.metadata.get("classifier"),
            "tasks": {},
            "format": "magic-pl timm: model.safetensors (body, num_classes=0) + heads/<task>.safetensors",
        }
        with out:
            tmp = out.stage()
            save_state_dict(body_sd, tmp / "model.safetensors")
            (tmp / "heads").mkdir()
            for task in check_task_names(setup.task_names, reserved=TIMM_OUTPUT_NAMES):
                head_sd = {k: cpu(v) for k, v in self._head_state(setup, task).items()}
                wkey = f"{config['classifier'][0]}.weight" if config["classifier"] else None
                n = int(head_sd[wkey].shape[0]) if wkey in head_sd else 0
                config["tasks"][task] = {"num_classes": n}
                if head_sd:
                    save_state_dict(head_sd, child_path(tmp, "heads", f"{task}.safetensors"))
                if full_checkpoints:
                    save_state_dict({**body_sd, **head_sd}, child_path(tmp, f"{task}{ext}"))
                    config["tasks"][task]["checkpoint"] = f"{task}{ext}"
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            out.commit({"content": "timm body, heads and per-task checkpoints", "tasks": list(setup.task_names)})
        return out.path


def load_timm_saved(path: PathLike, task: Optional[str] = None) -> nn.Module:
    """Rebuild a model written by :meth:`TimmAdapter.save`: the body (``task=None``) or the full timm classifier of
    ``task`` (``timm.create_model(arch, num_classes=n)`` with body + head loaded strictly)."""
    import timm

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    arch, kwargs = config["architecture"], config.get("model_kwargs") or {}
    body_sd = load_state_dict(path / "model.safetensors")
    if task is None:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        model.load_state_dict(dict(body_sd), strict=True)
        return model.eval()
    if task not in config["tasks"]:
        raise KeyError(f"no task {task!r} in {path}; tasks: {sorted(config['tasks'])}")
    n = config["tasks"][task]["num_classes"]
    model = timm.create_model(arch, pretrained=False, num_classes=n, **kwargs)
    head_file = path / "heads" / f"{task}.safetensors"
    head_sd = dict(load_state_dict(head_file)) if head_file.exists() else {}
    model.load_state_dict({**dict(body_sd), **head_sd}, strict=True)
    return model.eval()
