"""Big-model merge + WSC benchmark: K Llama-shaped experts streamed from sharded bf16 safetensors.

Writes a random-initialised base and K experts (base + small noise) of about ``--params`` parameters each to a
temporary directory as sharded bf16 safetensors with a Llama ``config.json``, generating one tensor at a time for all
K + 1 checkpoints at once (the writer never holds a model). Then, for each K in ``--k``, runs
:func:`magic_pl.models.stream_merge` (task arithmetic + WSC by default) in a fresh child process and reports its wall
time and peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child) as JSON. Target
(the memory goal): peak RSS under 1.5x one model's size in memory, independent of K.

Usage::

    .venv/bin/python benchmarks/bench_bigmodel.py --params 5e7          # quick check (~50M params per model)
    .venv/bin/python benchmarks/bench_bigmodel.py                       # 1.1B params per model, K = 2 and 4
    .venv/bin/python benchmarks/bench_bigmodel.py --reader mmap --k 2   # compare with memory-mapped reading

Disk: (max K + 1) x 2 bytes x params (about 11 GB at the default size), removed at the end unless ``--keep``.
The child runs at nice 10 with ``--threads`` torch threads (default 1) so a shared machine stays usable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The parent imports no torch: a forked child's ru_maxrss starts from the parent's RSS at fork time (Linux keeps it
# across execve), so the parent stays small and every measurement comes from a fresh child.

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def llama_shape(params: float) -> dict:
    """A Llama config of about ``params`` parameters (untied embeddings). At >= 5e8: TinyLlama-1.1B's widths
    (hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000) with the number of layers solved for ``params``."""
    if params >= 5e8:
        hidden, inter, heads, kv, vocab = 2048, 5632, 32, 4, 32000
    elif params >= 2e7:
        hidden, inter, heads, kv, vocab = 512, 1408, 8, 4, 32000
    else:
        hidden, inter, heads, kv, vocab = 128, 352, 4, 2, 4000
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    embed = 2 * vocab * hidden + hidden
    layers = max(1, round((params - embed) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
    }


def llama_plan(cfg: dict, bf: object = "bf16") -> list[tuple[str, tuple[int, ...], object]]:
    """Tensor names and shapes of ``LlamaForCausalLM`` (as ``save_pretrained`` writes them), in file order; ``bf``
    is the dtype entry (``torch.bfloat16`` when writing)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    plan = [("model.embed_tokens.weight", (v, h), bf)]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        plan += [
            (p + "input_layernorm.weight", (h,), bf),
            (p + "self_attn.q_proj.weight", (h, h), bf),
            (p + "self_attn.k_proj.weight", (kvd, h), bf),
            (p + "self_attn.v_proj.weight", (kvd, h), bf),
            (p + "self_attn.o_proj.weight", (h, h), bf),
            (p + "post_attention_layernorm.weight", (h,), bf),
            (p + "mlp.gate_proj.weight", (i, h), bf),
            (p + "mlp.up_proj.weight", (i, h), bf),
            (p + "mlp.down_proj.weight", (h, i), bf),
        ]
    plan += [("model.norm.weight", (h,), bf), ("lm_head.weight", (v, h), bf)]
    return plan


def write_family(root: Path, cfg: dict, k: int, max_shard_size: str, seed: int = 0) -> tuple[Path, list[Path]]:
    """Base + k experts, generated tensor by tensor into k + 1 sharded checkpoints at once."""
    import torch

    from magic_pl.models.io import ShardedSafetensorsWriter

    plan = llama_plan(cfg, torch.bfloat16)
    dirs = [root / "base"] + [root / f"expert{j}" for j in range(k)]
    writers = [ShardedSafetensorsWriter(d, plan, max_shard_size=max_shard_size) for d in dirs]
    for d in dirs:
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    for n, (key, shape, dtype) in enumerate(plan):
        g = torch.Generator().manual_seed(seed * 1_000_003 + n)
        if key.endswith("norm.weight"):
            base = torch.ones(shape)
        else:
            base = torch.randn(shape, generator=g).mul_(0.02)
        writers[0].write(key, base.to(dtype))
        for j in range(k):
            # an expert = base + its own small update (seeded per expert and tensor)
            delta = torch.randn(shape, generator=g).mul_(0.002)
            writers[j + 1].write(key, (base + delta).to(dtype))
            del delta
        del base
    for w in writers:
        w.close()
    return dirs[0], dirs[1:]


