"""The benchmark on your own experts: ``magic-pl benchmark -c my_models.yaml`` (docs/benchmark.md, "Your own models").

The grid of the built-in suites (merge methods x calibration settings x draws of the calibration samples, with the
same tables, CSV, JSON, chart and paired bootstrap intervals) on a model adapter and a data module written exactly as
``magic-pl calibrate`` takes them (``model.init_args.adapter`` and ``data``). Rows (every one evaluated on every task's
test set, each task through its own head):

- ``base``: the pretrained body with the experts' heads (Task Arithmetic with lambda = 0, theta0 exactly).
- ``expert``: expert k on task k (:meth:`MagicModule.use_expert`); normalised accuracies divide by it.
- ``<method> x <calibration>``: one :class:`~magic_pl.lightning.module.MagicModule` per method, merged once; every
  calibration starts from a copy of that merge (:meth:`MagicModule.with_calibration`). A row whose module needs
  unlabelled samples (FSC, DSC, a data-based merge, a sensitive set to detect) runs ``trainer.predict`` once per draw:
  draw d takes ``n_calib`` samples per task from the data module's calibration sets with the data module's own draw
  (:func:`~magic_pl.lightning.data.draw_indices`) seeded by :func:`draw_seed`, so ``magic-pl calibrate`` with
  ``data.init_args.seed`` set to that seed reproduces the row.

The base body and the heads are loaded once for the whole run (:class:`SetupOnce`); each merge reads the experts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from magic_pl.lightning.data import TaskDataModule, check_count, dataset_labels, draw_indices
from magic_pl.lightning.module import MagicModule
from magic_pl.models.base import MergeSetup, ModelAdapter

__all__ = ["OWN_OPTIONS", "OWN_ONLY", "DEFAULT_RESULTS_DIR", "SetupOnce", "check_own_options", "check_own_benchmark",
           "draw_seed", "run_own_benchmark", "add_own_arguments", "suite_options", "own_arguments"]

log = logging.getLogger(__name__)

#: The benchmark options that apply to your own models (the keys of ``magic-pl benchmark -c`` next to ``model`` and
#: ``data``); every other option of the built-in suites (``suite``, ``tasks``, ``finetune``, ``tune_ta``, ...) is
#: refused with them.
OWN_OPTIONS = ("model", "data", "methods", "calibrations", "merge_options", "n_calib", "draws", "seed", "trainer",
               "threads", "bootstrap", "progress", "results_dir", "write", "select")
#: Where the reports go unless ``results_dir`` says otherwise.
DEFAULT_RESULTS_DIR = "results/own_models"
#: Name of these runs in the reports' titles (the built-in ones show their suite's name there).
RUN_NAME = "own models"


def draw_seed(seed: int, draw: int) -> int:
    """The data module seed of calibration draw ``draw`` in a run seeded ``seed``: ``seed * 1000 + draw`` (the draws
    of two run seeds never share a data seed while draws < 1000)."""
    return int(seed) * 1_000 + int(draw)


class SetupOnce(ModelAdapter):
    """``adapter``, set up once: every :class:`MagicModule` of a run gets the same
    :class:`~magic_pl.models.base.MergeSetup`, so the base body and the heads are read once (the setup is only read by
    the modules: each merge copies the base body; the heads are frozen and shared, as
    :meth:`MagicModule.with_calibration` shares them). Saving and task models go to ``adapter``."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self._setup: Optional[MergeSetup] = None

    def setup(self) -> MergeSetup:
        if self._setup is None:
            self._setup = self.adapter.setup()
        return self._setup

    def save(self, setup: MergeSetup, body: torch.nn.Module, path: Any, **options: Any) -> Path:
        return self.adapter.save(setup, body, path, **options)

    def task_model(self, setup: MergeSetup, body: torch.nn.Module, task: str) -> torch.nn.Module:
        return self.adapter.task_model(setup, body, task)

    def __getattr__(self, name: str) -> Any:
        # the wrapped adapter's own attributes (base_path, expert_paths, task_names: read for reports and checks)
        if name in ("adapter", "_setup"):
            raise AttributeError(name)
        return getattr(self.adapter, name)


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _uses_data(method: str, calibration: str) -> bool:
    """Whether a (method, calibration) row needs calibration samples, as far as the names tell (a setting's sensitive
    set to detect is known only once its module is bound)."""
    from magic_pl.calibration import resolve_setting
    from magic_pl.merging import METHODS

    setting = resolve_setting(calibration)
    return setting.uses_data or setting.detects or METHODS[method].needs_data


