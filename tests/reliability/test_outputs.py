"""What `calibrate` does to the files around it, one row per situation a user meets: the right result or a clear early
error, and nothing of the user's deleted or overwritten."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from torch import nn

from magic_pl.lightning import MagicCalibration, MagicModule, MagicTrainer, RandomTaskDataset, TaskDataModule
from magic_pl.lightning.tiny_inputs import TinyTimmAdapter, build_tiny_timm
from magic_pl.lightning.writer import save_module
from magic_pl.models.base import check_pairing
from magic_pl.output import MANIFEST, OutputError, OutputLocation, child_path


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


# ---------------------------------------------------------------------------------------------------------------------
# Names are data: a task name never becomes a path outside the output, nor one of the output's own files
# ---------------------------------------------------------------------------------------------------------------------
BAD_TASK_NAMES = [
    ("../../../x", "path separator"),
    ("/abs/path/x", "path separator"),
    ("a/b", "path separator"),
    ("..", "starts with '.'"),
    (".hidden", "starts with '.'"),
    ("", "is empty"),
    ("a\x00b", "control character"),
    ("line\nbreak", "control character"),
    ("x" * 300, "300 characters"),
    (" a", "white space"),
]


@pytest.mark.parametrize("name, why", BAD_TASK_NAMES, ids=[repr(n[:12]) for n, _ in BAD_TASK_NAMES])
def test_a_task_name_that_is_not_a_plain_name_is_refused_before_anything_is_read(inputs, tmp_path, name, why):
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=re.escape(why)):
        TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs["a"]), str(inputs["b"])],
                        task_names=[name, "b"])
    with pytest.raises(ValueError, match=re.escape(why)):
        MagicCalibration(experts=[str(inputs["a"]), str(inputs["b"])], base=str(inputs["base"]),
                         task_names=["b", name])
    with pytest.raises(ValueError, match=re.escape(why)):
        save_module(nn.Linear(2, 2), tmp_path / "out", heads={name: nn.Linear(2, 2)})
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("names, why", [
    (["model", "b"], "the name of a file the output holds"),  # model.safetensors is the timm body
    (["heads", "b"], "the name of a file the output holds"),
    (["a", "A"], "repeats 'a'"),  # one file on case-insensitive file systems
])
def test_a_task_name_that_clashes_with_the_outputs_own_files_is_refused(inputs, names, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs["a"]), str(inputs["b"])], task_names=names)


def test_a_task_name_from_the_cli_is_refused_in_one_line_and_nothing_is_written(fresh_cli, capsys):
    from magic_pl.lightning.cli import main

    before = _snapshot(fresh_cli)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "-c", "configs/tiny.yaml", "--task_names", "[../../escaped, b]", "--output_dir", "out"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "path separator" in err and "../../escaped" in err and len(err.strip().splitlines()) <= 2
    assert _snapshot(fresh_cli) == before and not (fresh_cli / "out").exists()


def test_child_path_refuses_what_would_leave_the_staged_directory(tmp_path):
    root = tmp_path / "staged"
    (root / "heads").mkdir(parents=True)
    os.symlink(tmp_path, root / "link")
    assert child_path(root, "heads", "a.safetensors") == root / "heads" / "a.safetensors"
    for parts in (("..", "x"), ("heads", "../../x"), ("/etc/x",), ("link", "x")):
        with pytest.raises(OutputError, match="not inside the output"):
            child_path(root, *parts)


# ---------------------------------------------------------------------------------------------------------------------
# Pairing: experts are matched with task names by name where they carry one
# ---------------------------------------------------------------------------------------------------------------------
def test_experts_listed_in_another_order_than_their_tasks_are_refused(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"expert 0 .*b\.safetensors.* named 'b' .* paired with task 'a'"):
        TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs["b"]), str(inputs["a"])], task_names=["a", "b"])
    with pytest.raises(ValueError, match="reorder"):
        MagicCalibration(experts=[str(inputs["b"]), str(inputs["a"])], base=str(inputs["base"]), task_names=["a", "b"])
    # a Hugging Face expert names its task in config.json (finetuning_task), whatever its directory is called
    for d, task in (("run1", "topic"), ("run2", "sentiment")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text(json.dumps({"finetuning_task": task}))
    with pytest.raises(ValueError, match="named 'topic' but is paired with task 'sentiment'"):
        check_pairing([tmp_path / "run1", tmp_path / "run2"], ["sentiment", "topic"])
    check_pairing([tmp_path / "run1", tmp_path / "run2"], ["topic", "sentiment"])
    check_pairing([str(inputs["a"]), str(inputs["b"])], ["x", "y"])  # nothing to check: accepted, and printed


def test_the_pairing_is_in_the_report_and_the_final_message(inputs, tmp_path):
    from magic_pl.lightning.cli import calibrate_summary

    adapter = TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs["a"]), str(inputs["b"])],
                              task_names=["x", "y"])
    res = _trainer().calibrate(MagicModule(adapter=adapter, calibration="wsc"), datamodule=None,
                               output_dir=str(tmp_path / "out"), evaluate=False)
    doc = json.loads(Path(res["report"]).read_text())
    assert doc["pairing"] == [{"task": "x", "expert": str(inputs["a"])}, {"task": "y", "expert": str(inputs["b"])}]
    assert f"tasks: x <- {inputs['a']}, y <- {inputs['b']}" in calibrate_summary(res, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------------
# Logs, reruns and concurrent runs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_cli(tmp_path, monkeypatch) -> Path:
    """A working directory holding ``configs/tiny.yaml``, the tiny inputs cached under it; the cwd."""
    import shutil
    import sys

    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", work / "configs" / "tiny.yaml")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["magic-pl"])
    monkeypatch.setenv("MAGIC_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAGIC_PL_DEBUG", raising=False)
    return work


def _bad_test_data_args() -> list[str]:
    # calibration samples are drawn from the test sets, so images of the wrong size fail right after calibration
    return ["--data.init_args.test.a.init_args.shape", "[3, 8, 8]", "--data.init_args.test.b.init_args.shape",
            "[3, 8, 8]"]


def test_a_failed_first_run_leaves_nothing_and_the_rerun_succeeds(fresh_cli, capsys):
    from magic_pl.lightning.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "out", *_bad_test_data_args()])
    assert exc.value.code == 1
    assert sorted(os.listdir(fresh_cli)) == ["configs"]  # no out/logs, no hidden scratch, no lock
    main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "out"])
    assert list((fresh_cli / "out" / "logs").rglob("metrics.csv")) and (fresh_cli / "out" / MANIFEST).is_file()
    assert sorted(os.listdir(fresh_cli)) == ["configs", "out"]


def test_a_failed_rerun_keeps_the_previous_output_byte_identical(fresh_cli, capsys):
    from magic_pl.lightning.cli import main

    main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "out"])
    before = _snapshot(fresh_cli / "out")
    with pytest.raises(SystemExit):
        main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "out", *_bad_test_data_args()])
    assert _snapshot(fresh_cli / "out") == before  # no logs/version_1 added to it
    assert sorted(os.listdir(fresh_cli)) == ["configs", "out"]


def test_a_killed_runs_scratch_logs_are_removed_by_the_next_run(inputs, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    scratch = tmp_path / f".out.magic-pl-tmp-{pid}-logs" / "lightning_logs" / "version_0"
    scratch.mkdir(parents=True)
    (scratch / "metrics.csv").write_text("step\n")
    (tmp_path / ".out.magic-pl-lock").write_text(json.dumps({"pid": pid}))  # the killed run's lock
    _trainer().calibrate(_module(inputs, "wsc"), datamodule=_data(), output_dir=str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_output_holding_only_an_old_failed_runs_logs_is_magic_pls(inputs, tmp_path):
    out = tmp_path / "out"
    (out / "logs" / "lightning_logs" / "version_0").mkdir(parents=True)
    (out / "logs" / "lightning_logs" / "version_0" / "metrics.csv").write_text("step\n")
    _trainer().calibrate(_module(inputs, "wsc"), datamodule=_data(), output_dir=str(out))
    assert (out / MANIFEST).is_file()
    # but not once the user put something of theirs there
    mine = tmp_path / "mine"
    (mine / "logs" / "lightning_logs" / "version_0").mkdir(parents=True)
    (mine / "logs" / "lightning_logs" / "version_0" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by magic-pl"):
        _trainer().calibrate(_module(inputs, "wsc"), datamodule=_data(), output_dir=str(mine))


def test_a_logger_writing_inside_the_output_is_refused_before_any_work(inputs, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    out = tmp_path / "out"
    for save_dir in (out, out / "logs"):
        trainer = MagicTrainer(accelerator="cpu", devices=1, logger=CSVLogger(save_dir=str(save_dir)),
                               enable_progress_bar=False, enable_model_summary=False)
        mod = _module(inputs)
        with pytest.raises(OutputError, match="inside the output directory"):
            trainer.calibrate(mod, datamodule=_data(), output_dir=str(out))
        assert mod.model is None and sorted(os.listdir(tmp_path)) == []


_HOLD = """
import sys, time
from magic_pl.output import OutputLocation
loc = OutputLocation(sys.argv[1]).check()
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_an_output_in_use_gets_a_clear_in_use_error(inputs, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        mod = _module(inputs)
        with pytest.raises(OutputError, match=rf"in use by another magic-pl run \(process {proc.pid}\)"):
            _trainer().calibrate(mod, datamodule=_data(), output_dir=str(out))
        assert mod.model is None and not out.exists()
    finally:
        proc.kill()
        proc.wait()
    _trainer().calibrate(_module(inputs, "wsc"), datamodule=_data(), output_dir=str(out))  # the lock is stale now
    assert (out / MANIFEST).is_file() and sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------------------------------------------------------
# Reports and result tables replace only files magic-pl wrote
# ---------------------------------------------------------------------------------------------------------------------
def test_report_files_replace_only_what_magic_pl_wrote(tmp_path):
    from magic_pl.lightning.report import write_json
    from magic_pl.zoo.report import write_texts

    mine = tmp_path / "calibration_report.json"
    mine.write_text('{"mine": true}')
    with pytest.raises(OutputError, match="calibration_report.json exists and was not written by magic-pl"):
        write_json({"xi": 1}, mine)
    assert mine.read_text() == '{"mine": true}'
    ours = tmp_path / "ours.json"
    write_json({"xi": 1}, ours)
    write_json({"xi": 2}, ours)  # magic-pl's own file: replaced
    assert json.loads(ours.read_text()) == {"xi": 2}
    ours.write_text('{"edited": "by the user"}')  # changed since: the user's now
    with pytest.raises(OutputError, match="or was changed since"):
        write_json({"xi": 3}, ours)
    (tmp_path / "results.md").write_text("my notes")
    with pytest.raises(OutputError, match="results.md"):
        write_texts(tmp_path, {"results.md": "table"})
    assert (tmp_path / "results.md").read_text() == "my notes"


def test_the_calibration_report_callback_keeps_a_users_report(inputs, tmp_path):
    from lightning.pytorch import Trainer

    from magic_pl.lightning import CalibrationReport

    (tmp_path / "calibration_report.json").write_text("mine")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[CalibrationReport(str(tmp_path), hash_inputs=False)])
    with pytest.raises(OutputError, match="not written by magic-pl"):
        trainer.predict(_module(inputs, "fsc"), datamodule=_data(), return_predictions=False)
    assert (tmp_path / "calibration_report.json").read_text() == "mine"


