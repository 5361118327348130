"""MAGIC magnitude calibration (docs/method.md), pure PyTorch: the calibration settings (pipelines of registered steps)
and their driver, WSC, FSC with weight folding, DSC, the magnitude-sensitive-layer probe, and the data-free rescalers
SVC, LiNeS and scale. Usable without Lightning."""

from magic_pl.calibration.dsc import dual_space_calibration
from magic_pl.calibration.fsc import (
    FSC_GATES,
    FSC_GRANULARITIES,
    FSC_MODES,
    FSC_STATISTICS,
    CalibrationDataError,
    CalibrationResult,
    FeatureSpaceCalibrator,
)
from magic_pl.calibration.modules import CalibratedModule, find_units, fold_kind
from magic_pl.calibration.sensitivity import (
    accuracy_score,
    detect_sensitive_layers,
    load_sensitivity,
    output_divergence_score,
    save_sensitivity,
    sensitivity_scores,
)
from magic_pl.calibration.lines import layer_index, lines_alpha, lines_keys, lines_scaling
from magic_pl.calibration.settings import AUTO, PRESETS, SENSITIVE_POLICIES, CalibrationSetting, resolve_setting
from magic_pl.calibration.steps import STEPS, CalibrationStep, register_step
from magic_pl.calibration.svc import singular_value_calibration
from magic_pl.calibration.taskvectors import LazyTaskVector
from magic_pl.calibration.wsc import DEFAULT_WSC_EXCLUDE, WSC_VARIANTS, row_scales, weight_space_calibration, wsc_keys

__all__ = [
    "AUTO",
    "DEFAULT_WSC_EXCLUDE",
    "FSC_GATES",
    "FSC_GRANULARITIES",
    "FSC_MODES",
    "FSC_STATISTICS",
    "PRESETS",
    "SENSITIVE_POLICIES",
    "STEPS",
    "WSC_VARIANTS",
    "CalibratedModule",
    "CalibrationSetting",
    "CalibrationStep",
    "CalibrationDataError",
    "CalibrationResult",
    "FeatureSpaceCalibrator",
    "LazyTaskVector",
    "accuracy_score",
    "detect_sensitive_layers",
    "dual_space_calibration",
    "find_units",
    "fold_kind",
    "layer_index",
    "lines_alpha",
    "lines_keys",
    "lines_scaling",
    "load_sensitivity",
    "output_divergence_score",
    "register_step",
    "resolve_setting",
    "row_scales",
    "save_sensitivity",
    "sensitivity_scores",
    "singular_value_calibration",
    "weight_space_calibration",
    "wsc_keys",
]
