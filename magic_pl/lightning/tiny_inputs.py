"""Tiny timm inputs for ``configs/tiny.yaml``: a random-init 2-block ViT base and seeded "experts", built on first use.

``magic-pl calibrate -c configs/tiny.yaml`` must run on a fresh clone with nothing downloaded, so the config's adapter
is :class:`TinyTimmAdapter`: given no ``base``/``experts`` it writes them once into a cache directory
(:func:`tiny_inputs_dir`: ``$MAGIC_PL_CACHE/tiny-inputs``, default ``~/.cache/magic-pl/tiny-inputs``) and then
behaves exactly like :class:`~magic_pl.models.timm.TimmAdapter` on those files. The experts are the base plus seeded
Gaussian noise, each with its own classifier head; accuracies on random data are at chance level. The files are
built in a temporary directory and renamed into place, so concurrent first runs (e.g. DDP ranks) never see a
half-written set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from magic_pl.models.timm import TimmAdapter

__all__ = ["TINY_MODEL_NAME", "TINY_MODEL_KWARGS", "TinyTimmAdapter", "build_tiny_timm", "tiny_inputs_dir"]

#: The timm architecture of the tiny inputs and its size overrides (2 blocks, width 32, 16x16 images).
TINY_MODEL_NAME = "vit_tiny_patch16_224"
TINY_MODEL_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}

_MANIFEST = "tiny-inputs.json"
_FORMAT = 1  # bump when the generated files change, so stale caches are not reused


def tiny_inputs_dir() -> Path:
    """Where tiny inputs are cached: ``$MAGIC_PL_CACHE/tiny-inputs``, default ``~/.cache/magic-pl/tiny-inputs``."""
    root = os.environ.get("MAGIC_PL_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "magic-pl") / "tiny-inputs"


def _expert_names(n: int) -> list[str]:
    return [chr(ord("a") + i) for i in range(n)]


def build_tiny_timm(
    cache_dir: Union[str, os.PathLike, None] = None,
    num_classes: Sequence[int] = (3, 4),
    noise: float = 0.05,
    seed: int = 0,
) -> dict[str, Path]:
    """The tiny base and experts as safetensors files, written on first use and reused after.

    Args:
        cache_dir: parent directory (default :func:`tiny_inputs_dir`); the files go in a subdirectory named after
            the other arguments.
        num_classes: one expert per entry, with that many classes (default 3 and 4: experts ``a`` and ``b``).
        noise: standard deviation of each expert's seeded perturbation of the base (default 0.05).
        seed: seed of the base's initialisation and of the perturbations (default 0).

    Returns:
        ``{"base": path, "a": path, "b": path, ...}``.
    """
    num_classes = [int(n) for n in num_classes]
    if not num_classes or min(num_classes) < 1:
        raise ValueError(f"num_classes needs one positive class count per expert; got {num_classes}")
    if not (noise >= 0.0 and noise < float("inf")):
        raise ValueError(f"noise must be a finite number >= 0; got {noise}")
    names = ["base", *_expert_names(len(num_classes))]
    parent = Path(cache_dir).expanduser() if cache_dir is not None else tiny_inputs_dir()
    key = f"vit2-f{_FORMAT}-seed{seed}-noise{noise:g}-classes{'x'.join(map(str, num_classes))}"
    final = parent / key
    paths = {n: final / f"{n}.safetensors" for n in names}
    if final.exists():
        if not (final / _MANIFEST).is_file() or not all(p.is_file() for p in paths.values()):
            raise FileExistsError(f"{final} exists but is not a complete set of magic-pl tiny inputs; remove it or "
                                  "point MAGIC_PL_CACHE elsewhere")
        return paths
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=parent))
    try:
        _write_tiny_timm(tmp, num_classes, noise, seed)
        (tmp / _MANIFEST).write_text(json.dumps({"format": _FORMAT, "model_name": TINY_MODEL_NAME,
                                                 "model_kwargs": TINY_MODEL_KWARGS, "num_classes": num_classes,
                                                 "noise": noise, "seed": seed, "files": names}, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MANIFEST).is_file():  # not a concurrent builder's complete set: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _write_tiny_timm(directory: Path, num_classes: list[int], noise: float, seed: int) -> None:
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):  # timm initialises from the global generator; leave the caller's alone
        torch.manual_seed(seed)
        base = timm.create_model(TINY_MODEL_NAME, pretrained=False, num_classes=num_classes[0], **TINY_MODEL_KWARGS)
        base_sd = base.state_dict()
        save_file({k: v.contiguous() for k, v in base_sd.items()}, str(directory / "base.safetensors"))
        for i, (name, n) in enumerate(zip(_expert_names(len(num_classes)), num_classes)):
            expert = timm.create_model(TINY_MODEL_NAME, pretrained=False, num_classes=n, **TINY_MODEL_KWARGS)
            g = torch.Generator().manual_seed(seed * 1000 + 100 + i)
            sd = {}
            for k, v in expert.state_dict().items():
                b = base_sd.get(k)
                shared = b is not None and b.shape == v.shape and v.is_floating_point() and not k.startswith("head.")
                sd[k] = (b + noise * torch.randn(b.shape, generator=g)).contiguous() if shared else v.contiguous()
            save_file(sd, str(directory / f"{name}.safetensors"))


class TinyTimmAdapter(TimmAdapter):
    """:class:`~magic_pl.models.timm.TimmAdapter` on the tiny ViT (:data:`TINY_MODEL_NAME`, :data:`TINY_MODEL_KWARGS`)
    whose base and experts are built on first use (:func:`build_tiny_timm`) unless given.

    Args:
        base: a base checkpoint of the tiny architecture; default ``None``: the cached tiny base.
        experts: expert checkpoints (give them together with ``base``); default ``None``: the cached tiny experts.
        task_names: one per expert (default ``a``, ``b``, ...).
        num_classes: classes per built expert (default 3, 4); ignored when ``experts`` are given.
        noise: the built experts' perturbation of the base (default 0.05).
        seed: seed of the built files (default 0).
        cache_dir: where built files go (default ``$MAGIC_PL_CACHE/tiny-inputs`` or ``~/.cache/magic-pl/tiny-inputs``).
    """

    def __init__(
        self,
        base: Optional[str] = None,
        experts: Optional[list[str]] = None,
        task_names: Optional[list[str]] = None,
        num_classes: Sequence[int] = (3, 4),
        noise: float = 0.05,
        seed: int = 0,
        cache_dir: Optional[str] = None,
    ) -> None:
        if (base is None) != (experts is None):
            raise ValueError("give both `base` and `experts` (your own checkpoints) or neither (the tiny inputs, "
                             "built in the cache): the built experts are fine-tuned from the built base only")
        if base is None:
            if task_names is not None and len(task_names) != len(num_classes):
                raise ValueError(f"{len(task_names)} task names for {len(num_classes)} built experts "
                                 f"(num_classes={list(num_classes)})")
            paths = build_tiny_timm(cache_dir, num_classes=num_classes, noise=noise, seed=seed)
            base = str(paths["base"])
            experts = [str(paths[n]) for n in _expert_names(len(num_classes))]
            task_names = list(task_names) if task_names is not None else _expert_names(len(num_classes))
        super().__init__(TINY_MODEL_NAME, experts=experts, base=base, task_names=task_names,
                         model_kwargs=dict(TINY_MODEL_KWARGS))