def test_an_input_whose_index_points_into_the_output_is_refused(inputs, tmp_path):
    import shutil

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    shutil.copy(inputs["a"], out / "model" / "a.safetensors")
    (out / MANIFEST).write_text(json.dumps({"magic_pl": "0"}))  # a previous output: replaceable
    ext = tmp_path / "ext"
    ext.mkdir()
    from safetensors import safe_open

    with safe_open(str(inputs["a"]), "pt") as f:
        keys = list(f.keys())
    index = ext / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: "../out/model/a.safetensors" for k in keys}}))
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match="inside the output location"):
        OutputLocation(out, inputs=[index]).check()
    assert _snapshot(tmp_path) == before


def test_the_benchmark_refuses_a_results_dir_holding_the_users_tables_before_any_work(tmp_path, monkeypatch):
    from magic_pl.zoo import run_benchmark, runner

    def no_data(*args, **kwargs):
        raise AssertionError("the suite's data was read before the results directory was checked")

    monkeypatch.setattr(runner, "load_suite", no_data)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.md").write_text("my notes")
    with pytest.raises(OutputError, match=r"mine/results\.md exists and was not written by magic-pl"):
        run_benchmark(suite="tiny", results_dir=str(tmp_path / "mine"), cache_dir=str(tmp_path / "cache"))
    assert (tmp_path / "mine" / "results.md").read_text() == "my notes"
