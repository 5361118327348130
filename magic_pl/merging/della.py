"""DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election and disjoint merge
(Deep et al., 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from torch import Tensor

from ._common import generator_for, prepare
from .method import merge_method
from .options import Density, Interval, OneOf, Scale, Seed
from .steps import disjoint_mean, elect_sign, magprune


def _window_rule(options: Mapping[str, Any]) -> None:
    """MagPrune's keep probabilities ``density +/- epsilon`` must be probabilities (``density`` 1 prunes nothing)."""
    d, e = options["density"], options["epsilon"]
    if d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
        raise ValueError(
            f"merge method 'della': keep probabilities density +/- epsilon = [{d - e:g}, {d + e:g}] must lie "
            "in (0, 1); lower epsilon or move density"
        )


@merge_method(
    name="della",
    paper="Deep, Bhardwaj & Poria, 2024, arXiv 2406.11617",
    check=_window_rule,
    steps=(magprune, elect_sign, disjoint_mean),
)
def della(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    density: Density = 0.5,
    epsilon: Annotated[float, Interval(0.0, 0.5, high_open=True)] = 0.15,
    rescale: Annotated[str, OneOf(("l1", "inverse", "none"))] = "l1",
    scale: Scale = 1.0,
    seed: Seed = 0,
) -> Tensor:
    """DELLA-Merging (Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling", 2024), per tensor:

    1. Drop (MagPrune, :func:`magprune`): within each row, entries are ranked by magnitude and kept with
       probability rising linearly from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), then
       rescaled. Row-wise ranking is the paper's best variant and MergeKit's.
    2. Elect: per entry the sign of the sum of the pruned task vectors (a zero sum elects +, as MergeKit does).
    3. Fuse: the mean over the tasks whose pruned entry has the elected sign (0 if none), times ``scale`` (lambda).

    This is MergeKit 0.1.5's ``della`` with every model's ``weight`` 1 and ``normalize: true``: with the same
    ``torch`` random stream its tensors are equal (see benchmarks/bench_vs_peers.py). Masks are drawn from a
    ``torch.Generator`` seeded from (seed, parameter name, task index), like DARE's.

    Defaults: ``density = 0.5`` (mean keep rate; the paper tunes the drop rate per merge, MergeKit's default 1.0
    prunes nothing), ``epsilon = 0.15`` (MergeKit's default window), ``rescale = "l1"`` (MergeKit's; ``"inverse"``
    is the ``1 / (1 - p_i)`` rule the paper states), ``scale = 1.0`` (the paper's constant lambda, MergeKit's
    default). MergeKit ranks 3-D and 4-D tensors along dim 1; here conv weights are ranked per output row of their
    ``[out, -1]`` view. DARE-TIES remains ``dare`` with ``then="ties"``.
    """
    ts = prepare(taus, name)
    pruned = [magprune(t, float(density), float(epsilon), generator_for(seed, name, k, t.device), rescale)
              for k, t in enumerate(ts)]
    elected = elect_sign(pruned, zero="plus")
    return disjoint_mean(pruned, elected).mul_(float(scale))
