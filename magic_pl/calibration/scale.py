"""Scale: the merged task vector times one constant, ``theta = theta0 + factor * tau_m``.

The baseline "the mean task vector scaled by a single constant": Task Arithmetic's scaling coefficient lambda
(Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) applied after any merge. It scales the tensors LiNeS
scales (:func:`~magic_pl.calibration.lines.lines_keys`: every floating tensor, 1-D included, but BatchNorm running
statistics) in float32 arithmetic (float64 in float64), so on a float32 model it is LiNeS with ``alpha = factor`` and
``beta = 0``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from magic_pl.calibration.lines import lines_keys
from magic_pl.calibration.steps import CalibrationStep, register_step

__all__ = ["ScaleStep"]


@register_step
@dataclass(frozen=True)
class ScaleStep(CalibrationStep):
    """The calibration step ``scale``: tau_m times ``factor``; it has no use for a sensitive set.

    Attributes:
        factor: the constant, in [0, 1000] (1.0: the identity, the model is left as merged).
    """

    name: ClassVar[str] = "scale"
    row_separable: ClassVar[bool] = True
    factor: float = 1.0

    def __post_init__(self) -> None:
        self._number("factor", lambda v: 0 <= v <= 1e3, "a finite number in [0, 1000]")

    def apply(self, merged_tv: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
              sensitive: Optional[Collection[str]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self.factor == 1.0:  # rewriting theta0 + tau_m could round away from the merged weights
            return {}, {}
        out = {}
        for key in lines_keys(merged_tv):
            d = merged_tv[key]
            out[key] = (d.to(torch.promote_types(d.dtype, torch.float32)) * self.factor).to(d.dtype)
        return out, {}
