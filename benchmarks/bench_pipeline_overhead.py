"""What running a benchmark row through MagicModule + a Lightning Trainer costs, against the same row in plain torch.

On a suite's cached experts (default: text), for each merge method and calibration setting, alternately (A/B
interleaved in one process, so a shared machine's load hits both alike):

- plain torch: ``merge`` on precomputed task vectors, ``theta0 + tau_m`` loaded into a copy of the encoder, the
  setting's Python driver (``CalibrationSetting.calibrate``) on the draw's samples, and a hand-written evaluation loop
  (the backbone's batches through each task's head, per-example correctness);
- the shipped path the benchmark runs: ``MagicModule.build`` (merge in setup), ``with_calibration``,
  ``trainer.predict`` for the FSC statistics and ``trainer.test``.

Both give the same per-example correctness (checked). Prints JSON: median seconds of each path per step and the
ratio. ``python benchmarks/bench_pipeline_overhead.py --suite text --repeats 2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="text")
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    parser.add_argument("--calibrations", nargs="+", default=["none", "wsc", "dsc"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args()

    from magic_pl.calibration import resolve_setting
    from magic_pl.merging import merge
    from magic_pl.statedict import apply_task_vector, task_vector
    from magic_pl.zoo.experts import default_cache_dir
    from magic_pl.zoo.pipeline import SuiteData, load_suite, suite_module
    from magic_pl.zoo.runner import _calibration_pools, _draw, build_trainer
    from magic_pl.zoo.suites import get_suite

    spec = get_suite(args.suite)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cache = default_cache_dir() if args.cache_dir is None else args.cache_dir
    loaded = load_suite(spec, cache, torch.device("cpu"))
    tasks, bb, es, template = loaded.tasks, loaded.backbone, loaded.experts, loaded.template
    names = loaded.names
    experts = loaded.expert_states
    data = SuiteData(bb, tasks, _calibration_pools(tasks, False), batch_size=spec.eval_batch_size)
    picks = {n: _draw(data.pools[n], 1, k) for k, n in enumerate(names)}
    trainer = build_trainer()
    base_state = dict(es.base)
    taus = [task_vector(e, base_state) for e in experts]

    @torch.inference_mode()
    def plain_eval(encoder: torch.nn.Module) -> dict[str, np.ndarray]:
        out = {}
        for n in names:
            split = data.test[n]
            ok = np.zeros(len(split.labels), dtype=bool)
            for idx, kw in bb.eval_batches(split.prepared, spec.eval_batch_size, torch.device("cpu")):
                pred = es.heads[n](encoder(**kw).float()).argmax(-1)
                ok[idx] = (pred == split.labels[torch.as_tensor(idx)]).numpy()
            out[n] = ok
        return out

    timings: dict[str, dict[str, list[float]]] = {}

    def timed(key: str, path: str, fn):
        t = time.perf_counter()
        value = fn()
        timings.setdefault(key, {}).setdefault(path, []).append(time.perf_counter() - t)
        return value

    for method in args.methods:
        for _ in range(args.repeats):
            tau_m = timed(f"{method}/merge", "plain", lambda method=method: merge(method, taus, seed=0))
            merged = timed(f"{method}/merge", "lightning",
                           lambda method=method: _built(suite_module(template, experts, es.heads, names, method,
                                                                     {"seed": 0})))
        for calib in args.calibrations:
            setting = resolve_setting(calib)
            for _ in range(args.repeats):
                def plain(setting=setting, tau_m=tau_m):
                    model = copy.deepcopy(template)
                    model.load_state_dict(apply_task_vector(base_state, tau_m))
                    model.eval()
                    batches = ({k: data.batches(n, picks[n], torch.device("cpu")) for k, n in enumerate(names)}
                               if setting.uses_data else None)
                    setting.calibrate(base_state, model, taus, tau_m, batches)
                    return plain_eval(model)

                def lightning(setting=setting, merged=merged):
                    m = merged.with_calibration(setting)
                    if setting.uses_data:
                        trainer.predict(m, datamodule=data.datamodule(picks), return_predictions=False)
                    trainer.test(m, datamodule=data.datamodule(), verbose=False)
                    return {n: c.numpy() for n, c in m.example_correctness.items()}

                a = timed(f"{method}/{calib}", "plain", plain)
                b = timed(f"{method}/{calib}", "lightning", lightning)
                assert all(np.array_equal(a[n], b[n]) for n in names), f"{method}/{calib}: the two paths differ"
    report = {}
    for key, paths in timings.items():
        p, q = statistics.median(paths["plain"]), statistics.median(paths["lightning"])
        report[key] = {"plain_s": round(p, 3), "lightning_s": round(q, 3), "ratio": round(q / p, 3)}
    total_p = sum(v["plain_s"] for v in report.values())
    total_q = sum(v["lightning_s"] for v in report.values())
    print(json.dumps({"suite": args.suite, "threads": torch.get_num_threads(), "repeats": args.repeats,
                      "steps": report, "total": {"plain_s": round(total_p, 2), "lightning_s": round(total_q, 2),
                                                 "ratio": round(total_q / total_p, 3)}}, indent=1))


def _built(module):
    module.build()
    return module


if __name__ == "__main__":
    main()
