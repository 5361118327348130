"""Parity and speed of magic-pl's merge methods and rescalers against FusionBench and MergeKit; prints JSON.

Runs every method magic-pl shares with a peer on the same task vectors: ViT-B/32-shaped (open_clip visual tower,
``--blocks`` of its 12 residual blocks, the 4-D conv stem left out because FusionBench averages 4-D tensors where
magic-pl treats them as matrices) and one Llama-shaped decoder block (TinyLlama-1.1B's widths by default). The task
vectors are "fine-tuning-like": per matrix a shared and a task-specific part, each with a power-law spectrum.

Per method: ``max_rel_diff`` = max |ours - peer| / max |peer| over all keys compared, and ``time_ratio`` = our time /
the peer's, both timed in this process, interleaved (ours, peer, ours, peer ...; the best of ``--repeats`` each).
Needs the peers importable (a separate venv, never a dependency of magic-pl)::

    PYTHONPATH=. /root/peers/bin/python benchmarks/bench_vs_peers.py --blocks 2 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import vit_b32_shapes  # noqa: E402

from magic_pl.calibration.svc import singular_value_calibration  # noqa: E402
from magic_pl.calibration.wsc import wsc_keys  # noqa: E402
from magic_pl.merging import merge  # noqa: E402
from magic_pl.merging._common import DEFAULT_MATRIX_EXCLUDE, derive_seed  # noqa: E402

SD = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------
def vit_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    keep = {f"transformer.resblocks.{i}." for i in range(blocks)}
    out = {}
    for k, s in vit_b32_shapes(1.0).items():
        if k == "conv1.weight":
            continue
        if "resblocks." in k and not any(k.startswith(p) for p in keep):
            continue
        out[k] = s
    return out


def llama_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, ...]]:
    p = "model.layers.0."
    return {
        p + "input_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (hidden, hidden),
        p + "self_attn.k_proj.weight": (kv, hidden),
        p + "self_attn.v_proj.weight": (kv, hidden),
        p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "post_attention_layernorm.weight": (hidden,),
        p + "mlp.gate_proj.weight": (intermediate, hidden),
        p + "mlp.up_proj.weight": (intermediate, hidden),
        p + "mlp.down_proj.weight": (hidden, intermediate),
    }


def _gen(*parts: object) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _power_law(shape: tuple[int, int], gen: torch.Generator, rank: int) -> torch.Tensor:
    """``(G1 * s) @ G2`` with ``s_i = (i + 1)^-1``: a decaying spectrum, the scale of fine-tuning deltas."""
    m, n = shape
    s = torch.arange(1, rank + 1, dtype=torch.float32).pow_(-1.0)
    left = torch.randn(m, rank, generator=gen) * s
    return (left @ torch.randn(rank, n, generator=gen)).mul_(1e-3 / rank**0.5)


def task_vectors(shapes: dict[str, tuple[int, ...]], k: int, rank: int) -> list[SD]:
    out: list[SD] = [{} for _ in range(k)]
    for key, shape in shapes.items():
        if len(shape) == 2 and not key.endswith("positional_embedding"):
            r = min(rank, *shape)
            shared = _power_law(shape, _gen("shared", key), r)
            for t in range(k):
                out[t][key] = shared * 0.5 + _power_law(shape, _gen(t, key), r)
        else:
            for t in range(k):
                out[t][key] = torch.randn(shape, generator=_gen(t, key)).mul_(1e-4)
    return out


def base_weights(shapes: dict[str, tuple[int, ...]]) -> SD:
    return {k: torch.randn(s, generator=_gen("base", k)).mul_(0.02) for k, s in shapes.items()}


# --------------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------------
def max_rel_diff(ours: SD, peer: SD, keys: list[str]) -> float:
    num = max(float((ours[k].float() - peer[k].float()).abs().max()) for k in keys)
    den = max(float(peer[k].float().abs().max()) for k in keys)
    return num / den if den > 0 else num


def timed(fn: Callable[[], SD]) -> tuple[SD, float]:
    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):  # the peers print per key
        out = fn()
    return out, time.perf_counter() - t0


def compare(ours: Callable[[], SD], peer: Callable[[], SD], keys: list[str] | None, repeats: int) -> dict:
    t_ours, t_peer = [], []
    a = b = None
    for _ in range(repeats):
        a, ta = timed(ours)
        b, tb = timed(peer)
        t_ours.append(ta)
        t_peer.append(tb)
    keys = keys if keys is not None else [k for k in b if k in a]
    return {
        "max_rel_diff": float(f"{max_rel_diff(a, b, keys):.3g}"),
        "ours_s": round(min(t_ours), 3),
        "peer_s": round(min(t_peer), 3),
        "time_ratio": round(min(t_ours) / min(t_peer), 3),
        "keys": len(keys),
    }


# --------------------------------------------------------------------------------------------------------------------
# Peer runners
# --------------------------------------------------------------------------------------------------------------------
def _mk_group(tensors: list[torch.Tensor], base: torch.Tensor, name: str):
    from mergekit.merge_methods.base import TensorGroup

    return TensorGroup.from_tensors([base, *tensors], base_index=0, name=name)


def mk_gta(method: str, tvs: list[SD], **params) -> SD:
    """MergeKit's generalised task arithmetic (ties, della, breadcrumbs, task_arithmetic) on zero base weights, so
    its output is the merged task vector; every model's weight is 1."""
    from mergekit.merge_methods import registry

    m = registry.get(method)
    k = len(tvs)
    per = {p: {i + 1: v for i in range(k)} for p, v in params.items() if p in ("density", "epsilon", "gamma")}
    shared = {p: v for p, v in params.items() if p not in per}
    out = {}
    for key in tvs[0]:
        group = _mk_group([tv[key] for tv in tvs], torch.zeros_like(tvs[0][key]), key)
        kwargs = {"int8_mask": False, "weight": {i + 1: 1.0 for i in range(k)}, **per, **shared}
        out[key] = m.merge_group(group, **kwargs)
    return out


