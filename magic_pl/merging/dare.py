"""DARE: Drop And REscale, then Task Arithmetic or TIES (Yu et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Optional

from torch import Tensor

from ._common import check_fraction, generator_for, prepare
from .basic import task_arithmetic
from .method import Option, merge_method, then_option_specs
from .options import Interval, OneOf, Seed
from .steps import dare_drop
from .ties import ties

#: Methods DARE can hand its sparsified task vectors to (option ``then``).
DARE_THEN = {"task_arithmetic": task_arithmetic, "ties": ties}
_THEN = OneOf(tuple(DARE_THEN))


def _then_options(options: Optional[Mapping[str, Any]]) -> dict[str, Option]:
    """The options of the ``then`` method DARE hands over to (:func:`~magic_pl.merging.method.then_option_specs`)."""
    return then_option_specs("dare", DARE_THEN, options)


@merge_method(
    name="dare",
    paper="Yu et al., ICML 2024, arXiv 2311.03099",
    more_options=_then_options,
    steps=(dare_drop,),
)
def dare(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    p: Annotated[float, Interval(0.0, 1.0, high_open=True)] = 0.9,
    then: Annotated[str, _THEN] = "task_arithmetic",
    seed: Seed = 0,
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
