"""Task-tagged data for calibration and evaluation.

Batches are dicts ``{"task": LongTensor[B], <inputs>..., "labels": ...}``. Inputs are either one tensor under
``"inputs"`` (passed positionally to the model) or named tensors (``pixel_values``, ``input_ids``,
``attention_mask``, ...; passed as keyword arguments). The task index is the position of the task in
:attr:`TaskDataModule.task_names`, which must follow the order of the experts (docs/method.md).

- Calibration (``predict``): ``samples_per_task`` unlabelled samples per task (default 1, the paper's setting), drawn
  with a seeded generator, labels dropped. Fewer samples than processes is an error raised in ``setup``, before
  any merging work (Lightning's predict sampler would otherwise stop on an ``assert``).
- Evaluation (``test``): every labelled test sample exactly once across processes
  (:class:`UnpaddedDistributedSampler`), so per-task accuracy under DDP equals the single-process value. Test and
  validation sets smaller than the process count are refused in ``setup`` too (at ``predict`` already, before the
  calibration they would follow), and :meth:`TaskDataModule.check_labels` refuses class labels outside a task head's
  range before anything is scored.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "TASK_KEY",
    "LABELS_KEY",
    "INPUTS_KEY",
    "INDEX_KEY",
    "as_sample",
    "TaskTaggedDataset",
    "draw_indices",
    "task_collate",
    "UnpaddedDistributedSampler",
    "TaskDataModule",
    "RandomTaskDataset",
    "TensorFileDataset",
    "HFDataset",
    "check_count",
    "check_samples_per_process",
    "check_calibration_size",
    "check_label_range",
    "dataset_labels",
    "count_predict_samples",
]

TASK_KEY = "task"
LABELS_KEY = "labels"
INPUTS_KEY = "inputs"
#: Optional per-sample position in its task's test set: evaluation then keeps per-example correctness (for paired
#: bootstrap intervals); never passed to the model.
INDEX_KEY = "index"
#: Label value that evaluation skips (as :class:`~magic_pl.lightning.metrics.PerTaskAccuracy` does); never a class.
IGNORE_INDEX = -100
#: Default right-padding values for :func:`task_collate`; other keys pad with 0.
DEFAULT_PAD_VALUES: dict[str, int] = {LABELS_KEY: IGNORE_INDEX, "attention_mask": 0, "input_ids": 0}


# --------------------------------------------------------------------------------------------------------------------
# Option and label checks
# --------------------------------------------------------------------------------------------------------------------
def check_count(name: str, value: Any, minimum: int, *, none: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming option ``name`` unless ``value`` is an integer ``>= minimum`` (or ``None`` when
    ``none`` says what ``None`` means).

    Counts are checked when an object is built, so a bad one never reaches a DataLoader or a draw (which would fail
    late with a message naming no option, or silently take nothing).
    """
    if value is None and none is not None:
        return
    or_none = f" (or None: {none})" if none is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # True is an int to Python, not a count
        raise ValueError(f"{name} must be an integer >= {minimum}{or_none}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{or_none}, got {value}")


