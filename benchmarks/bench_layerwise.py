"""Layer-by-layer FSC vs whole-model FSC on random Llama-shaped models: wall time and peak RSS in model copies.

Writes a random-initialised base and K experts (base + small noise) of about ``--params`` parameters each as sharded
bf16 safetensors with a Llama ``config.json`` (``bench_bigmodel``'s generator: one tensor at a time). Then, for each K
in ``--k`` and each path, runs one child process that merges (task arithmetic), calibrates with FSC on one
unlabelled sample per task (``--tokens`` tokens) and writes the calibrated model:

- ``whole``: today's big-model path: :func:`~magic_pl.models.stream_merge` (merge only) -> ``from_pretrained`` in
  ``--whole-dtype`` (float32 by default, as FSC's statistics) -> :func:`~magic_pl.models.streaming_fsc` (base and
  task vectors read lazily, per module and sample) -> ``save_pretrained``;
- ``layerwise``: :func:`~magic_pl.models.layerwise.layerwise_fsc` (one block at a time, float32 compute).

Each child reports its wall time (and per phase), its peak RSS (``VmHWM``) and the RSS right after imports, as JSON;
the parent adds ``peak_rss_over_model`` (peak RSS / one bf16 model) and ``peak_above_imports_over_model`` (peak minus
the import baseline, / one bf16 model), and the largest relative xi difference between the two paths (they differ by
design on bf16 checkpoints: the whole path measures on the bf16-rounded merge, the layer path on the float32 one).

Usage::

    .venv/bin/python benchmarks/bench_layerwise.py                         # ~50M and ~200M params, K = 2 and 4
    .venv/bin/python benchmarks/bench_layerwise.py --params 5e7 --k 2      # quick check

Disk: (max K + 1) x 2 bytes x params per size, plus the outputs; removed at the end unless ``--keep``. Children run at
nice 10 with ``--threads`` torch threads (default 1) so a shared machine stays usable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The parent imports no torch (see bench_bigmodel): every measurement comes from a fresh child.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_bigmodel import _vm_hwm, llama_plan, llama_shape  # noqa: E402  (needs the sys.path entries above)


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return -1


def _samples(k: int, tokens: int, vocab: int) -> dict:
    import torch

    return {t: [torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(t))] for t in range(k)}


def child(args: argparse.Namespace) -> None:
    """One measured run (``--path whole`` or ``layerwise``); prints one JSON line."""
    os.nice(10)
    import torch

    torch.set_num_threads(args.threads)
    # both paths import transformers' Llama code (about 240 MB of RSS): imported before the baseline is taken
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    from magic_pl.models.layerwise import layerwise_fsc
    from magic_pl.models.streaming import stream_merge, streaming_fsc

    cfg = json.loads(Path(args.base, "config.json").read_text())
    samples = _samples(len(args.experts), args.tokens, cfg["vocab_size"])
    rss0 = _rss_now()
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.path == "layerwise":
        report = layerwise_fsc(args.base, args.experts, samples, args.out, device="cpu", max_shard_size="1GB",
                               drop_page_cache=True)
        coefficients = report.coefficients
        phases["layerwise_fsc"] = time.perf_counter() - t0
        extra = {"peak_segment_bytes": report.peak_segment_bytes, "max_segment_bytes": report.max_segment_bytes,
                 "segments": report.segments}
    else:
        from magic_pl.models.io import save_pretrained_atomic

        merged_dir = Path(args.out + ".merged")
        stream_merge(args.base, args.experts, merged_dir, calibration="none", device="cpu", max_shard_size="1GB",
                     drop_page_cache=True)
        phases["stream_merge"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, args.whole_dtype)).eval()
        phases["load"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        result = streaming_fsc(model, args.base, args.experts, samples)
        phases["streaming_fsc"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        save_pretrained_atomic(model.to(torch.bfloat16), args.out, max_shard_size="1GB")
        phases["save"] = time.perf_counter() - t1
        shutil.rmtree(merged_dir, ignore_errors=True)
        coefficients = result.coefficients
        extra = {"whole_dtype": args.whole_dtype}
    wall = time.perf_counter() - t0
    Path(args.out + ".xi.json").write_text(json.dumps(coefficients))
    print(json.dumps({"path": args.path, "wall_s": round(wall, 2),
                      "phases_s": {k: round(v, 2) for k, v in phases.items()},
                      "peak_rss_bytes": _vm_hwm(), "rss_after_imports_bytes": rss0, **extra}))


def _write(root: Path, cfg: dict, k: int, threads: int) -> dict:
    (root / "plan.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(HERE / "bench_bigmodel.py"), "--write-k", str(k), "--out", str(root),
                           "--max-shard-size", "1GB", "--threads", str(threads)],
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"writing the checkpoints failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="5e7,2e8", help="comma-separated parameters per model (default 5e7,2e8)")
    ap.add_argument("--k", default="2,4", help="comma-separated expert counts (default 2,4)")
    ap.add_argument("--paths", default="whole,layerwise", help="which paths to run (default whole,layerwise)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the one sample per task (default 64)")
    ap.add_argument("--whole-dtype", default="float32", help="dtype the whole-model path loads the merge in")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", default=None, help="also write the result JSON to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--experts", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return {}

    ks = sorted({int(x) for x in args.k.split(",")})
    paths = [p for p in args.paths.split(",") if p]
    result: dict = {"threads": args.threads, "cpu_count": os.cpu_count(), "tokens": args.tokens,
                    "whole_dtype": args.whole_dtype, "sizes": []}
    for params in (float(x) for x in args.params.split(",")):
        cfg = llama_shape(params)
        n_params = sum(math.prod(s) for _, s, _ in llama_plan(cfg))
        model_bytes = 2 * n_params
        root = Path(args.workdir) / f"p{params:g}" if args.workdir else Path(tempfile.mkdtemp(prefix="magic_lw_"))
        root.mkdir(parents=True, exist_ok=True)
        need = (max(ks) + 4) * model_bytes
        if shutil.disk_usage(root).free < need * 1.1:
            raise SystemExit(f"not enough disk in {root}: need about {need / 1e9:.1f} GB")
        size = {"params_per_model": n_params, "model_bytes_bf16": model_bytes, "layers": cfg["num_hidden_layers"],
                "hidden": cfg["hidden_size"], "vocab": cfg["vocab_size"], "runs": []}
        try:
            t0 = time.perf_counter()
            size.update(_write(root, cfg, max(ks), args.threads))
            size["write_s"] = round(time.perf_counter() - t0, 2)
            base, experts = root / "base", [root / f"expert{j}" for j in range(max(ks))]
            for k in ks:
                xis = {}
                for path in paths:
                    out = root / f"out_{path}_k{k}"
                    cmd = [sys.executable, __file__, "--child", "--path", path, "--base", str(base), "--experts",
                           *map(str, experts[:k]), "--out", str(out), "--tokens", str(args.tokens), "--whole-dtype",
                           args.whole_dtype, "--threads", str(args.threads)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
                    if proc.returncode != 0:
                        raise SystemExit(f"{path} child failed (K={k}):\n{proc.stderr[-4000:]}")
                    run = json.loads(proc.stdout.strip().splitlines()[-1])
                    run["K"] = k
                    run["peak_rss_over_model"] = round(run["peak_rss_bytes"] / model_bytes, 2)
                    run["peak_above_imports_over_model"] = round(
                        (run["peak_rss_bytes"] - run["rss_after_imports_bytes"]) / model_bytes, 2)
                    xis[path] = json.loads(Path(str(out) + ".xi.json").read_text())
                    size["runs"].append(run)
                    print(json.dumps({"params": n_params, **run}), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                if len(xis) == 2:
                    a, b = xis["whole"], xis["layerwise"]
                    if set(a) != set(b):
                        raise SystemExit(f"K={k}: the two paths calibrated different modules")
                    rel = {n: abs(a[n] - b[n]) / abs(a[n]) for n in a}
                    # norms separately: their bf16 experts differ from the base by about one bf16 step at 1.0, so the
                    # whole path's bf16-rounded merge of them is mostly the base itself (a ~0/0 ratio), while the
                    # layer path merges in float32
                    size["runs"][-1]["max_rel_xi_diff_vs_whole"] = {
                        "linear_and_embedding": max(v for n, v in rel.items() if "norm" not in n),
                        "norms": max((v for n, v in rel.items() if "norm" in n), default=0.0)}
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        result["sizes"].append(size)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
