"""The built-in offline benchmark on real weights and real data (docs/benchmark.md).

``run_benchmark("text")`` fine-tunes (once, cached) MiniLM-L6 experts on five real text tasks, merges them with every
method, calibrates with MAGIC's WSC / FSC / DSC and writes per-task tables, CSV, JSON, a chart and the calibration
reports. From a shell: ``python -m magic_pl.zoo --suite text`` (or ``magic-pl benchmark``).

Names are imported lazily, so ``python -m magic_pl.zoo`` can configure OpenMP before torch loads.
"""

from __future__ import annotations

from magic_pl._lazy import lazy_exports

_EXPORTS = {
    "run_benchmark": "magic_pl.zoo.runner",
    "DEFAULT_METHODS": "magic_pl.zoo.runner",
    "CALIBRATIONS": "magic_pl.zoo.runner",
    "BN_CALIBRATIONS": "magic_pl.zoo.runner",
    "SENSITIVE_CHOICES": "magic_pl.zoo.runner",
    "SUITES": "magic_pl.zoo.suites",
    "Suite": "magic_pl.zoo.suites",
    "get_suite": "magic_pl.zoo.suites",
    "Task": "magic_pl.zoo.data",
    "DataUnavailableError": "magic_pl.zoo.data",
    "FinetuneConfig": "magic_pl.zoo.experts",
    "ExpertSet": "magic_pl.zoo.experts",
    "build_experts": "magic_pl.zoo.experts",
    "default_cache_dir": "magic_pl.zoo.experts",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports("magic_pl.zoo", globals(), _EXPORTS)
