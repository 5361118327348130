"""Sharded calibration on Lightning's own engine: ``ModelParallelStrategy`` (torch FSDP2, CPU/gloo) over 2 processes
gives one process's xi and weights, while each rank holds half of the merged body.

Both runs are real launches of a small script (Lightning starts the second process itself, as under ``ddp``) on tiny
Llama checkpoints; under the strategy's defaults both ranks see every calibration sample, one of them counts it.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from model_fixtures import llama_config  # noqa: E402

#: name -> (merge method, options, calibration): TIES merges whole tensors (each rank keeps its rows), task arithmetic
#: row by row (each rank reads only its own rows); DSC's WSC runs inside the merge, key by key
SETTINGS = {"fsc": ["ties", {"density": 0.5}, "fsc"],
            "fsc_channel": ["ties", {"density": 0.5}, "fsc:granularity=channel"],
            "dsc_rows": ["task_arithmetic", {"scale": 0.5}, "dsc"]}

_SCRIPT = r'''
import json, sys
from pathlib import Path

root, out, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
settings = json.loads(sys.argv[4])
from lightning.pytorch.strategies import ModelParallelStrategy
from magic_pl.lightning import HFDataset, MagicModule, TaskDataModule
from magic_pl.lightning.sharding import sharded_parameter_numel
from magic_pl.lightning.trainer import MagicTrainer
from magic_pl.models import CausalLMAdapter

loads = []  # the whole base model loaded: never, when merging into shards
whole_load = CausalLMAdapter.load_base
CausalLMAdapter.load_base = lambda self: loads.append(1) or whole_load(self)
tasks = ["a", "b"]
for name, (method, options, calibration) in settings.items():
    loads.clear()
    adapter = CausalLMAdapter(str(root / "base"), [str(root / t) for t in tasks], task_names=tasks)
    model = MagicModule(adapter=adapter, merge_method=method, merge_options=options, calibration=calibration)
    data = TaskDataModule(task_names=tasks, samples_per_task=2, calibration={
        t: HFDataset(str(root / f"{t}.txt"), tokenizer=str(root / "base"), label_column=None) for t in tasks})
    strategy = ModelParallelStrategy() if devices > 1 else "auto"
    trainer = MagicTrainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                           enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.calibrate(model, datamodule=data, output_dir=str(out / name), evaluate=False, hash_inputs=False,
                      model_card=False)
    local, total = sharded_parameter_numel(model.model)
    result = model.run.result
    (out / f"{name}.rank{trainer.global_rank}.json").write_text(json.dumps({
        "sharded": model.is_sharded, "local": local, "total": total, "coefficients": result.coefficients,
        "channels": result.channel_coefficients, "samples": result.samples_per_task, "base_loads": len(loads),
        "wsc": result.wsc_scales}))
'''




def _launch(root: Path, out: Path, devices: int) -> None:
    script = root / "run_sharded.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # one thread: the same float summation order
    proc = subprocess.run([sys.executable, str(script), str(root), str(out), str(devices), json.dumps(SETTINGS)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.timeout(600)
def test_model_parallel_strategy_equals_one_process(llama_files):
    one, two = llama_files / "one", llama_files / "two"
    _launch(llama_files, one, devices=1)
    _launch(llama_files, two, devices=2)
    for name in SETTINGS:
        single = json.loads((one / f"{name}.rank0.json").read_text())
        ranks = [json.loads((two / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        assert not single["sharded"] and all(r["sharded"] for r in ranks)
        # each sample counted once: both ranks ran all 4 samples, one of them counted them
        assert single["samples"] == [2, 2] and all(r["samples"] == [2, 2] for r in ranks)
        # one process loads the base model; the shards are filled from the checkpoints, no rank loads it whole
        assert single["base_loads"] == 1 and all(r["base_loads"] == 0 for r in ranks)
        assert all(r["wsc"].keys() == single["wsc"].keys() for r in ranks)
        assert all(abs(r["wsc"][k] - v) <= 1e-6 for r in ranks for k, v in single["wsc"].items())
        assert bool(single["wsc"]) == (name == "dsc_rows")
        xi1 = single["coefficients"]
        assert xi1 and any(abs(v - 1.0) > 1e-3 for v in xi1.values())  # the calibration did something
        for r in ranks:
            assert r["coefficients"].keys() == xi1.keys()
            assert max(abs(r["coefficients"][k] - xi1[k]) for k in xi1) <= 1e-6
            assert r["channels"].keys() == single["channels"].keys()
            for k, v in single["channels"].items():
                assert max(abs(a - b) for a, b in zip(r["channels"][k], v)) <= 1e-6 and len(v) == len(
                    r["channels"][k])
        if name == "fsc_channel":
            assert single["channels"]  # per-channel xi, sliced per shard in the fold
        # the merged body is split: each rank holds about half of it, together all of it
        total = single["total"]
        assert all(r["total"] == total for r in ranks) and sum(r["local"] for r in ranks) == total
        assert all(0.45 <= r["local"] / total <= 0.55 for r in ranks)
        # the gathered weights written by rank 0 equal one process's
        w1 = load_file(one / name / "model" / "model.safetensors")
        w2 = load_file(two / name / "model" / "model.safetensors")
        assert w1.keys() == w2.keys()
        # written tensor by tensor from the shards, in save_pretrained's layout: the same files and config
        files = {p.name for p in (one / name / "model").iterdir()} - {"README.md", ".magic-pl.json"}
        assert files == {p.name for p in (two / name / "model").iterdir()} - {"README.md", ".magic-pl.json"}
        assert json.loads((two / name / "model" / "config.json").read_text()) == json.loads(
            (one / name / "model" / "config.json").read_text())
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)
        report = json.loads((two / name / "calibration_report.json").read_text())
        shard = [s for s in report["steps"] if s["step"] == "shard"]
        assert shard and shard[0]["blocks"] == 2 and shard[0]["processes"] == 2
        merge = next(s for s in report["steps"] if s["step"] == "merge")
        assert merge["into_shards"] is True
        # task arithmetic is row-separable: rank 0 read about half of every tensor's rows; TIES needs them all
        assert merge["rows_read"] == pytest.approx(0.5, abs=0.05) if name == "dsc_rows" else merge["rows_read"] == 1
        one_report = json.loads((one / name / "calibration_report.json").read_text())
        for when in ("before", "after"):  # the magnitudes, summed over the shards: one process's
            got, want = report["magnitude_deviation"][when], one_report["magnitude_deviation"][when]
            assert want and got.keys() == want.keys(), when
            assert all(abs(got[m] - v) <= 1e-6 * (1 + abs(v)) for m, v in want.items()), when
        assert report["wsc_scales"] == pytest.approx(one_report["wsc_scales"], abs=1e-6)


def test_command_line_model_parallel_dsc_equals_one_process(tiny_workdir):
    """The real command line on the tiny ViT config with ``ModelParallelStrategy`` (DSC: WSC before sharding, FSC on
    shards; evaluation and the comparison runs included): one process's xi, files and accuracies, bit for bit."""
    from test_ddp import _run

    strategy = ("--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}')
    proc = _run(tiny_workdir, "mp2", *strategy)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _run(tiny_workdir, "one", devices=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.loads((tiny_workdir / "one" / "calibration_report.json").read_text())
    two = json.loads((tiny_workdir / "mp2" / "calibration_report.json").read_text())
    assert two["config"]["trainer"]["strategy"] == "ModelParallelStrategy"
    assert [s["step"] for s in two["steps"]] == ["load", "merge", "wsc", "shard", "fsc", "write"]
    assert one["coefficients"] == two["coefficients"] and one["coefficients"]
    assert one["metrics"] == two["metrics"] and one["comparison"]["uncalibrated"] == two["comparison"]["uncalibrated"]
    for f in ("model.safetensors", "a.safetensors", "b.safetensors"):
        w1, w2 = load_file(tiny_workdir / "one" / "model" / f), load_file(tiny_workdir / "mp2" / "model" / f)
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), f


_PIECES = r'''
import copy, os, sys
import torch
import torch.distributed as dist
from torch import nn

rank, store, granularity = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from magic_pl.calibration import FeatureSpaceCalibrator
from magic_pl.lightning.report import delta_norms
from magic_pl.lightning.sharding import full_state_dict, sharded_parameter_numel

torch.manual_seed(0)  # the same model, task vectors and samples on both ranks
base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                     nn.Linear(6 * 4 * 4, 5)).eval()
with torch.no_grad():
    base[1].running_mean.uniform_(-0.5, 0.5)
    base[1].running_var.uniform_(0.5, 1.5)
g = torch.Generator().manual_seed(1)
tvs = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items() if v.is_floating_point()}
       for _ in range(2)]
merged = copy.deepcopy(base)
with torch.no_grad():
    for k, v in merged.state_dict().items():
        if v.is_floating_point():
            v.add_(0.5 * (tvs[0][k] + tvs[1][k]))
samples = [(k, torch.randn(1, 3, 4, 4, generator=g)) for k in (0, 1, 0, 1)]
reference = copy.deepcopy(merged)
base_state = {k: v.clone() for k, v in base.state_dict().items()}

def calibrate(model):
    cal = FeatureSpaceCalibrator(base_state, model, tvs, granularity=granularity)
    for k, x in samples:
        cal.update(k, x)
    return cal.fold()

expected = calibrate(reference)
mesh = init_device_mesh("cpu", (2,))
fully_shard(merged, mesh=mesh)
local, total = sharded_parameter_numel(merged)
assert 0.4 < local / total < 0.6, (local, total)
got = calibrate(merged)  # every rank runs every sample (collective forwards); the statistics are equal on both
assert got.coefficients == expected.coefficients
assert got.folded == expected.folded and got.uncalibrated == expected.uncalibrated
norms = delta_norms(merged.state_dict(), base_state)  # summed over the shards: one process's norms
ref_norms = delta_norms(reference.state_dict(), base_state)
assert norms.keys() == ref_norms.keys() and all(abs(norms[m] - ref_norms[m]) <= 1e-9 * (1 + ref_norms[m])
                                                for m in norms), (norms, ref_norms)
state = full_state_dict(merged)
if rank == 0:
    want = reference.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        assert torch.equal(state[k], want[k]), k
else:
    assert state == {}
print("OK", flush=True)
dist.barrier()  # leave together, close the group and skip the interpreter's teardown, where gloo's threads can abort
dist.destroy_process_group()
os._exit(0)
'''


@pytest.mark.timeout(240)
@pytest.mark.parametrize("granularity", ["module", "channel"])
def test_fold_on_fsdp2_shards_equals_one_process(tmp_path, granularity):
    """Plain torch FSDP2, 2 gloo processes, a Conv + BatchNorm + Linear body (uneven shards; BatchNorm's running
    statistics stay whole while its weight and bias are sharded): the fold on local shards, the uncalibrated-key check
    and the deviation norms over shards equal one process, and the gathered state dict is the one-process model."""
    script = tmp_path / "pieces.py"
    script.write_text(_PIECES)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store"), granularity],
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
        assert p.returncode == 0 and out.startswith("OK"), f"rank {rank}: rc {p.returncode}\n{out}\n{err[-3000:]}"


def test_repeated_blocks_are_a_models_layers():
    from torch import nn
    from transformers import LlamaForCausalLM

    from magic_pl.lightning.sharding import repeated_blocks

    llama = LlamaForCausalLM(llama_config(num_hidden_layers=3))
    assert repeated_blocks(llama) == list(llama.model.layers)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.ReLU())
    assert repeated_blocks(mixed) == []  # no two blocks of one class: the root group holds everything
    nested = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(2)])
    assert repeated_blocks(nested) == list(nested)  # outermost blocks only


@pytest.mark.parametrize("calibration, refused", [
    ("fsc", None), ("dsc", None), ("fsc:granularity=channel", None), ("wsc", None),
    ("fsc:sensitive=detect", "detecting the sensitive set"), ("featcal", "the feature step 'featcal'"),
])
def test_steps_that_need_the_whole_model_are_refused_before_sharding(calibration, refused):
    from magic_pl.calibration import resolve_setting
    from magic_pl.lightning.pipeline import CalibrationRun

    run = CalibrationRun(resolve_setting(calibration))
    if refused is None:
        run.check_shardable()
    else:
        with pytest.raises(ValueError, match=refused):
            run.check_shardable()


def test_fsdp1_is_refused_with_the_way_out():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from magic_pl.lightning.sharding import check_strategy

    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        check_strategy(FSDPStrategy())
    check_strategy(ModelParallelStrategy())  # the supported way
    check_strategy("auto")
