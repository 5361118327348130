"""Parity and speed of magic-pl's RegMean against FusionBench's RegMean merge core; prints JSON.

One ViT-block-shaped set of linear layers (q, k, v, out: ``d x d``; fc1: ``4d x d``; fc2: ``d x 4d``), K experts
(base + fine-tuning-like task vectors) and per task ``--rows`` input rows per layer with a power-law feature scale and
a few outlier features (the ill-conditioning of real activation Grams). magic-pl runs end to end (forward hooks,
Gram sums, solve); FusionBench's ``merging_with_regmean_weights`` gets the same mean Gram matrices (computed here by
explicit ``X^T X / n``) and the expert weights, in float64 and in float32 (its usual model dtype).

Reported: ``max_rel_diff_weights`` = max |W_ours - W_peer| / max |W_peer| over the merged weights;
``max_rel_diff_tau`` = the same on the merged task vectors (W - W0, the stricter view); ``time_ratio`` = our solve
(same Gram sums, ``magic_pl.merging.regmean._solve``) / FusionBench's merge core, best of ``--repeats``, interleaved;
``ours_end_to_end_s`` adds our forward pass and Gram accumulation. Needs fusion_bench importable (never a
dependency of magic-pl)::

    PYTHONPATH=. /root/peers/bin/python benchmarks/bench_regmean_peers.py --width 384 --k 8 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_peers import _gen, _power_law  # noqa: E402

from magic_pl.merging import regmean  # noqa: E402
from magic_pl.merging.regmean import _solve  # noqa: E402

SD = dict[str, torch.Tensor]


class Layers(nn.Module):
    """Independent linear layers, each fed its own input: ``model(**{name: x})``."""

    def __init__(self, width: int):
        super().__init__()
        d, h = width, 4 * width
        shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "out": (d, d), "fc1": (d, h), "fc2": (h, d)}
        self.layers = nn.ModuleDict({n: nn.Linear(i, o) for n, (i, o) in shapes.items()})

    def forward(self, **inputs: torch.Tensor) -> None:
        for name, x in inputs.items():
            self.layers[name](x)


def activations(width: int, rows: int, task: int, layer: str, in_features: int) -> torch.Tensor:
    g = _gen("x", task, layer)
    scale = torch.arange(1, in_features + 1, dtype=torch.float64).pow_(-0.5)
    scale[:: max(1, in_features // 8)] *= 30.0  # outlier features
    mix = torch.eye(in_features, dtype=torch.float64) + 0.1 * torch.randn(in_features, in_features, generator=g,
                                                                          dtype=torch.float64) / in_features**0.5
    return (torch.randn(rows, in_features, generator=g, dtype=torch.float64) * scale) @ mix + 0.1 * (task + 1)


def best_of(fn, repeats: int) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def rel(ours: SD, peer: SD, keys: list[str]) -> float:
    num = max(float((ours[k].double() - peer[k].double()).abs().max()) for k in keys)
    den = max(float(peer[k].double().abs().max()) for k in keys)
    return float(f"{num / den:.3g}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=384, help="block width d (768: ViT-B; default 384)")
    parser.add_argument("--k", type=int, default=8, help="number of experts (default 8)")
    parser.add_argument("--rows", type=int, default=2048, help="input rows per task and layer (default 2048)")
    parser.add_argument("--alpha", type=float, default=0.95, help="reduce_non_diagonal (default 0.95)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    model = Layers(args.width).double().eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    taus = [{k: (_power_law(tuple(v.shape), _gen(t, k), 16).double() * 30 if v.dim() == 2 else
                 torch.randn(v.shape, generator=_gen(t, k), dtype=torch.float64) * 1e-3)
             for k, v in base.items()} for t in range(args.k)]
    names = list(model.layers)
    fins = {n: model.layers[n].in_features for n in names}
    xs = {t: {n: activations(args.width, args.rows, t, n, fins[n]) for n in names} for t in range(args.k)}
    batches = {t: [{n: x[i::4] for n, x in xs[t].items()} for i in range(4)] for t in range(args.k)}

    ours, t_end = best_of(lambda: regmean(base, Layers(args.width).double().eval(), taus, batches,
                                          reduce_non_diagonal=args.alpha), args.repeats)
    ours_w = {k: base[k] + ours[k] for k in base}
    sums = {n: torch.stack([xs[t][n].T @ xs[t][n] for t in range(args.k)]) for n in names}
    rows = torch.full((args.k,), float(args.rows), dtype=torch.float64)
    grams = [{f"layers.{n}": sums[n][t] / args.rows for n in names} for t in range(args.k)]
    experts = [{k: base[k] + tv[k] for k in base} for tv in taus]
    weight_keys = [f"layers.{n}.weight" for n in names]

    # _solve overwrites the sums it is given: one copy per timed call, made before the timing
    copies = [{n: sums[n].clone() for n in names} for _ in range(args.repeats)]

    def ours_core() -> SD:
        mine = copies.pop()
        return {f"layers.{n}.weight": _solve(mine[n], rows, lambda t, n=n: taus[t][f"layers.{n}.weight"],
                                             args.alpha, n) for n in names}

    def peer(dtype: torch.dtype):
        params = {k: [e[k].to(dtype) for e in experts] for k in base}
        gl = [{m: g.to(dtype) for m, g in gr.items()} for gr in grams]
        return lambda: merging_with_regmean_weights(params, gl, reduce_non_diagonal_ratio=args.alpha)

    result: dict = {
        "benchmark": "regmean_vs_fusionbench",
        "versions": {p: metadata.version(p) for p in ("torch", "fusion-bench")},
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "width": args.width, "k": args.k, "rows": args.rows, "alpha": args.alpha,
        "ours_end_to_end_s": round(t_end, 3),
    }
    core, t_core = best_of(ours_core, args.repeats)
    result["ours_core_vs_end_to_end_max_rel_diff_tau"] = rel(core, ours, weight_keys)
    for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        theirs, t_peer = best_of(peer(dtype), args.repeats)
        theirs_tau = {k: theirs[k].double() - base[k] for k in base}
        result[f"fusionbench_{label}"] = {
            "max_rel_diff_weights": rel(ours_w, theirs, weight_keys),
            "max_rel_diff_tau": rel(ours, theirs_tau, weight_keys),
            "max_rel_diff_biases": rel(ours_w, theirs, [k for k in base if k.endswith("bias")]),
            "ours_core_s": round(t_core, 4),
            "peer_s": round(t_peer, 4),
            "time_ratio": round(t_core / t_peer, 3),
        }
    # FusionBench builds its off-diagonal multiplier in float32 (torch.ones's default dtype), so its alpha is
    # float32(alpha); with that alpha our solve should equal its float64 run to rounding
    alpha32 = float(torch.tensor(args.alpha, dtype=torch.float32))
    core32 = {f"layers.{n}.weight": _solve(sums[n].clone(), rows, lambda t, n=n: taus[t][f"layers.{n}.weight"],
                                           alpha32, n) for n in names}
    theirs = peer(torch.float64)()
    result["fusionbench_float64"]["max_rel_diff_tau_alpha_as_float32"] = rel(
        core32, {k: theirs[k] - base[k] for k in weight_keys}, weight_keys)
    s = sum(grams[t]["layers.fc2"] for t in range(args.k))
    s = args.alpha * s + (1 - args.alpha) * torch.diag(s.diagonal())
    result["cond_sum_reduced_gram_fc2"] = float(f"{float(torch.linalg.cond(s)):.3g}")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
