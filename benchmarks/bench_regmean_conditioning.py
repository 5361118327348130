"""Why RegMean needs data: the conditioning of its Gram matrices against the number of unlabelled samples per task.

On a suite's cached experts (default: text), for each budget n, the budget study's first draw of n calibration
samples per task (the same seeds as ``magic_pl.zoo.budget``), RegMean with ``diagnostics`` reports per linear layer
the input rows per task (samples x real tokens), the condition number of ``sum_k G_k'`` (alpha 0.95) and how far the
closed form moves from the plain average task vector (``||tau_m - avg|| / ||avg||``). Prints JSON: per n, per layer
kind (the name with its layer indices as ``*``, e.g. ``...layer.*.attention.self.query``), the median over layers.

``python benchmarks/bench_regmean_conditioning.py --suite text --budgets 1 4 16 64``
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections import defaultdict

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="text")
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--reduce_non_diagonal", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args()

    from magic_pl.merging import regmean
    from magic_pl.statedict import task_vector
    from magic_pl.zoo.experts import default_cache_dir
    from magic_pl.zoo.pipeline import SuiteData, load_suite
    from magic_pl.zoo.runner import _calibration_pools, _draw
    from magic_pl.zoo.suites import get_suite

    spec = get_suite(args.suite)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device("cpu")
    loaded = load_suite(spec, default_cache_dir() if args.cache_dir is None else args.cache_dir, device)
    names = loaded.names
    base = dict(loaded.experts.base)
    taus = [task_vector(e, base) for e in loaded.expert_states]
    data = SuiteData(loaded.backbone, loaded.tasks, _calibration_pools(loaded.tasks, False),
                     batch_size=spec.eval_batch_size)

    out: dict[str, dict] = {}
    for n in args.budgets:
        # the budget study's draw 0 (runner: seed * 1000 + draw * 7 + task index)
        batches = {k: data.batches(name, _draw(data.pools[name], n, args.seed * 1_000 + k), device, size=8)
                   for k, name in enumerate(names)}
        diagnostics: dict[str, dict] = {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            regmean(base, copy.deepcopy(loaded.template), taus, batches,
                    reduce_non_diagonal=args.reduce_non_diagonal, diagnostics=diagnostics)
        seconds = time.perf_counter() - t0
        kinds: dict[str, list[dict]] = defaultdict(list)
        for layer, d in diagnostics.items():
            kinds[".".join("*" if part.isdigit() else part for part in layer.split("."))].append(d)
        out[str(n)] = {
            "seconds": round(seconds, 2),
            "layers": len(diagnostics),
            "kinds": {
                kind: {
                    "layers": len(ds),
                    "dim": ds[0]["dim"],
                    "rows_per_task": statistics.median(statistics.mean(d["rows"]) for d in ds),
                    "log10_condition": statistics.median(
                        math.log10(d["condition"]) if math.isfinite(d["condition"]) else math.inf for d in ds),
                    "shift_from_average": statistics.median(d["shift"] for d in ds),
                }
                for kind, ds in sorted(kinds.items())
            },
        }
    print(json.dumps({"suite": args.suite, "tasks": names, "reduce_non_diagonal": args.reduce_non_diagonal,
                      "budgets": out}, indent=1))


if __name__ == "__main__":
    main()
