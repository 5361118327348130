"""Layer-by-layer FSC vs whole-model and sharded FSC on random Llama-shaped models: wall time and peak RSS in model
copies.

Writes a random-initialised base and K experts (base + small noise) of about ``--params`` parameters each as sharded
bf16 safetensors with a Llama ``config.json`` (``bench_bigmodel``'s generator: one tensor at a time). Then, for each K
in ``--k`` and each path of ``--paths``, runs child processes that merge (task arithmetic), calibrate with FSC on one
unlabelled sample per task (``--tokens`` tokens) and write the calibrated model:

- ``whole``: today's big-model path: :func:`~magic_pl.models.stream_merge` (merge only) -> ``from_pretrained`` in
  ``--whole-dtype`` (float32 by default, as FSC's statistics) -> :func:`~magic_pl.models.streaming_fsc` (base and
  task vectors read lazily, per module and sample) -> ``save_pretrained``;
- ``layerwise``: :func:`~magic_pl.models.layerwise.layerwise_fsc` (one block at a time, float32 compute);
- ``sharded``: the Lightning path, ``MagicTrainer.calibrate`` on a ``MagicModule`` with the ``CausalLMAdapter``
  (dtype ``--whole-dtype``) under ``lightning.pytorch.strategies.ModelParallelStrategy`` (torch FSDP2) on 2 CPU
  processes (gloo), launched here as two children with ``MASTER_ADDR`` / ``MASTER_PORT`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` set, so that Lightning joins them instead of starting its own and each rank is a fresh process.

Each child reports its wall time (and per phase), its peak RSS (``VmHWM``) and the RSS right after imports, as JSON;
the parent adds ``peak_rss_over_model`` (peak RSS / one bf16 model) and ``peak_above_imports_over_model`` (peak minus
the import baseline, / one bf16 model). For ``sharded`` these are the largest over the ranks (``wall_s``: the slower
rank), and ``ranks`` holds each rank's own. xi differences: ``max_rel_xi_diff_vs_whole`` on the layerwise run (the two
differ by design on bf16 checkpoints: the whole path measures on the bf16-rounded merge, the layer path on the float32
one) and ``max_rel_xi_diff_vs_layerwise`` on the sharded run.

Usage::

    .venv/bin/python benchmarks/bench_layerwise.py                         # ~50M and ~200M params, K = 2 and 4
    .venv/bin/python benchmarks/bench_layerwise.py --params 5e7 --k 2      # quick check
    .venv/bin/python benchmarks/bench_layerwise.py --params 5e7 --k 2 --paths layerwise,sharded
    .venv/bin/python benchmarks/bench_layerwise.py --table --json table.json   # 125M, 350M, 1.1B; K = 2, 4; 3 paths

``--params`` takes numbers with an optional K / M / B suffix (``125M,350M,1.1B``). Disk: (max K + 1) x 2 bytes x
params per size, plus the outputs (the sharded path's in ``--whole-dtype``); removed at the end unless ``--keep``.
Children run at nice 10 with ``--threads`` torch threads each (default 1; the sharded path runs two such processes)
so a shared machine stays usable. Memory: the sharded path's two ranks run at once, and rank 0 gathers the calibrated
model to write it.
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
        phases.update({f"layerwise_{k}": v for k, v in report.phase_seconds.items()})
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


def sharded_child(args: argparse.Namespace) -> None:
    """One rank of the sharded run (``--path sharded``; rank from ``LOCAL_RANK``): writes ``<out>.rank<r>.json``."""
    os.nice(10)
    import torch

    torch.set_num_threads(args.threads)
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401  (in the baseline, as in the other paths)
    from lightning.pytorch.strategies import ModelParallelStrategy

    from magic_pl.lightning import MagicModule, TaskDataModule
    from magic_pl.lightning.trainer import MagicTrainer
    from magic_pl.models import CausalLMAdapter

    cfg = json.loads(Path(args.base, "config.json").read_text())
    samples = _samples(len(args.experts), args.tokens, cfg["vocab_size"])
    tasks = [f"task{j}" for j in range(len(args.experts))]
    # the other paths' one sample per task, as a one-item dataset per task (collated back to [1, tokens])
    data = TaskDataModule(task_names=tasks, samples_per_task=1,
                          calibration={t: [{"input_ids": samples[j][0][0]}] for j, t in enumerate(tasks)})
    adapter = CausalLMAdapter(args.base, list(args.experts), task_names=tasks, dtype=args.whole_dtype,
                              max_shard_size="1GB")
    module = MagicModule(adapter=adapter, merge_method="task_arithmetic", calibration="fsc")
    trainer = MagicTrainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(), logger=False,
                           enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    rss0 = _rss_now()
    t0 = time.perf_counter()
    trainer.calibrate(module, datamodule=data, output_dir=args.out, evaluate=False, hash_inputs=False,
                      model_card=False, overwrite=True)
    wall = time.perf_counter() - t0
    rank = trainer.global_rank
    if rank == 0:
        Path(args.out + ".xi.json").write_text(json.dumps(module.run.result.coefficients))
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "wall_s": round(wall, 2), "peak_rss_bytes": _vm_hwm(), "rss_after_imports_bytes": rss0,
        "sharded": bool(module.is_sharded)}))
    # leave together and skip the interpreter's teardown, where gloo's threads can abort a clean run
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_sharded(cmd: list[str], out: Path, timeout: float = 7200) -> dict:
    """Launch the two ranks of ``cmd`` and combine their reports."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "MASTER_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0",
               PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(r), "RANK": str(r)}, cwd=str(ROOT),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:  # one rank failed and the other waits in a collective: end ours
                proc.kill()
                proc.wait()
    failed = [(r, p.returncode, err) for r, (p, (_, err)) in enumerate(zip(procs, outs)) if p.returncode != 0]
    if failed:
        raise SystemExit("sharded child failed:\n" + "\n".join(f"rank {r} (rc {rc}):\n{err[-3000:]}"
                                                               for r, rc, err in failed))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    top = max(ranks, key=lambda r: r["peak_rss_bytes"])
    return {"path": "sharded", "processes": 2, "wall_s": max(r["wall_s"] for r in ranks),
            "launch_wall_s": round(time.perf_counter() - t0, 2), "peak_rss_bytes": top["peak_rss_bytes"],
            "rss_after_imports_bytes": top["rss_after_imports_bytes"], "whole_dtype": None, "ranks": ranks}


