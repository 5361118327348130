"""``magic-pl``: the command line (a LightningCLI).

Subcommands:

- ``fit`` / ``validate`` / ``test`` / ``predict``: the standard Lightning ones, for any LightningModule.
- ``calibrate``: merge, WSC, FSC (``trainer.predict``), save, evaluate (``trainer.test``) in one command
  (:meth:`magic_pl.lightning.trainer.MagicTrainer.calibrate`); ends by printing where the model and the report went
  and a summary of xi.
- ``benchmark``: the offline real-data benchmark, forwarded to ``magic_pl.zoo.run_benchmark``.
- ``merge RECIPE OUTPUT_DIR``: a recipe file in MergeKit's vocabulary plus calibration keys
  (:mod:`magic_pl.lightning.recipe`); the adapter is picked from the checkpoints.

With no config the subcommands run a tiny synthetic demo (:mod:`magic_pl.lightning.demo`). ``--base``,
``--experts``, ``--task_names``, ``--merge_method``, ``--merge_options`` and ``--calibration`` are shortcuts for the
model's init args (the adapter's for the checkpoints when it takes them); they win over the config file.

Errors are printed in one line (``magic-pl: error: ...``; exit code 2 for a bad command line or config, 1 for a
failed run, 130 for Ctrl-C); ``--debug`` or ``MAGIC_PL_DEBUG=1`` shows the full traceback instead.

Examples::

    magic-pl calibrate                                   # the synthetic demo, seconds on a CPU
    magic-pl calibrate -c configs/tiny.yaml --output_dir out
    magic-pl calibrate -c configs/tiny.yaml --merge_method ties --calibration wsc --output_dir out
    magic-pl calibrate -c configs/tiny.yaml --print_config > my.yaml && magic-pl calibrate -c my.yaml
    magic-pl test -c configs/tiny.yaml
    magic-pl benchmark --suite text
    magic-pl merge recipe.yaml merged
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from jsonargparse import ArgumentError, DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from magic_pl.lightning.cli_errors import (
    CLIError,
    describe_construction_error,
    import_class,
    one_line,
    short_parse_error,
)
from magic_pl.lightning.report import comparison_line, pairing_line, selection_line, xi_summary
from magic_pl.lightning.trainer import MagicTrainer

__all__ = ["MagicCLI", "MagicArgumentParser", "CLIError", "main", "benchmark_main", "benchmark_parser", "merge_main",
           "calibrate_summary", "xi_summary", "apply_shortcuts", "budget_from_data", "with_demo_config"]

PROG = "magic-pl"
DEBUG_ENV = "MAGIC_PL_DEBUG"
#: The default CSV logger's ``save_dir``; with an output directory the logs end up in ``<output_dir>/logs`` (written
#: beside it while the run is under way, moved in when it succeeded).
DEFAULT_LOG_DIR = "magic_pl_logs"

_DESCRIPTION = (
    "magic-pl: training-free model merging with MAGIC magnitude calibration (arXiv 2512.19320). "
    "Errors print in one line; --debug (or MAGIC_PL_DEBUG=1) shows the traceback."
)
_BENCHMARK_HELP = "Run the offline real-data benchmark (magic_pl.zoo.run_benchmark; magic-pl benchmark --help)."
_MERGE_HELP = ("Merge and calibrate as a recipe file says (MergeKit's vocabulary plus calibration keys): the "
               "adapter is picked from the checkpoints; writes one model with its card (magic-pl merge RECIPE "
               "OUTPUT_DIR).")


# --------------------------------------------------------------------------------------------------------------------
# Shortcut flags: short names for the model's (or its adapter's) init args
# --------------------------------------------------------------------------------------------------------------------
#: flag -> (type, metavar, help). The checkpoint flags go to the adapter when it takes them, else to the model.
_SHORTCUTS: dict[str, tuple[Any, str, str]] = {
    "base": (Optional[str], "PATH", "the pretrained checkpoint the experts were fine-tuned from"),
    "experts": (Optional[list[str]], "[PATH,...]", "one fine-tuned checkpoint per task"),
    "task_names": (Optional[list[str]], "[NAME,...]", "one task name per expert"),
    "merge_method": (Optional[str], "NAME", "the merge method"),
    "merge_options": (Optional[dict[str, Any]], "DICT", "options of the merge method (replace the config's)"),
    "calibration": (Optional[Union[dict[str, Any], str]], "SETTING", "the MAGIC calibration setting"),
}
_CHECKPOINT_SHORTCUTS = ("base", "experts", "task_names")


def _accepts(class_path: str, arg: str) -> bool:
    try:
        return arg in inspect.signature(import_class(class_path).__init__).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return False


def _is_class_config(value: Any) -> bool:
    return isinstance(value, Namespace) and isinstance(value.get("class_path"), str)


def apply_shortcuts(cfg: Namespace) -> Namespace:
    """Move the shortcut flags' values (``--base``, ``--merge_method``, ...) into the model's init args, in place.

    ``base`` / ``experts`` / ``task_names`` go to the model's ``adapter`` when it takes them, else to the model; the
    others to the model. Given shortcuts are then reset to ``None``, so applying twice changes nothing. Raises
    :class:`CLIError` naming the flag when no class takes it.
    """
    given = {k: cfg.get(k) for k in _SHORTCUTS if cfg.get(k) is not None}
    if not given:
        return cfg
    model = cfg.get("model")
    if not _is_class_config(model):
        raise CLIError(f"--{next(iter(given))} sets an init arg of the model, but no model is configured: "
                       "give a config with -c (e.g. configs/tiny.yaml)")
    if model.get("init_args") is None:
        model["init_args"] = Namespace()
    adapter = model.init_args.get("adapter")
    for name, value in given.items():
        if name in _CHECKPOINT_SHORTCUTS and _is_class_config(adapter):
            if not _accepts(adapter.class_path, name):
                raise CLIError(f"--{name}: the adapter {adapter.class_path} takes no {name!r}; set its init args "
                               "(--model.init_args.adapter.init_args.*) or use an adapter that reads checkpoints")
            if adapter.get("init_args") is None:
                adapter["init_args"] = Namespace()
            adapter.init_args[name] = value
        elif _accepts(model.class_path, name):
            model.init_args[name] = value
        else:
            raise CLIError(f"--{name}: the model {model.class_path} takes no {name!r} (the shortcut is for "
                           "magic_pl.lightning.MagicModule)")
        cfg[name] = None
    return cfg


def budget_from_data(cfg: Namespace) -> Namespace:
    """Give the model the data module's ``samples_per_task`` when the model leaves its merge method or calibration to
    the recommended recipe (:func:`magic_pl.recommended.recommended` picks per budget), in place."""
    model, data = cfg.get("model"), cfg.get("data")
    if not (_is_class_config(model) and _is_class_config(data)):
        return cfg
    args = model.get("init_args") or Namespace()
    if args.get("merge_method") is not None and args.get("calibration") is not None:
        return cfg
    if _accepts(model.class_path, "samples_per_task") and _accepts(data.class_path, "samples_per_task"):
        data_args = data.get("init_args") or Namespace()
        args["samples_per_task"] = data_args.get("samples_per_task", 1)
        model["init_args"] = args
    return cfg


#: How many subclasses outside magic_pl a help line names before it says how many more there are.
_OTHER_SUBCLASSES_SHOWN = 3


class _ShortSubclassesFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with each "known subclasses" list cut to magic-pl's classes and a few others: for an
    ``nn.Module`` argument it lists every module class torch defines (``--model.help MagicModule`` ran to 2,800
    lines)."""

    def _expand_help(self, action: Any) -> str:
        text = super()._expand_help(action)
        head, sep, tail = text.partition(", known subclasses: ")
        if not sep:
            return text
        names, close = (tail[:-1], ")") if tail.endswith(")") else (tail, "")
        names = [n.strip() for n in names.split(",")]
        ours = [n for n in names if n.startswith("magic_pl.")]
        others = [n for n in names if not n.startswith("magic_pl.")]
        shown = ours + others[:_OTHER_SUBCLASSES_SHOWN]
        more = len(names) - len(shown)
        return head + sep + ", ".join(shown) + (f", and {more} more" if more > 0 else "") + close


class MagicArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose dumps (``--print_config``, the saved ``config.yaml``) have the shortcut flags
    folded into the model's init args, so a printed config reads as it runs, and whose help keeps subclass lists
    short."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _ShortSubclassesFormatter)
        super().__init__(*args, **kwargs)

    #: set on the subcommand parsers that have the shortcut flags (the parsers jsonargparse builds for nested
    #: classes, e.g. MagicModule's init args, share this class but hold the real init args under the same names)
    has_shortcuts = False

    def dump(self, namespace: Namespace, *args: Any, **kwargs: Any) -> str:
        if "skip_none" in kwargs:  # Lightning still passes the pre-4.49 name; forward it under the current one
            kwargs["skip_unset"] = kwargs.pop("skip_none")
        if self.has_shortcuts:
            namespace = apply_shortcuts(namespace.clone())
            for key in _SHORTCUTS:  # folded above: a printed config names each value once, where it applies
                if key in namespace:
                    del namespace[key]
        return super().dump(namespace, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# calibrate --help: the options that matter first, then the full list
# --------------------------------------------------------------------------------------------------------------------
class _SummaryFirstFormatter(_ShortSubclassesFormatter):
    """Keeps the curated summary's layout (argparse would re-wrap it)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


_HELP_WIDTH = 100
_CALIBRATE_USAGE = (
    "magic-pl calibrate [-c CONFIG] [--base PATH] [--experts [PATH,...]] [--merge_method NAME]\n"
    "                          [--merge_options DICT] [--calibration SETTING] [--output_dir DIR] [options]"
)


def _calibrate_summary_help() -> str:
    from magic_pl.calibration import PRESETS, STEPS
    from magic_pl.merging.method import METHODS

    methods = ", ".join(METHODS)
    presets = ", ".join(PRESETS)
    steps = ", ".join(STEPS)
    rows = [
        ("-c, --config FILE", "a YAML config naming the model, its adapter and the data (e.g. configs/tiny.yaml);"
                              " none: a synthetic demo"),
        ("--base PATH", "the pretrained checkpoint the experts were fine-tuned from"),
        ("--experts [P,...]", "one fine-tuned checkpoint per task, e.g. --experts [a.safetensors,b.safetensors]"),
        ("--task_names [N,...]", "one name per expert (default: the config's, or the expert file names)"),
        ("--merge_method NAME", f"one of: {methods}; with --calibration unset too (in the config as well), the "
                                "recommended recipe for the data's samples_per_task (README: Which recipe)"),
        ("--merge_options DICT", "the method's options, e.g. '{scale: 0.3}' or '{density: 0.2, seed: 0}'"),
        ("--calibration SETTING", f"a preset ({presets}), steps joined by '+' ({steps}; e.g. "
                                  "'svc+fsc:svc.alpha=0.2'), 'space:key=value,...' (e.g. 'fsc:norm=2') or a dict"),
        ("--output_dir DIR", "the calibrated model (DIR/model), calibration_report.json/.png and the logs "
                             "(DIR/logs); none: no model is written"),
        ("--evaluate false", "skip the test run (--save_model / --report false skip those outputs)"),
        ("--print_config", "print the resolved config (runnable with -c) and exit"),
        ("--debug", "show the full traceback on errors (or MAGIC_PL_DEBUG=1)"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    lines = [
        "Merge the experts into the base, calibrate the merged model with MAGIC (WSC, then FSC statistics from",
        "trainer.predict), save it and evaluate it (trainer.test), in one command. It ends by printing the model",
        "path, the report path and a summary of xi.",
        "",
        "Main options (the shortcuts set the model's init args and win over the config; full list below):",
    ]
    for key, text in rows:
        wrapped = textwrap.wrap(text, _HELP_WIDTH - width - 2) or [""]
        lines.append(f"  {key:<{width}}{wrapped[0]}")
        lines += [" " * (width + 2) + more for more in wrapped[1:]]
    lines += [
        "",
        "Examples:",
        "  magic-pl calibrate -c configs/tiny.yaml --output_dir out",
        "  magic-pl calibrate -c configs/tiny.yaml --merge_method ties --merge_options '{density: 0.2}' \\",
        "      --calibration wsc --output_dir out",
        "  magic-pl calibrate -c configs/tiny.yaml --print_config > my.yaml && magic-pl calibrate -c my.yaml",
        "",
        "All options:",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------------------------
class SaveConfigToLogs(SaveConfigCallback):
    """Lightning's ``config.yaml`` beside the run's logs, and nowhere without a logger: with ``logger: false``
    Lightning's log directory is the working directory, and a user's own ``config.yaml`` there would be replaced."""

    def setup(self, trainer: Any, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class MagicCLI(LightningCLI):
    """LightningCLI with a ``calibrate`` subcommand, shortcut flags for the model's merge and calibration options, a
    CSV logger by default (under ``<output_dir>/logs`` when an output directory is given), seed 0 by default, and
    errors raised as :class:`CLIError` (parse and construction: exit code 2) or as they are (the run)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "calibrate": {"model", "datamodule"}}

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", MagicTrainer)
        kwargs.setdefault("parser_class", MagicArgumentParser)
        kwargs.setdefault("save_config_callback", SaveConfigToLogs)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # an explicit seed: `True` (Lightning's default) warns "No seed found" on every run
        kwargs.setdefault("seed_everything_default", 0)
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        defaults.setdefault("logger", {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                       "init_args": {"save_dir": DEFAULT_LOG_DIR}})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("description", _DESCRIPTION)
        parser_kwargs.setdefault("prog", PROG)
        parser_kwargs.setdefault("calibrate", {})
        parser_kwargs["calibrate"].setdefault("usage", _CALIBRATE_USAGE)
        parser_kwargs["calibrate"].setdefault("description", _calibrate_summary_help())
        super().__init__(args=args, run=run, trainer_defaults=defaults, parser_kwargs=parser_kwargs, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", False)  # errors are raised and printed in one line by `main`
        return super().init_parser(**kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # add_subcommand gives every subcommand the main parser's formatter; calibrate's summary keeps its layout
        self._subcommand_parsers["calibrate"].formatter_class = _SummaryFirstFormatter
        # listed with the others; `main` runs it (it has its own options, from run_benchmark's signature)
        placeholder = self.init_parser(description=_BENCHMARK_HELP)
        parser._subcommands_action.add_subcommand("benchmark", placeholder, help=_BENCHMARK_HELP)
        parser._subcommands_action.add_subcommand("merge", self.init_parser(description=_MERGE_HELP), help=_MERGE_HELP)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if isinstance(parser, MagicArgumentParser):
            parser.has_shortcuts = True
        group = parser.add_argument_group("Shortcuts (set the model's init args; they win over the config)")
        for name, (typ, metavar, text) in _SHORTCUTS.items():
            group.add_argument(f"--{name}", type=typ, default=None, metavar=metavar, help=text)
        parser.add_argument("--log_level", type=Optional[str], default=None,
                            help="Python logging level for lightning / magic_pl (e.g. WARNING); default unchanged")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise CLIError(short_parse_error(str(err)), hint=_usage_hint(args)) from err
        if self.config.get("subcommand") in ("benchmark", "merge"):
            sub = self.config.get("subcommand")
            usage = "benchmark [options]" if sub == "benchmark" else "merge RECIPE OUTPUT_DIR [options]"
            raise CLIError(f"{sub} takes its own options: run it as `magic-pl {usage}` (first argument; see "
                           f"magic-pl {sub} --help)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(str(self.subcommand), self.config)
        level = cfg.get("log_level")
        if level:
            for name in ("lightning.pytorch", "lightning.fabric", "magic_pl"):
                logging.getLogger(name).setLevel(level.upper())
        given = [k for k in _SHORTCUTS if cfg.get(k) is not None]
        _checkpoints_instead_of_demo(cfg)
        apply_shortcuts(cfg)
        budget_from_data(cfg)
        if given:  # the shortcuts' values were not checked against their targets' types while parsing
            try:
                self._parser(self.subcommand).validate(cfg)
            except (ArgumentError, TypeError, ValueError) as err:
                flags = ", ".join(f"--{k}" for k in given)
                raise CLIError(f"{short_parse_error(str(err))} (set by {flags})",
                               hint=_usage_hint(None, self.subcommand)) from err
        output_dir = cfg.get("output_dir")
        if output_dir:
            from magic_pl.output import scratch_path

            # a hidden sibling while the run is under way; calibrate moves it to <output_dir>/logs on success
            _logs_under(cfg.get("trainer"), scratch_path(output_dir, "logs"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            cfg = self.config.get(str(self.subcommand), self.config)
            raise CLIError(describe_construction_error(err, cfg), hint=_usage_hint(None, self.subcommand)) from err

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            # Lightning turns Ctrl-C inside its loops into sys.exit(1) after a graceful shutdown
            if getattr(getattr(self, "trainer", None), "interrupted", False):
                raise KeyboardInterrupt from None
            raise

    def calibrate(self, **kwargs: Any) -> dict[str, Any]:
        """Run :meth:`MagicTrainer.calibrate` and print where its outputs went (rank 0)."""
        result = self.trainer.calibrate(**kwargs)
        if self.trainer.is_global_zero:
            print("\n".join(calibrate_summary(result, kwargs.get("output_dir"), kwargs.get("save_model", True))),
                  flush=True)
        return result


def _checkpoints_instead_of_demo(cfg: Namespace) -> None:
    """``calibrate --base B --experts [...]`` without a config: the adapter is picked from the checkpoints
    (:func:`magic_pl.lightning.recipe.adapter_for`) in place of the demo's, and the demo's synthetic data is dropped
    (a setting that needs data then says so; ``--calibration wsc`` needs none)."""
    model = cfg.get("model")
    adapter = model.init_args.get("adapter") if _is_class_config(model) and model.get("init_args") else None
    if not (_is_class_config(adapter) and adapter.class_path == DEMO_ADAPTER) or cfg.get("experts") is None:
        return
    from magic_pl.lightning.recipe import RecipeError, adapter_for

    if cfg.get("base") is None:
        raise CLIError("--experts without a config needs --base: the checkpoint the experts were fine-tuned from")
    try:
        class_path, args = adapter_for(cfg.base, cfg.experts, where="--experts")
    except RecipeError as err:
        raise CLIError(str(err)) from err
    model.init_args.adapter = Namespace(class_path=class_path, init_args=Namespace(**args))
    cfg.base = cfg.experts = None  # now in the adapter's init args
    cfg.data = None


def _logs_under(trainer_cfg: Optional[Namespace], save_dir: Path) -> None:
    """Point the default logger (``save_dir`` == :data:`DEFAULT_LOG_DIR`) at ``save_dir``; a chosen one is kept."""
    logger = trainer_cfg.get("logger") if trainer_cfg is not None else None
    for lg in logger if isinstance(logger, list) else [logger]:
        if _is_class_config(lg) and lg.get("init_args") is not None and lg.init_args.get("save_dir") == DEFAULT_LOG_DIR:
            lg.init_args.save_dir = str(save_dir)


def calibrate_summary(result: dict[str, Any], output_dir: Any = None, save_model: bool = True) -> list[str]:
    """The lines ``calibrate`` ends with: the model path (or why none was written), the report path and a one-line
    xi summary read from the report JSON."""
    lines = []
    if result.get("model"):
        lines.append(f"model:  {result['model']}")
    elif output_dir is None:
        lines.append("no model written: pass --output_dir DIR")
    else:
        lines.append("no model written: --save_model is false" if not save_model else "no model written")
    report = result.get("report")
    if report:
        doc = json.loads(Path(report).read_text())
        lines.append(f"report: {report}")
        if doc.get("pairing"):
            lines.append(pairing_line(doc["pairing"]))
        if (doc.get("config") or {}).get("recommended"):
            lines.append(f"recipe: {doc['config']['recommended']}")
        if (doc.get("config") or {}).get("selection"):
            lines.append(selection_line(doc["config"]["selection"]))
        lines.append(xi_summary(doc))
        if doc.get("comparison"):
            lines.append(comparison_line(doc["comparison"]))
        return lines
    lines.append("no report written: pass --output_dir DIR" if output_dir is None else
                 "no report written (--report false)")
    calibrated = result.get("result")
    if calibrated is not None:
        lines.append(xi_summary({"coefficients": calibrated.coefficients, "wsc_scales": calibrated.wsc_scales}))
    return lines


def _usage_hint(args: Any, subcommand: Optional[str] = None) -> str:
    if subcommand is None and isinstance(args, (list, tuple)):
        subcommand = next((a for a in args if a in MagicCLI.subcommands()), None)
    help_cmd = f"{PROG} {subcommand} --help" if subcommand else f"{PROG} --help"
    return f"{help_cmd} lists the options; --debug shows the traceback"


# --------------------------------------------------------------------------------------------------------------------
# benchmark, demo, entry point
# --------------------------------------------------------------------------------------------------------------------
def benchmark_parser(run_benchmark: Any = None) -> Any:
    """The parser of ``magic-pl benchmark`` (and ``python -m magic_pl.zoo``): ``run_benchmark``'s keywords plus
    ``--trainer.*`` (the Lightning ``Trainer`` options, as ``calibrate`` takes them; defaults:
    :data:`magic_pl.zoo.runner.TRAINER_DEFAULTS`), ``--model``/``--data``/``--merge_options`` for a run on your own
    experts (:func:`magic_pl.zoo.own.add_own_arguments`) and ``-c/--config`` for a YAML file of them."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import Trainer

    if run_benchmark is None:
        from magic_pl.zoo import run_benchmark
    parser = ArgumentParser(prog=f"{PROG} benchmark", exit_on_error=False,
                            description=(run_benchmark.__doc__ or "Run the offline benchmark").strip().splitlines()[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config of the benchmark options")
    takes_trainer = "trainer" in inspect.signature(run_benchmark).parameters
    parser.add_function_arguments(run_benchmark, as_group=False, skip={"trainer"} if takes_trainer else None)
    if takes_trainer:
        from magic_pl.zoo.runner import TRAINER_DEFAULTS

        parser.add_class_arguments(Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True)
        parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})
    from magic_pl.zoo.own import add_own_arguments

    add_own_arguments(parser)
    return parser


def benchmark_main(args: Sequence[str]) -> Any:
    """``magic-pl benchmark [options]``: parse :func:`benchmark_parser`'s options and call
    ``magic_pl.zoo.run_benchmark``, or with ``model``/``data`` (your own experts)
    :func:`magic_pl.zoo.own.run_own_benchmark`; only the Trainer options that differ from Lightning's defaults are
    passed."""
    try:
        from magic_pl.zoo import run_benchmark
    except ImportError as err:
        raise CLIError(
            f"magic-pl benchmark needs magic_pl.zoo.run_benchmark, which cannot be imported here: {err}. "
            "Install the benchmark extras: pip install 'magic-pl[zoo]'", exit_code=1,
        ) from err
    parser = benchmark_parser(run_benchmark)
    try:
        cfg = parser.parse_args(list(args))
    except ArgumentError as err:
        raise CLIError(short_parse_error(str(err)), hint=f"{PROG} benchmark --help lists the options") from err
    from magic_pl.zoo.own import OWN_ONLY, own_arguments, run_own_benchmark

    run = run_benchmark
    if any(cfg.get(k) is not None for k in ("model", "data")):  # your own experts instead of a suite
        run, kwargs = run_own_benchmark, own_arguments(parser, cfg)
    else:
        given = [k for k in OWN_ONLY if cfg.get(k) is not None]
        if given:
            raise CLIError(f"{given[0]}: applies to a benchmark on your own experts (with model: and data:), not to "
                           "a built-in suite", hint=f"{PROG} benchmark --help lists the options")
        kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__", "trainer", *OWN_ONLY)}
    if "trainer" in cfg:
        kwargs["trainer"] = _trainer_options(parser, cfg)
    from lightning.pytorch.utilities import rank_zero_only

    from magic_pl.zoo.data import DataUnavailableError

    try:
        result = run(**kwargs)
    except DataUnavailableError as err:
        raise CLIError(str(err)) from err
    if rank_zero_only.rank == 0:  # under DDP every process runs the benchmark; the first one reports
        print_result(result)
    return result


def _trainer_options(parser: Any, cfg: Namespace) -> Optional[dict[str, Any]]:
    """The ``--trainer.*`` values that differ from Lightning's defaults (class-path entries such as callbacks and
    loggers instantiated)."""
    from lightning.pytorch import Trainer

    defaults = {k: p.default for k, p in inspect.signature(Trainer.__init__).parameters.items()}
    given = cfg.trainer.as_dict()
    changed = [k for k, v in given.items() if k in defaults and v != defaults[k]]
    if not changed:
        return None
    values = parser.instantiate_classes(cfg).trainer if any(isinstance(given[k], (dict, list)) for k in changed) \
        else cfg.trainer
    return {k: values[k] for k in changed}


def print_result(result: dict) -> None:
    """Print the markdown report and the files written (or the result itself when nothing was written)."""
    files = result.get("files", {})
    print(open(files["markdown"]).read() if "markdown" in files else result)
    if files:
        print("\nwritten:", ", ".join(files.values()))


_RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict", "calibrate")
DEMO_ADAPTER = "magic_pl.lightning.demo.DemoAdapter"


def with_demo_config(argv: list[str]) -> list[str]:
    """``argv`` with the synthetic demo config (:func:`magic_pl.lightning.demo.demo_defaults`) inserted after the
    subcommand when neither a config (``-c``/``--config``) nor any ``--model*``/``--data*`` argument is given."""
    if not argv or argv[0] not in _RUN_SUBCOMMANDS:
        return argv
    user_config = any(a in ("-c", "--config") or a.startswith(("--config=", "--model", "--data")) for a in argv[1:])
    if user_config or "PL_CONFIG" in os.environ:
        return argv
    import yaml

    from magic_pl.lightning.demo import demo_defaults

    return [argv[0], "--config", yaml.safe_dump(demo_defaults(), sort_keys=False), *argv[1:]]


#: The classes ``--model.<arg>.help`` / ``--data.<arg>.help`` describe when neither a config nor the class is given.
_HELP_DEFAULTS = {"model": "magic_pl.lightning.MagicModule", "data": "magic_pl.lightning.TaskDataModule"}


def with_help_defaults(argv: list[str]) -> list[str]:
    """``argv`` with ``--data magic_pl.lightning.TaskDataModule`` (``--model ...MagicModule``) inserted before a
    nested help request such as ``--data.test.help HFDataset`` when no config and no data (model) class is given:
    jsonargparse can only describe an init arg of a class it knows."""
    if not argv or argv[0] not in _RUN_SUBCOMMANDS or any(a in ("-c", "--config") or a.startswith("--config=")
                                                          for a in argv[1:]):
        return argv
    out = list(argv)
    for group, cls in _HELP_DEFAULTS.items():
        asks = next((i for i, a in enumerate(out) if a.startswith(f"--{group}.") and
                     a.split("=")[0].endswith(".help") and a.count(".") >= 2), None)
        given = any(a == f"--{group}" or a.startswith(f"--{group}=") for a in out)
        if asks is not None and not given:
            out[asks:asks] = [f"--{group}", cls]
    return out


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(debug?, argv without ``--debug``): ``--debug`` anywhere or ``MAGIC_PL_DEBUG`` set to a true value."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    rest = [a for a in argv if a != "--debug"]
    return env or len(rest) != len(argv), rest


class _NoProductTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines (two per run, about products
    magic-pl does not use); every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _quiet_product_tips() -> None:
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoProductTips) for f in log.filters):
        log.addFilter(_NoProductTips())


def merge_parser() -> Any:
    """The parser of ``magic-pl merge RECIPE OUTPUT_DIR [options]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=f"{PROG} merge", exit_on_error=False, description=_MERGE_HELP)
    parser.add_argument("recipe", type=str, help="the recipe file (YAML; MergeKit's keys plus calibration, "
                                                 "calibration_data, test_data)")
    parser.add_argument("output_dir", type=str, help="where OUTPUT_DIR/model, its README.md model card and "
                                                     "calibration_report.json/.png go")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace OUTPUT_DIR even if magic-pl did not write it (default false)")
    parser.add_argument("--evaluate", type=bool, default=True, help="evaluate on the recipe's test_data (default true)")
    parser.add_argument("--compare", type=bool, default=True,
                        help="also evaluate the uncalibrated merge and each expert (default true)")
    parser.add_argument("--push_to_hub", type=Optional[str], default=None,
                        help="upload OUTPUT_DIR/model to this Hub repository (owner/name) afterwards")
    parser.add_argument("--accelerator", type=str, default="auto", help="Lightning accelerator (default auto)")
    parser.add_argument("--devices", type=Union[int, str], default=1, help="Lightning devices (default 1)")
    return parser


def merge_main(args: Sequence[str]) -> dict[str, Any]:
    """``magic-pl merge RECIPE OUTPUT_DIR``: :func:`magic_pl.lightning.recipe.run_recipe`, then the lines
    ``calibrate`` ends with."""
    from magic_pl.lightning.recipe import RecipeError, load_recipe, run_recipe

    parser = merge_parser()
    try:
        cfg = parser.parse_args(list(args))
    except ArgumentError as err:
        raise CLIError(short_parse_error(str(err)), hint=f"{PROG} merge --help lists the options") from err
    try:
        recipe = load_recipe(cfg.recipe)
    except RecipeError as err:
        raise CLIError(str(err)) from err
    result = run_recipe(recipe, cfg.output_dir, overwrite=cfg.overwrite, evaluate=cfg.evaluate, compare=cfg.compare,
                        push_to_hub=cfg.push_to_hub,
                        trainer={"accelerator": cfg.accelerator, "devices": cfg.devices})
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print("\n".join(calibrate_summary(result, cfg.output_dir)), flush=True)
        if result.get("hub"):
            print(f"hub:    {result['hub']}", flush=True)
    return result


def _run(argv: list[str]) -> None:
    if argv and argv[0] == "benchmark":
        benchmark_main(argv[1:])
        return
    if argv and argv[0] == "merge":
        merge_main(argv[1:])
        return
    _quiet_product_tips()
    with warnings.catch_warnings():  # args are given explicitly on purpose (demo config, --debug removed)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        MagicCLI(args=with_demo_config(with_help_defaults(argv)))


def _fail(message: str, code: int, hint: Optional[str] = None) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if hint:
        print(f"{PROG}: {hint}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(code)


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``magic-pl`` console script (``args``: the command line without the program name; default
    ``sys.argv[1:]``). Exits 2 on a bad command line or config, 1 on a failed run, 130 on Ctrl-C."""
    debug, argv = _debug_requested(list(sys.argv[1:] if args is None else args))
    try:
        _run(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except CLIError as err:
        if debug:
            raise
        _fail(str(err), err.exit_code, err.hint)
    except Exception as err:  # the run failed: one line, the traceback on request
        if debug:
            raise
        _fail(one_line(err), 1, f"--debug (or {DEBUG_ENV}=1) shows the traceback")


if __name__ == "__main__":
    main()
