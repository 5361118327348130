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
from lightning_helpers import CONFIGS
from safetensors.torch import load_file


def _run(workdir: Path, out: str, *extra: str, devices: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
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


def test_two_process_featcal_equals_one_process(tiny_workdir):
    """FeatCal under DDP: one sample per task, so each process holds only one task's sample; each block's statistics
    are summed over processes (one reduce) before its solve, so both processes write the one-process weights."""
    extra = ("--calibration", "featcal", "--data.init_args.samples_per_task", "1")
    for out, devices in (("fc2", 2), ("fc1", 1)):
        proc = _run(tiny_workdir, out, *extra, devices=devices)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.loads((tiny_workdir / "fc1" / "calibration_report.json").read_text())
    two = json.loads((tiny_workdir / "fc2" / "calibration_report.json").read_text())
    steps1, steps2 = ([s for s in r["steps"] if s["step"] == "featcal"][0] for r in (one, two))
    assert steps1["samples_per_task"] == steps2["samples_per_task"] == [1, 1]  # summed over both processes
    assert steps1["rounds"] == steps2["rounds"] == 2 and steps1["modules"] == steps2["modules"] > 0
    w1 = load_file(str(tiny_workdir / "fc1" / "model" / "model.safetensors"))
    w2 = load_file(str(tiny_workdir / "fc2" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:  # float32 sums added in another order: equal to float32 rounding
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)
    assert one["metrics"] == two["metrics"]


@pytest.mark.slow
def test_fewer_calibration_samples_than_processes_fails_before_work(tiny_workdir):
    """Real 3-process launch (slow; the same check is unit-tested in test_module / test_data)."""
    # 2 tasks x 1 sample, 3 processes
    proc = _run(tiny_workdir, "few", "--trainer.devices", "3", "--data.init_args.samples_per_task", "1")
    assert proc.returncode != 0
    assert "has 2 sample(s) but the run uses 3 processes" in proc.stderr
    assert "Merge" not in proc.stderr and not (tiny_workdir / "few" / "model").exists()


_NONFINITE_RANK = r'''
import copy, os, sys
import torch
import torch.distributed as dist
from torch import nn

rank, store, mode, statistic = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
from magic_pl.calibration import FeatureSpaceCalibrator
from magic_pl.calibration.fsc import CalibrationDataError
from magic_pl.lightning.statistics import FeatureStatisticsCollector

torch.manual_seed(0)  # the same model and task vectors on both ranks
base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
g = torch.Generator().manual_seed(1)
tvs = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()} for _ in range(2)]
merged = copy.deepcopy(base)
with torch.no_grad():
    for k, v in merged.state_dict().items():
        v.add_(0.5 * (tvs[0][k] + tvs[1][k]))
cal = FeatureSpaceCalibrator(base, merged, tvs, mode=mode, statistic=statistic, task_names=["a", "b"])
collector = FeatureStatisticsCollector(cal)
assert not cal.raise_at_update  # two processes: the check waits for the sum
x = torch.randn(2, 6, generator=torch.Generator().manual_seed(10 + rank))
if rank == 1:
    x[1, 0] = float("nan")  # task "b", on this rank only
collector.update(torch.tensor([0, 1]), x)
try:
    collector.finish()
    result = "NO ERROR"
except CalibrationDataError as e:
    result = f"RAISED {e}"
print(result, flush=True)
# both ranks leave together; then exit without the interpreter's teardown, where gloo's threads can abort the process
# ("terminate called without an active exception") after the result is already printed
dist.barrier()
dist.destroy_process_group()
os._exit(0 if result.startswith("RAISED") else 3)
'''


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_nonfinite_data_on_one_rank_raises_on_every_rank(tmp_path, mode):
    """2 gloo processes, a NaN in task "b"'s sample on rank 1 only: both ranks raise CalibrationDataError naming the
    task and the module after the one sum (rank 1 must not raise alone at its update: rank 0 would wait forever)."""
    script = tmp_path / "rank.py"
    script.write_text(_NONFINITE_RANK)
    launcher = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    statistic = "mean_of_ratios" if mode == "parallel" else "ratio_of_means"
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store"), mode, statistic],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: end our own processes
                p.kill()
                p.wait()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: rc {p.returncode}\n{out}\n{err[-3000:]}"
        assert out.startswith("RAISED") and "task 'b'" in out and "module '0'" in out, out
    assert "not from this process's samples" in outs[0][0] and "at 1 position(s)" in outs[1][0]
