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
- While a run holds a location (from :meth:`~OutputLocation.check` to commit or abort) a lock file beside it
  (``.<name>.magic-pl-lock``) names the process; a second run for the same location is refused as "in use". A lock
  whose process is gone is taken over.
- :meth:`~OutputLocation.scratch` gives a hidden sibling for work that must not touch the location while the run is
  under way (the CLI's logs); :meth:`~OutputLocation.adopt` moves it into the staged output, and an interrupted run's
  scratch is removed by the next run like any other leftover.
- Single files (reports, plots, result tables) written with :func:`atomic_output` replace an existing file only when
  magic-pl wrote it: the directory keeps a record (:data:`FILES_RECORD`) of the sha256 of each file magic-pl wrote
  there, and a file whose content no longer matches its record (or has none) is the user's.
- Names are data: :func:`check_task_names` is the one check every writer applies to task names before any tensor is
  read, and :func:`child_path` joins a name under a staged directory and refuses anything that would leave it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
import weakref
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
    "FILES_RECORD",
    "MAX_TASK_NAME",
    "check_task_names",
    "child_path",
    "scratch_path",
    "check_files",
    "sha256_path",
]

PathLike = Union[str, os.PathLike]

#: Written inside every directory output magic-pl creates; its presence makes the directory replaceable.
MANIFEST = ".magic-pl.json"
#: Metadata key of single safetensors files magic-pl writes (value: the magic-pl version).
MAGIC_PL_METADATA_KEY = "magic_pl"

#: Beside single files magic-pl writes into a directory: the sha256 of each such file, so a later run replaces only
#: files whose content is still what magic-pl wrote.
FILES_RECORD = ".magic-pl-files.json"
#: Longest task name accepted: names become file names (``heads/<task>.safetensors``), which file systems cap.
MAX_TASK_NAME = 100