def check_label_range(labels: Tensor, num_classes: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if a class label is outside ``[0, num_classes)``.

    :data:`IGNORE_INDEX` is allowed (evaluation skips it). Without this check an out-of-range label is simply never
    predicted, and the accuracy comes out low with no warning.
    """
    labels = labels.reshape(-1)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}: label {int(labels[first])} at index {first} is outside the {num_classes} classes of the task's "
            f"head (0..{num_classes - 1}); {int(bad.sum())} of {labels.numel()} labels are out of range"
        )


def _class_id(value: Any, where: str) -> int:
    """An integer class id from a dataset item's label (an int, or a 0-d integer tensor)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"{where}: label {value!r} is not an integer class id")


def dataset_labels(dataset: Dataset, limit: Optional[int] = None, where: str = "the dataset") -> Optional[Tensor]:
    """Class labels of the first ``limit`` items of ``dataset`` (all by default) as an int64 tensor.

    Read through the dataset's ``labels()`` when it has one (no image decoding or tokenising: see
    :class:`HFDataset`, :class:`TensorFileDataset`, :class:`RandomTaskDataset`), else item by item. ``None`` when the
    labels are token sequences (causal LMs: no class range to check). ``ValueError`` naming ``where`` when an item
    has no label or one that is not an integer.
    """
    size = len(dataset)  # type: ignore[arg-type]
    n = size if limit is None else min(limit, size)
    accessor = getattr(dataset, "labels", None)
    if callable(accessor):
        try:
            labels = accessor()
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return None if labels is None else labels[:n]
    out = []
    for i in range(n):
        label = as_sample(dataset[i]).get(LABELS_KEY)
        if label is None:
            raise ValueError(f"{where}: item {i} has no label; evaluation needs one per item")
        if isinstance(label, Tensor) and label.dim() > 0:
            return None  # token labels (causal LM): accuracy over the vocabulary, no class range
        out.append(_class_id(label, f"{where}, item {i}"))
    return torch.tensor(out, dtype=torch.long)


def _describe(dataset: Dataset) -> str:
    """Where a dataset's labels come from (file and column when it can say), for error messages."""
    source = getattr(dataset, "label_source", None)
    return source() if callable(source) else type(dataset).__name__


# --------------------------------------------------------------------------------------------------------------------
# Samples and datasets
# --------------------------------------------------------------------------------------------------------------------
def as_sample(item: Any) -> dict[str, Any]:
    """Normalise a dataset item to a dict: ``(x, y)`` -> ``{"inputs": x, "labels": y}``, ``x`` -> ``{"inputs": x}``,
    a mapping is copied with a ``"label"`` key renamed to ``"labels"``."""
    if isinstance(item, Mapping):
        out = dict(item)
        if "label" in out and LABELS_KEY not in out:
            out[LABELS_KEY] = out.pop("label")
        return out
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"a sequence sample must be (inputs, label); got {len(item)} elements")
        return {INPUTS_KEY: item[0], LABELS_KEY: item[1]}
    return {INPUTS_KEY: item}


class TaskTaggedDataset(Dataset):
    """A view of ``dataset`` (optionally a subset ``indices``) whose items carry ``{"task": task}``.

    Args:
        dataset: any map-style dataset; items are normalised by :func:`as_sample`.
        task: the task index (position of the expert).
        indices: optional subset of ``dataset`` indices (default: all).
        drop_labels: remove ``"labels"`` (calibration is label-free).
        with_index: add ``"index"``, the sample's position in ``dataset`` (evaluation keeps per-example correctness by
            it, for paired comparisons of two models on the same examples).
    """

    def __init__(
        self, dataset: Dataset, task: int, indices: Optional[Sequence[int]] = None, *, drop_labels: bool = False,
        with_index: bool = False,
    ) -> None:
        self.dataset = dataset
        self.task = int(task)
        self.indices = list(indices) if indices is not None else None
        self.drop_labels = drop_labels
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i] if self.indices is not None else i
        sample = as_sample(self.dataset[j])
        if self.drop_labels:
            sample.pop(LABELS_KEY, None)
        if self.with_index:
            sample.setdefault(INDEX_KEY, torch.tensor(j))
        sample[TASK_KEY] = self.task
        return sample


def draw_indices(size: int, n: int, *, seed: int = 0, task: int = 0, name: Optional[str] = None) -> list[int]:
    """``n`` distinct indices out of ``range(size)``, drawn with a generator seeded by ``(seed, task)``.

    The same ``(seed, task)`` always gives the same draw, on every process. Raises ``ValueError`` if ``n > size``.
    """
    if n > size:
        what = f"task {name!r}" if name is not None else f"task {task}"
        raise ValueError(f"cannot draw {n} calibration samples (samples_per_task) from {what}: its dataset has {size}")
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(task))
    return torch.randperm(size, generator=gen)[:n].tolist()


