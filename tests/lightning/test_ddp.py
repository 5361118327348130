"""Exactness under DDP: 2 CPU processes (gloo) give the same xi, weights and per-task accuracy as 1 process.

The 2-process run is the real command line (``python -m magic_pl.lightning.cli calibrate ... --trainer.strategy ddp``:
Lightning starts the second process itself); the test sets have odd sizes (21 and 20 samples, 41 in all), so a padded
sampler would count a duplicate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_helpers import CONFIGS


def _run(workdir: Path, out: str, *extra: str, devices: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONWARNINGS"] = "ignore"
    # Lightning gives each of N local processes cores/N intra-op threads; a different thread count changes the float
    # summation order inside matmuls (1 ulp). One thread everywhere makes the comparison exact.
    env["OMP_NUM_THREADS"] = "1"
    env["MAGIC_PL_CACHE"] = str(workdir / "cache")  # the tiny config's inputs, built once per test
    strategy = ["--trainer.strategy", "ddp"] if devices > 1 else []
    cmd = [sys.executable, "-m", "magic_pl.lightning.cli", "calibrate", "-c", str(CONFIGS / "tiny.yaml"),
           "--trainer.devices", str(devices), *strategy, "--output_dir", out, *extra]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("calibration", ["dsc", "auto"])
def test_two_process_ddp_equals_one_process(tiny_workdir, calibration):
    """DSC, and the recommended setting whose label-free probe scores are summed over processes too."""
    extra = ("--model.init_args.calibration", calibration)
    proc = _run(tiny_workdir, "ddp2", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _run(tiny_workdir, "one", *extra, devices=1)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one = json.loads((tiny_workdir / "one" / "calibration_report.json").read_text())
    two = json.loads((tiny_workdir / "ddp2" / "calibration_report.json").read_text())
    assert two["config"]["trainer"]["world_size"] == 2 and one["config"]["trainer"]["world_size"] == 1
    assert one["config"]["calibration"] == two["config"]["calibration"] == (
        "fsc:sensitive=detect" if calibration == "auto" else "dsc")
    assert one["config"].get("sensitive_detected") == two["config"].get("sensitive_detected")
    assert (calibration == "auto") == bool(two["config"].get("sensitive_detected"))
    xi1, xi2 = one["coefficients"], two["coefficients"]
    assert xi1.keys() == xi2.keys() and len(xi1) > 0
    assert max(abs(xi1[k] - xi2[k]) for k in xi1) <= 1e-6
    # identical weights, bit for bit
    w1 = load_file(str(tiny_workdir / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tiny_workdir / "ddp2" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    fsc1, fsc2 = ([s for s in r["steps"] if s["step"] == "fsc"][0] for r in (one, two))
    assert fsc1["samples_per_task"] == fsc2["samples_per_task"] == [2, 2]  # summed over both processes
    # per-task accuracy: exactly equal, every test sample counted once
    assert one["metrics"] == two["metrics"] and set(two["metrics"]) == {"test/acc/a", "test/acc/b", "test/acc/avg"}
    for task, n in (("a", 21), ("b", 20)):
        acc = two["metrics"][f"test/acc/{task}"]
        assert abs(acc * n - round(acc * n)) < 1e-9  # a whole number of correct samples out of n


def test_two_process_regmean_then_fsc_equals_one_process(tiny_workdir):
    """A data-based merge under DDP: one sample per task, so each process holds only one task's sample; the Gram
    sums and row counts are summed over processes before the solve, then FSC runs on the merged model."""
    extra = ("--merge_method", "regmean", "--merge_options", "{}", "--calibration", "fsc",
             "--data.init_args.samples_per_task", "1")
    for out, devices in (("rm2", 2), ("rm1", 1)):
        proc = _run(tiny_workdir, out, *extra, devices=devices)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.loads((tiny_workdir / "rm1" / "calibration_report.json").read_text())
    two = json.loads((tiny_workdir / "rm2" / "calibration_report.json").read_text())
    assert [s["step"] for s in one["steps"]][:2] == ["load", "merge"]
    assert [s for s in two["steps"] if s["step"] == "merge"][0]["samples"] == 1  # this process's share
    xi1, xi2 = one["coefficients"], two["coefficients"]
    assert xi1.keys() == xi2.keys() and max(abs(xi1[k] - xi2[k]) for k in xi1) <= 1e-6
    w1 = load_file(str(tiny_workdir / "rm1" / "model" / "model.safetensors"))
    w2 = load_file(str(tiny_workdir / "rm2" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:  # Gram sums added in another order (float64): equal to float32 rounding
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-6, atol=1e-7)
    assert one["metrics"] == two["metrics"]


@pytest.mark.slow
def test_fewer_calibration_samples_than_processes_fails_before_work(tiny_workdir):
    """Real 3-process launch (slow; the same check is unit-tested in test_module / test_data)."""
    # 2 tasks x 1 sample, 3 processes
    proc = _run(tiny_workdir, "few", "--trainer.devices", "3", "--data.init_args.samples_per_task", "1")
    assert proc.returncode != 0
    assert "has 2 sample(s) but the run uses 3 processes" in proc.stderr
    assert "Merge" not in proc.stderr and not (tiny_workdir / "few" / "model").exists()
