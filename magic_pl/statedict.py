"""Checkpoint core: loading, lazy access, validation, task vectors and atomic saving.

Everything here is pure PyTorch + safetensors. A *state dict* is any ``Mapping[str, Tensor]``; a *tensor source*
(:class:`TensorSource`) is one that also answers ``shape(key)`` and ``dtype(key)`` without reading the tensor, and
:func:`tensor_shape` / :func:`tensor_dtype` ask any mapping that way (reading the tensor only when it cannot answer).
Files in the safetensors format are opened lazily (:class:`LazyStateDict`), so reading one tensor reads only that
tensor and merging K experts holds about one model in memory (see docs/method.md).

Task vectors: ``tau = finetuned - base`` over floating-point entries only, in float32. Integer and bool buffers
(``position_ids``, ``num_batches_tracked``) never enter a task vector; :func:`apply_task_vector` copies them from the
base. Every task-vector entry is computed by :func:`tensor_task_vector`, which refuses NaN/Inf (naming the file and
the key) on the tensor it just computed, so checking costs no extra pass; :func:`apply_delta` is the one
``theta0 + scale * tau`` (float64 bases stay float64).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import stat
import struct
import zipfile
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "StateDict",
    "TensorSource",
    "CheckpointError",
    "LazyStateDict",
    "SAFETENSORS_DTYPES",
    "read_safetensors_header",
    "load_state_dict",
    "tensor_shape",
    "tensor_dtype",
    "tensor_file",
    "is_mergeable",
    "is_batchnorm_stat",
    "all_finite",
    "ensure_finite",
    "validate_state_dict",
    "validate_experts",
    "key_mismatch_error",
    "shape_error",
    "tensor_task_vector",
    "LazyTaskVector",
    "task_vector",
    "align_to_base",
    "iter_task_vectors",
    "compute_dtype",
    "apply_delta",
    "apply_task_vector",
    "atomic_path",
    "save_state_dict",
]

StateDict = Mapping[str, Tensor]
Source = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module]

#: Suffixes of BatchNorm running statistics: float buffers that are not weights.
BATCHNORM_STAT_SUFFIXES = ("running_mean", "running_var")

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_HF_WEIGHT_FILES = ("model.safetensors", _SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message names the file, key and shapes involved."""


# --------------------------------------------------------------------------------------------------------------------
# The tensor-source protocol
# --------------------------------------------------------------------------------------------------------------------
@runtime_checkable
class TensorSource(Protocol):
    """A mapping key -> tensor that tells a tensor's shape and dtype without reading it (lazy checkpoints and the
    views over them). ``file_of(key)`` (optional) names the file a tensor comes from, for error messages."""

    def __getitem__(self, key: str) -> Tensor: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def shape(self, key: str) -> torch.Size: ...

    def dtype(self, key: str) -> torch.dtype: ...


def tensor_shape(sd: StateDict, key: str) -> torch.Size:
    """Shape of ``sd[key]``, without reading the data when ``sd`` is a :class:`TensorSource`."""
    shape = getattr(sd, "shape", None)
    if callable(shape):
        return torch.Size(shape(key))
    return sd[key].shape


def tensor_dtype(sd: StateDict, key: str) -> torch.dtype:
    """Dtype of ``sd[key]``, without reading the data when ``sd`` is a :class:`TensorSource`."""
    dtype = getattr(sd, "dtype", None)
    if callable(dtype):
        return dtype(key)
    return sd[key].dtype


def tensor_file(sd: StateDict, key: str) -> Optional[Path]:
    """The file ``sd[key]`` is read from, when ``sd`` knows it (``file_of(key)``); else ``None``."""
    file_of = getattr(sd, "file_of", None)
    if not callable(file_of):
        return None
    try:
        return file_of(key)
    except KeyError:
        return None


def _label(sd: StateDict, key: str, name: str) -> str:
    """``name`` plus the file ``key`` lives in, when known and not already in the name."""
    file = tensor_file(sd, key)
    return f"{name} ({file})" if file is not None and str(file) not in name else name


# --------------------------------------------------------------------------------------------------------------------
# The safetensors reader
# --------------------------------------------------------------------------------------------------------------------
#: safetensors dtype names -> torch dtypes (the one table; the writer uses its inverse).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
for _torch_name, _st_name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                              ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _torch_name):
        SAFETENSORS_DTYPES[_st_name] = getattr(torch, _torch_name)

#: Largest safetensors header (and sharded-checkpoint index) read, in bytes: the reference reader's bound.
_MAX_HEADER = 100 * 2**20


