"""``MagicTrainer``: a Lightning ``Trainer`` with a ``calibrate`` entry point (merge, WSC, FSC, save, evaluate).

``calibrate`` is also the ``magic-pl calibrate`` subcommand. With ``strategy="ddp"`` every process runs the whole
pipeline (weights stay identical on all ranks; rank 0 writes files). ``ddp_spawn`` is refused: spawned workers do not
hand the calibrated weights back between ``predict`` and ``test``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from magic_pl.lightning.callbacks import (
    CalibratedModelWriter,
    CalibrationReport,
    FeatureSpaceCalibration,
    MergeExperts,
    WeightSpaceCalibration,
)
from magic_pl.lightning.module import MagicModule

__all__ = ["MagicTrainer"]


class MagicTrainer(Trainer):
    """``lightning.pytorch.Trainer`` plus :meth:`calibrate`."""

    def calibrate(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        output_dir: Optional[Union[str, os.PathLike]] = None,
        save_model: bool = True,
        report: bool = True,
        evaluate: bool = True,
        hash_inputs: bool = True,
    ) -> dict[str, Any]:
        """Merge, calibrate (WSC / FSC via ``predict``), save and evaluate (``test``) in one call.

        Works with a :class:`~magic_pl.lightning.module.MagicModule` or with any LightningModule whose Trainer has
        the magic-pl callbacks (:class:`~magic_pl.lightning.callbacks.MergeExperts`, ...).

        Args:
            model: the module to calibrate.
            datamodule: calibration (``predict_dataloader``) and evaluation (``test_dataloader``) data.
            output_dir: where the calibrated model (``<output_dir>/model``) and the report go; default ``None``: the
                report goes to the log directory and the model is not saved (unless a writer callback is set).
            save_model: save the calibrated model under ``output_dir`` (default ``True``).
            report: write ``calibration_report.json`` / ``.png`` (default ``True``).
            evaluate: run ``trainer.test`` after calibration when there is test data (default ``True``).
            hash_inputs: store sha256 hashes of the input checkpoints in the report (default ``True``).

        Returns:
            ``{"metrics": {...}, "model": path or None, "report": path or None}`` (paths on rank 0).
        """
        launcher = getattr(self.strategy, "launcher", None)
        if launcher is not None and type(launcher).__name__ == "_MultiProcessingLauncher" and self.world_size > 1:
            raise ValueError(
                "calibrate cannot use a spawn-based strategy (ddp_spawn / ddp_notebook): the calibrated weights of the "
                "workers would be lost between predict and test. Use strategy='ddp'."
            )
        writer = next((cb for cb in self.callbacks if isinstance(cb, CalibratedModelWriter)), None)
        if writer is None and output_dir is not None and save_model:
            writer = CalibratedModelWriter(Path(output_dir) / "model", backbone=_backbone_of(self))
            self.callbacks.append(writer)
        reporter = next((cb for cb in self.callbacks if isinstance(cb, CalibrationReport)), None)
        if reporter is None and report:
            reporter = CalibrationReport(dirpath=output_dir, hash_inputs=hash_inputs)
            self.callbacks.append(reporter)

        needs_predict = (isinstance(model, MagicModule) and model.uses_fsc) or any(
            isinstance(cb, FeatureSpaceCalibration) for cb in self.callbacks
        )
        if needs_predict:
            self.predict(model, datamodule=datamodule, return_predictions=False)
        metrics: dict[str, float] = {}
        can_test = _has_test_data(model, datamodule)
        if evaluate and can_test:
            results = self.test(model, datamodule=datamodule)
            for d in results:
                metrics.update({k: float(v) for k, v in d.items()})
        else:
            if evaluate:
                rank_zero_info("calibrate: no test data, skipping evaluation")
            if not needs_predict:
                # nothing ran through the Trainer: build in this process and write here (single process)
                if isinstance(model, MagicModule):
                    model.build()
                else:
                    for cb in self.callbacks:
                        if isinstance(cb, MergeExperts):
                            cb.merge_now(self, model)
                        if isinstance(cb, WeightSpaceCalibration):
                            cb.apply_now(self, model)
                if writer is not None:
                    writer.write(self, model)
                if reporter is not None:
                    reporter.write(self, model)
        return {
            "metrics": metrics,
            "model": str(writer.written) if writer is not None and writer.written is not None else None,
            "report": str(reporter.path) if reporter is not None and reporter.path is not None else None,
        }


def _backbone_of(trainer: Trainer) -> str:
    for cb in trainer.callbacks:
        if isinstance(cb, (MergeExperts, WeightSpaceCalibration, FeatureSpaceCalibration)):
            return cb.backbone
    return "backbone"


def _has_test_data(model: LightningModule, datamodule: Optional[LightningDataModule]) -> bool:
    if datamodule is not None:
        test_sets = getattr(datamodule, "test_sets", None)
        if test_sets is not None:
            return bool(test_sets)
        return is_overridden("test_dataloader", datamodule)
    return is_overridden("test_dataloader", model)