def _write(root: Path, cfg: dict, k: int, threads: int) -> dict:
    (root / "plan.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(HERE / "bench_bigmodel.py"), "--write-k", str(k), "--out", str(root),
                           "--max-shard-size", "1GB", "--threads", str(threads)],
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"writing the checkpoints failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


PATHS = ("whole", "layerwise", "sharded")
#: ``--table``: the full comparison (sizes of GPT-2-small / -medium and TinyLlama; K = 2, 4; every path)
TABLE = {"params": "125M,350M,1.1B", "k": "2,4", "paths": ",".join(PATHS)}


def _count(text: str) -> float:
    """``"5e7"``, ``"125M"``, ``"1.1B"`` -> a number of parameters."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text.strip()[-1:].upper(), 1.0)
    return float(text.strip()[:-1] if scale != 1.0 else text) * scale


def _rel_diffs(ref: dict, other: dict, what: str) -> dict:
    """Largest relative xi difference of ``other`` against ``ref``, norms separately (see the whole path's note)."""
    if set(ref) != set(other):
        raise SystemExit(f"{what}: the paths calibrated different modules: {sorted(set(ref) ^ set(other))[:6]}")
    rel = {n: abs(other[n] - ref[n]) / abs(ref[n]) for n in ref}
    return {"linear_and_embedding": max(v for n, v in rel.items() if "norm" not in n),
            "norms": max((v for n, v in rel.items() if "norm" in n), default=0.0)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="5e7,2e8",
                    help="comma-separated parameters per model, K/M/B suffixes allowed (default 5e7,2e8)")
    ap.add_argument("--k", default="2,4", help="comma-separated expert counts (default 2,4)")
    ap.add_argument("--paths", default="whole,layerwise",
                    help=f"comma-separated paths out of {','.join(PATHS)} (default whole,layerwise)")
    ap.add_argument("--table", action="store_true",
                    help=f"the full table: --params {TABLE['params']} --k {TABLE['k']} --paths {TABLE['paths']}")
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
        (sharded_child if args.path == "sharded" else child)(args)
        return {}
    if args.table:
        args.params, args.k, args.paths = TABLE["params"], TABLE["k"], TABLE["paths"]

    ks = sorted({int(x) for x in args.k.split(",")})
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    result: dict = {"threads": args.threads, "cpu_count": os.cpu_count(), "tokens": args.tokens,
                    "whole_dtype": args.whole_dtype, "sizes": []}
    for params in (_count(x) for x in args.params.split(",")):
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
                xis: dict[str, dict] = {}
                runs: dict[str, dict] = {}
                for path in paths:
                    out = root / f"out_{path}_k{k}"
                    cmd = [sys.executable, __file__, "--child", "--path", path, "--base", str(base), "--experts",
                           *map(str, experts[:k]), "--out", str(out), "--tokens", str(args.tokens), "--whole-dtype",
                           args.whole_dtype, "--threads", str(args.threads)]
                    if path == "sharded":
                        run = _run_sharded(cmd, out)
                        run["whole_dtype"] = args.whole_dtype
                    else:
                        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
                        if proc.returncode != 0:
                            raise SystemExit(f"{path} child failed (K={k}):\n{proc.stderr[-4000:]}")
                        run = json.loads(proc.stdout.strip().splitlines()[-1])
                    run["K"] = k
                    for r in (run, *run.get("ranks", ())):
                        r["peak_rss_over_model"] = round(r["peak_rss_bytes"] / model_bytes, 2)
                        r["peak_above_imports_over_model"] = round(
                            (r["peak_rss_bytes"] - r["rss_after_imports_bytes"]) / model_bytes, 2)
                    xis[path] = json.loads(Path(str(out) + ".xi.json").read_text())
                    runs[path] = run
                    size["runs"].append(run)
                    print(json.dumps({"params": n_params, **run}), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    for extra in out.parent.glob(out.name + ".*"):  # xi, per-rank reports, the whole path's merge
                        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
                # norms separately: their bf16 experts differ from the base by about one bf16 step at 1.0, so the
                # whole path's bf16-rounded merge of them is mostly the base itself (a ~0/0 ratio), while the layer
                # path merges in float32
                if "whole" in xis and "layerwise" in xis:
                    runs["layerwise"]["max_rel_xi_diff_vs_whole"] = _rel_diffs(xis["whole"], xis["layerwise"],
                                                                               f"K={k}")
                if "sharded" in xis and "layerwise" in xis:
                    runs["sharded"]["max_rel_xi_diff_vs_layerwise"] = _rel_diffs(xis["layerwise"], xis["sharded"],
                                                                                 f"K={k}")
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