def _q(name: object, limit: int = 80) -> str:
    """``repr(name)`` cut to ``limit`` characters: keys and names in hostile files may be huge."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_regular(path: Path, what: str = "checkpoint") -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file (symlinks to one are fine).

    Reading a FIFO blocks until a writer appears and a device never ends, so the type is checked on the open file
    descriptor itself (opened non-blocking, which regular files ignore): no window between check and open.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} not found") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a regular file: refusing to read it")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: only then look for the repeated key
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _parse_json(raw: bytes, fail: Callable[[str], CheckpointError]) -> Any:
    """``json.loads`` for file headers: a key given twice is refused (JSON keeps the last one silently, other
    readers may keep the first), and so is nesting deep enough to exhaust Python's recursion limit. Errors are
    ``fail(reason)``."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as dup:
        raise fail(f"key {_q(dup.args[0])} appears twice") from None
    except RecursionError:
        raise fail("its JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # json errors, invalid UTF-8, integers of >4300 digits
        raise fail(f"it is not JSON: {str(err)[:120]}") from None


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0  # not bool, not float: 16.0 or true are no offsets


def _numel(shape: Sequence[int], limit: int) -> int:
    """``prod(shape)``, stopping once past ``limit`` (a hostile shape can hold thousands of huge numbers)."""
    if 0 in shape:
        return 0
    n = 1
    for s in shape:
        n *= s
        if n > limit:
            break
    return n


def _check_header(path: Path, header: Any, data_size: int) -> None:
    """Enforce the safetensors format on a parsed header, so both reading backends refuse the same files with one
    message: ``__metadata__`` maps strings to strings; each tensor has a dtype this reader knows, a shape of
    non-negative integers and ``data_offsets = [begin, end]`` whose length is exactly ``numel * element size``; the
    tensors tile the data section with no overlap, no gap and nothing after the last (as the reference reader
    demands, so the memory-mapped and positional readers agree)."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {why}")

    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ must map strings to strings")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        what = f"tensor {_q(key)}"
        if not isinstance(entry, dict):
            raise bad(f"{what} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"{what} has dtype {_q(dtype, 20)}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"{what} has shape {_q(shape, 60)}; dimensions must be non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"{what} has data_offsets {_q(offsets, 60)}; expected [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(f"{path} is truncated or corrupt: {what} lies outside the file (its data ends at "
                                  f"byte {end} of a {data_size}-byte data section)")
        need = _numel(shape, data_size) * SAFETENSORS_DTYPES[dtype].itemsize
        if need != end - begin:
            dims = "x".join(map(str, shape)) if len(shape) <= 8 else f"{len(shape)}-dim"
            raise bad(f"{what} has {end - begin} bytes of data but shape [{dims}] {dtype} needs "
                      + (str(need) if need <= data_size else f"more than the file's {data_size}"))
        spans.append((begin, end, key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            how = "overlaps the tensor before it" if begin < pos else "leaves a gap after the tensor before it"
            raise bad(f"the data of tensor {_q(key)} (bytes {begin}..{end}) {how} (expected it to start at byte "
                      f"{pos})")
        pos = end
    if pos != data_size:
        raise bad(f"{data_size - pos} byte(s) after the last tensor's data belong to no tensor")


def read_safetensors_header(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header: returns (header, byte offset of the data section); the header maps
    each key to its ``dtype``/``shape``/``data_offsets`` and may hold ``__metadata__``.

    Every reader goes through here, so a file is checked once, when opened. Raises :class:`CheckpointError`
    naming the file (and the tensor, where one is at fault) for: a non-regular file (FIFO, device, socket), a length
    field past the file or the 100 MiB bound, a header that is not JSON (or repeats a key, or nests too deeply),
    and any break of the format's rules (see :func:`_check_header`: known dtypes, sizes matching shapes, data
    offsets inside the file that neither overlap nor leave gaps).
    """
    path = Path(path)
    with _open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path} is not a safetensors file (its header length field says {n} bytes, the file has {size})"
                )
            raw = f.read(n)
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
    header = _parse_json(raw, lambda why: CheckpointError(f"{path} is not a safetensors file (its header: {why})"))
    _check_header(path, header, size - 8 - n)
    return header, 8 + n


