"""The tiny suite end to end (real digits data, real pipeline): results structure, sane values, the expert cache,
and the same results on two DDP processes as on one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from magic_pl.zoo import run_benchmark
from magic_pl.zoo.runner import CALIBRATIONS, DEFAULT_METHODS


def _rows(result):
    return {(r["method"], r["calibration"]): r for r in result["rows"]}


def test_tiny_writes_every_report(tiny):
    # its wall time is not asserted here (timings belong in benchmarks; CI's own limit bounds the suite)
    files = tiny["result"]["files"]
    for key in ("markdown", "csv", "json", "chart"):
        assert (tiny["results"] / files[key].split("/")[-1]).is_file(), key
    assert open(files["chart"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads(open(files["json"]).read())
    assert on_disk["suite"] == "tiny" and len(on_disk["rows"]) == len(tiny["result"]["rows"])
    md = open(files["markdown"]).read()
    assert "| weight_average |" in md and "FSC n=1" in md and "BN re-est." in md
    csv_lines = open(files["csv"]).read().strip().splitlines()
    assert len(csv_lines) == 1 + len(on_disk["rows"])
    cal = list((tiny["results"] / "calibration").glob("*.json"))
    reports = {p.name: json.loads(p.read_text()) for p in cal}
    fsc = reports["weight_average__fsc__draw0.json"]
    assert fsc["coefficients"] and all(math.isfinite(v) for v in fsc["coefficients"].values())
    assert fsc["folded"] and not fsc["wrapped"]  # conv + BatchNorm all fold into plain weights
    assert "row_scale_mean" in reports["ties__wsc.json"]
    assert reports["iso_c__dsc__draw2.json"]["wsc_scales"]


def test_tiny_results_structure(tiny):
    result = tiny["result"]
    rows = _rows(result)
    names = result["config"]["tasks"]
    assert names == ["digits_low", "digits_high", "digits_parity", "digits_mod3"]
    expected = {("base", "none"), ("expert", "none"),
                ("task_arithmetic_tuned", "none"), ("task_arithmetic_tuned", "bn")}
    expected |= {(m, c) for m in DEFAULT_METHODS for c in CALIBRATIONS + ("bn", "bn+fsc")}
    assert set(rows) == expected
    for (_method, c), r in rows.items():
        assert set(r["per_task"]) == set(names)
        assert r["avg"] == pytest.approx(np.mean(list(r["per_task"].values())))
        lo, hi = r["avg_ci95"]
        assert lo <= r["avg"] <= hi
        assert r["draws"] == (3 if c in ("fsc", "dsc", "bn+fsc") else 1)
        if r["draws"] > 1:
            assert len(r["draw_avgs"]) == 3 and r["avg_std"] == pytest.approx(np.std(r["draw_avgs"], ddof=1))
    assert result["batchnorm"] is True
    for task in result["tasks"]:
        s = task["splits"]
        assert s["test"]["size"] >= 300 and s["calib"]["size"] > 0 and s["train"]["size"] > 300
    assert set(result["gains"]["over_uncalibrated"]) == set(DEFAULT_METHODS)
    assert rows[("task_arithmetic_tuned", "none")]["scale"] in result["config"]["ta_grid"]


def test_tiny_values_are_sane(tiny):
    result = tiny["result"]
    rows = _rows(result)
    base, expert = rows[("base", "none")], rows[("expert", "none")]
    chance = {t["name"]: t["chance"] for t in result["tasks"]}
    for name in result["config"]["tasks"]:
        assert expert["per_task"][name] > base["per_task"][name] + 0.03, name  # fine-tuning helped every task
        assert expert["per_task"][name] > 0.9
    assert expert["avg_normalized"] == pytest.approx(1.0)
    mean_chance = float(np.mean(list(chance.values())))
    for (m, c), r in rows.items():
        if m in ("base", "expert"):
            continue
        assert mean_chance + 0.1 < r["avg"] <= expert["avg"] + 1e-9, (m, c)
        assert 0 < r["avg_normalized"] <= 1.0 + 1e-9


def test_second_run_reuses_the_cache(tiny):
    cache = tiny["cache"]
    manifests = list(cache.glob("tiny/*/manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert set(manifest["experts"]) == set(tiny["result"]["config"]["tasks"])
    assert manifest["versions"]["torch"] and manifest["config"]["finetune"]["steps"] == 80
    for entry in manifest["experts"].values():
        splits = entry["splits"]
        idx = {s: set(v["indices"]) for s, v in splits.items()}
        assert not idx["train"] & idx["test"] and not idx["train"] & idx["calib"] and not idx["calib"] & idx["test"]
        assert not idx["val"] & (idx["train"] | idx["test"] | idx["calib"])
        assert all(len(v["sha256"]) == 64 for v in splits.values())
    assert all(not e["cached"] for e in tiny["result"]["experts"].values())
    assert tiny["result"]["base_pretext"]["cached"] is False

    again = run_benchmark("tiny", cache_dir=str(cache), results_dir=str(tiny["results"] / "again"), progress=False,
                          methods=["weight_average"], calibrations=["none", "fsc"], draws=1, tune_ta=False,
                          bootstrap=0)
    assert all(e["cached"] for e in again["experts"].values())
    assert again["base_pretext"]["cached"] is True
    assert again["timings"]["experts_seconds"] < 0.5 * tiny["result"]["timings"]["experts_seconds"]
    first, second = _rows(tiny["result"]), _rows(again)
    for key in (("base", "none"), ("expert", "none"), ("weight_average", "none")):
        assert second[key]["per_task"] == first[key]["per_task"]  # same experts, same data, deterministic eval
    # the same first calibration draw (seeded) gives the same FSC result
    assert second[("weight_average", "fsc")]["avg"] == pytest.approx(first[("weight_average", "fsc")]["draw_avgs"][0])
    assert json.loads(manifests[0].read_text())["experts"] == manifest["experts"]  # nothing rewritten


def test_corrupted_expert_is_rebuilt(tiny, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny["cache"], cache)
    manifest_path = next(cache.glob("tiny/*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    target = manifest_path.parent / manifest["experts"]["digits_mod3"]["file"]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    again = run_benchmark("tiny", cache_dir=str(cache), progress=False, methods=["weight_average"],
                          calibrations=["none"], tune_ta=False, bn_reestimate=False, bootstrap=0, write=False)
    info = again["experts"]
    assert info["digits_mod3"]["cached"] is False and "sha256" in info["digits_mod3"]["rebuilt_reason"]
    assert all(info[n]["cached"] for n in ("digits_low", "digits_high", "digits_parity"))
    rebuilt = json.loads(manifest_path.read_text())["experts"]["digits_mod3"]
    from magic_pl.zoo.backbones import file_sha256

    assert file_sha256(manifest_path.parent / rebuilt["file"]) == rebuilt["sha256"]
    # (seeded, but not bit-identical to the original: CPU kernels may pick other code paths in a warm process)
    assert rebuilt["spec"] == manifest["experts"]["digits_mod3"]["spec"]


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown suite"):
        run_benchmark("nope", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown merge method"):
        run_benchmark("tiny", cache_dir=str(tmp_path), methods=["average_of_vibes"])
    with pytest.raises(ValueError, match="unknown calibration"):
        run_benchmark("tiny", cache_dir=str(tmp_path), calibrations=["magic"])
    with pytest.raises(ValueError, match="no task"):
        run_benchmark("tiny", cache_dir=str(tmp_path), tasks=["imagenet"])


@pytest.mark.parametrize("sensitive", ["empty", "detect"])
def test_sensitive_sets(tiny, sensitive):
    result = run_benchmark("tiny", cache_dir=str(tiny["cache"]), progress=False, methods=["ties"],
                           calibrations=["none", "wsc", "fsc"], draws=1, tune_ta=False, bn_reestimate=False,
                           bootstrap=0, write=False, sensitive=sensitive, sensitive_alpha=3)
    rows = _rows(result)
    if sensitive == "empty":
        assert result["sensitive_set"] == []
        # paper gating with no sensitive tensor: WSC rows only grow
        assert rows[("ties", "wsc")]["scales"]["min"] >= 1.0 - 1e-6
    else:
        assert len(result["sensitive_set"]) == 3
        assert all(isinstance(k, str) and k.endswith(("weight", "bias")) for k in result["sensitive_set"])
    assert 0.2 < rows[("ties", "fsc")]["avg"] <= 1.0


def test_named_settings_columns_equal_their_explicit_strings(tiny):
    """A preset and the explicit string of the same setting are two paths to the same numbers; both probes run."""
    cals = ["none", "fsc_rom_gated", "fsc:statistic=ratio_of_means,gate=paper", "auto", "fsc_channel",
            "wsc_gated_detect_labelled"]
    result = run_benchmark("tiny", cache_dir=str(tiny["cache"]), progress=False, methods=["weight_average", "ties"],
                           calibrations=cals, draws=2, tune_ta=True, ta_grid=[0.3, 0.6], bn_reestimate=False,
                           bootstrap=100, write=False, sensitive_alpha=3)
    rows = _rows(result)
    for m in ("weight_average", "ties"):
        a, b = rows[(m, "fsc_rom_gated")], rows[(m, "fsc:statistic=ratio_of_means,gate=paper")]
        assert a["draw_avgs"] == b["draw_avgs"]
        assert a["setting"] == "fsc:statistic=ratio_of_means,gate=paper"
        # the paper gate never shrinks: every module's xi >= 1
        assert a["scales"]["min"] >= 1.0
    sets = result["sensitive_sets"]
    assert set(sets) == {"detect", "detect_labelled"} and all(len(v) == 3 for v in sets.values())
    gains = result["gains"]
    for c in cals[1:]:
        lo, hi = gains["mean_over_methods_ci95"][c]
        assert lo <= gains["mean_over_methods"][c] + 1e-9 and gains["mean_over_methods"][c] <= hi + 1e-9
        tuned = rows[("task_arithmetic_tuned", "none")]["avg"]
        want = np.mean([rows[(m, c)]["avg"] - tuned for m in ("weight_average", "ties")])
        assert gains["mean_over_tuned_ta"][c] == pytest.approx(want)


def test_label_free_selection_row_takes_the_closest_row_on_each_draw(tiny):
    result = run_benchmark("tiny", cache_dir=str(tiny["cache"]), progress=False, methods=["weight_average", "ties"],
                           calibrations=["none", "wsc", "fsc"], draws=2, tune_ta=False, bn_reestimate=False,
                           bootstrap=50, write=False, select=True)
    rows = _rows(result)
    chosen = rows[("selected", "label-free")]
    candidates = {k: r for k, r in rows.items() if "selection_scores" in r}
    assert set(candidates) == {(m, c) for m in ("weight_average", "ties") for c in ("none", "wsc", "fsc")}
    for d in range(2):
        best = min(candidates, key=lambda k: candidates[k]["selection_scores"][d])
        assert chosen["choices"][d] == f"{best[0]}@{best[1]}"
        row = candidates[best]
        assert chosen["draw_avgs"][d] == row["draw_avgs"][d if row["draws"] == 2 else 0]
    # data-free rows are measured on every draw's samples; their single evaluation serves both draws
    assert len(candidates[("ties", "wsc")]["selection_scores"]) == 2


def test_tuned_lines_row_and_data_free_rescalers(tiny, tmp_path):
    """``tune_lines``: 9 validation scores, the best one chosen; its beta = 0 points are Task Arithmetic with
    lambda = alpha (another path to the same model, so the same validation accuracy); SVC/LiNeS columns run."""
    result = run_benchmark("tiny", cache_dir=str(tiny["cache"]), results_dir=str(tmp_path), progress=False,
                           methods=["ties"], calibrations=["none", "svc", "lines", "lines_fsc"], draws=1,
                           tune_ta=True, ta_grid=[0.125, 0.25, 0.5], tune_lines=True, bn_reestimate=False,
                           bootstrap=0)
    rows = _rows(result)
    lines = rows[("lines_tuned", "lines")]
    scores = lines["val_scores"]
    assert len(scores) == 9 and result["config"]["lines_grid"][0] == [0.5, 0.0]
    best = max(scores.values())
    chosen = f"{4 * lines['lines_alpha']:g}/K,{4 * lines['lines_beta']:g}/K"  # K = 4 tasks
    assert scores[chosen] == best and lines["setting"].startswith("wsc:weight_method=lines,lines_alpha=")
    ta = rows[("task_arithmetic_tuned", "none")]["val_scores"]
    for mult, lam in ((0.5, "0.125"), (1, "0.25"), (2, "0.5")):  # alpha = mult / K, beta = 0: TA at lambda = alpha
        assert scores[f"{mult:g}/K,0/K"] == pytest.approx(ta[lam], abs=0.02)
    assert 0.2 < lines["avg"] <= 1.0
    for c in ("svc", "lines", "lines_fsc"):
        assert 0.2 < rows[("ties", c)]["avg"] <= 1.0
    assert "scales" not in rows[("ties", "svc")] and "scales" not in rows[("ties", "lines")]  # they scale no rows
    assert rows[("ties", "lines_fsc")]["scales"]["kind"] == "FSC xi per module"
    md = open(result["files"]["markdown"]).read()
    assert "| task_arithmetic + LiNeS, (alpha, beta) tuned on val (alpha " in md
    assert "LiNeS + FSC" in md


def test_max_test_subsamples_the_test_split_and_keeps_the_cached_experts(tiny):
    result = run_benchmark("tiny", cache_dir=str(tiny["cache"]), progress=False, methods=["weight_average"],
                           calibrations=["none"], tune_ta=False, bn_reestimate=False, bootstrap=0, write=False,
                           max_test=50)
    assert all(e["cached"] for e in result["experts"].values())
    assert result["expert_cache"] == tiny["result"]["expert_cache"]
    assert all(t["splits"]["test"]["size"] == 50 for t in result["tasks"])
    # the subsample is part of the full test split: its accuracy is an average of the full run's examples
    assert all(len(r["per_task"]) == len(result["config"]["tasks"]) for r in result["rows"])


def test_two_ddp_processes_give_the_one_process_results(tiny, tmp_path):
    """``--trainer.devices 2 --trainer.strategy ddp`` (the real command line; Lightning starts the second process):
    every row's per-task accuracy, xi and interval equals the one-process run's."""
    options = ["--suite", "tiny", "--cache_dir", str(tiny["cache"]), "--methods", "[weight_average, ties]",
               "--calibrations", "[none, wsc, fsc, dsc]", "--draws", "2", "--ta_grid", "[0.3, 0.6]",
               "--bootstrap", "100", "--progress", "false"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # one thread per process: the same float sums
    runs = {}
    for devices in (2, 1):
        out = tmp_path / f"d{devices}"
        extra = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
        proc = subprocess.run([sys.executable, "-m", "magic_pl.zoo", *options, "--results_dir", str(out), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.count("written:") == 1  # the first process reports
        runs[devices] = json.loads((out / "results.json").read_text())
    one, two = runs[1], runs[2]
    assert one["config"]["trainer"]["world_size"] == 1 and two["config"]["trainer"]["world_size"] == 2
    rows1, rows2 = _rows(one), _rows(two)
    # base, experts; 2 methods x (4 settings, bn, bn+fsc); tuned TA (+ bn)
    assert rows1.keys() == rows2.keys() and len(rows1) == 2 + 2 * 6 + 2
    for key, r1 in rows1.items():
        r2 = rows2[key]
        assert r1["per_task"] == r2["per_task"] and r1["draw_avgs"] == r2["draw_avgs"], key
        assert r1["avg_ci95"] == r2["avg_ci95"], key
        if "scales" in r1:
            assert all(abs(r1["scales"][f] - r2["scales"][f]) <= 1e-6 for f in ("mean", "min", "max")), key
    for name in ("weight_average__fsc__draw1.json", "ties__dsc__draw0.json"):
        xi1, xi2 = (json.loads((tmp_path / f"d{d}" / "calibration" / name).read_text())["coefficients"]
                    for d in (1, 2))
        assert xi1.keys() == xi2.keys() and max(abs(xi1[k] - xi2[k]) for k in xi1) <= 1e-6
