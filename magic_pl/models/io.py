"""Checkpoint I/O in the formats checkpoints come in: sharded safetensors (+ ``model.safetensors.index.json``),
Hugging Face ``save_pretrained`` directories (config and tokenizer files copied), all written atomically.

Also the ``pread`` flavour of the one safetensors reader (:class:`SafetensorsReader`, a
:class:`~magic_pl.statedict.LazyStateDict` reading with plain positional reads instead of a memory map): a
memory-mapped file keeps every page it touched resident in the process (counted in its RSS) until the map is closed,
so streaming K experts through ``safe_open`` grows to K models of resident pages.
Reading with ``pread`` into a fresh tensor keeps the resident set at the tensors actually held. The writer
(:class:`ShardedSafetensorsWriter`) plans every shard's header up front and writes each tensor at its offset as it
arrives, so neither side ever holds a whole model.

``magic_pl.statedict`` has single-file saving (:func:`~magic_pl.statedict.save_state_dict`); sharded saving lives
here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.statedict import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    LazyStateDict,
    StateDict,
    tensor_dtype,
    tensor_shape,
)

__all__ = [
    "parse_size",
    "SafetensorsReader",
    "ShardedSafetensorsWriter",
    "save_sharded_safetensors",
    "save_pretrained_atomic",
    "copy_support_files",
    "SUPPORT_FILES",
    "SAFETENSORS_INDEX",
]

PathLike = Union[str, os.PathLike]
SAFETENSORS_INDEX = "model.safetensors.index.json"

_log = logging.getLogger(__name__)

#: The model side files :func:`copy_support_files` copies next to a written model, by exact name: what
#: ``transformers``' ``save_pretrained`` writes beside the weights (model, generation, processor, image / video /
#: feature-extractor and tokenizer configs, chat templates) and the vocabulary files its tokenizers read
#: (``VOCAB_FILES_NAMES`` of the tokenizer classes). An allow-list, not "everything but weights": a model folder
#: can also hold notes, caches, code (``modeling_*.py`` would be run under ``trust_remote_code``) or links to
#: anything on the machine, none of which belongs in an output.
SUPPORT_FILES: frozenset[str] = frozenset({
    # model, generation and processor configs
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "audio_tokenizer_config.json",
    # tokenizer configs and chat templates
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
    "chat_template.json", "chat_template.jinja",
    # vocabularies (BPE / WordPiece / SentencePiece and model-specific ones)
    "vocab.txt", "vocab.json", "merges.txt", "bpe.codes", "dict.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.model", "sentencepiece.bpe.model", "spm.model", "spm_char.model", "source.spm", "target.spm",
    "vocab-src.json", "vocab-tgt.json", "entity_vocab.json", "emoji.json", "normalizer.json", "byte_maps.json",
    "prophetnet.tokenizer", "word_pronunciation.json", "word_shape.json",
})

#: torch dtype -> safetensors dtype name (the inverse of :data:`magic_pl.statedict.SAFETENSORS_DTYPES`).
_DTYPE_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (decimal units for B/KB/MB/GB,
    binary for KiB/MiB/GiB, as in ``transformers``' ``max_shard_size``)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    out = int(value * factors[unit])
    if out <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return out


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------------------------
# Reading without a memory map
# --------------------------------------------------------------------------------------------------------------------
class SafetensorsReader(LazyStateDict):
    """:class:`~magic_pl.statedict.LazyStateDict` with the ``pread`` backend: each tensor is read with positional
    reads into a fresh CPU tensor (no memory map), so nothing stays resident between calls (see the module
    docstring). ``read_rows(key, start, stop)`` reads a contiguous slice of the first dimension.

    Args:
        weight_map: key -> file path (use :meth:`from_path` for files, directories and ``*.index.json``).
        drop_page_cache: after each read, advise the kernel to drop those file pages from the page cache
            (``POSIX_FADV_DONTNEED``); default ``False``. Useful on shared machines streaming very large models.
    """

    def __init__(self, weight_map: Mapping[str, PathLike], *, drop_page_cache: bool = False,
                 index: Optional[PathLike] = None, backend: str = "pread"):
        if backend != "pread":
            raise ValueError("SafetensorsReader reads with pread; use LazyStateDict for the mmap backend")
        super().__init__(weight_map, backend="pread", drop_page_cache=drop_page_cache, index=index)


# --------------------------------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------------------------------
class ShardedSafetensorsWriter:
    """Write a (possibly sharded) safetensors checkpoint whose tensor list is known in advance, tensor by tensor.

    Shards are planned greedily in the given order (a new shard starts when the next tensor would push the current
    one past ``max_shard_size``; one tensor larger than that gets a shard of its own), named like Hugging Face's
    (``model-00001-of-00003.safetensors``; a single shard is ``model.safetensors`` without an index). Each shard's
    header is written first and every tensor is written at its planned offset when :meth:`write` receives it, in any
    order; :meth:`close` checks that all arrived and writes ``model.safetensors.index.json``.

    Writes go directly into ``directory`` (:func:`save_sharded_safetensors` stages it in a
    :class:`magic_pl.output.OutputLocation` for atomicity).

    Args:
        directory: output directory (created).
        plan: ``(key, shape, dtype)`` for every tensor, in file order.
        max_shard_size: bytes per shard (int) or a string like ``"5GB"`` (default ``"5GB"``, as ``transformers``).
        metadata: the ``__metadata__`` of every shard (default ``{"format": "pt"}``).
        prefix: shard file stem (default ``"model"``).
    """

    def __init__(self, directory: PathLike, plan: Sequence[tuple[str, Sequence[int], torch.dtype]], *,
                 max_shard_size: Union[int, str] = "5GB", metadata: Optional[Mapping[str, str]] = None,
                 prefix: str = "model"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        limit = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **dict(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        seen: set[str] = set()
        for key, shape, dtype in plan:
            if key in seen:
                raise ValueError(f"tensor {key!r} appears twice in the write plan")
            seen.add(key)
            if dtype not in _DTYPE_TO_ST:
                raise CheckpointError(f"cannot write {key!r}: dtype {dtype} has no safetensors equivalent")
            nb = _nbytes(shape, dtype)
            if shards[-1] and size + nb > limit:
                shards.append([])
                size = 0
            shards[-1].append((key, tuple(int(s) for s in shape), dtype, nb))
            size += nb
        n = len(shards)
        self.total_size = 0
        self._where: dict[str, tuple[Path, int, tuple[int, ...], torch.dtype]] = {}
        self._fds: dict[Path, int] = {}
        self.weight_map: dict[str, str] = {}
        self.shard_files: list[Path] = []
        for i, shard in enumerate(shards):
            fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            path = self.directory / fname
            header: dict[str, Any] = {"__metadata__": self.metadata}
            offset = 0
            for key, shape, dtype, nb in shard:
                header[key] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape),
                               "data_offsets": [offset, offset + nb]}
                offset += nb
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * ((8 - len(raw) % 8) % 8)  # align the data section to 8 bytes, as the reference writer
            data_start = 8 + len(raw)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, data_start + offset)
            self._fds[path] = fd
            self.shard_files.append(path)
            for key, shape, dtype, _nb in shard:
                self._where[key] = (path, data_start + int(header[key]["data_offsets"][0]), shape, dtype)
                self.weight_map[key] = fname
            self.total_size += offset
        self._pending = set(self._where)
        self._partial: dict[str, int] = {}
        self.index_path: Optional[Path] = None

    def write(self, key: str, tensor: Tensor, *, row_offset: int = 0) -> None:
        """Write ``tensor`` (or, with ``row_offset``, the rows starting there) into its planned place.

        The tensor must have the planned dtype and shape (a row slice: the planned shape after the first dimension).
        """
        if key not in self._where:
            raise KeyError(f"tensor {key!r} is not in the write plan")
        path, offset, shape, dtype = self._where[key]
        if tensor.dtype != dtype:
            raise CheckpointError(f"cannot write {key!r}: planned dtype {dtype}, got {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        if row_offset == 0 and tuple(t.shape) == shape:
            rows = shape[0] if shape else 1
        else:
            if not shape or tuple(t.shape[1:]) != shape[1:] or row_offset + t.shape[0] > shape[0]:
                raise CheckpointError(
                    f"cannot write rows {row_offset}..{row_offset + (t.shape[0] if t.dim() else 0)} of {key!r}: "
                    f"planned shape {shape}, got {tuple(t.shape)}"
                )
            rows = t.shape[0]
            offset += row_offset * _nbytes(shape[1:], dtype)
        data = t.view(-1).view(torch.uint8).numpy() if t.numel() else b""
        fd = self._fds[path]
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        if not shape or (row_offset == 0 and rows == shape[0]):
            self._pending.discard(key)
        else:
            got = self._partial.get(key, 0) + rows
            self._partial[key] = got
            if got >= shape[0]:
                self._pending.discard(key)

    def close(self) -> Path:
        """Flush shards, check every planned tensor was written, write the index (several shards). Returns the
        directory."""
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if self._pending:
            missing = sorted(self._pending)
            raise CheckpointError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[:5]}")
        if len(self.shard_files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            self.index_path = self.directory / SAFETENSORS_INDEX
            self.index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return self.directory

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_sharded_safetensors(state: StateDict, directory: PathLike, *, max_shard_size: Union[int, str] = "5GB",
                             metadata: Optional[Mapping[str, str]] = None, support_from: Optional[PathLike] = None,
                             prefix: str = "model", overwrite: bool = False,
                             inputs: Sequence[PathLike] = ()) -> Path:
    """Write ``state`` atomically as ``directory/`` with safetensors shard(s) (+ index when there are several).

    Tensors sharing storage (tied weights) are written once each (the format cannot alias). ``support_from``: a model
    directory whose support files (config, tokenizer, ...) are copied alongside (:func:`copy_support_files`).
    ``directory`` is replaced only when empty, a previous magic-pl output, or with ``overwrite``; ``inputs`` may not
    lie inside it (:class:`magic_pl.output.OutputLocation`). Returns ``directory``.
    """
    from magic_pl.output import OutputLocation, magic_metadata

    out = OutputLocation(directory, overwrite=overwrite,
                         inputs=[*inputs, *([support_from] if support_from is not None else [])]).check()
    plan = [(k, tuple(tensor_shape(state, k)), tensor_dtype(state, k)) for k in state]
    with out:
        tmp = out.stage()
        with ShardedSafetensorsWriter(tmp, plan, max_shard_size=max_shard_size, metadata=magic_metadata(metadata),
                                      prefix=prefix) as writer:
            for key in state:
                writer.write(key, state[key])
        if support_from is not None:
            copy_support_files(support_from, tmp)
        out.commit({"content": "safetensors checkpoint", "shards": [p.name for p in writer.shard_files]})
    return out.path


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------------------------------------------------
def copy_support_files(source: PathLike, target: PathLike, *, overwrite: bool = False) -> list[str]:
    """Copy the model side files of directory ``source`` (those named in :data:`SUPPORT_FILES`: config, tokenizer,
    processor, generation config, ...) into ``target``. Returns the copied names.

    Only regular files are copied, by content, never as links. A symlink is followed only when its target resolves
    inside ``source`` (an output must not carry a copy of whatever a link points to elsewhere on the machine); others
    are skipped with a logged warning naming them, as are directories, FIFOs and devices under a known name. Files
    already in ``target`` are kept unless ``overwrite``.
    """
    source, target = Path(source), Path(target)
    if not source.is_dir():
        return []
    root = source.resolve()
    copied = []
    for name in sorted(SUPPORT_FILES):
        f = source / name
        if not os.path.lexists(f):
            continue
        real = f.resolve()
        if f.is_symlink() and not real.is_relative_to(root):
            _log.warning("not copying %s: it links to %s, outside %s", f, real, source)
            continue
        try:
            mode = os.stat(real).st_mode
        except OSError:  # a dangling link
            mode = 0
        if not stat.S_ISREG(mode):
            _log.warning("not copying %s: not a regular file", f)
            continue
        dest = target / name
        if os.path.lexists(dest) and not overwrite:
            continue
        if os.path.lexists(dest):
            dest.unlink()  # a link at dest would otherwise be written through
        shutil.copyfile(real, dest)
        shutil.copystat(real, dest)
        copied.append(name)
    return copied


def save_pretrained_atomic(model: nn.Module, path: PathLike, *, support_from: Optional[PathLike] = None,
                           tokenizer: Any = None, max_shard_size: Union[int, str] = "5GB",
                           extra_files: Optional[Mapping[str, Union[str, bytes]]] = None, overwrite: bool = False,
                           inputs: Sequence[PathLike] = ()) -> Path:
    """``model.save_pretrained`` into a temporary directory renamed to ``path`` on success.

    Args:
        model: a ``transformers.PreTrainedModel``.
        path: output directory, replaced atomically when it is empty, a previous magic-pl output, or with
            ``overwrite`` (default ``False``).
        support_from: source model directory whose side files (tokenizer, processor, ...: :data:`SUPPORT_FILES`)
            are copied in (files ``save_pretrained`` wrote itself, e.g. ``config.json``, are kept).
        tokenizer: optionally an object with ``save_pretrained`` (tokenizer or processor) to save as well.
        max_shard_size: largest shard (default ``"5GB"``, ``transformers``' default); larger models get
            ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
        extra_files: relative name -> text/bytes written into the directory too (e.g. a calibration report, or
            ``heads/<task>/model.safetensors``); a name that would leave the directory is refused.
        inputs: files and directories the run read, which may not lie inside ``path``.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained; use save_sharded_safetensors")
    from magic_pl.output import OutputLocation, child_path

    out = OutputLocation(path, overwrite=overwrite,
                         inputs=[*inputs, *([support_from] if support_from is not None else [])]).check()
    with out:
        tmp = out.stage()
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if support_from is not None:
            copy_support_files(support_from, tmp)
        for name, content in (extra_files or {}).items():
            target = child_path(tmp, *Path(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(target, mode) as f:
                f.write(content)
        out.commit({"content": f"{type(model).__name__}.save_pretrained"})
    return out.path
