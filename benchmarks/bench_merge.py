"""Time each merge method and measure its peak memory on a ViT-B/32-sized set of task vectors; prints JSON.

The K task vectors have the shapes of CLIP ViT-B/32's visual tower (about 88M parameters at ``--scale 1``) and
random float32 values. They are *lazy*: each ``tv[key]`` draws the tensor from a generator seeded by (task, key), so
the K experts are never resident and :func:`magic_pl.merging.merge` streams exactly as it does over safetensors files.

Every method runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own. Reported per
method: ``wall_s`` (the whole ``merge`` call), ``merge_s`` (``wall_s`` minus the time to generate the K inputs,
measured separately as ``load``), ``peak_rss_mb`` and ``delta_rss_mb`` (peak minus the process's peak before the
merge: imports, Python). The merged task vector itself is one float32 model (``model_mb``).

    python benchmarks/bench_merge.py                       # all methods, full size, K = 8
    python benchmarks/bench_merge.py --scale 0.05 --methods task_arithmetic,ties --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import torch

#: Method runs: name -> (merge method, options). "ties_global" is TIES with one magnitude threshold per task.
RUNS: dict[str, tuple[str, dict]] = {
    "weight_average": ("weight_average", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "ties_global": ("ties", {"global_topk": True}),
    "dare": ("dare", {}),
    "breadcrumbs": ("breadcrumbs", {}),
    "consensus": ("consensus", {}),
    "tsv_m": ("tsv_m", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "model_stock": ("model_stock", {}),
    "della": ("della", {}),
    "wudi": ("wudi", {}),
}


def vit_b32_shapes(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of open_clip's ViT-B/32 visual tower; ``scale`` shrinks the width so params ~ scale."""
    d = 768 if scale >= 1.0 else max(8, int(round(768 * math.sqrt(scale) / 8)) * 8)
    out_dim = 512 if scale >= 1.0 else max(8, int(round(512 * math.sqrt(scale) / 8)) * 8)
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (d, 3, 32, 32),
        "class_embedding": (d,),
        "positional_embedding": (50, d),
        "ln_pre.weight": (d,),
        "ln_pre.bias": (d,),
    }
    for i in range(12):
        p = f"transformer.resblocks.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.in_proj_weight": (3 * d, d),
                p + "attn.in_proj_bias": (3 * d,),
                p + "attn.out_proj.weight": (d, d),
                p + "attn.out_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (4 * d, d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (d, 4 * d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes.update({"ln_post.weight": (d,), "ln_post.bias": (d,), "proj": (d, out_dim)})
    return shapes


class SyntheticTaskVector(Mapping[str, torch.Tensor]):
    """A lazy task vector: ``tv[key]`` draws N(0, 1e-3^2) values from a generator seeded by (task, key)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], task: int):
        self._shapes, self._task = dict(shapes), task

    def __getitem__(self, key: str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self._task}/{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.randn(self._shapes[key], generator=gen).mul_(1e-3)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._shapes[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _worker(run: str, scale: float, k: int, threads: int | None) -> dict:
    from magic_pl.merging import merge

    if threads:
        torch.set_num_threads(threads)

    tvs = [SyntheticTaskVector(vit_b32_shapes(scale), t) for t in range(k)]
    before = _maxrss_mb()
    t0 = time.perf_counter()
    if run == "load":
        for key in tvs[0]:
            slices = [tv[key] for tv in tvs]
            del slices
        n_out = 0
    else:
        method, opts = RUNS[run]
        out = merge(method, tvs, seed=0, **opts)
        n_out = sum(t.numel() for t in out.values())
        assert all(bool(torch.isfinite(t).all()) for t in out.values()), f"{run}: non-finite output"
    wall = time.perf_counter() - t0
    peak = _maxrss_mb()
    return {"run": run, "wall_s": round(wall, 3), "peak_rss_mb": round(peak, 1),
            "delta_rss_mb": round(peak - before, 1), "outputs": n_out}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(RUNS), help=f"comma-separated runs from: {', '.join(RUNS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the ViT-B/32 size (width scaled)")
    parser.add_argument("--k", type=int, default=8, help="number of task vectors (default 8)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's choice); on a shared, busy machine 1 is far more stable",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.scale, args.k, args.threads)))
        return {}
    runs = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in runs if m not in RUNS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(RUNS)}")
    if args.k < 1 or not 0 < args.scale <= 1:
        parser.error("need --k >= 1 and 0 < --scale <= 1")
    shapes = vit_b32_shapes(args.scale)
    n_params = sum(math.prod(s) for s in shapes.values())
    result = {
        "benchmark": "merge methods on ViT-B/32-shaped random task vectors",
        "params": n_params,
        "k": args.k,
        "scale": args.scale,
        "model_mb": round(n_params * 4 / 2**20, 1),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "machine": platform.machine(),
        "methods": {},
    }

    def run_child(run: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", run, "--scale", str(args.scale), "--k", str(args.k)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    load = run_child("load")
    result["load"] = load
    for run in runs:
        rec = run_child(run)
        if "wall_s" in rec and "wall_s" in load:
            rec["merge_s"] = round(rec["wall_s"] - load["wall_s"], 3)
        rec.pop("run", None)
        result["methods"][run] = rec
        print(f"{run}: {rec}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
