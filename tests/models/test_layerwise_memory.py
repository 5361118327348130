"""A model bigger than an imposed memory budget calibrates with the layer-by-layer path.

A random Llama of about 129 MB in float32 (20 blocks of 6.3 MB) and two experts are written to disk. A child process
imports torch / transformers / magic_pl, reads its own data segment size and caps it with ``RLIMIT_DATA`` at that plus
half a model copy; under the cap :func:`~magic_pl.models.layerwise.layerwise_fsc` must succeed and write the weights
an uncapped run writes, while loading the whole model (``from_pretrained`` in float32, plus one expert) must be refused.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import llama_config, perturb

from magic_pl.models.layerwise import layerwise_fsc
from magic_pl.statedict import load_state_dict

ROOT = Path(__file__).resolve().parents[2]
K = 2

# Runs in a fresh interpreter: imports first (they are the baseline, not the budget), then the cap, then the two
# attempts. Prints one JSON line.
_CHILD = r'''
import gc, json, resource, sys
import torch

torch.set_num_threads(1)
import transformers.models.llama.modeling_llama  # noqa: F401  (the model code both attempts need)
from transformers import AutoModelForCausalLM

from magic_pl.models.layerwise import layerwise_fsc
from magic_pl.statedict import load_state_dict

root, budget = sys.argv[1], int(sys.argv[2])
samples = torch.load(f"{root}/samples.pt")
experts = [f"{root}/e{i + 1}" for i in range(int(sys.argv[3]))]


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def refused(exc):
    # Python raises MemoryError; torch's CPU allocator and safetensors' mmap raise RuntimeError/OSError with ENOMEM
    text = str(exc)
    return isinstance(exc, MemoryError) or "allocate memory" in text or "Cannot allocate" in text


gc.collect()
base_data = status("VmData")
resource.setrlimit(resource.RLIMIT_DATA, (base_data + budget, resource.RLIM_INFINITY))
out = {"base_data": base_data, "limit": resource.getrlimit(resource.RLIMIT_DATA)[0]}

report = layerwise_fsc(f"{root}/base", experts, samples, f"{root}/limited", device="cpu", chunk_bytes="1MB",
                       max_shard_size="32MB", copy_support=False)
out.update(layerwise="ok", peak_segment_bytes=report.peak_segment_bytes, coefficients=report.coefficients,
           data_after_layerwise=status("VmData"))
del report
gc.collect()

stage = "base"
try:
    model = AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32)
    stage = "expert"
    expert = {k: v.clone() for k, v in load_state_dict(experts[0]).items()}
    out["whole"] = "ok"
except Exception as exc:  # re-raised unless it is the cap
    if not refused(exc):
        raise
    out["whole"] = f"refused at the {stage}: {type(exc).__name__}: {str(exc)[:200]}"
print(json.dumps(out), flush=True)
'''


def _family(root: Path) -> int:
    """Base + K experts (base + seeded noise) of a random Llama, float32 safetensors; returns one model's bytes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # 20 blocks of 1.57M parameters and a 1000-word vocabulary: 32.2M parameters, 129 MB in float32, written in a few
    # seconds; a block is 1/20 of the model, so the layer path's (K + 2) block copies are a fifth of it
    config = llama_config(vocab_size=1000, hidden_size=384, intermediate_size=1024, num_hidden_layers=20,
                          num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    for i in range(K + 1):
        m = model if i == 0 else perturb(copy.deepcopy(model), seed=i, scale=0.05)
        m.save_pretrained(root / ("base" if i == 0 else f"e{i}"))
        del m
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA on anonymous mmaps is Linux's (>= 4.7)")
@pytest.mark.timeout(300)
def test_model_above_the_memory_budget_calibrates_layer_by_layer(tmp_path):
    model_bytes = _family(tmp_path)
    samples = {t: [torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(t))] for t in range(K)}
    torch.save(samples, tmp_path / "samples.pt")
    experts = [tmp_path / f"e{i + 1}" for i in range(K)]

    # the reference: the same call in this process, uncapped
    ref = layerwise_fsc(tmp_path / "base", experts, samples, tmp_path / "reference", device="cpu", chunk_bytes="1MB",
                        max_shard_size="32MB", copy_support=False)

    # The budget, over the child's data segment after its imports: half of one float32 model copy (64 MB). The layer
    # path needs (K + 2) copies of the largest segment (base, K task vectors, merged: 4 x 6.3 MB = 25 MB, measured
    # below as peak_segment_bytes) plus heap the allocator keeps between segments (about 14 MB) and per-key
    # temporaries: in trials it succeeded at 50 MB and up, and failed at 40 MB in some runs. A whole-model load needs
    # at least one model copy (129 MB) before anything else.
    budget = model_bytes // 2
    assert ref.model_bytes == model_bytes and model_bytes > 120e6
    assert ref.peak_segment_bytes <= (K + 2) * ref.max_segment_bytes < budget / 2

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_", "MKL_"))}
    env.update(
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",  # no thread pool: each thread's stack is writable private memory the cap counts
        # One malloc arena: an allocation from another thread would open an arena of its own, with its own heap
        # counted by the cap and free space the main arena cannot reuse.
        MALLOC_ARENA_MAX="1",
        # A fixed mmap threshold: every allocation of 64 KB or more (each tensor here) is its own mapping, unmapped
        # when freed, so the data segment follows the live tensors. With glibc's default dynamic threshold, freed
        # tensors raise the threshold and later ones land in the brk heap, whose fragmented top is kept: the outcome
        # near the cap then depends on address-space layout.
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="131072",
        MALLOC_TOP_PAD_="0",
    )
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(budget), str(K)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    # the cap was set where intended, and it bites: one float32 model copy does not fit under it
    assert got["limit"] == got["base_data"] + budget
    assert got["whole"].startswith("refused at the base"), got["whole"]
    # the layer path succeeded under it, with the segment residency the budget was derived from
    assert got["layerwise"] == "ok" and got["peak_segment_bytes"] == ref.peak_segment_bytes

    # and wrote the uncapped run's model (the child computes with one thread; the reference may use more)
    assert got["coefficients"].keys() == ref.coefficients.keys()
    for name, xi in ref.coefficients.items():
        assert got["coefficients"][name] == pytest.approx(xi, rel=1e-6), name
    limited, reference = load_state_dict(tmp_path / "limited"), load_state_dict(tmp_path / "reference")
    assert set(limited.keys()) == set(reference.keys())
    for key in reference.keys():
        torch.testing.assert_close(limited[key], reference[key], rtol=0, atol=1e-6, msg=key)