@contextlib.contextmanager
def mk_della_seeded(seed: int):
    """Reseed torch's global generator before each of MergeKit's MagPrune calls with magic-pl's (seed, key, task)
    seed, so both draw the same Bernoulli masks."""
    import mergekit.sparsify as msp

    orig = msp.della_magprune
    state = {"key": None, "task": 0}

    def patched(tensor, density, epsilon, rescale_norm=None):
        torch.manual_seed(derive_seed(seed, state["key"], state["task"]))
        state["task"] += 1
        return orig(tensor, density, epsilon, rescale_norm)

    msp.della_magprune = patched
    try:
        yield state
    finally:
        msp.della_magprune = orig


def mk_della(tvs: list[SD], density: float, epsilon: float, seed: int) -> SD:
    from mergekit.merge_methods import registry

    m = registry.get("della")
    k = len(tvs)
    out = {}
    with mk_della_seeded(seed) as state:
        for key in tvs[0]:
            state["key"], state["task"] = key, 0
            group = _mk_group([tv[key] for tv in tvs], torch.zeros_like(tvs[0][key]), key)
            out[key] = m.merge_group(group, int8_mask=False, normalize=True, rescale=True, **{"lambda": 1.0},
                                     weight={i + 1: 1.0 for i in range(k)}, density={i + 1: density for i in range(k)},
                                     epsilon={i + 1: epsilon for i in range(k)})
    return out


def mk_model_stock(tvs: list[SD]) -> SD:
    from mergekit.merge_methods import registry

    m = registry.get("model_stock")
    return {key: m.merge_group(_mk_group([tv[key] for tv in tvs], torch.zeros_like(tvs[0][key]), key))
            for key in tvs[0]}


def mk_slerp(tvs: list[SD], base: SD, t: float) -> SD:
    from mergekit.merge_methods.slerp import slerp

    return {key: slerp(torch.tensor(t), base[key] + tvs[0][key], base[key] + tvs[1][key]) - base[key] for key in base}


def fb_ties(tvs: list[SD], density: float, global_topk: bool) -> SD:
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        vector_to_state_dict,
    )

    if global_topk:
        flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
        merged = ties_merging(flat, reset_thresh=density, merge_func="mean")
        return dict(vector_to_state_dict(merged, tvs[0]))
    return {key: ties_merging(torch.vstack([tv[key].reshape(-1) for tv in tvs]), reset_thresh=density,
                              merge_func="mean").reshape(tvs[0][key].shape) for key in tvs[0]}


