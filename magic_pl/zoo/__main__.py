"""``python -m magic_pl.zoo --suite text [options]``: run a benchmark suite (options = ``run_benchmark``'s keywords).

``--config configs/benchmark/text.yaml`` loads a YAML file whose keys are those keywords; ``--print_config`` prints
the resolved configuration (a runnable YAML) and exits.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

# Busy-waiting OpenMP threads collapse when the cores are shared (measured on 2 shared cores: a MiniLM step took 12 s
# instead of 1.5 s); passive waiting costs little when the machine is idle. Only effective before torch loads, and
# only if the user has not chosen a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser():
    """A jsonargparse parser over :func:`magic_pl.zoo.run_benchmark`'s signature (typed options + ``--config``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from magic_pl.zoo.runner import run_benchmark

    parser = ArgumentParser(prog="python -m magic_pl.zoo",
                            description="magic-pl offline benchmark: merge fine-tuned experts, calibrate with "
                                        "MAGIC (WSC/FSC/DSC), evaluate on real data.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with run_benchmark options")
    parser.add_function_arguments(run_benchmark, as_positional=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from magic_pl.zoo.data import DataUnavailableError
    from magic_pl.zoo.runner import run_benchmark

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    cfg = parser.parse_args(list(argv) if argv is not None else None)
    options = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    try:
        result = run_benchmark(**options)
    except DataUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_result(result)
    return 0


def print_result(result: dict) -> None:
    """Print the markdown report and the files written (or the result itself when nothing was written)."""
    files = result.get("files", {})
    print(open(files["markdown"]).read() if "markdown" in files else result)
    if files:
        print("\nwritten:", ", ".join(files.values()))


if __name__ == "__main__":
    sys.exit(main())
