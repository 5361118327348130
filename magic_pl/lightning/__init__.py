"""Lightning layer of magic-pl: ``MagicModule``, the shared ``CalibrationRun``, callbacks, task data, ``MagicTrainer``
with ``calibrate``, and the ``magic-pl`` CLI."""

from magic_pl.lightning.callbacks import (
    CalibratedModelWriter,
    CalibrationReport,
    MagicCalibration,
    WeightSources,
)
from magic_pl.lightning.data import (
    HFDataset,
    RandomTaskDataset,
    TaskDataModule,
    TaskTaggedDataset,
    TensorFileDataset,
    UnpaddedDistributedSampler,
    task_collate,
)
from magic_pl.lightning.metrics import FSCStatistics, PerTaskAccuracy
from magic_pl.lightning.module import MagicModule
from magic_pl.lightning.pipeline import CalibrationRun
from magic_pl.lightning.report import CalibrationRecord
from magic_pl.lightning.statistics import FeatureStatisticsCollector
from magic_pl.lightning.trainer import MagicTrainer

__all__ = [
    "MagicModule",
    "MagicTrainer",
    "MagicCalibration",
    "CalibrationRun",
    "CalibratedModelWriter",
    "CalibrationReport",
    "CalibrationRecord",
    "WeightSources",
    "FeatureStatisticsCollector",
    "FSCStatistics",
    "PerTaskAccuracy",
    "TaskDataModule",
    "TaskTaggedDataset",
    "UnpaddedDistributedSampler",
    "RandomTaskDataset",
    "TensorFileDataset",
    "HFDataset",
    "task_collate",
]