def task_collate(samples: Sequence[Mapping[str, Any]], pad_values: Optional[Mapping[str, int]] = None) -> dict:
    """Collate task-tagged samples into a batch dict.

    ``"task"`` becomes a ``LongTensor[B]``. Tensors of equal shape are stacked; tensors that differ only in their first
    dimension (token sequences) are right-padded to the longest with ``pad_values`` (default: labels -100,
    attention_mask 0, input_ids 0, others 0). Numbers become tensors; other values are kept as lists.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    pads = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
    keys = list(samples[0].keys())
    out: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, (int, float, bool)) or (isinstance(first, Tensor) and first.dim() == 0):
            out[key] = torch.as_tensor(values if not isinstance(first, Tensor) else torch.stack(values))
            if key == TASK_KEY:
                out[key] = out[key].long()
        elif isinstance(first, Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                out[key] = torch.stack(values)
            else:
                tails = {tuple(v.shape[1:]) for v in values}
                if len(tails) != 1:
                    raise ValueError(f"cannot collate {key!r}: shapes {sorted(shapes)} differ beyond the first dim")
                length = max(v.shape[0] for v in values)
                batch = values[0].new_full((len(values), length, *values[0].shape[1:]), pads.get(key, 0))
                for i, v in enumerate(values):
                    batch[i, : v.shape[0]] = v
                out[key] = batch
        else:
            out[key] = values
    return out


class RandomTaskDataset(Dataset):
    """Seeded synthetic classification data: inputs ``N(0, 1)`` of ``shape``, labels a fixed random linear rule.

    For smoke tests and tiny configs only. Args: ``num_samples`` (64), ``shape`` ((8,)), ``num_classes`` (3),
    ``seed`` (0), ``key`` (input key, ``"inputs"``; e.g. ``"pixel_values"``), ``dtype`` (``"float32"``;
    ``"int64"`` draws token ids in ``[0, vocab_size)``), ``vocab_size`` (100).
    """

    def __init__(
        self,
        num_samples: int = 64,
        shape: Sequence[int] = (8,),
        num_classes: int = 3,
        seed: int = 0,
        key: str = INPUTS_KEY,
        dtype: str = "float32",
        vocab_size: int = 100,
        attention_mask: bool = False,
    ) -> None:
        for name, value in (("num_samples", num_samples), ("num_classes", num_classes), ("vocab_size", vocab_size)):
            check_count(name, value, 1)
        for size in shape:
            check_count("shape", size, 1)
        gen = torch.Generator().manual_seed(seed)
        shape = tuple(int(s) for s in shape)
        if dtype == "int64":
            self.x = torch.randint(0, vocab_size, (num_samples, *shape), generator=gen)
            feats = torch.nn.functional.one_hot(self.x, vocab_size).float().flatten(1)
        else:
            self.x = torch.randn(num_samples, *shape, generator=gen, dtype=getattr(torch, dtype))
            feats = self.x.float().flatten(1)
        w = torch.randn(feats.shape[1], num_classes, generator=gen)
        self.y = (feats @ w).argmax(-1)
        self.num_classes = num_classes
        self.key = key
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return len(self.y)

    def labels(self) -> Tensor:
        """Every item's class label, int64 ``[N]``."""
        return self.y

    def label_source(self) -> str:
        return f"RandomTaskDataset with num_classes={self.num_classes}"

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        out = {self.key: self.x[i], LABELS_KEY: self.y[i]}
        if self.attention_mask:
            out["attention_mask"] = torch.ones(self.x.shape[1], dtype=torch.long)
        return out


