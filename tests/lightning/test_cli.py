"""``magic-pl``: calibrate end to end from the tiny config, --print_config round trip, benchmark forwarding."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from safetensors.torch import load_file

from lightning_helpers import CONFIGS
from magic_pl.lightning.cli import main


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["magic-pl"])  # args are given to main() explicitly


def test_calibrate_tiny_config_end_to_end(tiny_workdir):
    main(["calibrate", "-c", str(CONFIGS / "tiny.yaml"), "--output_dir", "out"])
    out = tiny_workdir / "out"
    report = json.loads((out / "calibration_report.json").read_text())
    assert (out / "calibration_report.png").stat().st_size > 1000
    # the calibrated model in the adapter's (timm) layout, loadable as a plain timm body
    body = load_file(str(out / "model" / "model.safetensors"))
    assert "blocks.0.attn.qkv.weight" in body and "head.weight" not in body
    assert sorted(p.name for p in (out / "model" / "heads").iterdir()) == ["a.safetensors", "b.safetensors"]
    # report contents
    assert report["task_names"] == ["a", "b"]
    assert report["config"]["calibration"] == "dsc" and report["config"]["merge_options"] == {"scale": 0.3}
    xi = report["coefficients"]
    assert len(xi) == 14 and all(v > 0 for v in xi.values())
    assert set(report["modules"]["folded"]) == set(xi) and report["modules"]["wrapped"] == []
    assert report["inputs"]["base"]["sha256"] and len(report["inputs"]["experts"]) == 2
    assert {s["step"] for s in report["steps"]} >= {"load", "merge", "wsc", "fsc", "write"}
    dev = report["magnitude_deviation"]
    assert dev["mean_before"] < 0.7 < dev["mean_after"]  # TA 0.3 x 2 experts shrinks; MAGIC restores ~1
    assert set(report["metrics"]) == {"test/acc/a", "test/acc/b", "test/acc/avg"}
    # CSV logger by default, config saved
    metrics_csv = list((tiny_workdir / "tiny_logs").rglob("metrics.csv"))
    assert metrics_csv and "test/acc/avg" in metrics_csv[0].read_text()


def test_print_config_runs_as_is(tiny_workdir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "-c", str(CONFIGS / "tiny.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["class_path"] == "magic_pl.lightning.MagicModule" and cfg["output_dir"] == "tiny_out"
    (tiny_workdir / "printed.yaml").write_text(printed)
    main(["calibrate", "-c", "printed.yaml", "--evaluate", "false", "--report", "false"])
    assert (tiny_workdir / "tiny_out" / "model" / "model.safetensors").is_file()
    assert not (tiny_workdir / "tiny_out" / "calibration_report.json").exists()


def test_calibrate_without_fsc_or_evaluation_still_saves(tiny_workdir):
    main(["calibrate", "-c", str(CONFIGS / "tiny.yaml"), "--model.init_args.calibration", "wsc",
          "--evaluate", "false", "--output_dir", "wsc_out"])
    report = json.loads((tiny_workdir / "wsc_out" / "calibration_report.json").read_text())
    assert report["coefficients"] == {} and report["wsc_scales"]
    assert "fsc" not in {s["step"] for s in report["steps"]}
    assert (tiny_workdir / "wsc_out" / "model" / "model.safetensors").is_file()


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


def test_help_lists_calibrate(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "calibrate" in out and "benchmark" in out


def test_no_config_runs_the_synthetic_demo_and_its_printed_config_runs_as_is(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["calibrate", "--print_config"])
    printed = capsys.readouterr().out
    assert "magic_pl.lightning.demo.DemoAdapter" in printed
    (tmp_path / "demo.yaml").write_text(printed)
    main(["calibrate", "-c", "demo.yaml", "--output_dir", "demo_out"])
    report = json.loads((tmp_path / "demo_out" / "calibration_report.json").read_text())
    assert report["task_names"] == ["task0", "task1", "task2"] and set(report["coefficients"]) == {"fc1", "norm", "fc2"}
    # a user config replaces the demo entirely (nothing of it leaks in)
    from magic_pl.lightning.cli import with_demo_config

    assert with_demo_config(["calibrate", "-c", "x.yaml"]) == ["calibrate", "-c", "x.yaml"]
    assert with_demo_config(["benchmark"]) == ["benchmark"]
