"""Checkpoint core: loading, lazy access, validation, task vectors and atomic saving.

Everything here is pure PyTorch + safetensors. A *state dict* is any ``Mapping[str, Tensor]``; files in the
safetensors format are opened lazily (:class:`LazyStateDict`), so reading one tensor reads only that tensor and
merging K experts holds about one model in memory (DESIGN.md sections 2 and 5).

Task vectors follow DESIGN.md section 2: ``tau = finetuned - base`` over floating-point entries only. Integer and bool
buffers (``position_ids``, ``num_batches_tracked``) never enter a task vector; :func:`apply_task_vector` copies them
from the base.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "StateDict",
    "CheckpointError",
    "LazyStateDict",
    "load_state_dict",
    "is_mergeable",
    "is_batchnorm_stat",
    "validate_state_dict",
    "validate_experts",
    "key_mismatch_error",
    "task_vector",
    "iter_task_vectors",
    "apply_task_vector",
    "atomic_path",
    "save_state_dict",
]

StateDict = Mapping[str, Tensor]
Source = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module]

#: Suffixes of BatchNorm running statistics: float buffers that are not weights (DESIGN.md section 2).
BATCHNORM_STAT_SUFFIXES = ("running_mean", "running_var")

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_HF_WEIGHT_FILES = ("model.safetensors", _SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message names the file, key and shapes involved."""