_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.magic-pl-(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class OutputError(ValueError):
    """An output location cannot be written as asked; the message names the path and what to do."""


# -- names are data ----------------------------------------------------------------------------------------------------
def check_task_names(names: Sequence[Any], *, reserved: Sequence[str] = (), what: str = "task name") -> list[str]:
    """Return ``names`` as strings after checking each can name files safely, before any tensor is read.

    A task name must be a non-empty string (an integer is accepted and converted) of at most :data:`MAX_TASK_NAME`
    printable characters, without a path separator, without leading or trailing white space, not starting with a
    dot (``.``, ``..`` and hidden names, where magic-pl keeps its own temporaries), unique ignoring case (two names
    that differ only in case are one file on macOS and Windows), and none of ``reserved`` (the names a writer uses for
    its own files, e.g. ``model`` beside ``model.safetensors``). Raises ``ValueError`` naming the bad name.
    """
    out: list[str] = []
    seen: dict[str, str] = {}
    taken = {r.casefold(): r for r in reserved}
    for i, name in enumerate(names):
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise ValueError(f"{what} {i} must be a string, got {type(name).__name__} {name!r}")
        name = str(name)
        problem = None
        if not name:
            problem = "is empty"
        elif len(name) > MAX_TASK_NAME:
            problem = f"is {len(name)} characters long (at most {MAX_TASK_NAME})"
        elif not name.isprintable():
            problem = "contains a control character (NUL, newline, tab, ...)"
        elif any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")):
            problem = "contains a path separator; task names become file names and may not be paths"
        elif name.startswith("."):
            problem = "starts with '.'; task names become file names and may not be '.', '..' or hidden names"
        elif name != name.strip():
            problem = "starts or ends with white space"
        elif name.casefold() in taken:
            problem = f"is the name of a file the output holds ({taken[name.casefold()]!r}); rename the task"
        elif name.casefold() in seen:
            problem = f"repeats {seen[name.casefold()]!r} (names must be unique, ignoring case)"
        if problem:
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise ValueError(f"{what} {shown!r} {problem}")
        seen[name.casefold()] = name
        out.append(name)
    return out


def child_path(root: PathLike, *parts: str) -> Path:
    """``root / parts...``, refused with :class:`OutputError` unless it stays strictly inside ``root`` (no absolute
    part, no ``..``, no link inside ``root`` leading out): the last line of defence for names that become paths."""
    root_real = Path(os.path.realpath(root))
    target = Path(root).joinpath(*parts)
    real = Path(os.path.realpath(target))
    if any(Path(p).is_absolute() or ".." in Path(p).parts for p in parts) or root_real not in real.parents:
        raise OutputError(f"refusing to write {target}: it is not inside the output being written ({root})")
    return target


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


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux ``/proc``), so a lock is not held by a recycled process id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _lock_owner(lock: Path) -> Optional[int]:
    """The live process holding ``lock``, or ``None`` when the lock is stale (its process is gone) or unreadable."""
    try:
        doc = json.loads(lock.read_text())
        pid = int(doc["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _pid_alive(pid):
        return None
    started = doc.get("started")
    if started is not None and _process_start(pid) not in (None, started):
        return None
    return pid


#: Locks this process holds (real path -> number of OutputLocation objects sharing it).
_HELD: dict[str, int] = {}


def _drop_lock(key: str, lock: Path) -> None:
    """Release one share of a lock of this process; the file goes with the last share."""
    n = _HELD.get(key, 0)
    if n <= 0:
        return
    if n > 1:
        _HELD[key] = n - 1
        return
    del _HELD[key]
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()


def scratch_path(path: PathLike, name: str) -> Path:
    """The hidden sibling ``.<path name>.magic-pl-tmp-<pid>-<name>`` of an output ``path`` for this process's work
    in progress (see :meth:`OutputLocation.scratch`); the next run for ``path`` removes it once this process is gone."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"scratch name must be letters, digits or '_', got {name!r}")
    path = Path(path)
    return path.parent / f".{path.name}.magic-pl-tmp-{os.getpid()}-{name}"


#: What Lightning's CSV logger (and the CLI's config saver) leave in ``<output>/logs`` while a run is under way.
_RUN_LOG_FILES = {"metrics.csv", "hparams.yaml", "config.yaml"}


def _only_old_run_logs(path: Path) -> bool:
    """True when a directory holds nothing but ``logs/**/version_<n>/`` with the files a magic-pl run logs there:
    what an interrupted run of an older magic-pl left in place (newer runs log into a scratch directory)."""
    if not path.is_dir() or path.is_symlink() or sorted(os.listdir(path)) != ["logs"]:
        return False
    found = False
    for root, dirs, files in os.walk(path / "logs"):
        rel = Path(root).relative_to(path)
        if any((Path(root) / d).is_symlink() for d in dirs):
            return False
        if files:
            if not rel.name.startswith("version_") or not set(files) <= _RUN_LOG_FILES:
                return False
            found = True
    return found


def _with_index_shards(inputs: Sequence[Path]) -> list[Path]:
    """``inputs`` plus the shard files named by the sharded-checkpoint indexes among them (``*.index.json`` files,
    or directories holding one): a shard may live elsewhere than its index (``../out/model/a.safetensors``)."""
    out = list(inputs)
    for inp in inputs:
        candidates = [inp] if inp.name.endswith(".index.json") else (
            sorted(inp.glob("*.index.json")) if inp.is_dir() else [])
        for index in candidates:
            try:
                weight_map = json.loads(index.read_text()).get("weight_map") or {}
            except (OSError, ValueError, AttributeError):
                continue  # the loader reports a bad index, naming it
            if isinstance(weight_map, dict):
                out += [index.parent / v for v in set(weight_map.values()) if isinstance(v, str)]
    return out


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        self._scratch: list[Path] = []
        self._lock: Optional[Path] = None
        self._share: Optional[weakref.finalize] = None
        self._checked = False
        self._committed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, overwrite={self.overwrite})"

    # -- checks -------------------------------------------------------------------------------------------------------
    def _replaceable(self) -> bool:
        return _is_empty(self.path) or is_previous_output(self.path) or _only_old_run_logs(self.path)

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
        for inp in _with_index_shards(self.inputs):
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
        """Validate the location (cheap: no tensor read), take its lock and remove leftovers of interrupted runs;
        returns ``self``.

        Raises :class:`OutputError` naming the path (see the module docstring for the rules), also when another
        live run holds the location.
        """
        self._check_inputs()
        if self.path.parent.is_dir():
            self._acquire()
        try:
            if self.path.parent.is_dir():
                clean_leftovers(self.path)
            self._check_target()
            self._check_parent()
        except BaseException:
            self._release()  # a refused location keeps no lock
            raise
        self._checked = True
        return self

    # -- the lock -----------------------------------------------------------------------------------------------------
    def _lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.magic-pl-lock"

    def _acquire(self) -> None:
        """Create the lock file (exclusive); a lock of this process is shared, a stale one is taken over."""
        if self._lock is not None:
            return
        lock = self._lock_path()
        key = str(_real(lock))
        if key in _HELD:  # another writer of this process holds it (e.g. an early check): share it
            _HELD[key] += 1
            self._lock = lock
            self._share = weakref.finalize(self, _drop_lock, key, lock)
            return
        doc = json.dumps({"pid": os.getpid(), "started": _process_start(os.getpid())})
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner is not None:
                    raise OutputError(
                        f"output {self.path} is in use by another magic-pl run (process {owner}); wait for it to "
                        "finish or choose another path"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its process is gone
                continue
            except OSError:
                return  # a read-only parent: _check_parent says so
            with os.fdopen(fd, "w") as f:
                f.write(doc)
            _HELD[key] = 1
            self._lock = lock
            # a location checked early and then dropped (no commit or abort) releases its share when collected
            self._share = weakref.finalize(self, _drop_lock, key, lock)
            return

    def _release(self) -> None:
        """Release this location's share of the lock, once (a finalizer runs at most once: calling it here also
        keeps garbage collection from releasing a share a second time)."""
        if self._share is not None:
            self._share()
            self._share = None
        self._lock = None

    # -- writing ------------------------------------------------------------------------------------------------------
    def _prefix(self, kind: str) -> str:
        return f".{self.path.name}.magic-pl-{kind}-{os.getpid()}-"

    def _make_staged(self) -> Path:
        staged = Path(tempfile.mkdtemp(prefix=self._prefix("tmp"), dir=self.path.parent))
        os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes it private; the output gets the usual permissions
        return staged

    def stage(self) -> Path:
        """Create (once) and return the hidden temporary sibling to write into; parents are created here."""
        if self._committed:
            raise OutputError(f"output {self.path} was already committed")
        if self._staged is None:
            if not self._checked:
                self.check()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
            self._staged = self._make_staged()
        return self._staged

    def scratch(self, name: str) -> Path:
        """A hidden sibling of the location for work in progress that must not touch it until the run succeeded
        (``.<name>.magic-pl-tmp-<pid>-<name>``; not created here). Removed by :meth:`abort`; a killed run's scratch
        is removed by the next run for the location (:func:`clean_leftovers`)."""
        path = scratch_path(self.path, name)
        if path not in self._scratch:
            self._scratch.append(path)
        return path

    def adopt(self, scratch: Path, relative: str) -> None:
        """Move a :meth:`scratch` directory (if it was created) into the staged output at ``relative``."""
        staged = self.stage()
        if scratch.is_dir() and not scratch.is_symlink():
            dest = child_path(staged, relative)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(scratch), str(dest))

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
        self._let_go()
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
        """Remove the staged temporary and the scratch directories, and release the lock (idempotent)."""
        if self._staged is not None:
            _remove(self._staged)
            self._staged = None
        self._let_go()

    def _let_go(self) -> None:
        """Remove the scratch directories not adopted into the output and release the lock."""
        for path in self._scratch:
            _remove(path)
        self._release()

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
        os.chmod(staged, 0o666 & ~_umask())  # its writer may have made it private (mkstemp does)
        os.replace(staged, self.path)
        _fsync_dir(self.path.parent)


def sha256_path(path: PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, or of a directory's regular files (relative names and contents, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def _read_record(directory: Path) -> dict[str, str]:
    record = directory / FILES_RECORD
    if record.is_symlink() or not record.is_file():
        return {}
    try:
        doc = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def _written_here(path: Path) -> bool:
    """True when the file ``path`` is still exactly what magic-pl wrote there (its sha256 is in the directory's
    :data:`FILES_RECORD`), or a safetensors file carrying magic-pl's marker."""
    recorded = _read_record(path.parent).get(path.name)
    if recorded is not None and path.is_file() and recorded == sha256_path(path):
        return True
    return is_previous_output(path)


def check_files(paths: Sequence[PathLike]) -> None:
    """Refuse, before any work, to replace a file magic-pl did not write: each of ``paths`` must be missing, empty,
    still what magic-pl wrote there (:data:`FILES_RECORD`) or a safetensors file carrying magic-pl's marker.
    A run that writes several report files calls this on all of them first, so it fails before it starts."""
    for path in map(Path, paths):
        if path.is_symlink():
            raise OutputError(f"{path} is a symbolic link; magic-pl does not write through links: remove it or "
                              "choose another path")
        if path.is_file() and not _is_empty(path) and not _written_here(path):
            raise OutputError(
                f"{path} exists and was not written by magic-pl (or was changed since); refusing to replace it: "
                "choose another path, or move the file away"
            )


def _record_written(path: Path) -> None:
    """Add ``path``'s sha256 to its directory's :data:`FILES_RECORD` (itself replaced atomically)."""
    record = _read_record(path.parent)
    record[path.name] = sha256_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{FILES_RECORD}.magic-pl-tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({MAGIC_PL_METADATA_KEY: _version(), "files": dict(sorted(record.items()))}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path.parent / FILES_RECORD)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(path: PathLike, *, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write a file or a directory at; rename it into place on success,
    delete it on error.

    A directory written there gets :data:`MANIFEST` and replaces an existing directory only by the
    :class:`OutputLocation` rules (empty, a previous magic-pl output, or ``overwrite``). A file written there
    replaces an existing file only when that is empty, still exactly what magic-pl wrote there (its sha256 is in the
    directory's :data:`FILES_RECORD`, which every file written here joins), a safetensors file carrying magic-pl's
    marker, or with ``overwrite``: the primitive for reports, tables, plots and caches. Both are checked before the
    body runs. A file never replaces a directory, nor a directory a file.
    """
    loc = OutputLocation(path, overwrite=overwrite, inputs=inputs)
    path = loc.path
    existing_dir = path.is_dir() and not path.is_symlink()
    loc._check_inputs()
    if path.parent.is_dir():
        loc._acquire()
        clean_leftovers(path)
    try:
        if existing_dir or path.is_symlink():
            loc._check_target()
        elif not overwrite:
            check_files([path])
        loc._check_parent()
    except BaseException:
        loc.abort()
        raise
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
            _record_written(path)
    finally:
        loc.abort()