def check_own_options(*, methods: Optional[Sequence[str]] = None, calibrations: Optional[Sequence[str]] = None,
                      merge_options: Optional[Mapping[str, Mapping[str, Any]]] = None, n_calib: int = 1,
                      draws: int = 3, seed: int = 0, threads: Optional[int] = None, bootstrap: int = 1000
                      ) -> tuple[list[str], list[str], dict[str, dict[str, Any]]]:
    """Check the options of a run that name no file (methods, calibrations, merge options, counts); each error names
    its key. Method names must be registered (:data:`magic_pl.merging.METHODS`) and calibration settings resolve
    (:func:`magic_pl.calibration.resolve_setting`), neither repeated; ``merge_options`` may name only run methods
    and their valid options.

    Returns:
        ``(methods, calibrations, merge options per method)``, defaults filled in (methods
        :data:`~magic_pl.zoo.runner.DEFAULT_METHODS`, calibrations :data:`~magic_pl.zoo.runner.CALIBRATIONS`;
        data-free merges get ``seed``).
    """
    from magic_pl.calibration import resolve_setting
    from magic_pl.merging import METHODS, validate_merge_options
    from magic_pl.zoo.runner import CALIBRATIONS, DEFAULT_METHODS

    check_count("n_calib", n_calib, 1)
    check_count("draws", draws, 1)
    check_count("bootstrap", bootstrap, 0)
    check_count("threads", threads, 1, none="torch's default")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    methods = list(methods) if methods is not None else list(DEFAULT_METHODS)
    calibrations = list(calibrations) if calibrations is not None else list(CALIBRATIONS)
    if not methods or not calibrations:
        raise ValueError(f"{'methods' if not methods else 'calibrations'} is empty: give at least one")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown merge method(s) {unknown}; available: {', '.join(METHODS)}")
    for key, names in (("methods", methods), ("calibrations", calibrations)):
        if len(set(names)) != len(names):
            raise ValueError(f"{key} repeat a name: {names}")
    for c in calibrations:
        try:
            resolve_setting(c)
        except (ValueError, TypeError) as err:
            raise ValueError(f"calibrations: {c!r}: {err}") from None
    options = {str(k): dict(v or {}) for k, v in (merge_options or {}).items()}
    extra = sorted(set(options) - set(methods))
    if extra:
        raise ValueError(f"merge_options: {extra} are not among the run's methods {methods}; merge_options maps a "
                         "method name to its options, e.g. {ties: {density: 0.2}}")
    per_method: dict[str, dict[str, Any]] = {}
    for m in methods:
        opts = dict(options.get(m, {}))
        if not METHODS[m].needs_data:  # the run seed makes random merges (DARE, ...) reproducible, as built in
            opts.setdefault("seed", int(seed))
        try:
            per_method[m] = validate_merge_options(m, opts)
        except (ValueError, TypeError) as err:
            raise ValueError(f"merge_options.{m}: {err}") from None
    return methods, calibrations, per_method