# --------------------------------------------------------------------------------------------------------------------
# Lazy safetensors access
# --------------------------------------------------------------------------------------------------------------------
class LazyStateDict(Mapping[str, Tensor]):
    """Read-only mapping over one or more safetensors files; ``sd[key]`` reads just that tensor from disk.

    Args:
        files: key -> file path, for sharded checkpoints (``model.safetensors.index.json``'s ``weight_map``) or a
            single file (every key maps to it).
    """

    def __init__(self, weight_map: Mapping[str, Union[str, Path]]):
        from safetensors import safe_open

        self._weight_map = {k: Path(v) for k, v in weight_map.items()}
        self._handles: dict[Path, Any] = {}
        self._safe_open = safe_open
        self._meta: dict[str, tuple[torch.Size, torch.dtype]] = {}

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "LazyStateDict":
        """Open a single ``.safetensors`` file."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
        return cls({k: path for k in keys})

    @classmethod
    def from_index(cls, index_path: Union[str, Path]) -> "LazyStateDict":
        """Open a sharded checkpoint from its ``*.safetensors.index.json``."""
        index_path = Path(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot read sharded-checkpoint index {index_path}: {err}") from err
        files = {k: index_path.parent / v for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"shard {f} listed in {index_path} does not exist")
        return cls(files)

    def _handle(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            handle = self._safe_open(str(path), framework="pt")
            self._handles[path] = handle
        return handle

    def __getitem__(self, key: str) -> Tensor:
        try:
            path = self._weight_map[key]
        except KeyError:
            raise KeyError(key) from None
        return self._handle(path).get_tensor(key)

    def _slice_meta(self, key: str) -> tuple[torch.Size, torch.dtype]:
        if key not in self._meta:
            sl = self._handle(self._weight_map[key]).get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                dtype = self[key].dtype
            self._meta[key] = (torch.Size(sl.get_shape()), dtype)
        return self._meta[key]

    def shape(self, key: str) -> torch.Size:
        """Shape of ``key`` without reading its data."""
        return self._slice_meta(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of ``key`` without reading its data."""
        return self._slice_meta(key)[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def __repr__(self) -> str:
        files = sorted({str(p) for p in self._weight_map.values()})
        return f"LazyStateDict({len(self)} tensors in {files})"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _shape(sd: StateDict, key: str) -> torch.Size:
    return sd.shape(key) if isinstance(sd, LazyStateDict) else sd[key].shape


def _dtype(sd: StateDict, key: str) -> torch.dtype:
    return sd.dtype(key) if isinstance(sd, LazyStateDict) else sd[key].dtype


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def load_state_dict(source: Source, *, trust_pickle: bool = False) -> StateDict:
    """Load a state dict from a file, a directory, a mapping or a module.

    Args:
        source: a ``.safetensors`` file; a sharded checkpoint's ``*.index.json``; a ``.pt``/``.bin``/``.pth``/``.ckpt``
            torch file; a directory holding one of those (Hugging Face layout: ``model.safetensors``,
            ``model.safetensors.index.json``, ``pytorch_model.bin``); a mapping of tensors; or an ``nn.Module``.
        trust_pickle: torch files are read with ``weights_only=True`` so a checkpoint can never run code. Set this to
            ``True`` only for pickles you trust that hold more than tensors.

    Returns:
        A mapping key -> tensor. safetensors sources give a :class:`LazyStateDict` (nothing is read until indexed);
        a module gives its detached ``state_dict()`` (shared storage, no copy).
    """
    if isinstance(source, nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, Mapping):
        for k, v in source.items():
            if not isinstance(v, Tensor):
                raise CheckpointError(f"entry {k!r} is a {type(v).__name__}, not a tensor")
        return source
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _load_directory(path, trust_pickle=trust_pickle)
    name = path.name
    if name.endswith(".safetensors"):
        return LazyStateDict.from_file(path)
    if name.endswith(".safetensors.index.json"):
        return LazyStateDict.from_index(path)
    if name.endswith(".bin.index.json"):
        return _load_torch_index(path, trust_pickle=trust_pickle)
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return _load_torch_file(path, trust_pickle=trust_pickle)
    raise CheckpointError(
        f"cannot tell the format of {path}: expected .safetensors, *.safetensors.index.json, .pt/.pth/.bin/.ckpt "
        "or a Hugging Face model directory"
    )


def _load_directory(path: Path, *, trust_pickle: bool) -> StateDict:
    for fname in _HF_WEIGHT_FILES:
        if (path / fname).is_file():
            return load_state_dict(path / fname, trust_pickle=trust_pickle)
    shards = sorted(path.glob("*.safetensors"))
    if len(shards) == 1:
        return LazyStateDict.from_file(shards[0])
    raise CheckpointError(
        f"directory {path} holds no model weights: looked for {', '.join(_HF_WEIGHT_FILES)}"
        + (f" (found {len(shards)} .safetensors files but no index)" if shards else "")
    )


def _load_torch_file(path: Path, *, trust_pickle: bool) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except Exception as err:
        hint = "" if trust_pickle else " (it is read with weights_only=True; pass trust_pickle=True for trusted files)"
        raise CheckpointError(f"cannot load torch checkpoint {path}: {err}{hint}") from err
    # Lightning / common training checkpoints nest the weights.
    for nested in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and nested in obj and isinstance(obj[nested], Mapping):
            obj = obj[nested]
            break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:5]} are not tensors")
    return dict(obj)


def _load_torch_index(path: Path, *, trust_pickle: bool) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read sharded-checkpoint index {path}: {err}") from err
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(_load_torch_file(path.parent / shard, trust_pickle=trust_pickle))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def is_mergeable(tensor_or_dtype: Union[Tensor, torch.dtype]) -> bool:
    """True for floating-point tensors (or dtypes): only those enter task vectors."""
    dtype = tensor_or_dtype.dtype if isinstance(tensor_or_dtype, Tensor) else tensor_or_dtype
    return dtype.is_floating_point


def is_batchnorm_stat(key: str) -> bool:
    """True for BatchNorm running statistics, which merge coefficients must never extrapolate."""
    return key.endswith(BATCHNORM_STAT_SUFFIXES)


def _check_finite(tensor: Tensor, key: str, where: str) -> None:
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise CheckpointError(f"{where}: tensor {key!r} has {n_nan} NaN and {n_inf} Inf values")


