"""The ``magic-pl`` console script: configures OpenMP, then runs :func:`magic_pl.lightning.cli.main`.

Busy-waiting OpenMP threads collapse when the cores are shared (measured on 2 shared cores: a MiniLM training step
took 12 s instead of 1.5 s); passive waiting costs little on an idle machine. OpenMP reads the policy when torch
loads, so it is set here, before any torch import (``magic_pl`` imports its names lazily). A policy the user set is
kept.
"""

from __future__ import annotations

import os
from typing import Any


def main() -> Any:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from magic_pl.lightning.cli import main as cli_main

    return cli_main()
