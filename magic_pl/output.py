"""Where magic-pl writes, and the rules that keep the user's files safe.

Every output goes through :class:`OutputLocation` (a directory) or :class:`OutputFile` (one file):

- :meth:`~OutputLocation.check` runs before any tensor is read. It refuses a location that exists and is neither empty
  nor a previous magic-pl output (a directory holding :data:`MANIFEST`; a safetensors file whose metadata carries the
  magic-pl marker) unless ``overwrite=True``; refuses a location that holds an input, or would replace part of an
  input directory; refuses a file where a directory is wanted and the reverse; refuses a symbolic link unless
  ``overwrite=True`` (then the link itself is replaced, never its target); checks the parent is writable; and
  removes the leftovers of interrupted earlier runs for the same location.
- :meth:`~OutputLocation.stage` creates a hidden temporary sibling to write into
  (``.<name>.magic-pl-tmp-<pid>-<random>``).
- :meth:`~OutputLocation.commit` writes the manifest and swaps the staged output into place: an old output is renamed
  aside (``.<name>.magic-pl-old-<pid>-<random>``), the new one renamed to the location, then the old one removed. A
  run killed at any point leaves either the old output or the new one at the location, plus hidden leftovers that
  the next run for that location removes (restoring the old output if the kill fell between the two renames).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "OutputError",
    "MANIFEST",
    "MAGIC_PL_METADATA_KEY",
    "OutputLocation",
    "OutputFile",
    "atomic_output",
    "magic_metadata",
    "is_previous_output",
    "clean_leftovers",
]

PathLike = Union[str, os.PathLike]

#: Written inside every directory output magic-pl creates; its presence makes the directory replaceable.
MANIFEST = ".magic-pl.json"
#: Metadata key of single safetensors files magic-pl writes (value: the magic-pl version).
MAGIC_PL_METADATA_KEY = "magic_pl"

_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.magic-pl-(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class OutputError(ValueError):
    """An output location cannot be written as asked; the message names the path and what to do."""


def _version() -> str:
    from magic_pl import __version__

    return str(__version__)


def magic_metadata(metadata: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """safetensors ``__metadata__`` for a file magic-pl writes: ``format: pt`` (what ``transformers`` expects), the
    caller's entries, and the magic-pl marker that makes the file replaceable by a later run."""
    out = {"format": "pt"}
    out.update({str(k): str(v) for k, v in (metadata or {}).items()})
    out[MAGIC_PL_METADATA_KEY] = _version()
    return out


