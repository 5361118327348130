"""What `calibrate` does to the files around it, one row per situation a user meets: the right result or a clear early
error, and nothing of the user's deleted or overwritten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from magic_pl.lightning import MagicModule, MagicTrainer, RandomTaskDataset, TaskDataModule
from magic_pl.lightning.tiny_inputs import TinyTimmAdapter, build_tiny_timm
from magic_pl.output import MANIFEST, OutputError


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _module(inputs: dict[str, Path], calibration: str = "dsc") -> MagicModule:
    adapter = TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs["a"]), str(inputs["b"])],
                              task_names=["a", "b"])
    return MagicModule(adapter=adapter, calibration=calibration)


def _data(test_classes: tuple[int, int] = (3, 4)) -> TaskDataModule:
    test = {t: RandomTaskDataset(6, (3, 16, 16), n, seed=i) for i, (t, n) in enumerate(zip("ab", test_classes))}
    return TaskDataModule(["a", "b"], test=test, samples_per_task=1)


def _trainer() -> MagicTrainer:
    return MagicTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_timm(tmp_path_factory.mktemp("cache"))


def test_inputs_and_notes_inside_the_output_dir_are_refused_before_any_work(inputs, tmp_path):
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    for name in ("base", "a", "b"):
        os.link(inputs[name], work / "model" / f"{name}.safetensors")
    (work / "model" / "NOTES.txt").write_text("mine")
    local = {n: work / "model" / f"{n}.safetensors" for n in ("base", "a", "b")}
    before = _snapshot(work)
    mod = _module(local)
    with pytest.raises(OutputError, match="work"):
        _trainer().calibrate(mod, datamodule=_data(), output_dir=str(work))
    assert mod.model is None and _snapshot(work) == before


def test_a_users_directory_is_refused_and_overwrite_replaces_it(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not written by magic-pl|overwrite"):
        _trainer().calibrate(_module(inputs), datamodule=_data(), output_dir=str(out))
    assert (out / "thesis.tex").read_text() == "years of work"
    _trainer().calibrate(_module(inputs), datamodule=_data(), output_dir=str(out), overwrite=True)
    assert (out / MANIFEST).is_file() and not (out / "thesis.tex").exists()


def test_a_failed_evaluation_keeps_the_previous_output_and_leaves_nothing(inputs, tmp_path):
    out = tmp_path / "out"
    res = _trainer().calibrate(_module(inputs), datamodule=_data(), output_dir=str(out))
    assert res["model"] == str(out / "model") and (out / "model" / "model.safetensors").is_file()
    before = _snapshot(out)
    # calibration samples fit the model, test images of another size do not: evaluation fails after calibration
    bad = TaskDataModule(["a", "b"], calibration={t: RandomTaskDataset(2, (3, 16, 16), 3, seed=i)
                                                  for i, t in enumerate("ab")},
                         test={t: RandomTaskDataset(6, (3, 8, 8), 3, seed=i) for i, t in enumerate("ab")},
                         samples_per_task=1)
    with pytest.raises(Exception, match="(?i)input|size|shape"):
        _trainer().calibrate(_module(inputs, "fsc"), datamodule=bad, output_dir=str(out))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden staging leftovers


def test_a_previous_output_is_replaced_whole_after_success(inputs, tmp_path):
    out = tmp_path / "out"
    _trainer().calibrate(_module(inputs, "wsc"), datamodule=_data(), output_dir=str(out))
    first = (out / "model" / "model.safetensors").read_bytes()
    _trainer().calibrate(_module(inputs, "auto"), datamodule=_data(), output_dir=str(out))
    assert (out / "model" / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_nan_expert_is_an_error_naming_file_and_key_and_writes_nothing(inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(inputs["a"]))
    key = next(k for k in sd if k.endswith("qkv.weight"))
    sd[key][0, 0] = float("nan")
    bad = tmp_path / "a_nan.safetensors"
    save_file(sd, str(bad))
    out = tmp_path / "out"
    with pytest.raises(Exception, match=rf"a_nan\.safetensors.*{key}|{key}.*a_nan\.safetensors"):
        _trainer().calibrate(_module({**inputs, "a": bad}), datamodule=_data(), output_dir=str(out))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_nan.safetensors"]
