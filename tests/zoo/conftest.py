"""The tiny suite, run once per test session: its results and its expert cache are shared by the zoo tests."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from magic_pl.zoo import run_benchmark

    root = tmp_path_factory.mktemp("tiny")
    cache, results = root / "cache", root / "results"
    t0 = time.perf_counter()
    result = run_benchmark("tiny", cache_dir=str(cache), results_dir=str(results), progress=False, bootstrap=200)
    return {"result": result, "cache": cache, "results": results, "seconds": time.perf_counter() - t0}
