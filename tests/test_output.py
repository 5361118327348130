"""Output locations: what may be replaced, inputs, links, leftovers of interrupted runs, atomic swaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from magic_pl.output import MANIFEST, OutputError, OutputFile, OutputLocation, clean_leftovers, is_previous_output
from magic_pl.statedict import atomic_path, load_state_dict, save_state_dict

ROOT = Path(__file__).resolve().parents[1]


def _write(out: OutputLocation, name: str = "model.txt", text: str = "new", manifest=None) -> Path:
    with out:
        tmp = out.stage()
        (tmp / name).write_text(text)
        return out.commit(manifest)


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_empty_or_missing_directory_is_written_with_a_manifest(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "missing/deeper"):
        out = OutputLocation(tmp_path / name).check()
        path = _write(out, manifest={"command": "merge"})
        assert path == tmp_path / name
        assert _names(path) == [MANIFEST, "model.txt"]
        doc = json.loads((path / MANIFEST).read_text())
        assert doc["command"] == "merge" and doc["magic_pl"] and doc["created"]
        assert is_previous_output(path)
    assert _names(tmp_path) == ["empty", "missing"]  # no temporaries left


def test_user_directory_is_refused_and_untouched(tmp_path: Path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_text("meow")
    with pytest.raises(OutputError, match=r"photos exists and was not written by magic-pl"):
        OutputLocation(user).check()
    assert _names(user) == ["cat.jpg"] and _names(tmp_path) == ["photos"]
    # a directory without the manifest's magic-pl field is not a previous output either
    (user / MANIFEST).write_text("{}")
    with pytest.raises(OutputError):
        OutputLocation(user).check()


def test_previous_output_is_replaced_whole(tmp_path: Path):
    out_dir = tmp_path / "out"
    _write(OutputLocation(out_dir).check(), name="old.txt", text="first")
    _write(OutputLocation(out_dir).check(), name="model.txt", text="second")
    assert _names(out_dir) == [MANIFEST, "model.txt"]
    assert (out_dir / "model.txt").read_text() == "second"
    assert _names(tmp_path) == ["out"]


def test_overwrite_replaces_a_user_directory(tmp_path: Path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("x")
    _write(OutputLocation(user, overwrite=True).check())
    assert _names(user) == [MANIFEST, "model.txt"]


def test_inputs_inside_the_output_are_refused(tmp_path: Path):
    out_dir = tmp_path / "out"
    _write(OutputLocation(out_dir).check())
    base = out_dir / "base.safetensors"
    base.write_text("weights")
    for inputs in ([base], [out_dir], [tmp_path / "link_to_base"]):
        if inputs[0].name == "link_to_base":
            inputs[0].symlink_to(base)
        with pytest.raises(OutputError, match=r"output location .*out"):
            OutputLocation(out_dir, overwrite=True, inputs=inputs).check()
    # the output inside an input directory: refused when it would replace part of it, allowed when new
    expert_dir = tmp_path / "expert"
    (expert_dir / "sub").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"inside input directory .*expert"):
        OutputLocation(expert_dir / "sub", inputs=[expert_dir]).check()
    OutputLocation(expert_dir / "new", inputs=[expert_dir]).check()
    assert base.read_text() == "weights"


def test_file_and_directory_kinds_are_not_swapped(tmp_path: Path):
    f = tmp_path / "result"
    f.write_text("a file")
    with pytest.raises(OutputError, match=r"is an existing file, but a directory"):
        OutputLocation(f, overwrite=True).check()
    d = tmp_path / "some_dir"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    with pytest.raises(OutputError, match=r"some_dir is an existing directory"):
        save_state_dict({"a": torch.ones(2)}, d)
    with pytest.raises(OutputError, match=r"existing directory"):
        save_state_dict({"a": torch.ones(2)}, d, overwrite=True)
    assert _names(d) == ["keep.txt"] and f.read_text() == "a file"


def test_symlink_is_never_followed(tmp_path: Path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("keep me")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(OutputError, match=r"symbolic link"):
        OutputLocation(link).check()
    _write(OutputLocation(link, overwrite=True).check())
    assert not link.is_symlink() and _names(link) == [MANIFEST, "model.txt"]
    assert _names(target) == ["data.txt"]
    # a link inside an old output is unlinked, not followed, when the output is replaced
    os.symlink(target, link / "inner_link")
    _write(OutputLocation(link).check())
    assert _names(target) == ["data.txt"] and (target / "data.txt").read_text() == "keep me"
    # the single-file form replaces a link itself, not its target
    user_file = tmp_path / "user.safetensors"
    save_file({"u": torch.zeros(1)}, str(user_file))
    flink = tmp_path / "m.safetensors"
    flink.symlink_to(user_file)
    with pytest.raises(OutputError, match=r"symbolic link"):
        save_state_dict({"a": torch.ones(1)}, flink)
    save_state_dict({"a": torch.ones(1)}, flink, overwrite=True)
    assert not flink.is_symlink() and set(load_state_dict(flink)) == {"a"}
    assert set(load_state_dict(user_file)) == {"u"}


def test_abort_and_exceptions_leave_nothing(tmp_path: Path):
    out = OutputLocation(tmp_path / "out").check()
    tmp = out.stage()
    (tmp / "half.bin").write_bytes(b"x" * 10)
    out.abort()
    out.abort()  # idempotent
    assert _names(tmp_path) == []
    with pytest.raises(RuntimeError):
        with OutputLocation(tmp_path / "out") as out:
            (out.stage() / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    with OutputLocation(tmp_path / "out") as out:
        out.stage()  # never committed: aborted on exit
    assert _names(tmp_path) == []


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path: Path):
    out_dir = tmp_path / "out"
    _write(OutputLocation(out_dir).check())
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".out.magic-pl-tmp-{dead}-abc123").mkdir()
    (tmp_path / f".out.magic-pl-old-{dead}-def456").mkdir()
    (tmp_path / f".out.magic-pl-tmp-{live}-ghi789").mkdir()
    (tmp_path / f".other.magic-pl-tmp-{dead}-jkl012").mkdir()  # another location's: not ours to remove
    OutputLocation(out_dir).check()
    assert _names(tmp_path) == [f".other.magic-pl-tmp-{dead}-jkl012", f".out.magic-pl-tmp-{live}-ghi789", "out"]
    # killed between "old aside" and "new in place": the old output is restored
    os.rename(out_dir, tmp_path / f".out.magic-pl-old-{dead}-zz")
    assert clean_leftovers(out_dir) and (out_dir / "model.txt").read_text() == "new"


def test_single_file_rules(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_state_dict({"a": torch.ones(2)}, path)
    save_state_dict({"a": torch.zeros(2)}, path)  # a previous magic-pl output: replaced
    assert torch.equal(load_state_dict(path)["a"], torch.zeros(2))
    user = tmp_path / "user.safetensors"
    save_file({"a": torch.ones(2)}, str(user))
    with pytest.raises(OutputError, match=r"user.safetensors exists and was not written by magic-pl"):
        save_state_dict({"a": torch.zeros(2)}, user)
    torch.save({"a": torch.ones(2)}, tmp_path / "user.pt")
    with pytest.raises(OutputError, match=r"user.pt exists"):
        save_state_dict({"a": torch.zeros(2)}, tmp_path / "user.pt")
    save_state_dict({"a": torch.zeros(2)}, user, overwrite=True)
    assert torch.equal(load_state_dict(user)["a"], torch.zeros(2))
    with pytest.raises(OutputError, match=r"input .*m.safetensors is the output location"):
        save_state_dict({"a": torch.ones(2)}, path, inputs=[path])
    with pytest.raises(ValueError, match="no manifest"):
        OutputFile(tmp_path / "x.safetensors").commit({"a": 1})
    assert _names(tmp_path) == ["m.safetensors", "user.pt", "user.safetensors"]


def test_atomic_path_refuses_user_directories(tmp_path: Path):
    user = tmp_path / "d"
    user.mkdir()
    (user / "mine.txt").write_text("x")
    with pytest.raises(OutputError):
        with atomic_path(user) as tmp:
            tmp.mkdir()
    with pytest.raises(OutputError, match=r"existing directory; a file was written"):
        with atomic_path(tmp_path / "e") as tmp:
            tmp.mkdir()
        with atomic_path(tmp_path / "e") as tmp:
            tmp.write_text("file")
    assert _names(user) == ["mine.txt"] and _names(tmp_path) == ["d", "e"]


_KILLED_SAVE = textwrap.dedent("""
    import sys, time, torch
    import magic_pl.models.io as io
    real = io.ShardedSafetensorsWriter.write
    def slow_write(self, key, tensor, **kw):
        real(self, key, tensor, **kw)
        print("writing", flush=True)
        time.sleep(60)
    io.ShardedSafetensorsWriter.write = slow_write
    io.save_sharded_safetensors({"a": torch.ones(3), "b": torch.ones(3)}, sys.argv[1])
