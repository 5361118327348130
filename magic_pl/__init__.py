"""magic-pl: training-free model merging with MAGIC magnitude calibration (Li et al., arXiv 2512.19320).

The pure-PyTorch core is importable without Lightning::

    from magic_pl import load_state_dict, task_vector, merge, weight_space_calibration, FeatureSpaceCalibrator

The Lightning layer lives in :mod:`magic_pl.lightning`, model adapters in :mod:`magic_pl.models` and the offline
benchmark in :mod:`magic_pl.zoo`.
"""

from magic_pl.calibration import (
    FeatureSpaceCalibrator,
    detect_sensitive_layers,
    dual_space_calibration,
    weight_space_calibration,
)
from magic_pl.merging import MERGE_METHODS, merge, merge_models, merge_tensor
from magic_pl.statedict import (
    CheckpointError,
    LazyStateDict,
    apply_task_vector,
    iter_task_vectors,
    load_state_dict,
    save_state_dict,
    task_vector,
    validate_experts,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FeatureSpaceCalibrator",
    "LazyStateDict",
    "MERGE_METHODS",
    "apply_task_vector",
    "detect_sensitive_layers",
    "dual_space_calibration",
    "iter_task_vectors",
    "load_state_dict",
    "merge",
    "merge_models",
    "merge_tensor",
    "save_state_dict",
    "task_vector",
    "validate_experts",
    "weight_space_calibration",
]
