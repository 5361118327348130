"""``magic-pl``: the command line (a LightningCLI).

Subcommands:

- ``fit`` / ``validate`` / ``test`` / ``predict``: the standard Lightning ones, for any LightningModule.
- ``calibrate``: merge, WSC, FSC (``trainer.predict``), save, evaluate (``trainer.test``) in one command
  (:meth:`magic_pl.lightning.trainer.MagicTrainer.calibrate`).
- ``benchmark``: the offline real-data benchmark, forwarded to ``magic_pl.zoo.run_benchmark``.

With no config the subcommands run a tiny synthetic demo (:mod:`magic_pl.lightning.demo`).

Examples::

    magic-pl calibrate                                   # the synthetic demo, seconds on a CPU
    magic-pl calibrate -c configs/clip_vit_b32_8tasks.yaml
    magic-pl calibrate -c configs/tiny.yaml --model.init_args.calibration wsc --output_dir out/
    magic-pl calibrate -c configs/tiny.yaml --print_config > my.yaml && magic-pl calibrate -c my.yaml
    magic-pl test -c configs/tiny.yaml
    magic-pl benchmark --suite text
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from magic_pl.lightning.trainer import MagicTrainer

__all__ = ["MagicCLI", "main", "benchmark_main"]

_DESCRIPTION = (
    "magic-pl: training-free model merging with MAGIC magnitude calibration (arXiv 2512.19320). "
    "Subcommands: fit, validate, test, predict, calibrate (merge + WSC + FSC + save + evaluate), "
    "and benchmark (the offline real-data benchmark: magic-pl benchmark --help)."
)


class MagicCLI(LightningCLI):
    """LightningCLI with a ``calibrate`` subcommand, a CSV logger by default and overwritable saved configs."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "calibrate": {"model", "datamodule"}}

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", MagicTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        defaults.setdefault("logger", {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                       "init_args": {"save_dir": "magic_pl_logs"}})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("description", _DESCRIPTION)
        super().__init__(args=args, run=run, trainer_defaults=defaults, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--log_level", type=Optional[str], default=None,
                            help="Python logging level for lightning / magic_pl (e.g. WARNING); default unchanged")

    def before_instantiate_classes(self) -> None:
        level = self._get(self.config, "log_level")
        if level:
            import logging

            for name in ("lightning.pytorch", "lightning.fabric", "magic_pl"):
                logging.getLogger(name).setLevel(level.upper())


def benchmark_main(args: Sequence[str]) -> Any:
    """``magic-pl benchmark [options]``: parse ``magic_pl.zoo.run_benchmark``'s signature and call it."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    try:
        from magic_pl.zoo import run_benchmark
    except ImportError as err:
        raise SystemExit(
            f"magic-pl benchmark needs magic_pl.zoo.run_benchmark, which cannot be imported here: {err}. "
            "Install the benchmark extras: pip install 'magic-pl[zoo]'"
        ) from err
    parser = ArgumentParser(prog="magic-pl benchmark",
                            description=(run_benchmark.__doc__ or "Run the offline benchmark").strip().splitlines()[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config of the benchmark options")
    parser.add_function_arguments(run_benchmark, as_group=False)
    cfg = parser.parse_args(list(args))
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    kwargs.pop("config", None)
    result = run_benchmark(**kwargs)
    from magic_pl.zoo.__main__ import print_result

    print_result(result)
    return result


_RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict", "calibrate")


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


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``magic-pl`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "benchmark":
        benchmark_main(argv[1:])
        return
    demo = with_demo_config(argv)
    if demo is not argv:
        import warnings

        with warnings.catch_warnings():  # args deliberately extend the command line here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            MagicCLI(args=demo)
        return
    MagicCLI(args=None if args is None else argv)


if __name__ == "__main__":
    main()