class LazyStateDict(Mapping[str, Tensor]):
    """Read-only mapping over one or more safetensors files; ``sd[key]`` reads just that tensor from disk.

    Shapes, dtypes and files come from the headers (read once, when opened). Two ways to read the data:

    - ``backend="mmap"`` (default): ``safetensors.safe_open`` (memory-mapped; pages touched stay resident in the
      process while the file is open);
    - ``backend="pread"``: plain positional reads into a fresh tensor (no memory map), so the resident set is the
      tensors actually held; what :func:`magic_pl.models.streaming.stream_merge` uses for models larger than memory.

    Args:
        weight_map: key -> file path (a sharded checkpoint's ``weight_map``, or every key of one file).
        backend: ``"mmap"`` or ``"pread"`` (see above).
        drop_page_cache: ``pread`` only: after each read, advise the kernel to drop those pages from the page cache
            (``POSIX_FADV_DONTNEED``); default ``False``.
        index: the index file the map came from (for error messages).
    """

    def __init__(self, weight_map: Mapping[str, Union[str, os.PathLike]], *, backend: str = "mmap",
                 drop_page_cache: bool = False, index: Optional[Union[str, os.PathLike]] = None):
        if backend not in ("mmap", "pread"):
            raise ValueError(f"backend must be 'mmap' or 'pread', got {backend!r}")
        self.backend = backend
        self.drop_page_cache = drop_page_cache
        self.metadata: dict[str, str] = {}
        self._files: dict[Path, tuple[dict[str, Any], int]] = {}
        self._map: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}
        for key, file in weight_map.items():
            file = Path(file)
            if file not in self._files:
                if not file.exists():
                    where = f" (listed in {index})" if index is not None else ""
                    raise CheckpointError(f"safetensors file {file}{where} not found")
                header, start = read_safetensors_header(file)
                self.metadata = self.metadata or dict(header.get("__metadata__") or {})
                self._files[file] = (header, start)
            if key not in self._files[file][0] or key == "__metadata__":
                where = f" listed in {index}" if index is not None else ""
                raise CheckpointError(f"shard {file} lacks key {key!r}{where}")
            self._map[key] = file

    # -- opening ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], **kw: Any) -> "LazyStateDict":
        """Open a single ``.safetensors`` file."""
        path = Path(path)
        header, _ = read_safetensors_header(path)
        return cls({k: path for k in header if k != "__metadata__"}, **kw)

    @classmethod
    def from_index(cls, index_path: Union[str, os.PathLike], **kw: Any) -> "LazyStateDict":
        """Open a sharded checkpoint from its ``*.safetensors.index.json``."""
        index_path = Path(index_path)
        weight_map = _read_index(index_path)
        return cls({k: index_path.parent / v for k, v in weight_map.items()}, index=index_path, **kw)

    @classmethod
    def from_path(cls, path: Union[str, os.PathLike], **kw: Any) -> "LazyStateDict":
        """Open a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory holding either
        (``model.safetensors.index.json`` preferred, then ``model.safetensors``, then a single index or file)."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / _SAFETENSORS_INDEX, path / "model.safetensors"]
            found = next((c for c in candidates if _is_candidate(c)), None)
            if found is None:
                indexes = sorted(path.glob("*.safetensors.index.json"))
                files = sorted(path.glob("*.safetensors"))
                if len(indexes) == 1:
                    found = indexes[0]
                elif len(files) == 1:
                    found = files[0]
                else:
                    raise CheckpointError(
                        f"directory {path} holds no safetensors checkpoint (found {len(files)} .safetensors files and "
                        f"{len(indexes)} index files)"
                    )
            path = found
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} not found")
        if path.name.endswith(".index.json"):
            return cls.from_index(path, **kw)
        if path.name.endswith(".safetensors"):
            return cls.from_file(path, **kw)
        raise CheckpointError(f"{path} is not a safetensors checkpoint (.safetensors, *.index.json or a directory)")

    # -- metadata ---------------------------------------------------------------------------------------------------
    def _entry(self, key: str) -> tuple[Path, dict[str, Any], int]:
        try:
            file = self._map[key]
        except KeyError:
            raise KeyError(key) from None
        header, start = self._files[file]
        return file, header[key], start

    def shape(self, key: str) -> torch.Size:
        """Shape of ``key`` (from the header; no data read)."""
        return torch.Size(self._entry(key)[1]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of ``key`` (from the header; no data read)."""
        return SAFETENSORS_DTYPES[self._entry(key)[1]["dtype"]]  # known: checked when the file was opened

    def nbytes(self, key: str) -> int:
        """Bytes of ``key``'s data (from the header)."""
        begin, end = self._entry(key)[1]["data_offsets"]
        return int(end) - int(begin)

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def file_of(self, key: str) -> Path:
        """The file holding ``key``."""
        return self._entry(key)[0]

    # -- data -------------------------------------------------------------------------------------------------------
    def _handle(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            _open_regular(path).close()  # safe_open would block on a FIFO swapped in since the header was read
            handle = self._handles[path] = safe_open(str(path), framework="pt")
        return handle

    def _mmap_read(self, file: Path, key: str, read: Callable[[Any], Tensor]) -> Tensor:
        """``read(safe_open handle)``, with the library's errors (the file changed since its header was checked, an
        I/O error) turned into a :class:`CheckpointError` naming the file and key."""
        try:
            return read(self._handle(file))
        except CheckpointError:
            raise
        except Exception as err:  # SafetensorError, OSError
            raise CheckpointError(f"{file}: cannot read tensor {_q(key)}: {str(err)[:200]}") from err

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            f = _open_regular(file)
            fd = self._fds[file] = os.dup(f.fileno())
            f.close()
        return fd

    def _pread_into(self, file: Path, offset: int, out: Tensor) -> None:
        fd = self._fd(file)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        total, n = 0, len(view)
        while total < n:
            got = os.preadv(fd, [view[total:]], offset + total)
            if got <= 0:
                raise CheckpointError(f"{file}: unexpected end of file at byte {offset + total}")
            total += got
        if self.drop_page_cache and n and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)

    def __getitem__(self, key: str) -> Tensor:
        file, entry, start = self._entry(key)
        if self.backend == "mmap":
            return self._mmap_read(file, key, lambda h: h.get_tensor(key))
        # the header check at opening guarantees size == numel * element size, inside the file
        out = torch.empty(torch.Size(entry["shape"]), dtype=self.dtype(key))
        self._pread_into(file, start + int(entry["data_offsets"][0]), out)
        return out

    def read_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``key``'s first dimension (a contiguous byte range), read alone."""
        file, entry, data_start = self._entry(key)
        dtype, shape = self.dtype(key), torch.Size(entry["shape"])
        if len(shape) == 0:
            raise ValueError(f"{key!r} is a scalar; it has no rows")
        start, stop = max(0, start), min(int(shape[0]), stop)
        if self.backend == "mmap":
            return self._mmap_read(file, key, lambda h: h.get_slice(key)[start:stop])
        row_bytes = shape[1:].numel() * _element_size(dtype)
        out = torch.empty((max(0, stop - start), *shape[1:]), dtype=dtype)
        self._pread_into(file, data_start + int(entry["data_offsets"][0]) + start * row_bytes, out)
        return out

    def close(self) -> None:
        """Close the open files (reading again reopens them)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} tensors in {sorted(str(p) for p in self._files)})"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_candidate(path: Path) -> bool:
    """Whether a directory lookup should take ``path``: anything there but a directory, so a FIFO or device named
    like a weight file is refused by name (by :func:`_open_regular`) rather than skipped in silence."""
    return path.exists() and not path.is_dir()


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: key -> shard file name.

    Shard names are data, never paths: a value that is not a plain file name (absolute, with ``..`` or a folder) is
    refused, so an index can only point at files beside it.
    """

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read sharded-checkpoint index {path}: {why}")

    with _open_regular(path, "sharded-checkpoint index") as f:
        try:
            raw = f.read(_MAX_HEADER + 1)
        except OSError as err:
            raise fail(str(err)) from err
    if len(raw) > _MAX_HEADER:
        raise fail(f"larger than {_MAX_HEADER} bytes")
    index = _parse_json(raw, fail)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise fail("it has no weight_map object")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise fail(f"weight_map[{_q(key)}] is {type(shard).__name__} {_q(shard, 40)}, not a file name")
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard or "\0" in shard:
            raise fail(f"weight_map[{_q(key)}] = {_q(shard)} is not a file name beside the index (shards are "
                       "named, never given as paths)")
    return weight_map


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def load_state_dict(source: Source, *, trust_pickle: bool = False, backend: str = "mmap") -> StateDict:
    """Load a state dict from a file, a directory, a mapping or a module.

    Args:
        source: a ``.safetensors`` file; a sharded checkpoint's ``*.index.json``; a ``.pt``/``.bin``/``.pth``/``.ckpt``
            torch file (zip or legacy format); a directory holding one of those (Hugging Face layout:
            ``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``); a mapping of tensors;
            or an ``nn.Module``.
        trust_pickle: torch files are read with ``weights_only=True`` so a checkpoint can never run code. Set this to
            ``True`` only for pickles you trust that hold more than tensors.
        backend: how safetensors are read (:class:`LazyStateDict`): ``"mmap"`` (default) or ``"pread"`` (nothing
            stays resident: for passes over models larger than memory, where touched mapped pages would add up).

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
        raise CheckpointError(f"checkpoint {path} not found")
    if path.is_dir():
        return _load_directory(path, trust_pickle=trust_pickle, backend=backend)
    name = path.name
    if name.endswith(".safetensors"):
        return LazyStateDict.from_file(path, backend=backend)
    if name.endswith(".safetensors.index.json"):
        return LazyStateDict.from_index(path, backend=backend)
    if name.endswith(".bin.index.json"):
        return _load_torch_index(path, trust_pickle=trust_pickle)
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return _load_torch_file(path, trust_pickle=trust_pickle)
    raise CheckpointError(
        f"cannot tell the format of {path}: expected .safetensors, *.safetensors.index.json, .pt/.pth/.bin/.ckpt "
        "or a Hugging Face model directory"
    )


def _load_directory(path: Path, *, trust_pickle: bool, backend: str = "mmap") -> StateDict:
    for fname in _HF_WEIGHT_FILES:
        if _is_candidate(path / fname):
            return load_state_dict(path / fname, trust_pickle=trust_pickle, backend=backend)
    shards = sorted(path.glob("*.safetensors"))
    if len(shards) == 1:
        return LazyStateDict.from_file(shards[0], backend=backend)
    raise CheckpointError(
        f"directory {path} holds no model weights: looked for {', '.join(_HF_WEIGHT_FILES)}"
        + (f" (found {len(shards)} .safetensors files but no index)" if shards else "")
    )


def _torch_format(path: Path) -> Optional[str]:
    """``"zip"`` (torch.save's default), ``"legacy"`` (a pickle stream, torch < 1.6 or
    ``_use_new_zipfile_serialization=False``), or ``None``: not a torch checkpoint. Refuses non-regular files."""
    with _open_regular(path) as f:
        head = f.read(2)
    if head == b"PK":
        return "zip" if zipfile.is_zipfile(path) else None
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "legacy"
    return None


def _load_torch_file(path: Path, *, trust_pickle: bool) -> dict[str, Tensor]:
    try:
        kind = _torch_format(path)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if kind is None:
        what = "an empty file" if path.stat().st_size == 0 else "neither a zip archive nor a pickle"
        raise CheckpointError(f"{path} is not a torch checkpoint ({what})")
    try:
        # mmap needs the zip layout; legacy files are read whole (still with the safe unpickler)
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        if not trust_pickle and "weights_only" in str(err).lower().replace(" ", "_"):
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise CheckpointError(
                f"{path} holds Python objects beyond tensors, which could run code when loaded"
                + (f" (it needs {found.group(1)})" if found else "")
                + ": it is read with weights_only=True; pass trust_pickle=True only for files you trust"
            ) from err
        raise CheckpointError(f"{path} is not a torch checkpoint (or it is corrupt): {err}") from err
    except Exception as err:  # torch raises RuntimeError / EOFError / zip errors for corrupt files
        raise CheckpointError(f"{path} is not a torch checkpoint (or it is corrupt): {err}") from err
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
    weight_map = _read_index(path)
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = path.parent / shard
        if not file.exists():
            raise CheckpointError(f"shard {file} listed in {path} not found")
        loaded = _load_torch_file(file, trust_pickle=trust_pickle)
        for key in (k for k, v in weight_map.items() if v == shard):
            if key not in loaded:
                raise CheckpointError(f"shard {file} lacks key {key!r} listed in {path}")
        out.update(loaded)
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


def all_finite(tensor: Tensor) -> bool:
    """True when every value of ``tensor`` is finite (integer tensors always are).

    Fast path: one reduction (a sum over finite values is finite; NaN and Inf propagate into it), with no temporary
    of the tensor's size; only a non-finite sum (NaN/Inf present, or the sum itself overflowing) pays for the exact
    elementwise check.
    """
    if not tensor.dtype.is_floating_point:
        return True
    # float16 sums overflow early (max 65504): accumulate those in float32; other dtypes sum in their own
    acc = torch.float32 if tensor.dtype == torch.float16 else None
    if bool(torch.isfinite(tensor.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(tensor).all())


def _nonfinite_error(tensor: Tensor, key: str, where: str) -> CheckpointError:
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    return CheckpointError(f"{where}: tensor {key!r} has {n_nan} NaN and {n_inf} Inf values")


def ensure_finite(tensor: Tensor, key: str, where: str) -> None:
    """Raise :class:`CheckpointError` ("<where>: tensor <key> has n NaN and m Inf values") unless every value of a
    float ``tensor`` is finite."""
    if not all_finite(tensor):
        raise _nonfinite_error(tensor, key, where)


def validate_state_dict(state: StateDict, *, name: str = "checkpoint", check_finite: bool = True) -> None:
    """Raise :class:`CheckpointError` if ``state`` is empty or holds NaN/Inf in a float tensor (one read per
    tensor)."""
    if len(state) == 0:
        raise CheckpointError(f"{name} is empty")
    if check_finite:
        for key in state:
            if is_mergeable(tensor_dtype(state, key)):  # integer buffers cannot hold NaN: not read
                ensure_finite(state[key], key, _label(state, key, name))


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


_VOCAB_HINT_WORDS = ("embed", "wte", "word_embeddings", "token_embedding", "lm_head", "shared")


def shape_error(name: str, key: str, base_shape: Sequence[int], expert_shape: Sequence[int], *,
                other: str = "expert") -> CheckpointError:
    """The error for a shape mismatch (names both shapes), with a vocabulary hint for embedding tables."""
    msg = f"{name}: shape mismatch for {key!r}: base {tuple(base_shape)} vs {other} {tuple(expert_shape)}"
    if any(w in key for w in _VOCAB_HINT_WORDS):
        msg += " (the vocabularies differ: experts must share the base's tokenizer and vocabulary size)"
    return CheckpointError(msg)


def validate_experts(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
) -> None:
    """Check that every expert matches the base key for key.

    Raises :class:`CheckpointError` naming the expert (and its file) and key for: missing or extra keys, a shape
    mismatch (both shapes), a float tensor where the base has a non-float one (or the reverse), NaN/Inf values
    (``check_finite``, default ``True``: reads every tensor once; without it only shapes and dtypes are compared,
    from the headers of lazy sources). Mixed float dtypes (bf16 experts, fp32 base) are allowed.
    """
    if len(experts) == 0:
        raise CheckpointError("need at least one expert, got none")
    names = list(names) if names is not None else [f"expert {i}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise CheckpointError(f"{len(names)} names given for {len(experts)} experts")
    base_keys = set(base.keys())
    if not base_keys:
        raise CheckpointError("the base checkpoint is empty")
    base_meta = {k: (tensor_shape(base, k), tensor_dtype(base, k)) for k in base}
    for name, expert in zip(names, experts):
        mismatch = key_mismatch_error(name, base_keys, expert.keys())
        if mismatch is not None:
            raise mismatch
        for key, (bshape, bdtype) in base_meta.items():
            eshape, edtype = tensor_shape(expert, key), tensor_dtype(expert, key)
            if bshape != eshape:
                raise shape_error(_label(expert, key, name), key, bshape, eshape)
            if is_mergeable(bdtype) != is_mergeable(edtype):
                raise CheckpointError(
                    f"{_label(expert, key, name)}: dtype mismatch for {key!r}: base {bdtype} vs expert {edtype} "
                    "(a float tensor is needed on both sides to form a task vector)"
                )
            if check_finite and is_mergeable(edtype):
                ensure_finite(expert[key], key, _label(expert, key, name))
    if check_finite:
        validate_state_dict(base, name="base")


# --------------------------------------------------------------------------------------------------------------------
# Task vectors
# --------------------------------------------------------------------------------------------------------------------
def tensor_task_vector(
    expert: Tensor,
    base: Tensor,
    key: str,
    *,
    name: str = "fine-tuned checkpoint",
    base_name: str = "base",
    check_finite: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """One task-vector entry: ``expert - base`` in float32 (on ``device``, default where ``expert`` lives).

    Raises :class:`CheckpointError` naming ``name`` / ``base_name`` (include the file) and ``key`` for a shape
    mismatch, a non-float expert tensor, and (``check_finite``, default ``True``) NaN/Inf in either side. The finite
    check runs on the difference just computed (finite minus finite is finite), so it costs no extra read; only on
    failure are the two sides inspected to say which one is at fault.
    """
    if expert.shape != base.shape:
        raise shape_error(name, key, base.shape, expert.shape)
    if not is_mergeable(expert):
        raise CheckpointError(f"{name}: tensor {key!r} has dtype {expert.dtype}; a float tensor is needed")
    if device is not None:
        expert = expert.to(device)
    tau = expert.to(torch.float32) - base.to(device=expert.device, dtype=torch.float32)
    if check_finite and not all_finite(tau):
        for side, where in ((base, base_name), (expert, name)):
            if not all_finite(side):
                raise _nonfinite_error(side, key, where)
        raise CheckpointError(f"{name}: the task vector of {key!r} overflows float32 (|expert - base| > 3.4e38)")
    return tau


class LazyTaskVector(Mapping[str, Tensor]):
    """Read-only mapping ``key -> finetuned[key] - base[key]`` (float32), computed when a key is read.

    Keys: the base's floating-point keys (integer/bool buffers never enter a task vector). Reading a key reads one
    base and one expert tensor (:func:`tensor_task_vector`: errors name the expert, its file and the key; NaN/Inf is
    refused unless ``check_finite=False``), so K lazy task vectors over lazily loaded checkpoints stream key by key.
    ``shape``/``dtype`` read no data.

    Args:
        finetuned: the expert's state dict (any mapping; a :class:`LazyStateDict` stays lazy).
        base: the base state dict.
        device: where the difference is computed and returned (default: where the expert tensor lives).
        name: how error messages call the expert (default ``"fine-tuned checkpoint"``); the file is added when known.
        base_name: how error messages call the base (default ``"base"``).
        check_finite: refuse NaN/Inf (default ``True``).
    """

    def __init__(self, finetuned: StateDict, base: StateDict, *, device: Optional[Union[str, torch.device]] = None,
                 name: str = "fine-tuned checkpoint", base_name: str = "base", check_finite: bool = True):
        self.finetuned = finetuned
        self.base = base
        self.name, self.base_name = name, base_name
        self.device = torch.device(device) if device is not None else None
        self.check_finite = check_finite
        self._keys = [k for k in base if is_mergeable(tensor_dtype(base, k))]
        self._key_set = set(self._keys)

    @property
    def expert(self) -> StateDict:
        """The fine-tuned state dict (alias of ``finetuned``)."""
        return self.finetuned

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        try:
            e = self.finetuned[key]
        except KeyError:
            raise CheckpointError(f"{self.name} lacks key {key!r} of the base") from None
        return tensor_task_vector(e, self.base[key], key, name=_label(self.finetuned, key, self.name),
                                  base_name=_label(self.base, key, self.base_name), check_finite=self.check_finite,
                                  device=self.device)

    def shape(self, key: str) -> torch.Size:
        if key not in self._key_set:
            raise KeyError(key)
        return tensor_shape(self.base, key)

    def dtype(self, key: str) -> torch.dtype:
        if key not in self._key_set:
            raise KeyError(key)
        return torch.float32

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"LazyTaskVector({self.name}, {len(self)} tensors)"


def _source_name(source: Source, default: str) -> str:
    return f"{default} {source}" if isinstance(source, (str, os.PathLike)) else default


class KeyedMapping(Mapping[str, Tensor]):
    """A lazy mapping over a fixed, ordered key list (``self._keys``, with ``self._set`` for membership): subclasses
    set them through :meth:`_set_keys` and implement ``__getitem__``."""

    _keys: list[str]
    _set: set[str]

    def _set_keys(self, keys: Iterable[str]) -> None:
        self._keys = list(keys)
        self._set = set(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set


class RenamedView(KeyedMapping):
    """The entries of ``source`` under new names (``names``: new key -> key in ``source``, in order), lazy; shape,
    dtype and file are forwarded without reading data. A key not in ``names`` raises ``KeyError``."""

    def __init__(self, source: StateDict, names: Mapping[str, str]):
        self.source, self.names = source, dict(names)
        self._set_keys(self.names)

    def __getitem__(self, key: str) -> Tensor:
        return self.source[self.names[key]]

    def shape(self, key: str) -> torch.Size:
        return tensor_shape(self.source, self.names[key])

    def dtype(self, key: str) -> torch.dtype:
        return tensor_dtype(self.source, self.names[key])

    def file_of(self, key: str) -> Optional[Path]:
        return tensor_file(self.source, self.names[key])


def key_prefixes(keys: Collection[str], depth: int = 1) -> list[str]:
    """The dotted key prefixes of ``keys`` up to ``depth`` parts (``"bert."``; with depth 2 also ``"model.bert."``),
    most frequent first: the candidates when a checkpoint's body must be found under some prefix."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")[:-1]
        for n in range(1, min(depth, len(parts)) + 1):
            prefix = ".".join(parts[:n]) + "."
            counts[prefix] = counts.get(prefix, 0) + 1
    return sorted(counts, key=lambda p: -counts[p])


