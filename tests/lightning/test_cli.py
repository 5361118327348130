"""``magic-pl``: calibrate end to end from the tiny config on a fresh working directory, the shortcut flags, the
help screens, the end-of-run summary, --print_config round trips, benchmark forwarding."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from lightning_helpers import CONFIGS
from safetensors.torch import load_file

from magic_pl.lightning.cli import main
from magic_pl.recommended import recommended

REPO = CONFIGS.parent


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``$MAGIC_PL_CACHE`` for the session: the tiny inputs are built once, never under ``~/.cache``."""
    return tmp_path_factory.mktemp("magic_pl_cache")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tiny_cache):
    monkeypatch.setattr(sys, "argv", ["magic-pl"])  # args are given to main() explicitly
    monkeypatch.setenv("MAGIC_PL_CACHE", str(tiny_cache))
    monkeypatch.delenv("MAGIC_PL_DEBUG", raising=False)


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch) -> Path:
    """An empty working directory holding only ``configs/tiny.yaml`` (what a fresh clone has); the cwd."""
    (tmp_path / "configs").mkdir()
    shutil.copy(CONFIGS / "tiny.yaml", tmp_path / "configs" / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_tiny_config_on_a_fresh_directory_writes_only_under_output_dir(fresh, tiny_cache, capsys):
    before = _tree(fresh)
    main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "out"])
    new = _tree(fresh) - before
    assert new and all(p == "out" or p.startswith("out/") for p in new), sorted(new)
    out = fresh / "out"
    # the inputs were built in the cache, once, with a manifest
    built = [p for p in (tiny_cache / "tiny-inputs").iterdir() if not p.name.startswith(".")]
    assert len(built) == 1 and {p.name for p in built[0].iterdir()} == {
        "base.safetensors", "a.safetensors", "b.safetensors", "tiny-inputs.json"}
    report = json.loads((out / "calibration_report.json").read_text())
    assert (out / "calibration_report.png").stat().st_size > 1000
    # the calibrated model in the adapter's (timm) layout, loadable as a plain timm body
    body = load_file(str(out / "model" / "model.safetensors"))
    assert "blocks.0.attn.qkv.weight" in body and "head.weight" not in body
    assert sorted(p.name for p in (out / "model" / "heads").iterdir()) == ["a.safetensors", "b.safetensors"]
    assert report["task_names"] == ["a", "b"]
    assert report["config"]["calibration"] == "dsc" and report["config"]["merge_options"] == {"scale": 0.3}
    assert Path(report["inputs"]["base"]["path"]) == built[0] / "base.safetensors"
    xi = report["coefficients"]
    assert len(xi) == 14 and all(v > 0 for v in xi.values())
    assert {s["step"] for s in report["steps"]} >= {"load", "merge", "wsc", "fsc", "write"}
    dev = report["magnitude_deviation"]
    assert dev["mean_before"] < 0.7 < dev["mean_after"]  # TA 0.3 x 2 experts shrinks; MAGIC restores ~1
    assert set(report["metrics"]) == {"test/acc/a", "test/acc/b", "test/acc/avg"}
    # CSV logs and the saved config under <output_dir>/logs
    metrics_csv = list((out / "logs").rglob("metrics.csv"))
    assert len(metrics_csv) == 1 and "test/acc/avg" in metrics_csv[0].read_text()
    assert list((out / "logs").rglob("config.yaml"))
    # the summary: model path, report path, xi recomputed from the report
    lines = capsys.readouterr().out.splitlines()
    assert f"model:  {Path('out') / 'model'}" in lines and f"report: {Path('out') / 'calibration_report.json'}" in lines
    v = list(xi.values())
    expected = f"xi: {len(v)} modules, mean {sum(v) / len(v):.3g}, min {min(v):.3g}, max {max(v):.3g}"
    assert expected in lines


def test_a_config_without_a_recipe_runs_the_recommended_one_for_its_data(fresh, tiny_cache, capsys):
    cfg = yaml.safe_load((fresh / "configs" / "tiny.yaml").read_text())
    for key in ("merge_method", "merge_options", "calibration"):
        del cfg["model"]["init_args"][key]
    n = cfg["data"]["init_args"]["samples_per_task"] = 3  # the model is told the data's budget
    (fresh / "norecipe.yaml").write_text(yaml.safe_dump(cfg))
    main(["calibrate", "-c", "norecipe.yaml", "--output_dir", "out", "--evaluate", "false"])
    rec = recommended(n)
    report = json.loads((fresh / "out" / "calibration_report.json").read_text())
    assert (report["config"]["merge_method"], report["config"]["calibration"]) == (rec.merge_method, rec.calibration)
    assert f"recipe: {rec.describe(n)}" in capsys.readouterr().out.splitlines()
    # one half named: the other half is the recommendation's; both named: no recommendation
    main(["calibrate", "-c", "norecipe.yaml", "--output_dir", "half", "--evaluate", "false", "--merge_method", "ties"])
    report = json.loads((fresh / "half" / "calibration_report.json").read_text())
    assert (report["config"]["merge_method"], report["config"]["calibration"]) == ("ties", rec.calibration)
    main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "named", "--evaluate", "false"])
    report = json.loads((fresh / "named" / "calibration_report.json").read_text())
    assert report["config"]["recommended"] is None and report["config"]["calibration"] == "dsc"