def check_own_benchmark(model: ModelAdapter, data: TaskDataModule, *, methods: Optional[Sequence[str]] = None,
                        calibrations: Optional[Sequence[str]] = None,
                        merge_options: Optional[Mapping[str, Mapping[str, Any]]] = None, n_calib: int = 1,
                        draws: int = 3, seed: int = 0, threads: Optional[int] = None, bootstrap: int = 1000
                        ) -> tuple[list[str], list[str], dict[str, dict[str, Any]]]:
    """Check a run's options before any checkpoint is read; each error names its key (``methods``, ``data...test``).

    Checks :func:`check_own_options`; that ``model`` is a model adapter and ``data`` a ``TaskDataModule``; that the
    data's task names are the adapter's (when it names them: they pair the test sets with the experts); that every
    task has a test set; and, when a row needs calibration samples, that every task has a calibration set of at least
    ``n_calib`` samples. Returns what :func:`check_own_options` returns.
    """
    if not isinstance(model, ModelAdapter):
        raise ValueError(f"model must be a magic_pl.models adapter (class_path + init_args, as magic-pl calibrate "
                         f"takes under model.init_args.adapter), got {type(model).__name__}")
    if not isinstance(data, TaskDataModule):
        raise ValueError(f"data must be a magic_pl.lightning.TaskDataModule (class_path + init_args, as magic-pl "
                         f"calibrate takes it), got {type(data).__name__}")
    methods, calibrations, per_method = check_own_options(
        methods=methods, calibrations=calibrations, merge_options=merge_options, n_calib=n_calib, draws=draws,
        seed=seed, threads=threads, bootstrap=bootstrap)
    names = list(data.task_names)
    named = getattr(model, "task_names", None)
    if named is not None and list(named) != names:
        raise ValueError(
            f"data.init_args.task_names {names} differ from the model's task names {list(named)}: test sets pair "
            "with the experts by name and position; list the tasks in the experts' order in both"
        )
    missing = [n for n in names if n not in data.test_sets]
    if missing:
        raise ValueError(f"data.init_args.test has no test set for task(s) {missing}: the benchmark evaluates every "
                         "row on every task's labelled test set")
    if any(_uses_data(m, c) for m in methods for c in calibrations):
        for n in names:
            source = data.calibration_sources.get(n)
            if source is None:
                raise ValueError(
                    f"data.init_args.calibration has no set for task {n!r}: FSC, DSC and data-based merges draw "
                    f"n_calib unlabelled samples from every task's calibration set (leave calibration out to draw "
                    "from the test sets)")
            size = len(source)
            if n_calib > size:
                raise ValueError(f"n_calib={n_calib} is more than task {n!r} has: its calibration set holds {size} "
                                 f"sample(s); use n_calib <= {size} or give more calibration samples")
    return methods, calibrations, per_method


def _with_draw(data: TaskDataModule, samples: int, seed: int, test: Optional[Sequence[str]] = None
               ) -> TaskDataModule:
    """A data module like ``data`` (same datasets and loader options) drawing ``samples`` calibration samples per
    task with ``seed``, and testing the tasks ``test`` (default all)."""
    names = list(data.task_names)
    tests = {n: data.test_sets[n] for n in (test if test is not None else names)}
    return TaskDataModule(names, test=tests, calibration=data.calibration_sources, val=data.val_sets,
                          samples_per_task=samples, seed=seed, batch_size=data.batch_size,
                          calibration_batch_size=data.calibration_batch_size, test_limit=data.test_limit,
                          num_workers=data.num_workers, pad_values=data.pad_values)


def _task_info(data: TaskDataModule, name: str, classes: Optional[int]) -> dict[str, Any]:
    """One task's sizes, chance level (1 / classes) and majority-class rate on its test set (as evaluated)."""
    test = data.test_sets[name]
    n = len(test) if data.test_limit is None else min(data.test_limit, len(test))
    info: dict[str, Any] = {"name": name, "classes": classes, "test": n,
                            "calibration_pool": len(data.calibration_sources[name])
                            if name in data.calibration_sources else None,
                            "chance": 1.0 / classes if classes else None, "majority": None}
    labels = dataset_labels(test, n, f"the test set of task {name!r}")
    if labels is not None:
        labels = labels[labels >= 0]
        if len(labels):
            info["majority"] = float(torch.bincount(labels).max()) / len(labels)
    return info