def _safetensors_metadata(path: Path) -> Optional[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def is_previous_output(path: PathLike) -> bool:
    """True when ``path`` is something magic-pl wrote: a directory holding :data:`MANIFEST` (a JSON object naming the
    magic-pl version), or a safetensors file whose metadata carries :data:`MAGIC_PL_METADATA_KEY`."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_symlink() or not manifest.is_file():
            return False
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and MAGIC_PL_METADATA_KEY in doc
    if path.is_file():
        meta = _safetensors_metadata(path)
        return bool(meta) and MAGIC_PL_METADATA_KEY in meta
    return False


def _is_empty(path: Path) -> bool:
    if path.is_dir():
        return not any(os.scandir(path))
    return path.stat().st_size == 0


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def _remove(path: Path) -> None:
    """Delete ``path`` without ever following a symbolic link (a link is unlinked, its target kept)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(path: PathLike) -> list[Path]:
    """Remove the hidden temporaries of interrupted earlier runs for ``path`` (their owning process is gone).

    An old output renamed aside by a run killed before its new output landed is renamed back when ``path`` is missing.
    Returns what was removed or restored.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return []
    done: list[Path] = []
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        m = _LEFTOVER_RE.match(entry.name)
        if not m or m.group("name") != path.name or _pid_alive(int(m.group("pid"))):
            continue
        leftover = parent / entry.name
        if m.group("kind") == "old" and not os.path.lexists(path):
            os.rename(leftover, path)
        else:
            _remove(leftover)
        done.append(leftover)
    return done


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _real(path: Path) -> Path:
    """``path`` with its parent resolved (the location a rename would replace) -- the link itself for a link."""
    return Path(os.path.realpath(path.parent if str(path.parent) else ".")) / path.name


class OutputLocation:
    """An output directory written atomically, replacing only what magic-pl wrote (see the module docstring).

    Args:
        path: the final location (a directory).
        overwrite: replace an existing location even when magic-pl did not write it (and replace a symbolic link
            there, never its target); default ``False``.
        inputs: the files and directories the run reads (base, experts, data): the output may not hold them or
            replace part of them.

    Use::

        out = OutputLocation(path, inputs=[base, *experts]).check()   # before reading any tensor
        with out:
            tmp = out.stage()
            ...write into tmp...
            out.commit({"command": "merge"})
    """

    _kind = "directory"

    def __init__(self, path: PathLike, *, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> None:
        self.path = Path(path)
        if not self.path.name or self.path.name in (".", ".."):
            raise OutputError(f"output path {str(path)!r} must name a {self._kind}")
        self.overwrite = bool(overwrite)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self._staged: Optional[Path] = None
        self._checked = False
        self._committed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, overwrite={self.overwrite})"

    # -- checks -------------------------------------------------------------------------------------------------------
    def _replaceable(self) -> bool:
        return _is_empty(self.path) or is_previous_output(self.path)

    def _wrong_kind(self) -> Optional[str]:
        if self.path.is_dir():
            return None
        return f"output {self.path} is an existing file, but a directory is written there; choose another path"

    def _check_target(self) -> None:
        path = self.path
        if not os.path.lexists(path):
            return
        if path.is_symlink():
            if not self.overwrite:
                raise OutputError(
                    f"output {path} is a symbolic link (to {os.readlink(path)}); magic-pl does not write through "
                    "links: choose another path, or pass overwrite=True to replace the link itself (its target is kept)"
                )
            return
        wrong = self._wrong_kind()
        if wrong:
            raise OutputError(wrong)
        if not self.overwrite and not self._replaceable():
            raise OutputError(
                f"output {path} exists and was not written by magic-pl ({self._marker_text()}); refusing to replace "
                "it: choose another path, empty it, or pass overwrite=True"
            )

    def _marker_text(self) -> str:
        return f"no {MANIFEST} inside"

    def _check_inputs(self) -> None:
        here, full = _real(self.path), Path(os.path.realpath(self.path))
        outs = {here, full}
        for inp in self.inputs:
            r = Path(os.path.realpath(inp))
            for out in outs:
                if r == out or out in r.parents:
                    raise OutputError(
                        f"input {inp} is {'the' if r == out else 'inside the'} output location {self.path}: writing "
                        "the output would replace it; choose another output path"
                    )
            if os.path.lexists(self.path) and Path(inp).is_dir() and any(r in out.parents for out in outs):
                raise OutputError(
                    f"output {self.path} is inside input directory {inp} and exists there: writing it would replace "
                    "part of the input; choose another output path"
                )

    def _check_parent(self) -> None:
        anc = Path(os.path.abspath(self.path)).parent
        while not os.path.lexists(anc):
            anc = anc.parent
        if not anc.is_dir():
            raise OutputError(f"cannot write {self.path}: {anc} is a file, not a directory")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {self.path}: directory {anc} is not writable")

    def check(self) -> "OutputLocation":
        """Validate the location (cheap: no tensor read) and remove leftovers of interrupted runs; returns ``self``.

        Raises :class:`OutputError` naming the path (see the module docstring for the rules).
        """
        self._check_inputs()
        if self.path.parent.is_dir():
            clean_leftovers(self.path)
        self._check_target()
        self._check_parent()
        self._checked = True
        return self

    # -- writing ------------------------------------------------------------------------------------------------------
    def _prefix(self, kind: str) -> str:
        return f".{self.path.name}.magic-pl-{kind}-{os.getpid()}-"

    def _make_staged(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=self._prefix("tmp"), dir=self.path.parent))

    def stage(self) -> Path:
        """Create (once) and return the hidden temporary sibling to write into; parents are created here."""
        if self._committed:
            raise OutputError(f"output {self.path} was already committed")
        if self._staged is None:
            if not self._checked:
                self.check()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._staged = self._make_staged()
        return self._staged

    def _write_manifest(self, staged: Path, manifest: Optional[Mapping[str, Any]]) -> None:
        doc = {MAGIC_PL_METADATA_KEY: _version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        doc.update(dict(manifest or {}))
        (staged / MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")

    def commit(self, manifest: Optional[Mapping[str, Any]] = None) -> Path:
        """Write :data:`MANIFEST` (magic-pl version, creation time, ``manifest``'s fields) into the staged directory
        and swap it into place (the old output, if any, is removed only after the new one is there). Returns
        ``path``."""
        if self._staged is None:
            raise OutputError(f"nothing was staged for {self.path}")
        staged = self._staged
        try:
            self._write_manifest(staged, manifest)
            self._check_target()  # the location may have changed since check()
            self._swap(staged)
        except BaseException:
            self.abort()
            raise
        self._staged = None
        self._committed = True
        return self.path

    def _swap(self, staged: Path) -> None:
        path = self.path
        if os.path.lexists(path):
            old = path.parent / f"{self._prefix('old')}{secrets.token_hex(4)}"
            os.rename(path, old)  # a link is moved itself, never its target
            try:
                os.rename(staged, path)
            except BaseException:
                os.rename(old, path)
                raise
            _fsync_dir(path.parent)
            _remove(old)
        else:
            os.rename(staged, path)
            _fsync_dir(path.parent)

    def abort(self) -> None:
        """Remove the staged temporary (idempotent)."""
        if self._staged is not None:
            _remove(self._staged)
            self._staged = None

    def __enter__(self) -> "OutputLocation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._committed:
            self.abort()


class OutputFile(OutputLocation):
    """A single output file written atomically (:func:`~magic_pl.statedict.save_state_dict`): staged as a hidden
    temporary file next to it and renamed into place.

    An existing file is replaced when it is empty, a safetensors file magic-pl wrote (its metadata carries
    :data:`MAGIC_PL_METADATA_KEY`; :func:`magic_metadata` adds it), or with ``overwrite=True``. An existing directory
    at the path is always refused.
    """

    _kind = "file"

    def _wrong_kind(self) -> Optional[str]:
        if not self.path.is_dir():
            return None
        return (f"output {self.path} is an existing directory, but one file is written there: give a file path "
                f"such as {self.path / 'model.safetensors'}")

    def _marker_text(self) -> str:
        return "it is not a safetensors file carrying magic-pl's metadata marker"

    def _make_staged(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=self._prefix("tmp"), dir=self.path.parent)
        os.close(fd)
        return Path(name)

    def commit(self, manifest: Optional[Mapping[str, Any]] = None) -> Path:
        """Rename the staged file into place (atomic; a link at ``path`` is replaced itself). A file carries its
        marker in its own metadata, so ``manifest`` must be ``None``."""
        if manifest is not None:
            raise ValueError("a single output file has no manifest; put the fields in its metadata")
        return super().commit(None)

    def _write_manifest(self, staged: Path, manifest: Optional[Mapping[str, Any]]) -> None:
        return None

    def _swap(self, staged: Path) -> None:
        os.replace(staged, self.path)
        _fsync_dir(self.path.parent)


@contextlib.contextmanager
def atomic_output(path: PathLike, *, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write a file or a directory at; rename it into place on success,
    delete it on error.

    A directory written there gets :data:`MANIFEST` and replaces an existing directory only by the
    :class:`OutputLocation` rules (empty, a previous magic-pl output, or ``overwrite``), checked before the body runs.
    A file written there replaces an existing file: this is the primitive for the files magic-pl itself rewrites
    (reports, caches, plots); model files go through :func:`~magic_pl.statedict.save_state_dict`, which refuses
    files magic-pl did not write. A file never replaces a directory, nor a directory a file.
    """
    loc = OutputLocation(path, overwrite=overwrite, inputs=inputs)
    path = loc.path
    existing_dir = path.is_dir() and not path.is_symlink()
    loc._check_inputs()
    if path.parent.is_dir():
        clean_leftovers(path)
    if existing_dir or path.is_symlink():
        loc._check_target()
    loc._check_parent()
    loc._checked = True
    holder = loc.stage()
    target = holder / path.name
    try:
        yield target
        if not os.path.lexists(target):
            raise FileNotFoundError(f"nothing was written to the temporary path for {path}")
        if target.is_dir():
            inner = OutputLocation(path, overwrite=overwrite)
            inner._checked = True
            inner._staged = target
            inner.commit()
        else:
            if path.is_dir() and not path.is_symlink():
                raise OutputError(f"output {path} is an existing directory; a file was written for it")
            os.replace(target, path)
            _fsync_dir(path.parent)
    finally:
        loc.abort()
