"""MAGIC magnitude calibration (docs/method.md), pure PyTorch: the calibration settings (pipelines of registered steps)
and their driver, WSC, FSC with weight folding, DSC, the magnitude-sensitive-layer probe, the data-free rescalers
SVC, LiNeS and scale, and the closed-form feature step FeatCal. Usable without Lightning.

``__all__`` lists what a user calls; the building blocks are imported from their modules (e.g.
``from magic_pl.calibration.wsc import row_scales``,
``from magic_pl.calibration.svc import singular_value_calibration``).
"""

from magic_pl.calibration.dsc import dual_space_calibration
from magic_pl.calibration.fsc import CalibrationDataError, CalibrationResult, FeatureSpaceCalibrator
from magic_pl.calibration.sensitivity import detect_sensitive_layers, save_sensitivity
from magic_pl.calibration.settings import PRESETS, CalibrationSetting, resolve_setting
from magic_pl.calibration.steps import STEPS, CalibrationStep, register_step
from magic_pl.calibration.wsc import weight_space_calibration

__all__ = [
    "CalibrationSetting",
    "resolve_setting",
    "PRESETS",
    "STEPS",
    "CalibrationStep",
    "register_step",
    "CalibrationResult",
    "CalibrationDataError",
    "FeatureSpaceCalibrator",
    "weight_space_calibration",
    "dual_space_calibration",
    "detect_sensitive_layers",
    "save_sensitivity",
]