def run_own_benchmark(
    model: ModelAdapter,
    data: TaskDataModule,
    *,
    methods: Optional[list[str]] = None,
    calibrations: Optional[list[str]] = None,
    merge_options: Optional[dict[str, dict[str, Any]]] = None,
    n_calib: int = 1,
    draws: int = 3,
    seed: int = 0,
    trainer: Optional[dict[str, Any]] = None,
    threads: Optional[int] = None,
    bootstrap: int = 1000,
    progress: bool = True,
    results_dir: Optional[str] = None,
    write: bool = True,
    select: bool = False,
) -> dict[str, Any]:
    """Run the benchmark grid on your own experts and write the built-in suites' reports.

    Args:
        model: a model adapter (:mod:`magic_pl.models`: ``SequenceClassificationAdapter``, ``TimmAdapter``, ...), as
            ``magic-pl calibrate`` takes it under ``model.init_args.adapter``; its experts pair with its task names.
        data: a :class:`~magic_pl.lightning.data.TaskDataModule` as ``magic-pl calibrate`` takes it: a labelled test
            set per task, and calibration sets (default: the test sets) to draw unlabelled samples from. Its
            ``samples_per_task`` and ``seed`` are replaced by ``n_calib`` and the draws' seeds; its batch sizes,
            ``test_limit`` and workers are kept.
        methods: merge methods (default :data:`~magic_pl.zoo.runner.DEFAULT_METHODS`).
        calibrations: calibration settings, as in the built-in benchmark (default ``none``, ``wsc``, ``fsc``,
            ``dsc``; presets such as ``auto`` and ``"space:key=value,..."`` strings add columns).
        merge_options: options per method, e.g. ``{"ties": {"density": 0.2}}`` (default: each method's defaults).
        n_calib: unlabelled calibration samples per task for the rows that use data (default 1).
        draws: draws of those samples (such rows report mean and std; default 3); draw d uses the data seed
            :func:`draw_seed` ``(seed, d)``.
        seed: seed of the draws and of random merges (default 0).
        trainer: ``lightning.pytorch.Trainer`` options over :data:`~magic_pl.zoo.runner.TRAINER_DEFAULTS` (CPU, one
            process, nothing logged), e.g. ``{"accelerator": "gpu"}``.
        threads: torch CPU threads during the run (default: torch's); restored afterwards.
        bootstrap: bootstrap resamples of the 95% intervals (0 disables; default 1000).
        progress: show a progress bar (default ``True``).
        results_dir: where the reports go (default :data:`DEFAULT_RESULTS_DIR`).
        write: write ``results.md``/``.csv``/``.json``/``.png`` and ``calibration/*.json`` (default ``True``).
        select: add the label-free selection's row (``selected``), as the built-in suites do (default ``False``).

    Returns:
        The results dict also written to ``results.json``: the built-in suites' keys (``rows``, ``gains``,
        ``config``, ``tasks``, ...) plus ``model`` (the adapter and its checkpoints).
    """
    methods, calibrations, per_method = check_own_benchmark(
        model, data, methods=methods, calibrations=calibrations, merge_options=merge_options, n_calib=n_calib,
        draws=draws, seed=seed, threads=threads, bootstrap=bootstrap)
    out_dir = Path(results_dir) if results_dir else Path(DEFAULT_RESULTS_DIR)
    if write:
        from magic_pl.zoo.report import check_report_files

        check_report_files(out_dir)  # the user's results.md is never replaced, and a run never fails only at the end
    if data.samples_per_task not in (1, n_calib) or data.seed != 0:
        log.warning("data.init_args.samples_per_task / seed are replaced by the benchmark's n_calib=%d and the "
                    "draws' seeds", n_calib)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(model, data, methods, calibrations, per_method, n_calib=n_calib, draws=draws, seed=seed,
                    trainer=trainer, bootstrap=bootstrap, progress=progress, out_dir=out_dir, write=write,
                    select=select)
    finally:
        torch.set_num_threads(previous_threads)