def validate_state_dict(state: StateDict, *, name: str = "checkpoint", check_finite: bool = True) -> None:
    """Raise :class:`CheckpointError` if ``state`` is empty or holds NaN/Inf in a float tensor."""
    if len(state) == 0:
        raise CheckpointError(f"{name} is empty")
    if check_finite:
        for key in state:
            _check_finite(state[key], key, name)


def key_mismatch_error(
    name: str, base_keys: Collection[str], expert_keys: Collection[str], *, hint: str = ""
) -> CheckpointError | None:
    """The error for an expert whose key set differs from the base's (names a few missing/extra keys), or None."""
    bset, eset = set(base_keys), set(expert_keys)
    missing, extra = sorted(bset - eset), sorted(eset - bset)
    if not (missing or extra):
        return None
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) of the base, e.g. {missing[:5]}")
    if extra:
        parts.append(f"has {len(extra)} key(s) the base lacks, e.g. {extra[:5]}")
    return CheckpointError(f"{name} does not match the base architecture: " + "; ".join(parts) + hint)


def validate_experts(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
) -> None:
    """Check that every expert matches the base key for key.

    Raises :class:`CheckpointError` naming the expert and key for: missing or extra keys, a shape mismatch (both
    shapes), a float tensor where the base has a non-float one (or the reverse), NaN/Inf values (``check_finite``).
    Mixed float dtypes (bf16 experts, fp32 base) are allowed. Reads one tensor at a time.
    """
    if len(experts) == 0:
        raise CheckpointError("need at least one expert, got none")
    names = list(names) if names is not None else [f"expert {i}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise CheckpointError(f"{len(names)} names given for {len(experts)} experts")
    base_keys = set(base.keys())
    if not base_keys:
        raise CheckpointError("the base checkpoint is empty")
    for name, expert in zip(names, experts):
        mismatch = key_mismatch_error(name, base_keys, expert.keys())
        if mismatch is not None:
            raise mismatch
        for key in base:
            bshape, eshape = _shape(base, key), _shape(expert, key)
            if bshape != eshape:
                raise CheckpointError(
                    f"{name}: shape mismatch for {key!r}: base {tuple(bshape)} vs expert {tuple(eshape)}"
                )
            bfloat, efloat = is_mergeable(_dtype(base, key)), is_mergeable(_dtype(expert, key))
            if bfloat != efloat:
                raise CheckpointError(
                    f"{name}: dtype mismatch for {key!r}: base {_dtype(base, key)} vs expert {_dtype(expert, key)} "
                    "(a float tensor is needed on both sides to form a task vector)"
                )
            if check_finite and efloat:
                _check_finite(expert[key], key, name)
    if check_finite:
        validate_state_dict(base, name="base")


# --------------------------------------------------------------------------------------------------------------------
# Task vectors
# --------------------------------------------------------------------------------------------------------------------
def _mergeable_keys(base: StateDict) -> list[str]:
    return [k for k in base if is_mergeable(_dtype(base, k))]


def task_vector(finetuned: Source, base: Source) -> dict[str, Tensor]:
    """``tau = finetuned - base`` in float32, over the base's floating-point entries only.

    Integer/bool buffers are left out; :func:`apply_task_vector` carries them from the base. Raises
    :class:`CheckpointError` on a missing key or a shape mismatch (naming both).
    """
    base_sd, ft_sd = load_state_dict(base), load_state_dict(finetuned)
    out: dict[str, Tensor] = {}
    for key in _mergeable_keys(base_sd):
        if key not in ft_sd:
            raise CheckpointError(f"the fine-tuned checkpoint lacks key {key!r} of the base")
        b, f = base_sd[key], ft_sd[key]
        if b.shape != f.shape:
            raise CheckpointError(f"shape mismatch for {key!r}: base {tuple(b.shape)} vs fine-tuned {tuple(f.shape)}")
        if not is_mergeable(f):
            raise CheckpointError(f"fine-tuned tensor {key!r} has dtype {f.dtype}; a float tensor is needed")
        out[key] = f.float() - b.float()
    return out


def iter_task_vectors(base: StateDict, experts: Sequence[StateDict]) -> Iterator[tuple[str, list[Tensor]]]:
    """Yield ``(key, [tau_1, ..., tau_K])`` one float key at a time, in float32.

    Streams: only one key's K slices are resident at a time, so lazily loaded experts are never held whole.
    Call :func:`validate_experts` first for friendly errors on mismatched checkpoints.
    """
    for key in _mergeable_keys(base):
        b = base[key].float()
        taus = []
        for i, expert in enumerate(experts):
            try:
                e = expert[key]
            except KeyError:
                raise CheckpointError(f"expert {i} lacks key {key!r} of the base") from None
            if e.shape != b.shape:
                raise CheckpointError(
                    f"expert {i}: shape mismatch for {key!r}: base {tuple(b.shape)} vs expert {tuple(e.shape)}"
                )
            taus.append(e.float() - b)
        yield key, taus


def apply_task_vector(base: StateDict, tau: StateDict, *, scale: float = 1.0) -> dict[str, Tensor]:
    """``base + scale * tau`` computed in float32 and cast back to each base tensor's dtype.

    Keys absent from ``tau`` (integer buffers, or float keys a method left alone) are copied from the base.
    """
    out: dict[str, Tensor] = {}
    for key in base:
        b = base[key]
        t = tau.get(key) if isinstance(tau, Mapping) else None
        if t is None or not is_mergeable(b):
            out[key] = b.clone()
            continue
        if t.shape != b.shape:
            raise CheckpointError(f"task vector shape {tuple(t.shape)} does not match base {tuple(b.shape)} for {key!r}")
        out[key] = (b.float() + scale * t.float()).to(b.dtype)
    extra = set(tau.keys()) - set(base.keys())
    if extra:
        raise CheckpointError(f"task vector has keys the base lacks, e.g. {sorted(extra)[:5]}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Atomic writing (the rules live in magic_pl.output)
# --------------------------------------------------------------------------------------------------------------------
def atomic_path(
    path: Union[str, os.PathLike], *, overwrite: bool = False, inputs: Sequence[Union[str, os.PathLike]] = ()
) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on error delete it.

    Works for files and directories (write a directory at the yielded path). A directory replaces an existing one
    only when that is empty, a previous magic-pl output, or ``overwrite``; see :func:`magic_pl.output.atomic_output`.
    """
    from magic_pl.output import atomic_output

    return atomic_output(path, overwrite=overwrite, inputs=inputs)


def save_state_dict(
    state: StateDict,
    path: Union[str, os.PathLike],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    inputs: Sequence[Union[str, os.PathLike]] = (),
) -> Path:
    """Write ``state`` atomically to the file ``path``: safetensors for ``*.safetensors`` (default), torch for
    ``.pt``/``.bin``/``.pth``.

    An existing file is replaced only when it is empty, a safetensors file magic-pl wrote (its metadata carries the
    marker this function adds), or with ``overwrite=True``; an existing directory at ``path`` is an error, as is an
    entry of ``inputs`` at ``path`` (:class:`magic_pl.output.OutputFile`). Tensors are made contiguous; tensors
    sharing storage with an earlier one (tied weights) are cloned, since safetensors refuses shared storage.
    Returns the written path.
    """
    from magic_pl.output import OutputFile, magic_metadata

    path = Path(path)
    out = OutputFile(path, overwrite=overwrite, inputs=inputs).check()
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    with out:
        tmp = out.stage()
        if path.suffix in {".pt", ".pth", ".bin"}:
            torch.save(tensors, tmp)
        else:
            from safetensors.torch import save_file

            seen: set[int] = set()
            for k, v in tensors.items():
                ptr = v.untyped_storage().data_ptr()
                if ptr in seen and v.numel() > 0:
                    tensors[k] = v.clone()
                seen.add(ptr)
            save_file(tensors, str(tmp), metadata=magic_metadata(metadata))
        out.commit()
    return path