""")


def test_sigkill_during_a_save_then_the_next_save_cleans_up(tmp_path: Path):
    out_dir = tmp_path / "out"
    from magic_pl.models.io import save_sharded_safetensors

    save_sharded_safetensors({"a": torch.zeros(3)}, out_dir)  # a complete earlier output
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(out_dir)], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = sorted(n for n in _names(tmp_path) if n != "out")
    # the staged temporary and the killed run's lock, both taken over by the next run
    assert len(leftovers) == 2 and leftovers[0] == ".out.magic-pl-lock"
    assert leftovers[1].startswith(f".out.magic-pl-tmp-{proc.pid}-")
    assert torch.equal(load_state_dict(out_dir)["a"], torch.zeros(3))  # the old output is intact
    # an interrupted single-file save leaves a hidden temporary file; the next save of that file removes it
    (tmp_path / f".m.safetensors.magic-pl-tmp-{proc.pid}-q1w2e3").write_bytes(b"half")
    save_state_dict({"x": torch.ones(1)}, tmp_path / "m.safetensors")
    save_sharded_safetensors({"a": torch.ones(3)}, out_dir)
    assert _names(tmp_path) == ["m.safetensors", "out"]
    assert torch.equal(load_state_dict(out_dir)["a"], torch.ones(3))


def test_outputs_get_the_usual_permissions_not_the_temporaries_private_ones(tmp_path: Path):
    from magic_pl.models.io import save_sharded_safetensors

    old = os.umask(0o022)
    try:
        save_sharded_safetensors({"a": torch.zeros(3)}, tmp_path / "out")
        save_state_dict({"x": torch.ones(1)}, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_lock_shared_in_one_process_stays_until_its_last_holder_lets_go(tmp_path: Path):
    import gc

    out = tmp_path / "out"
    first = OutputLocation(out).check()
    second = OutputLocation(out).check()  # e.g. an adapter's own check while the trainer holds the location
    lock = tmp_path / ".out.magic-pl-lock"
    first.abort()
    del first
    gc.collect()  # the first holder's finalizer must not release the second's share
    assert lock.is_file()
    second.stage()
    second.commit()
    assert not lock.exists() and (out / MANIFEST).is_file()
