"""``python -m magic_pl.zoo --suite text [options]``: the same command as ``magic-pl benchmark`` (options:
``run_benchmark``'s keywords and ``--trainer.*``; ``--config`` loads a YAML file of them, ``--print_config`` prints
the resolved configuration and exits).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Busy-waiting OpenMP threads collapse when the cores are shared (measured on 2 shared cores: a MiniLM step took 12 s
# instead of 1.5 s); passive waiting costs little when the machine is idle. Only effective before torch loads, and
# only if the user has not chosen a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> None:
    from magic_pl.lightning.cli import main as cli_main

    cli_main(["benchmark", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