def _run(adapter: ModelAdapter, data: TaskDataModule, methods: list[str], calibrations: list[str],
         per_method: dict[str, dict[str, Any]], *, n_calib: int, draws: int, seed: int,
         trainer: Optional[dict[str, Any]], bootstrap: int, progress: bool, out_dir: Path, write: bool,
         select: bool = False
         ) -> dict[str, Any]:
    import warnings

    from tqdm.auto import tqdm

    from magic_pl.calibration import resolve_setting
    from magic_pl.zoo.experts import library_versions
    from magic_pl.zoo.runner import _gains, _Row, _trainer_summary, build_trainer, selected_row

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    names = list(data.task_names)
    settings = {c: resolve_setting(c) for c in calibrations}
    pl_trainer = build_trainer(trainer)  # bad Trainer options fail here, before any tensor is read
    dev = pl_trainer.strategy.root_device
    main_process = pl_trainer.is_global_zero
    shared = SetupOnce(adapter)
    # the calibration sets are the test sets when none were given (the paper's protocol): said in the report
    from_test = all(data.calibration_sources.get(n) is data.test_sets.get(n) for n in names)
    seeds = [draw_seed(seed, d) for d in range(draws)]
    draw_data = [_with_draw(data, n_calib, s) for s in seeds]
    # the samples each draw takes (the data module's own draw, recorded so a reader can see them); only drawn when
    # a row can use them (the pools were checked against n_calib then)
    picked = [{n: draw_indices(len(data.calibration_sources[n]), n_calib, seed=s, task=k, name=n)
               for k, n in enumerate(names)} for s in seeds] \
        if any(_uses_data(m, c) for m in methods for c in calibrations) else None

    rows: list[_Row] = []
    reports: dict[str, Any] = {}
    bar = tqdm(total=2 + len(methods) * len(calibrations), desc="own models: evaluate",
               disable=not (progress and main_process))

    def module(method: str, options: Mapping[str, Any]) -> MagicModule:
        m = MagicModule(adapter=shared, merge_method=method, merge_options=dict(options), calibration="none")
        m.build()
        return m

    def evaluate(row: _Row, m: MagicModule, calib_s: float) -> None:
        t = time.perf_counter()
        m.example_correctness = {}  # a module tested again (use_expert) must not keep the previous test's values
        pl_trainer.test(m, datamodule=data, verbose=False)
        row.add(_correctness(m, names), calib_s, time.perf_counter() - t)
        bar.update(1)

    with warnings.catch_warnings():
        # one sample per calibration batch and small evaluation sets: Lightning's loader hints do not apply
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # ---- base and experts (one module: Task Arithmetic with lambda = 0 is theta0 exactly) ---------------------
        t = time.perf_counter()
        reference = module("task_arithmetic", {"scale": 0.0})
        timings["load_seconds"] = time.perf_counter() - t
        t_eval = time.perf_counter()
        row = _Row("base", "none")
        evaluate(row, reference, 0.0)
        rows.append(row)
        classes = reference.class_counts()
        row = _Row("expert", "none")
        correct: dict[str, np.ndarray] = {}
        t = time.perf_counter()
        for n in names:  # expert k on task k: theta0 + tau_k, tested on its own task only
            reference.use_expert(n)
            reference.example_correctness = {}
            # the user's data with task n's test set only (its calibration sets are not read here)
            pl_trainer.test(reference, datamodule=_with_draw(data, n_calib, seeds[0], test=[n]), verbose=False)
            correct[n] = _correctness(reference, [n])[n]
        row.add(correct, 0.0, time.perf_counter() - t)
        bar.update(1)
        rows.append(row)
        del reference

        # ---- merges x calibrations --------------------------------------------------------------------------------
        selector = None
        if select:  # the experts' outputs on each draw's samples, once
            from magic_pl.lightning.selection import DrawScores

            selector = DrawScores(module("task_arithmetic", {}), draw_data)
        for method in methods:
            t = time.perf_counter()
            merged = module(method, per_method[method])  # uncalibrated: every calibration starts from a copy of it
            merge_s = time.perf_counter() - t
            for calib in calibrations:
                setting = settings[calib]
                row = _Row(method, calib, merge_seconds=merge_s, setting=setting.to_string())
                t = time.perf_counter()
                m = merged if setting.space == "none" else merged.with_calibration(setting)
                if not m.needs_calibration_data:  # none, or data-free (WSC, SVC): applied when bound; one row
                    rep = m.run.result if setting.space != "none" else None
                    if rep is not None:
                        if rep.wsc_scales:  # SVC and LiNeS scale no rows
                            row.xi.append(rep.wsc_scales)
                        reports[f"{method}/{calib}"] = {"setting": setting.to_dict(),
                                                        "row_scale_mean": rep.wsc_scales}
                    evaluate(row, m, time.perf_counter() - t)
                    if selector is not None:
                        row.scores = [selector.score(m, d) for d in range(draws)]
                else:  # FSC / DSC, a data-based merge or a set to detect: once per draw
                    bar.total += draws - 1
                    for d in range(draws):
                        t = time.perf_counter()
                        m = merged.with_calibration(setting)
                        pl_trainer.predict(m, datamodule=draw_data[d], return_predictions=False)
                        rep = m.run.result
                        if setting.uses_data and rep is not None:
                            row.xi.append(rep.coefficients)
                        reports[f"{method}/{calib}/draw{d}"] = {"setting": setting.to_dict(), "data_seed": seeds[d],
                                                                **(rep.to_dict() if rep is not None else {})}
                        evaluate(row, m, time.perf_counter() - t)
                        if selector is not None:
                            row.scores.append(selector.score(m, d))
                rows.append(row)
            del merged
        if selector is not None:
            rows.append(selected_row(rows, draws))
    bar.close()
    timings["evaluate_seconds"] = time.perf_counter() - t_eval
    timings["total_seconds"] = time.perf_counter() - t_start

    # ---- summarise ------------------------------------------------------------------------------------------------
    expert_acc = {n: float(rows[1].draws[0][n].mean()) for n in names}
    summaries = [r.summary(expert_acc, bootstrap, seed) for r in rows]
    setup = shared.setup()
    sources = {"adapter": _class_path(adapter), "base": setup.metadata.get("base"),
               "experts": dict(zip(names, setup.metadata.get("experts") or [None] * len(names)))}
    result: dict[str, Any] = {
        "suite": RUN_NAME,
        "description": f"your own experts: {type(adapter).__name__}, {len(names)} tasks",
        "model": sources,
        "config": {
            "results_dir": str(out_dir), "tasks": names, "methods": methods, "calibrations": calibrations,
            "merge_options": per_method, "n_calib": n_calib, "draws": draws, "seed": seed, "draw_seeds": seeds,
            "calibration_samples": picked, "calibration_from_test": from_test,
            "settings": {c: s.to_dict() for c, s in settings.items()}, "device": str(dev),
            "trainer": _trainer_summary(pl_trainer), "threads": torch.get_num_threads(), "bootstrap": bootstrap,
            "data": {"class_path": _class_path(data), "batch_size": data.batch_size, "test_limit": data.test_limit},
        },
        "tasks": [_task_info(data, n, classes.get(n)) for n in names],
        "batchnorm": False,
        "rows": summaries,
        "gains": _gains(summaries, methods, rows, bootstrap, seed),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if write and main_process:
        from magic_pl.zoo.report import write_reports

        result["files"] = write_reports(result, reports, out_dir)
    return result


def _correctness(m: MagicModule, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example correctness of ``names`` after ``trainer.test``; refused when evaluation kept none (token
    accuracy of causal LMs has no per-example record: no bootstrap rows)."""
    missing = [n for n in names if n not in m.example_correctness]
    if missing:
        raise ValueError(
            f"evaluation kept no per-example results for task(s) {missing}: the benchmark needs class labels (one per "
            "example) in every task's test set; causal language models are evaluated with magic-pl calibrate")
    return {n: m.example_correctness[n].cpu().numpy() for n in names}


# ---------------------------------------------------------------------------------------------------------------------
# The command line: `magic-pl benchmark -c my_models.yaml`
# ---------------------------------------------------------------------------------------------------------------------
#: The options only runs on your own experts take (the built-in suites' parser has no such keys).
OWN_ONLY = ("model", "data", "merge_options")


def add_own_arguments(parser: Any) -> None:
    """Add ``--model``, ``--data`` and ``--merge_options`` (:data:`OWN_ONLY`) to the benchmark's parser: with
    ``model`` and ``data`` given, ``magic-pl benchmark`` runs :func:`run_own_benchmark` instead of a suite."""
    parser.add_argument(
        "--model", type=Optional[ModelAdapter], default=None,
        help="Your own experts: a model adapter (class_path + init_args), exactly what magic-pl calibrate takes "
             "under model.init_args.adapter. With data, the benchmark runs on them instead of a suite (options of "
             "the built-in suites do not apply; docs/benchmark.md, 'Your own models').")
    parser.add_argument(
        "--data", type=Optional[TaskDataModule], default=None,
        help="With --model: a magic_pl.lightning.TaskDataModule (class_path + init_args) as magic-pl calibrate "
             "takes it: a labelled test set per task and calibration sets to draw n_calib samples from.")
    parser.add_argument(
        "--merge_options", type=Optional[dict[str, dict[str, Any]]], default=None,
        help="With --model: options per merge method, e.g. '{ties: {density: 0.2}}' (default: each method's).")


def suite_options(parser: Any, cfg: Any) -> list[str]:
    """The options of ``cfg`` that only the built-in suites take and that differ from their defaults (a value left
    at its default cannot be told from one not given)."""
    defaults = parser.get_defaults()
    own = set(OWN_OPTIONS) | {"config", "__path__"}
    return [k for k in cfg.keys() if "." not in k and k not in own and cfg.get(k) != defaults.get(k)]


def own_arguments(parser: Any, cfg: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`run_own_benchmark` from the benchmark parser's ``cfg``, but ``trainer``: the
    adapter and the data module built, every option checked (:func:`check_own_benchmark`) before any tensor is read.
    Raises :class:`~magic_pl.lightning.cli_errors.CLIError` naming the key (exit code 2)."""
    from magic_pl.lightning.cli_errors import CLIError, describe_construction_error

    hint = "docs/benchmark.md ('Your own models') lists the keys; --debug shows the traceback"
    missing = [k for k in ("model", "data") if cfg.get(k) is None]
    if missing:
        raise CLIError(f"{missing[0]}: missing; a benchmark on your own experts needs both model: (the adapter, as "
                       "magic-pl calibrate takes it under model.init_args.adapter) and data: (a TaskDataModule)",
                       hint=hint)
    suite_only = suite_options(parser, cfg)
    if suite_only:
        raise CLIError(f"{', '.join(suite_only)}: option(s) of the built-in suites; with model: the benchmark takes "
                       f"{', '.join(OWN_OPTIONS)}", hint=hint)
    options = ("methods", "calibrations", "merge_options", "n_calib", "draws", "seed", "threads", "bootstrap")
    try:  # the options that name no file first: a bad one fails before any data file is read
        check_own_options(**{k: cfg.get(k) for k in options})
    except ValueError as err:
        raise CLIError(str(err), hint=hint) from err
    try:
        built = parser.instantiate_classes(cfg)
    except Exception as err:  # a class of the config failed to build: name its key
        raise CLIError(describe_construction_error(err, cfg), hint=hint) from err
    kwargs = {k: built.get(k) for k in OWN_OPTIONS if k != "trainer"}
    try:
        check_own_benchmark(kwargs["model"], kwargs["data"], **{k: kwargs[k] for k in options})
    except ValueError as err:
        raise CLIError(str(err), hint=hint) from err
    return kwargs
