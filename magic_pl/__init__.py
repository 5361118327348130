"""magic-pl: training-free model merging with MAGIC magnitude calibration (Li et al., arXiv 2512.19320).

The pure-PyTorch core is importable without Lightning::

    from magic_pl import load_state_dict, task_vector, merge, weight_space_calibration, FeatureSpaceCalibrator

The Lightning layer lives in :mod:`magic_pl.lightning`, model adapters in :mod:`magic_pl.models` and the offline
benchmark in :mod:`magic_pl.zoo`. The packages export what a user calls; everything else is imported from its module
(e.g. ``from magic_pl.statedict import LazyStateDict``, ``from magic_pl.merging.ties import ties``).

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already has a policy: busy-waiting
OpenMP threads made runs 5-10x slower on shared cores (passive waiting costs little on an idle machine). OpenMP reads
the policy when torch loads, so it takes effect when ``magic_pl`` is imported before ``torch``; names are imported
on first use, so importing the package does not load torch itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from magic_pl._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "FeatureSpaceCalibrator": "magic_pl.calibration",
    "CalibrationSetting": "magic_pl.calibration",
    "weight_space_calibration": "magic_pl.calibration",
    "resolve_setting": "magic_pl.calibration",
    "MERGE_METHODS": "magic_pl.merging",
    "merge": "magic_pl.merging",
    "merge_models": "magic_pl.merging",
    "CheckpointError": "magic_pl.statedict",
    "apply_task_vector": "magic_pl.statedict",
    "load_state_dict": "magic_pl.statedict",
    "save_state_dict": "magic_pl.statedict",
    "task_vector": "magic_pl.statedict",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static analysers see the real names
    from magic_pl.calibration import (  # noqa: F401
        CalibrationSetting,
        FeatureSpaceCalibrator,
        resolve_setting,
        weight_space_calibration,
    )
    from magic_pl.merging import MERGE_METHODS, merge, merge_models  # noqa: F401
    from magic_pl.statedict import (  # noqa: F401
        CheckpointError,
        apply_task_vector,
        load_state_dict,
        save_state_dict,
        task_vector,
    )


__getattr__, __dir__ = lazy_exports("magic_pl", globals(), _EXPORTS)
