"""The ``magic-pl`` console script: runs :func:`magic_pl.lightning.cli.main`.

Importing :mod:`magic_pl` (this module's package) has already set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a
policy, before anything imports torch: busy-waiting OpenMP threads collapse on shared cores (a MiniLM training step
took 12 s instead of 1.5 s on 2 shared cores).
"""

from __future__ import annotations

from typing import Any


def main() -> Any:
    from magic_pl.lightning.cli import main as cli_main

    return cli_main()