def test_second_run_reuses_the_cached_inputs(fresh, tiny_cache):
    main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "one", "--evaluate", "false"])
    built = next(p for p in (tiny_cache / "tiny-inputs").iterdir() if not p.name.startswith("."))
    stamps = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    main(["calibrate", "-c", "configs/tiny.yaml", "--output_dir", "two", "--evaluate", "false"])
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == stamps
    w1 = load_file(str(fresh / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(fresh / "two" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)


def test_without_output_dir_says_no_model_was_written(fresh, capsys):
    cfg = yaml.safe_load((fresh / "configs" / "tiny.yaml").read_text())
    del cfg["output_dir"]
    (fresh / "no_out.yaml").write_text(yaml.safe_dump(cfg))
    main(["calibrate", "-c", "no_out.yaml", "--evaluate", "false"])
    out = capsys.readouterr().out
    assert "no model written: pass --output_dir DIR" in out and "no report written: pass --output_dir DIR" in out
    n = int(re.search(r"^xi: (\d+) modules, mean", out, re.M).group(1))  # the summary still comes from the run
    assert n > 0
    assert not list(fresh.rglob("model.safetensors")) and not list(fresh.rglob("calibration_report.json"))


def test_shortcut_flags_set_the_model_and_adapter_init_args(fresh, tiny_timm, capsys):
    experts = f"[{tiny_timm['a']},{tiny_timm['b']}]"
    main(["calibrate", "-c", "configs/tiny.yaml", "--base", str(tiny_timm["base"]), "--experts", experts,
          "--task_names", "[a, b]", "--merge_method", "ties", "--merge_options", "{scale: 0.5, density: 0.5}",
          "--calibration", "wsc", "--output_dir", "short"])
    report = json.loads((fresh / "short" / "calibration_report.json").read_text())
    assert report["config"]["merge_method"] == "ties" and report["config"]["calibration"] == "wsc"
    assert report["config"]["merge_options"] == {"scale": 0.5, "density": 0.5}
    assert report["inputs"]["base"]["path"] == str(tiny_timm["base"].resolve())
    assert [e["path"] for e in report["inputs"]["experts"]] == [str(tiny_timm[t].resolve()) for t in "ab"]
    assert report["coefficients"] == {} and report["wsc_scales"]
    assert "xi: none (no feature space calibration); WSC rescaled" in capsys.readouterr().out
    # the saved config has the shortcuts folded into the model's init args
    saved = yaml.safe_load(next((fresh / "short" / "logs").rglob("config.yaml")).read_text())
    assert saved["model"]["init_args"]["merge_method"] == "ties"
    assert saved["model"]["init_args"]["adapter"]["init_args"]["base"] == str(tiny_timm["base"])
    assert saved.get("merge_method") is None and saved.get("base") is None


def test_print_config_with_shortcuts_reads_as_it_runs_and_runs_as_is(fresh, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "-c", "configs/tiny.yaml", "--merge_method", "ties", "--calibration", "wsc",
              "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["init_args"]["merge_method"] == "ties" and cfg["model"]["init_args"]["calibration"] == "wsc"
    assert "merge_method" not in cfg and "calibration" not in cfg  # folded, not duplicated
    assert cfg["seed_everything"] == 0 and cfg["output_dir"] == "tiny_out"
    (fresh / "printed.yaml").write_text(printed)
    main(["calibrate", "-c", "printed.yaml", "--evaluate", "false", "--report", "false"])
    assert (fresh / "tiny_out" / "model" / "model.safetensors").is_file()
    assert not (fresh / "tiny_out" / "calibration_report.json").exists()
    assert "no report written" in capsys.readouterr().out


def test_calibrate_help_first_screen_shows_the_main_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--help"])
    assert exc.value.code in (0, None)
    help_text = capsys.readouterr().out
    first = help_text.splitlines()[:40]
    for flag in ("--config", "--base", "--experts", "--merge_method", "--merge_options", "--calibration",
                 "--output_dir"):
        row = next((ln for ln in first if ln.strip().startswith((flag, f"-c, {flag}"))), None)
        assert row is not None and len(row.split()) > 3, f"{flag} has no one-line help in the first screen"
    assert any(ln.strip().startswith("magic-pl calibrate -c configs/tiny.yaml") for ln in first)  # an example
    from magic_pl.calibration import PRESETS
    from magic_pl.merging import MERGE_METHODS

    screen = " ".join(" ".join(first).split())
    assert all(m in screen for m in MERGE_METHODS) and all(p in screen for p in PRESETS)
    # then the full jsonargparse list, with the shortcuts documented there too
    rest = "\n".join(help_text.splitlines()[40:])
    assert "--trainer.accelerator" in rest and "--model.help" in rest and "--base PATH" in rest


def test_main_help_lists_every_subcommand_with_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "calibrate", "benchmark", "merge"):
        assert re.search(rf"^\s+{sub}\s+\S", out, re.M), f"{sub} not listed with a description"
    assert re.search(r"^\s+benchmark\s+Run the offline real-data benchmark", out, re.M)


def test_benchmark_subcommand_forwards_to_zoo(monkeypatch, tmp_path, capsys):
    calls = []

    def run_benchmark(suite: str = "text", methods: tuple[str, ...] = ("task_arithmetic",), samples: int = 1,
                      output_dir: str = "results"):
        """Run a built-in offline benchmark suite."""
        calls.append(dict(suite=suite, methods=list(methods), samples=samples, output_dir=output_dir))
        (tmp_path / "results.md").write_text("| the table |\n")
        return {"ok": True, "files": {"markdown": str(tmp_path / "results.md")}}

    import magic_pl.zoo

    monkeypatch.setattr(magic_pl.zoo, "run_benchmark", run_benchmark, raising=False)
    main(["benchmark", "--suite", "vision", "--methods", "[ties, dare]", "--samples", "4"])
    assert calls == [dict(suite="vision", methods=["ties", "dare"], samples=4, output_dir="results")]
    out = capsys.readouterr().out  # the report is printed, and where the files went
    assert "| the table |" in out and "written:" in out and "results.md" in out


def test_no_config_runs_the_synthetic_demo_and_its_printed_config_runs_without_seed_warnings(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["calibrate", "--print_config"])
    printed = capsys.readouterr().out
    assert "magic_pl.lightning.demo.DemoAdapter" in printed
    assert yaml.safe_load(printed)["seed_everything"] == 0  # not `true`, which warns "No seed found" on every run
    (tmp_path / "demo.yaml").write_text(printed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["calibrate", "-c", "demo.yaml", "--output_dir", "demo_out"])
    assert not [w for w in caught if "seed" in str(w.message).lower()], [str(w.message) for w in caught]
    report = json.loads((tmp_path / "demo_out" / "calibration_report.json").read_text())
    assert report["task_names"] == ["task0", "task1", "task2"]
    # the demo names no recipe: the recommended one for its data's samples per task
    rec = recommended(yaml.safe_load(printed)["data"]["init_args"]["samples_per_task"])
    assert (report["config"]["merge_method"], report["config"]["calibration"]) == (rec.merge_method, rec.calibration)
    assert report["config"]["recommended"].startswith(f"{rec.merge_method} + {rec.calibration}, the recommended")
    if "fsc" in rec.calibration:
        assert set(report["coefficients"]) == {"fc1", "norm", "fc2"}
    assert {p.name for p in tmp_path.iterdir()} == {"demo.yaml", "demo_out"}
    # a user config replaces the demo entirely (nothing of it leaks in)
    from magic_pl.lightning.cli import with_demo_config

    assert with_demo_config(["calibrate", "-c", "x.yaml"]) == ["calibrate", "-c", "x.yaml"]
    assert with_demo_config(["benchmark"]) == ["benchmark"]


@pytest.mark.slow
def test_console_script_on_a_fresh_clone(tmp_path, tiny_cache):
    """The acceptance run as a user does it: a clean copy of the repository, the console entry point, a new process."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copy(CONFIGS / "tiny.yaml", clone / "configs" / "tiny.yaml")  # the working tree's version
    before = _tree(clone)
    env = {**os.environ, "MAGIC_PL_CACHE": str(tiny_cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "from magic_pl._entry import main; main()", "calibrate", "-c",
                           "configs/tiny.yaml", "--output_dir", "out"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = _tree(clone) - before
    assert all(p == "out" or p.startswith("out/") for p in new), sorted(new)
    assert (clone / "out" / "model" / "model.safetensors").is_file()
    assert re.search(r"^xi: 14 modules, mean [\d.]+, min [\d.]+, max [\d.]+$", proc.stdout, re.M)


@pytest.mark.parametrize("argv,shows", [
    (["--data.test.help", "HFDataset"], "--test.text_column"),
    (["--model.adapter.help", "TimmAdapter"], "--adapter.model_name"),
    (["-c", "configs/tiny.yaml", "--data.calibration.help", "HFDataset"], "--calibration.label_column"),
])
def test_nested_class_help_works_without_naming_the_data_or_model_class(fresh, capsys, argv, shows):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", *argv])
    assert exc.value.code == 0
    assert shows in capsys.readouterr().out


def test_class_help_keeps_subclass_lists_short(fresh, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "-c", "configs/tiny.yaml", "--model.help", "MagicModule"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 300  # 2,800 lines when every torch module class was listed for `model`
    assert "magic_pl.models.SequenceClassificationAdapter" in out  # magic-pl's own classes are all named
    assert re.search(r",\s+and\s+\d+\s+more\)", out)  # the others: three named (which depends on imports)


def test_a_users_config_yaml_in_the_working_directory_is_left_alone(fresh, capsys):
    # without a logger Lightning's log directory is the working directory; its config.yaml is the user's
    (fresh / "config.yaml").write_text("mine: true\n")
    main(["calibrate", "--calibration", "wsc", "--trainer.logger", "false"])
    assert (fresh / "config.yaml").read_text() == "mine: true\n"
    assert "xi: none" in capsys.readouterr().out