def _fb_exclude(tvs: list[SD]) -> list[str]:
    """The 2-D keys magic-pl averages (embeddings by name), which FusionBench would treat as matrices."""
    import re

    return [k for k, v in tvs[0].items() if v.dim() == 2 and re.search(DEFAULT_MATRIX_EXCLUDE, k)]


def fb_iso_c(tvs: list[SD]) -> SD:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c

    return iso_c(tvs, accelerator="cpu", exclude_keys=_fb_exclude(tvs))


def fb_iso_cts(tvs: list[SD]) -> SD:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

    return iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu", exclude_keys=_fb_exclude(tvs))


def fb_tsv_m(tvs: list[SD]) -> SD:
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    return compute_and_sum_svd_mem_reduction(tvs, exclude_keys=_fb_exclude(tvs), accelerator="cpu")


def fb_wudi(tvs: list[SD], steps: int) -> SD:
    from fusion_bench.method.wudi.wudi import wudi_merging

    out = wudi_merging(tvs, accelerator="cpu", iter_num=steps, exclude_keys=_fb_exclude(tvs))
    return {k: v.detach() for k, v in out.items()}


def fb_svc(merged: SD, tvs: list[SD], keys: list[str], alpha: float) -> SD:
    from fusion_bench.method.singular_value_calibration.utils import (
        subspace_consistency_spectral_calibration_accelerated as svc,
    )

    return {k: svc(base_weight=torch.zeros_like(merged[k]), task_weights=[tv[k] for tv in tvs],
                   merged_weight=merged[k], alpha=alpha, accelerator="cpu") for k in keys}


def fb_model_stock(tvs: list[SD]) -> SD:
    """FusionBench's ModelStock arithmetic (pairwise angles averaged, then the ratio) on zero base weights."""
    from fusion_bench.method.model_stock.model_stock import compute_angle, compute_ratio

    zero = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    sums, n = {}, 0
    for i in range(len(tvs)):
        for j in range(i + 1, len(tvs)):
            for key, angle in compute_angle(tvs[i], tvs[j], zero).items():
                sums[key] = sums.get(key, 0.0) + angle
            n += 1
    ratio = compute_ratio({k: v / n for k, v in sums.items()}, k=len(tvs))
    return {k: sum(tv[k] for tv in tvs) / len(tvs) * float(ratio[k]) for k in tvs[0]}


# --------------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------------
def runs(tvs: list[SD], base: SD, args: argparse.Namespace, heavy: bool) -> dict[str, tuple]:
    """name -> (ours, peer, keys, peer label). ``heavy``: include the SVD and optimisation methods."""
    matrices = [k for k, v in tvs[0].items() if v.dim() == 2]
    two = tvs[:2]
    out = {
        "task_arithmetic": (lambda: merge("task_arithmetic", tvs, scale=0.3),
                            lambda: mk_gta("task_arithmetic", tvs, normalize=False, rescale=False, **{"lambda": 0.3}),
                            None, "mergekit"),
        "ties": (lambda: merge("ties", tvs, density=0.2), lambda: fb_ties(tvs, 0.2, False), None, "fusion_bench"),
        "ties_vs_mergekit": (lambda: merge("ties", tvs, density=0.2),
                             lambda: mk_gta("ties", tvs, normalize=True, rescale=False, density=0.2, **{"lambda": 1.0}),
                             None, "mergekit"),
        "della": (lambda: merge("della", tvs, density=0.5, epsilon=0.15, seed=0),
                  lambda: mk_della(tvs, 0.5, 0.15, 0), None, "mergekit"),
        "breadcrumbs": (lambda: merge("breadcrumbs", tvs, beta=0.85, gamma=0.993, scale=0.3),
                        lambda: mk_gta("breadcrumbs", tvs, normalize=False, rescale=False, density=0.143, gamma=0.007,
                                       **{"lambda": 0.3}), None, "mergekit"),
        "model_stock": (lambda: merge("model_stock", tvs), lambda: mk_model_stock(tvs), None, "mergekit"),
        "model_stock_vs_fusion_bench": (lambda: merge("model_stock", tvs), lambda: fb_model_stock(tvs), None,
                                        "fusion_bench"),
        "slerp_weights": (lambda: merge("slerp", two, base=base, space="weights", t=0.5),
                          lambda: mk_slerp(two, base, 0.5), None, "mergekit"),
    }
    if not heavy:
        return out
    out.update({
        "ties_global": (lambda: merge("ties", tvs, density=0.2, global_topk=True), lambda: fb_ties(tvs, 0.2, True),
                        None, "fusion_bench"),
        "iso_c": (lambda: merge("iso_c", tvs), lambda: fb_iso_c(tvs), None, "fusion_bench"),
        "iso_cts": (lambda: merge("iso_cts", tvs), lambda: fb_iso_cts(tvs), None, "fusion_bench"),
        "tsv_m": (lambda: merge("tsv_m", tvs), lambda: fb_tsv_m(tvs), None, "fusion_bench"),
    })
    one = [k for k in matrices if k.endswith("attn.out_proj.weight")][:1]
    sub = [{k: tv[k] for k in one} for tv in tvs]
    out["wudi"] = (lambda: merge("wudi", sub, steps=args.wudi_steps), lambda: fb_wudi(sub, args.wudi_steps), one,
                   "fusion_bench")
    ta = merge("task_arithmetic", tvs, scale=0.3)
    svc_keys = wsc_keys(ta)  # SVC's default selection: 2-D weights, embeddings excluded
    out["svc_after_task_arithmetic"] = (
        lambda: singular_value_calibration({k: ta[k] for k in svc_keys}, [{k: tv[k] for k in svc_keys} for tv in tvs],
                                           alpha=0.1),
        lambda: fb_svc(ta, tvs, svc_keys, 0.1), svc_keys, "fusion_bench")
    return out