class TensorFileDataset(Dataset):
    """Samples from a tensor file (``.safetensors`` or ``.pt``, read with ``weights_only=True``).

    Every tensor in the file shares its first dimension; item ``i`` is ``{key: tensor[i]}`` with ``"label"``
    renamed ``"labels"``. A single input tensor named ``"inputs"`` is passed to the model positionally. A
    ``"label"``/``"labels"`` tensor must hold integer class ids (or token ids, 2-D).
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError(f"{path} must hold a non-empty mapping of tensors")
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors in {path} differ in their first dimension: {sizes}")
        self.tensors = dict(tensors)
        self.path = path
        self.label_key = next((k for k in ("labels", "label") if k in self.tensors), None)
        if self.label_key is not None:
            y = self.tensors[self.label_key]
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"{path}: tensor {self.label_key!r} must hold integer class ids, got {y.dtype}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def labels(self) -> Optional[Tensor]:
        """Every item's class label, int64 ``[N]``; ``None`` for token labels (2-D). ``ValueError`` if the file has
        no label tensor."""
        if self.label_key is None:
            raise ValueError(f"{self.path} has no 'label' tensor: evaluation needs labels")
        y = self.tensors[self.label_key]
        return y.long() if y.dim() == 1 else None

    def label_source(self) -> str:
        return f"{self.path}, tensor {self.label_key or 'label'!r}"

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return as_sample({k: v[i] for k, v in self.tensors.items()})


class HFDataset(Dataset):
    """A Hugging Face dataset (hub name, ``save_to_disk`` folder), a local data file or an image folder, processed for
    a model.

    Args:
        path: hub name (e.g. ``"tanganke/eurosat"``, needs the ``datasets`` package and a network), a folder written by
            ``Dataset.save_to_disk``, a local ``.jsonl``/``.json``/``.csv`` file, a ``.txt`` file (one unlabelled text
            per non-empty line, in ``text_column``), or a folder of images: flat (unlabelled calibration images) or
            one sub-folder per class (labelled; classes are the sorted folder names unless ``label_names`` says
            otherwise). Local files and folders are read without ``datasets``.
        split: split to load from the hub (``"test"``).
        name: hub configuration name (None).
        image_processor: a Hugging Face image processor name or folder: images (``image_column``, PIL images or
            file paths) become ``pixel_values``.
        image_key: the batch key of the processed images (``"pixel_values"``, a Hugging Face model's keyword;
            ``"inputs"`` passes them positionally, as timm models take them).
        tokenizer: a tokenizer name or folder: texts (``text_column``) become ``input_ids``/``attention_mask``.
        text_column, image_column, label_column: column names (``"text"``, ``"image"``, ``"label"``).
        text_pair_column: second text column for sentence-pair tasks (None).
        text_template: ``str.format`` pattern over the row's columns used instead of ``text_column``, e.g.
            ``"Question: {question}\nAnswer: {answer}"`` (None).
        max_length: tokenizer truncation length (128).
        limit: keep only the first ``limit`` rows (None: all).
        lm_labels: for causal LMs: ``labels`` are the input ids (the loss/accuracy shifts them), padding masked.
        label_names: class names for string labels: a list (name at position i is class i) or a mapping name ->
            class id (None: labels must be integers; in a ``.csv`` file, integer text such as ``"2"``).

    Labels (``label_column``, unless ``lm_labels``) are read and checked when the dataset is built, so a label that is
    not a class id fails here, naming the file, the column and the row (1-based), not after merging and calibrating.
    Rows without the column are unlabelled (calibration data); a column present in only some rows is an error.
    """

    def __init__(
        self,
        path: str,
        split: str = "test",
        name: Optional[str] = None,
        image_processor: Optional[str] = None,
        tokenizer: Optional[str] = None,
        text_column: str = "text",
        image_column: str = "image",
        label_column: Optional[str] = "label",
        text_pair_column: Optional[str] = None,
        text_template: Optional[str] = None,
        max_length: int = 128,
        limit: Optional[int] = None,
        lm_labels: bool = False,
        label_names: Optional[Union[Sequence[str], Mapping[str, int]]] = None,
        image_key: str = "pixel_values",
    ) -> None:
        check_count("max_length", max_length, 1)
        check_count("limit", limit, 1, none="every row")
        if not isinstance(image_key, str) or not image_key:
            raise ValueError(f"image_key must be a batch key such as 'pixel_values' or 'inputs', got {image_key!r}")
        self.image_key = image_key
        self.path, self.split = str(path), split
        self.rows, folder_classes = _load_rows(path, split, name, text_column=text_column,
                                               image_column=image_column, label_column=label_column)
        self.label_ids = _label_ids(label_names if label_names is not None else folder_classes, self.path)
        self.limit = min(limit, len(self.rows)) if limit is not None else len(self.rows)
        self.root = Path(path).parent if Path(path).is_file() else Path(path)
        self.text_column, self.image_column, self.label_column = text_column, image_column, label_column
        self.text_pair_column, self.text_template = text_pair_column, text_template
        self.max_length = max_length
        self.lm_labels = lm_labels
        self._image_processor_name, self._tokenizer_name = image_processor, tokenizer
        self._image_processor: Any = None
        self._tokenizer: Any = None
        self._labels = None if lm_labels or label_column is None else self._read_labels()

    def __len__(self) -> int:
        return self.limit

    def _where(self) -> str:
        return self.path if Path(self.path).is_file() else f"{self.path} (split {self.split!r})"

    def _read_labels(self) -> Optional[Tensor]:
        """The label column of the first ``limit`` rows as class ids, or ``None`` if no row has the column."""
        column, rows = self.label_column, self.rows
        if hasattr(rows, "column_names"):  # a `datasets.Dataset`: read one column, decode no image
            if column not in rows.column_names:
                return None
            values = list((rows.select(range(self.limit)) if self.limit < len(rows) else rows)[column])
        else:
            kept = rows[: self.limit]
            present = [column in row for row in kept]
            if not any(present):
                return None
            if not all(present):
                raise ValueError(f"{self._where()}: row {present.index(False) + 1} has no {column!r} column while "
                                 "other rows do")
            values = [row[column] for row in kept]
        text_ok = Path(self.path).suffix == ".csv" and Path(self.path).is_file()  # CSV has no types: "2" is 2
        return torch.tensor([self._label_id(v, i, text_ok) for i, v in enumerate(values)], dtype=torch.long)

    def _label_id(self, value: Any, i: int, text_ok: bool) -> int:
        where = f"{self._where()}: column {self.label_column!r}, row {i + 1}"
        if isinstance(value, str):
            if self.label_ids is not None:
                if value not in self.label_ids:
                    raise ValueError(f"{where}: label {value!r} is not in label_names {sorted(self.label_ids)}")
                return self.label_ids[value]
            if text_ok and value.strip().lstrip("-").isdigit():
                return int(value)
            raise ValueError(f"{where}: label {value!r} is not an integer class id; give label_names (class names "
                             "in class order, or a name -> id mapping) to map names to ids")
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # e.g. a JSON export that wrote 2 as 2.0
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{where}: label {value!r} is not an integer class id")
        return int(value)

    def labels(self) -> Optional[Tensor]:
        """Every row's class id, int64 ``[N]``, read when the dataset was built; ``None`` for ``lm_labels`` (token
        labels). ``ValueError`` if the rows have no label column."""
        if self.lm_labels:
            return None
        if self._labels is None:
            raise ValueError(f"{self._where()} has no label column {self.label_column!r}: evaluation needs labels "
                             "(set label_column)")
        return self._labels

    def label_source(self) -> str:
        return f"{self._where()}, column {self.label_column!r}"

    def _processors(self) -> tuple[Any, Any]:
        if self._image_processor is None and self._image_processor_name is not None:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(self._image_processor_name)
        if self._tokenizer is None and self._tokenizer_name is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
        return self._image_processor, self._tokenizer

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i >= self.limit:
            raise IndexError(i)
        row = self.rows[i]
        image_processor, tokenizer = self._processors()
        out: dict[str, Any] = {}
        if image_processor is not None:
            image = row[self.image_column]
            if isinstance(image, (str, os.PathLike)):
                from PIL import Image

                p = Path(image)
                image = Image.open(p if p.is_absolute() else self.root / p)
            image = image.convert("RGB")
            out[self.image_key] = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        if tokenizer is not None:
            text = self.text_template.format(**row) if self.text_template else str(row[self.text_column])
            pair = str(row[self.text_pair_column]) if self.text_pair_column else None
            enc = tokenizer(text, pair, truncation=True, max_length=self.max_length)
            out["input_ids"] = torch.tensor(enc["input_ids"], dtype=torch.long)
            out["attention_mask"] = torch.tensor(enc["attention_mask"], dtype=torch.long)
            if self.lm_labels:
                out[LABELS_KEY] = out["input_ids"].clone()
        if not out:
            raise ValueError("HFDataset needs an image_processor or a tokenizer to build model inputs")
        if self._labels is not None:
            out[LABELS_KEY] = self._labels[i].clone()
        return out


def _label_ids(label_names: Optional[Union[Sequence[str], Mapping[str, int]]], where: str) -> Optional[dict[str, int]]:
    """``label_names`` as a name -> class id mapping (a list names the classes in order)."""
    if label_names is None:
        return None
    if isinstance(label_names, str):
        raise ValueError(f"{where}: label_names must be a list of class names or a name -> id mapping, not a string")
    if isinstance(label_names, Mapping):
        ids = {str(k): v for k, v in label_names.items()}
        for k, v in ids.items():
            check_count(f"label_names[{k!r}]", v, 0)
        return ids
    names = [str(n) for n in label_names]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: label_names repeats a name: {names}")
    return {n: i for i, n in enumerate(names)}


#: Image files an image folder may hold (what PIL opens).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Files that mark a folder written by ``datasets.Dataset(Dict).save_to_disk``.
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def _load_rows(path: str, split: str, name: Optional[str], *, text_column: str = "text", image_column: str = "image",
               label_column: Optional[str] = "label") -> tuple[Sequence[Mapping[str, Any]], Optional[list[str]]]:
    """The rows of a data source and, for an image folder with one sub-folder per class, its class names."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(p.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{p}: line {number} is not JSON ({err.msg})") from None
            return _objects(rows, p), None
        if p.suffix == ".json":
            try:
                rows = json.loads(p.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{p} is not JSON ({err.msg}, line {err.lineno})") from None
            if not isinstance(rows, list):
                raise ValueError(f"{p} must hold a JSON list of rows")
            return _objects(rows, p), None
        if p.suffix == ".csv":
            with p.open(newline="") as f:
                return list(csv.DictReader(f)), None
        if p.suffix == ".txt":
            rows = [{text_column: line} for line in p.read_text().splitlines() if line.strip()]
            if not rows:
                raise ValueError(f"{p} has no text: a .txt data file holds one text per non-empty line")
            return rows, None
        raise ValueError(f"unsupported data file {p}: use .jsonl, .json, .csv, .txt or a folder of images")
    if p.is_dir() and not any((p / f).is_file() for f in _SAVED_DATASET_FILES):
        return _image_folder(p, image_column, label_column)
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError(
            f"loading {path!r} needs the `datasets` package (pip install datasets); local .jsonl/.json/.csv/.txt "
            "files and image folders work without it"
        ) from err
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        return (ds[split] if isinstance(ds, datasets.DatasetDict) else ds), None
    return datasets.load_dataset(path, name, split=split), None


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _image_folder(folder: Path, image_column: str,
                  label_column: Optional[str]) -> tuple[list[dict[str, Any]], Optional[list[str]]]:
    """Rows of an image folder: flat (``{image}``, unlabelled) or one sub-folder per class (``{image, label}``, the
    label being the folder's name); anything else is refused, naming the folder."""
    images = _images_in(folder)
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if images and classes:
        raise ValueError(f"{folder} holds both images and sub-folders ({classes[0].name}/): give a flat folder of "
                         "images (unlabelled) or one sub-folder of images per class (labelled)")
    if images:
        return [{image_column: str(f.resolve())} for f in images], None  # rows' relative paths mean the root's
    if not classes:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no class folders")
    if label_column is None:
        raise ValueError(f"{folder} has one folder per class, but label_column is None")
    rows = []
    for d in classes:
        found = _images_in(d)
        if not found:
            raise ValueError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        rows += [{image_column: str(f.resolve()), label_column: d.name} for f in found]
    return rows, [d.name for d in classes]


def _objects(rows: list, path: Path) -> list:
    """``rows``, checked to be JSON objects (a row is looked up by column name)."""
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, Mapping)), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad + 1} is a {type(rows[bad]).__name__}, not an object of columns")
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------------------------------------------------
class UnpaddedDistributedSampler(DistributedSampler):
    """Shards ``range(len(dataset))`` as ``rank::world_size`` with no padding and no duplicates.

    Ranks may get different numbers of samples (or none), so every sample is counted exactly once; use it for
    evaluation only (not training, where DDP needs equal batch counts). Being a ``DistributedSampler``, Lightning
    leaves it in place instead of injecting its padded sampler.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def check_samples_per_process(num_samples: int, world_size: int, where: str, *, why: str, fix: str) -> None:
    """Raise ``ValueError`` if ``where`` has fewer samples than the run has processes: every rank must get one.

    ``why`` says what a rank without samples would break, ``fix`` which option gives more samples.
    """
    if num_samples < world_size:
        raise ValueError(
            f"{where} has {num_samples} sample(s) but the run uses {world_size} processes: {why}. Use at most "
            f"{max(num_samples, 1)} device(s) or {fix}."
        )


def check_calibration_size(num_samples: int, world_size: int, where: str = "calibration data") -> None:
    """Raise ``ValueError`` if fewer calibration samples than processes: every rank must run at least one.

    Lightning's unpadded predict sampler would otherwise fail with a bare ``assert`` after the model was built.
    """
    check_samples_per_process(num_samples, world_size, where,
                              why="feature space calibration needs at least one sample per process",
                              fix="more samples per task (samples_per_task)")


def count_predict_samples(trainer: Any) -> Optional[int]:
    """Calibration samples, if the datamodule can tell (``num_calibration_samples``) or its predict dataloader(s)
    have sized datasets; ``None`` if unknown."""
    dm = getattr(trainer, "datamodule", None)
    n = getattr(dm, "num_calibration_samples", None)
    if n is not None:
        return int(n)
    if dm is None or not callable(getattr(dm, "predict_dataloader", None)):
        return None
    try:
        loaders = dm.predict_dataloader()
        loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return sum(len(dl.dataset) for dl in loaders)  # type: ignore[arg-type]
    except Exception:  # not sized, not a DataLoader, or needs state not set up yet: Lightning checks later
        return None



# --------------------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------------------
class TaskDataModule(LightningDataModule):
    """Calibration (``predict``) and evaluation (``test``) data for K tasks, in the order of the experts.

    Args:
        task_names: task names, in expert order. Keys of ``test``/``calibration`` must be among them.
        test: task name -> labelled test dataset (None: no evaluation).
        val: task name -> labelled validation dataset for ``trainer.validate`` (e.g. to tune a merge coefficient
            without touching the test sets); default none.
        calibration: task name -> dataset to draw unlabelled calibration samples from (labels are dropped). Defaults
            to ``test`` (the paper calibrates on a handful of samples from each task's test distribution).
        samples_per_task: unlabelled samples per task for FSC (1, the paper's default); ``None`` calibrates on every
            sample of each calibration dataset, in its order (samples drawn by the caller).
        seed: seed of the calibration draws (0).
        batch_size: evaluation batch size (32).
        calibration_batch_size: calibration batch size (1: no padding; statistics are then identical for any
            number of processes).
        test_limit: keep only the first ``test_limit`` samples of each test set (None: all).
        num_workers: DataLoader workers (0).
        pad_values: padding values for :func:`task_collate`.

    Every option is checked here, before any sample is read. ``setup`` refuses evaluation data smaller than the
    process count (at ``predict`` already: the test run follows the calibration), and :meth:`check_labels` (called by
    :class:`~magic_pl.lightning.module.MagicModule` once its heads are known) refuses labels outside a head's classes.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        test: Optional[Mapping[str, Dataset]] = None,
        calibration: Optional[Mapping[str, Dataset]] = None,
        val: Optional[Mapping[str, Dataset]] = None,
        samples_per_task: Optional[int] = 1,
        seed: int = 0,
        batch_size: int = 32,
        calibration_batch_size: int = 1,
        test_limit: Optional[int] = None,
        num_workers: int = 0,
        pad_values: Optional[Mapping[str, int]] = None,
    ) -> None:
        super().__init__()
        from magic_pl.output import check_task_names

        self.task_names = check_task_names(task_names)  # names, never paths; unique
        for label, sets in (("test", test), ("calibration", calibration), ("val", val)):
            unknown = sorted(set(sets or {}) - set(self.task_names))
            if unknown:
                raise ValueError(f"{label} datasets for unknown tasks {unknown}; task_names is {self.task_names}")
        check_count("samples_per_task", samples_per_task, 1, none="every sample")
        check_count("batch_size", batch_size, 1)
        check_count("calibration_batch_size", calibration_batch_size, 1)
        check_count("test_limit", test_limit, 1, none="every sample")
        check_count("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.test_sets = dict(test or {})
        self.val_sets = dict(val or {})
        self.calibration_sources = dict(calibration or {}) or dict(self.test_sets)
        self.samples_per_task = samples_per_task
        self.seed = seed
        self.batch_size = batch_size
        self.calibration_batch_size = calibration_batch_size
        self.test_limit = test_limit
        self.num_workers = num_workers
        self.pad_values = dict(pad_values or {})
        self._calibration: Optional[Dataset] = None
        self._test: Optional[Dataset] = None
        self._val: Optional[Dataset] = None
        #: (split, task) -> the class count its labels were checked against (each set is read once)
        self._labels_checked: dict[tuple[str, str], int] = {}

    # --- datasets ---------------------------------------------------------------------------------------------------
    def calibration_dataset(self) -> Dataset:
        """Unlabelled, task-tagged samples: ``samples_per_task`` per task with a calibration source, task order."""
        if self._calibration is None:
            parts = []
            for k, name in enumerate(self.task_names):
                source = self.calibration_sources.get(name)
                if source is None:
                    continue
                idx = (range(len(source)) if self.samples_per_task is None  # type: ignore[arg-type]
                       else draw_indices(len(source), self.samples_per_task, seed=self.seed, task=k,  # type: ignore[arg-type]
                                         name=name))
                parts.append(TaskTaggedDataset(source, k, idx, drop_labels=True))
            self._calibration = torch.utils.data.ConcatDataset(parts) if parts else _EmptyDataset()
        return self._calibration

    def _kept(self, ds: Dataset) -> int:
        """Samples of an evaluation set that are used (its first ``test_limit``)."""
        n = len(ds)  # type: ignore[arg-type]
        return n if self.test_limit is None else min(self.test_limit, n)

    def _labelled(self, sets: Mapping[str, Dataset]) -> Dataset:
        parts = []
        for k, name in enumerate(self.task_names):
            ds = sets.get(name)
            if ds is None:
                continue
            parts.append(TaskTaggedDataset(ds, k, range(self._kept(ds)), with_index=True))
        return torch.utils.data.ConcatDataset(parts) if parts else _EmptyDataset()

    def test_dataset(self) -> Dataset:
        """Labelled, task-tagged test samples of every task (first ``test_limit`` of each)."""
        if self._test is None:
            self._test = self._labelled(self.test_sets)
        return self._test

    def val_dataset(self) -> Dataset:
        """Labelled, task-tagged validation samples of every task (first ``test_limit`` of each)."""
        if self._val is None:
            self._val = self._labelled(self.val_sets)
        return self._val

    @property
    def num_calibration_samples(self) -> int:
        return len(self.calibration_dataset())  # type: ignore[arg-type]

    # --- Lightning hooks ----------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def setup(self, stage: str) -> None:
        """Check that every process gets data: calibration samples at ``predict``, and the evaluation sets at
        ``predict`` too (``test``/``validate`` run after calibration, which would otherwise be wasted) and at their own
        stage."""
        world_size, _ = self._world()
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
        if stage == "predict":
            check_calibration_size(self.num_calibration_samples, world_size)
        if stage in ("predict", "test"):
            self._check_eval_size("test", self.test_sets, world_size)
        if stage in ("predict", "validate"):
            self._check_eval_size("validation", self.val_sets, world_size)

    def _check_eval_size(self, split: str, sets: Mapping[str, Dataset], world_size: int) -> None:
        if not sets:
            return
        sizes = {name: self._kept(ds) for name, ds in sets.items()}
        limit = f" after test_limit={self.test_limit}" if self.test_limit is not None else ""
        where = f"the {split} data ({', '.join(f'task {n!r}: {k}' for n, k in sizes.items())}{limit})"
        check_samples_per_process(
            sum(sizes.values()), world_size, where,
            why="evaluation needs at least one sample per process (a process without batches would skip the final "
                "all-reduce of the accuracy counts)",
            fix=f"more {split} samples" + (" (a larger test_limit)" if self.test_limit is not None else ""))

    def check_labels(self, num_classes: Mapping[str, Optional[int]]) -> None:
        """Raise ``ValueError`` if a label of a task's test or validation set is outside ``[0, num_classes[task])``.

        The message names the task, the set (file and column when it can say), the label and the class count. Tasks
        missing from ``num_classes`` or mapped to ``None`` (class count unknown) are skipped; each set is read once
        (through its ``labels()`` when it has one: no image decoding or tokenising).
        """
        for split, sets in (("test", self.test_sets), ("validation", self.val_sets)):
            for name, ds in sets.items():
                classes = num_classes.get(name)
                if classes is None or self._labels_checked.get((split, name)) == classes:
                    continue
                where = f"the {split} set of task {name!r} ({_describe(ds)})"
                labels = dataset_labels(ds, self._kept(ds), where)
                if labels is not None:
                    check_label_range(labels, int(classes), where)
                self._labels_checked[(split, name)] = int(classes)

    def _collate(self, samples: Sequence[Mapping[str, Any]]) -> dict:
        return task_collate(samples, self.pad_values)

    def predict_dataloader(self) -> DataLoader:
        ds = self.calibration_dataset()
        world_size, _ = self._world()
        check_calibration_size(len(ds), world_size)  # type: ignore[arg-type]
        # Lightning wraps this in its unpadded predict sampler (rank::world_size, >= 1 sample per rank).
        return DataLoader(
            ds, batch_size=self.calibration_batch_size, shuffle=False, num_workers=self.num_workers,
            collate_fn=self._collate,
        )

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset())

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        world_size, rank = self._world()
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=UnpaddedDistributedSampler(ds, num_replicas=world_size, rank=rank),
            num_workers=self.num_workers,
            collate_fn=self._collate,
        )


class _EmptyDataset(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> Any:
        raise IndexError(i)