def _prefix_candidates(keys: Collection[str]) -> list[str]:
    return ["", *key_prefixes(keys)]


def _strip(keys: Collection[str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def body_prefixes(base_keys: Collection[str], expert_keys: Collection[str], *, base_prefix: Optional[str] = None,
                  expert_prefix: Optional[str] = None) -> tuple[str, str]:
    """The key prefixes under which a base and an expert hold the same body: the given ones, else the pair (``""`` or
    a first dotted component of the keys on each side) whose stripped key sets share the most keys, ``("", "")`` on a
    tie. It finds ``bert.`` in a ``BertForSequenceClassification`` expert of a ``BertModel`` base, ``model.`` in a
    Lightning checkpoint, ``vit.`` / ``roberta.`` / ``distilbert.`` and any other architecture's prefix alike."""
    best, best_score = ("", ""), -1
    for pb in [base_prefix] if base_prefix is not None else _prefix_candidates(base_keys):
        pe, score = best_prefix(_strip(base_keys, pb), expert_keys,
                                [expert_prefix] if expert_prefix is not None else _prefix_candidates(expert_keys))
        if score > best_score:
            best, best_score = (pb, pe), score
    return best


def best_prefix(wanted: Collection[str], keys: Collection[str], candidates: Iterable[str]) -> tuple[str, int]:
    """The candidate prefix under which ``keys`` hold the most of ``wanted`` once it is stripped (the first such
    candidate), and how many they hold."""
    wanted = set(wanted)
    best, best_hits = "", -1
    for cand in dict.fromkeys(candidates):
        hits = len(wanted.intersection(_strip(keys, cand)))
        if hits > best_hits:
            best, best_hits = cand, hits
        if hits == len(wanted):
            break
    return best, best_hits


def align_to_base(base: StateDict, expert: StateDict, *, base_prefix: Optional[str] = None,
                  expert_prefix: Optional[str] = None, name: str = "expert") -> tuple[StateDict, StateDict, list[str]]:
    """Match an expert's keys to its base's when they are written differently; returns ``(base body, expert, heads)``.

    The rule: each side's body is what lies under its prefix (:func:`body_prefixes`: given, or detected). The
    expert's body key ``<expert prefix>x`` is the base's ``<base prefix>x``; keys outside a side's prefix are that
    side's heads (a classifier, ``cls.*``, ``lm_head`` of another task) and are left out of the task vector, and
    returned by name. A floating-point body key of the base that the expert lacks, or the reverse, is an error naming
    it (integer buffers such as ``position_ids`` may be absent on either side). Both returned mappings are lazy and
    keyed like the base.
    """
    pb, pe = body_prefixes(list(base.keys()), list(expert.keys()), base_prefix=base_prefix,
                           expert_prefix=expert_prefix)
    b, e = _strip(list(base.keys()), pb), _strip(list(expert.keys()), pe)
    floats = {k for k in set(b) ^ set(e) if is_mergeable(tensor_dtype(base, b[k]) if k in b else
                                                         tensor_dtype(expert, e[k]))}
    if floats:
        missing, extra = sorted(floats & set(b)), sorted(floats & set(e))
        where = f" (body prefixes: base {pb!r}, {name} {pe!r}; pass base_prefix= / expert_prefix= to choose others)"
        raise key_mismatch_error(name, [pb + k for k in missing], [pe + k for k in extra], hint=where)
    shared = [k for k in b if k in e]
    heads = sorted(k for k in expert.keys() if not k.startswith(pe)) + \
        sorted(k for k in base.keys() if not k.startswith(pb))
    return (RenamedView(base, {b[k]: b[k] for k in shared}), RenamedView(expert, {b[k]: e[k] for k in shared}),
            heads)


def task_vector(finetuned: Source, base: Source, *, base_prefix: Optional[str] = None,
                expert_prefix: Optional[str] = None, check_finite: bool = True) -> dict[str, Tensor]:
    """``tau = finetuned - base`` in float32, over the base's floating-point entries only, keyed like the base.

    Integer/bool buffers are left out; :func:`apply_task_vector` carries them from the base. Checkpoints whose keys
    are written differently are matched by :func:`align_to_base`: a ``BertForSequenceClassification`` directory
    against a ``BertModel`` base (``bert.`` prefix detected, the ``classifier`` head left out), or explicit
    ``base_prefix`` / ``expert_prefix``. Raises :class:`CheckpointError` naming the file and key when body keys
    differ, on a shape mismatch (both shapes), and on NaN/Inf in either checkpoint (``check_finite``, default
    ``True``, checked on each difference as it is computed).
    """
    base_sd, ft_sd = load_state_dict(base), load_state_dict(finetuned)
    name = _source_name(finetuned, "the fine-tuned checkpoint")
    if base_prefix is not None or expert_prefix is not None or set(base_sd.keys()) != set(ft_sd.keys()):
        base_sd, ft_sd, heads = align_to_base(base_sd, ft_sd, base_prefix=base_prefix, expert_prefix=expert_prefix,
                                              name=name)
        if heads:
            logging.getLogger(__name__).info("%s: %d key(s) outside the shared body left out (heads): %s", name,
                                             len(heads), ", ".join(heads[:8]))
    tv = LazyTaskVector(ft_sd, base_sd, name=name, base_name=_source_name(base, "base"), check_finite=check_finite)
    return {key: tv[key] for key in tv}


def iter_task_vectors(base: StateDict, experts: Sequence[StateDict], *, names: Sequence[str] | None = None,
                      check_finite: bool = True) -> Iterator[tuple[str, list[Tensor]]]:
    """Yield ``(key, [tau_1, ..., tau_K])`` one float key at a time, in float32.

    Streams: only one key's K slices are resident at a time, so lazily loaded experts are never held whole. Key sets
    are compared first (missing or extra keys raise :class:`CheckpointError` naming them); each entry is checked
    as :func:`tensor_task_vector` does (shape, float-ness, NaN/Inf unless ``check_finite=False``).
    """
    names = list(names) if names is not None else [f"expert {i}" for i in range(len(experts))]
    for name, expert in zip(names, experts):
        mismatch = key_mismatch_error(name, base.keys(), expert.keys())
        if mismatch is not None:
            raise mismatch
    tvs = [LazyTaskVector(e, base, name=n, check_finite=check_finite) for e, n in zip(experts, names)]
    for key in [k for k in base if is_mergeable(tensor_dtype(base, k))]:
        yield key, [tv[key] for tv in tvs]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``theta0 + tau`` is computed in for a base tensor of ``dtype``: float64 stays float64, everything
    else goes through float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_delta(base: Tensor, tau: Tensor, scale: float = 1.0, *, key: str = "tensor", name: str = "merged model",
                check_finite: bool = True, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``base + scale * tau`` computed in :func:`compute_dtype` of the output dtype and cast to it, on the base's
    device: the one ``theta0 + tau`` of the package.

    ``out_dtype`` (default: the base's dtype) lets a caller pass a base already converted to the compute dtype
    (streaming converts each block once). Raises :class:`CheckpointError` for a shape mismatch and
    (``check_finite``, default ``True``) for a non-finite result (naming ``name`` and ``key``; checked after the
    cast, so a float16 overflow is caught).
    """
    if tuple(tau.shape) != tuple(base.shape):
        raise CheckpointError(f"task vector shape {tuple(tau.shape)} does not match base {tuple(base.shape)} for "
                              f"{key!r}")
    out_dtype = base.dtype if out_dtype is None else out_dtype
    cd = compute_dtype(out_dtype)
    # one fused op (no temporary for scale * tau)
    out = torch.add(base.to(cd), tau.to(device=base.device, dtype=cd), alpha=scale).to(out_dtype)
    if check_finite and not all_finite(out):
        if not all_finite(base):
            raise _nonfinite_error(base, key, "base")
        raise _nonfinite_error(out, key, f"{name} (base + {scale:g} * task vector, in {base.dtype})")
    return out


def apply_task_vector(base: StateDict, tau: StateDict, *, scale: float = 1.0,
                      check_finite: bool = True) -> dict[str, Tensor]:
    """``base + scale * tau`` per key (:func:`apply_delta`: float64 base tensors stay float64, others go through
    float32), cast back to each base tensor's dtype.

    Keys absent from ``tau`` (integer buffers, or float keys a method left alone) are copied from the base.
    """
    extra = set(tau.keys()) - set(base.keys())
    if extra:
        raise CheckpointError(f"task vector has keys the base lacks, e.g. {sorted(extra)[:5]}")
    out: dict[str, Tensor] = {}
    for key in base:
        b = base[key]
        t = tau.get(key) if isinstance(tau, Mapping) else None
        if t is None or not is_mergeable(b):
            out[key] = b.clone()
            continue
        out[key] = apply_delta(b, t, scale, key=key, check_finite=check_finite)
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
