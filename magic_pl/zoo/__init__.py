"""The built-in offline benchmark on real weights and real data (docs/benchmark.md).

``run_benchmark("text")`` fine-tunes (once, cached) MiniLM-L6 experts on five real text tasks, merges them with every
method, calibrates with MAGIC's WSC / FSC / DSC and writes per-task tables, CSV, JSON, a chart and the calibration
reports. From a shell: ``python -m magic_pl.zoo --suite text`` (or ``magic-pl benchmark``).
``run_own_benchmark(adapter, datamodule)`` runs the same grid on your own experts and data (``magic-pl benchmark -c
my_models.yaml``; docs/benchmark.md, "Your own models").

Names are imported lazily, so ``python -m magic_pl.zoo`` can configure OpenMP before torch loads. The package
exports :func:`run_benchmark` and :func:`run_own_benchmark`; the rest is imported from its module
(``magic_pl.zoo.suites.SUITES``, ``magic_pl.zoo.experts.build_experts``, ``magic_pl.zoo.data.Task``, ...).
"""

from __future__ import annotations

from magic_pl._lazy import lazy_exports

_EXPORTS = {
    "run_benchmark": "magic_pl.zoo.runner",
    "run_own_benchmark": "magic_pl.zoo.own",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports("magic_pl.zoo", globals(), _EXPORTS)
