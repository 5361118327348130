"""The recipe (merge method x calibration setting) magic-pl uses when the user names none: one answer per budget of
unlabelled samples per task.

Each answer is the out-of-sample study's pick (``python -m magic_pl.zoo.holdout``; its report is
``benchmarks/zoo/holdout/holdout.md``). Every recipe of the budget study was run on the text suite (MiniLM-L6, K = 5)
and the vision suite (EfficientNet-Lite0, K = 4); each task's test examples were split by a seeded permutation into a
selection half and a report half. On the selection half, the rule took the best mean over the two suites among the
recipes never significantly below the merge they start from on either suite. :attr:`Recommendation.report` gives
the pick's numbers on the report half, which the rule never saw. A test checks this table against the committed
study, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Recommendation", "RECOMMENDATIONS", "recommended", "fill_recipe"]


@dataclass(frozen=True)
class Recommendation:
    """The recipe for budgets of at least ``samples`` unlabelled samples per task (up to the next entry's)."""

    samples: int
    merge_method: str
    calibration: str
    #: the pick's accuracy (%) on the report half, per measured budget it covers and suite.
    report: str

    @property
    def recipe(self) -> str:
        """``"method/calibration"``, as the study's tables name it."""
        return f"{self.merge_method}/{self.calibration}"

    def describe(self, samples_per_task: Optional[int]) -> str:
        """One line for a run's summary: the recipe and why it was taken."""
        n = "every" if samples_per_task is None else str(samples_per_task)
        unit = "sample" if samples_per_task == 1 else "samples"
        return (f"{self.merge_method} + {self.calibration}, the recommended recipe for {n} unlabelled {unit} per task "
                "(README: Which recipe)")


#: Budget -> recipe, from the out-of-sample study (ascending ``samples``; the first entry is data-free).
RECOMMENDATIONS: tuple[Recommendation, ...] = (
    # per-channel FSC collapses on vision with fewer than 4 samples per task (depthwise channels with tiny updates)
    Recommendation(0, "tsv_m", "none", "n = 0: text 66.4, vision 86.5; n = 1: text 66.4, vision 86.5"),
    Recommendation(4, "tsv_m", "fsc_channel",
                   "n = 4: text 66.9, vision 88.5; n = 16: text 66.6, vision 88.4; n = 64: text 66.5, vision 88.5"),
)


def recommended(samples_per_task: Optional[int]) -> Recommendation:
    """The recipe for ``samples_per_task`` unlabelled samples per task (``None``: every sample of the calibration
    set, the largest budget): the entry with the largest ``samples`` not above it."""
    if samples_per_task is not None and (isinstance(samples_per_task, bool) or not isinstance(samples_per_task, int)
                                         or samples_per_task < 0):
        raise ValueError(f"samples_per_task must be a whole number >= 0 or None, got {samples_per_task!r}")
    n = RECOMMENDATIONS[-1].samples if samples_per_task is None else samples_per_task
    return [r for r in RECOMMENDATIONS if r.samples <= n][-1]


def fill_recipe(merge_method: Optional[str], calibration: Any, samples_per_task: Optional[int]
                ) -> tuple[str, Any, Optional[Recommendation]]:
    """``(merge_method, calibration, recommendation)``: a ``None`` method or setting filled from
    :func:`recommended` for ``samples_per_task`` (the recommendation is ``None`` when both were named). The one rule
    of every front door that defaults to the recommended recipe."""
    if merge_method is not None and calibration is not None:
        return merge_method, calibration, None
    rec = recommended(samples_per_task)
    return (rec.merge_method if merge_method is None else merge_method,
            rec.calibration if calibration is None else calibration, rec)
