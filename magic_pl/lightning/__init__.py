"""Lightning layer of magic-pl: ``MagicModule``, the callbacks, task data, ``MagicTrainer`` with ``calibrate``, and
the ``magic-pl`` CLI.

``__all__`` lists what a user names in code or in a config's ``class_path``; the rest is imported from its module
(e.g. ``from magic_pl.lightning.pipeline import CalibrationRun``, ``from magic_pl.lightning.data import task_collate``).
"""

from magic_pl.lightning.callbacks import CalibratedModelWriter, CalibrationReport, MagicCalibration
from magic_pl.lightning.data import HFDataset, RandomTaskDataset, TaskDataModule, TensorFileDataset
from magic_pl.lightning.module import MagicModule
from magic_pl.lightning.trainer import MagicTrainer

__all__ = [
    "MagicModule",
    "MagicTrainer",
    "MagicCalibration",
    "CalibratedModelWriter",
    "CalibrationReport",
    "TaskDataModule",
    "HFDataset",
    "TensorFileDataset",
    "RandomTaskDataset",
]
