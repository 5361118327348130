"""DARE: Drop And REscale, then Task Arithmetic or TIES (Yu et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import check_fraction, generator_for, prepare
from .basic import task_arithmetic
from .ties import ties

#: Methods DARE can hand its sparsified task vectors to (option ``then``).
DARE_THEN = {"task_arithmetic": task_arithmetic, "ties": ties}


def dare_drop(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Zero each entry independently with probability ``p`` and rescale the survivors by ``1 / (1 - p)``.

    Unbiased: ``E[dare_drop(tau)] = tau``.
    """
    keep = torch.rand(tau.shape, generator=generator, device=tau.device, dtype=torch.float32) >= p
    return torch.where(keep, tau / (1.0 - p), torch.zeros((), dtype=tau.dtype, device=tau.device))


def dare(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    p: float = 0.9,
    then: str = "task_arithmetic",
    seed: int = 0,
    **then_options: Any,
) -> Tensor:
    """DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    ICML 2024): drop each entry of every tau_k with probability ``p``, rescale by ``1/(1-p)``, then merge.

    Args:
        p: drop probability in [0, 1); 0.9 is the rate the paper reports as safe for fine-tuned deltas (the MAGIC
            authors' scripts dropped 10% by mistake, so their DARE rows are not DARE at the paper's rate).
        then: ``"task_arithmetic"`` (default; its ``scale`` defaults to 0.3) or ``"ties"`` (``density``, ``scale``).
        seed: drop masks use a ``torch.Generator`` seeded from (seed, parameter name, task index), so results are
            reproducible, independent of key order, and differ across tensors and tasks.
        **then_options: options of the ``then`` method (e.g. ``scale``).
    """
    if then not in DARE_THEN:
        raise ValueError(f"dare: unknown then={then!r}; valid: {', '.join(sorted(DARE_THEN))}")
    p = check_fraction(p, "p", high_open=True)
    ts = prepare(taus, name)
    dropped = [dare_drop(t, p, generator_for(seed, name, k, t.device)) for k, t in enumerate(ts)]
    return DARE_THEN[then](dropped, name=name, **then_options)