def wudi_cost(steps: int) -> dict:
    """Seconds per 768 x 768 layer (K = 8) for magic-pl's WUDI at ``steps`` steps, on this CPU."""
    tvs = task_vectors({"w": (768, 768)}, 8, 768)
    _, t = timed(lambda: merge("wudi", tvs, steps=steps))
    return {"steps": steps, "seconds_per_768x768_layer": round(t, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="ViT-B/32 residual blocks kept (of 12; default 2)")
    parser.add_argument("--k", type=int, default=8, help="number of task vectors (default 8)")
    parser.add_argument("--rank", type=int, default=768, help="rank of each power-law part (default 768: full)")
    parser.add_argument("--llama", default="2048,5632,256", help="hidden,intermediate,kv widths ('' to skip)")
    parser.add_argument("--llama-heavy", action="store_true", help="also run the SVD methods on the Llama block")
    parser.add_argument("--wudi-steps", type=int, default=30, help="WUDI steps in the parity run (default 30)")
    parser.add_argument("--wudi-cost-steps", type=int, default=300, help="steps for the cost figure (0: skip)")
    parser.add_argument("--methods", default="", help="comma-separated subset of the run names")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
    result = {
        "benchmark": "magic-pl vs FusionBench / MergeKit on the same task vectors",
        "date": datetime.date.today().isoformat(),
        "versions": {p: metadata.version(p) for p in ("torch", "fusion-bench", "mergekit")},
        "k": args.k,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "parts": {},
    }
    parts = [("vit_b32", vit_shapes(args.blocks), True)]
    if args.llama:
        h, i, kv = (int(x) for x in args.llama.split(","))
        parts.append(("llama_block", llama_shapes(h, i, kv), args.llama_heavy))
    for label, shapes, heavy in parts:
        tvs = task_vectors(shapes, args.k, args.rank)
        base = base_weights(shapes)
        rec = {"params": sum(v.numel() for v in tvs[0].values()), "methods": {}}
        for name, (ours, peer, keys, who) in runs(tvs, base, args, heavy).items():
            if wanted and name not in wanted:
                continue
            rec["methods"][name] = {"peer": who, **compare(ours, peer, keys, args.repeats)}
            print(f"{label}/{name}: {rec['methods'][name]}", file=sys.stderr, flush=True)
        result["parts"][label] = rec
        del tvs, base
    if args.wudi_cost_steps and (not wanted or "wudi" in wanted):
        result["wudi_cost"] = wudi_cost(args.wudi_cost_steps)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