def _vm_hwm() -> int:
    """Peak RSS of this process image (``VmHWM``, bytes): unlike ru_maxrss it starts afresh at execve."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def writer_child(args: argparse.Namespace) -> None:
    """Generate the checkpoints (in a child, so the parent stays small)."""
    os.nice(10)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    write_family(Path(args.out), json.loads(Path(args.out, "plan.json").read_text()), int(args.write_k),
                 args.max_shard_size)
    print(json.dumps({"write_s": round(time.perf_counter() - t0, 2),
                      "writer_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def child(args: argparse.Namespace) -> None:
    """Run one stream_merge and print its measurements as one JSON line."""
    os.nice(10)
    import torch

    torch.set_num_threads(args.threads)
    from magic_pl.models.streaming import stream_merge

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    report = stream_merge(
        args.base, args.experts, args.out, method=args.method, method_options=json.loads(args.method_options),
        calibration="none" if args.no_wsc else "wsc", device=args.device, max_shard_size=args.max_shard_size,
        chunk_bytes=args.chunk_bytes,
        drop_page_cache=args.drop_page_cache, reader=args.reader,
    )
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "wall_s": round(wall, 2), "peak_rss_bytes": peak, "peak_rss_vmhwm_bytes": _vm_hwm(),
        "rss_after_imports_bytes": rss0,
        "tensors": report.tensors, "calibrated": report.calibrated, "chunked": report.chunked,
        "bytes_written": report.bytes_written, "shards": len(report.shards), "device": report.device,
    }))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.1e9, help="parameters per model (default 1.1e9)")
    ap.add_argument("--k", default="2,4", help="comma-separated expert counts (default 2,4)")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--method-options", default="{}", help="JSON options of the merge method")
    ap.add_argument("--no-wsc", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-shard-size", default="1GB")
    ap.add_argument("--chunk-bytes", default="256MB")
    ap.add_argument("--reader", default="pread", choices=("pread", "mmap"))
    ap.add_argument("--drop-page-cache", action=argparse.BooleanOptionalAction, default=True,
                    help="drop read pages from the page cache (default on: friendlier to a shared machine)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", default=None, help="also write the result JSON to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--write-k", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--experts", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return {}
    if args.write_k is not None:
        writer_child(args)
        return {}

    ks = sorted({int(x) for x in args.k.split(",")})
    cfg = llama_shape(args.params)
    n_params = sum(math.prod(s) for _, s, _ in llama_plan(cfg))
    model_bytes = 2 * n_params
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="magic_bigmodel_"))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = (max(ks) + 2) * model_bytes
    if free < need * 1.1:
        raise SystemExit(f"not enough disk in {root}: need about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    result = {"params_per_model": n_params, "model_bytes_bf16": model_bytes, "model_gib": round(model_bytes / 2**30, 3),
              "config": cfg, "method": args.method,
              "wsc": not args.no_wsc, "reader": args.reader, "chunk_bytes": args.chunk_bytes, "threads": args.threads,
              "cpu_count": os.cpu_count(), "runs": []}
    try:
        (root / "plan.json").write_text(json.dumps(cfg))
        proc = subprocess.run([sys.executable, __file__, "--write-k", str(max(ks)), "--out", str(root),
                               "--max-shard-size", args.max_shard_size, "--threads", str(args.threads)],
                              capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            raise SystemExit(f"writing the checkpoints failed:\n{proc.stderr[-4000:]}")
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        base, experts = root / "base", [root / f"expert{j}" for j in range(max(ks))]
        for k in ks:
            out = root / f"merged_k{k}"
            cmd = [sys.executable, __file__, "--child", "--base", str(base), "--experts", *map(str, experts[:k]),
                   "--out", str(out), "--method", args.method, "--method-options", args.method_options,
                   "--device", args.device, "--max-shard-size", args.max_shard_size, "--chunk-bytes",
                   args.chunk_bytes, "--reader", args.reader, "--threads", str(args.threads),
                   "--drop-page-cache" if args.drop_page_cache else "--no-drop-page-cache"]
            if args.no_wsc:
                cmd.append("--no-wsc")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
            if proc.returncode != 0:
                raise SystemExit(f"merge child failed (K={k}):\n{proc.stderr[-4000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["K"] = k
            run["peak_rss_over_model"] = round(run["peak_rss_bytes"] / model_bytes, 3)
            run["peak_rss_gib"] = round(run["peak_rss_bytes"] / 2**30, 3)
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        peaks = [r["peak_rss_bytes"] for r in result["runs"]]
        result["target_met"] = all(p < 1.5 * model_bytes for p in peaks)
        result["peak_rss_spread_over_k"] = round((max(peaks) - min(peaks)) / model_bytes, 3)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
