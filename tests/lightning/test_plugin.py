"""Plug-in example: an existing LightningModule with a timm backbone and its own DataModule gains merging + MAGIC by
adding magic-pl callbacks to its Trainer, without changing its code.

This is the README snippet::

    from magic_pl.lightning import MagicCalibration, CalibratedModelWriter, CalibrationReport

    trainer = Trainer(callbacks=[
        MagicCalibration(experts=["a.safetensors", "b.safetensors"], base="base.safetensors", backbone="backbone",
                         calibration="auto"),          # task = predict dataloader index (or batch["task"])
        CalibratedModelWriter("out/model", backbone="backbone"),
        CalibrationReport("out"),
    ])
    trainer.predict(model, datamodule=data, return_predictions=False)   # merge, WSC, FSC, save
    trainer.test(model, datamodule=data)                                # the project's own evaluation
"""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning_helpers import TIMM_KWARGS, TIMM_NAME
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from magic_pl.lightning import CalibratedModelWriter, CalibrationReport, MagicCalibration, MagicModule, TaskDataModule
from magic_pl.models import TimmAdapter


# ---- the "existing project": nothing magic-pl specific -------------------------------------------------------------
class LitMultiTask(LightningModule):
    def __init__(self, num_classes: tuple[int, ...] = (3, 4)) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **TIMM_KWARGS)
        self.heads = nn.ModuleList(nn.Linear(self.backbone.num_features, n) for n in num_classes)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.backbone(x))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x, _ = batch
        return self(x, dataloader_idx).argmax(-1)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        acc = (self(x, dataloader_idx).argmax(-1) == y).float().mean()
        self.log(f"acc_{dataloader_idx}", acc, add_dataloader_idx=False)


class LitData(LightningDataModule):
    def __init__(self, calib: list[TensorDataset], test: list[TensorDataset]) -> None:
        super().__init__()
        self.calib, self.test = calib, test

    def predict_dataloader(self):
        return [DataLoader(ds, batch_size=2) for ds in self.calib]

    def test_dataloader(self):
        return [DataLoader(ds, batch_size=8) for ds in self.test]


def _datasets(seed: int, n: int, classes=(3, 4)) -> list[TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    return [TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, c, (n,), generator=g))
            for c in classes]


# ---- the test --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, options, calibration", [
    ("task_arithmetic", {"scale": 0.3}, "dsc"),
    ("task_arithmetic", {"scale": 0.3}, {"space": "fsc", "sensitive": "detect", "alpha": 3}),
    ("regmean", {"reduce_non_diagonal": 0.9}, "fsc"),  # a data-based merge: merged from the predict batches
])
def test_plugin_callback_equals_magic_module(tiny_timm, tmp_path, method, options, calibration):
    """The plug-in path and the MagicModule path run the same CalibrationRun: same xi, same weights."""
    torch.manual_seed(0)
    model, calib, test = LitMultiTask(), _datasets(1, 3), _datasets(2, 9)
    data = LitData(calib, test)
    experts = [str(tiny_timm["a"]), str(tiny_timm["b"])]
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[  # listed out of order on purpose: each callback is self-contained
            CalibratedModelWriter(tmp_path / "model", backbone="backbone"),
            CalibrationReport(tmp_path),
            MagicCalibration(experts=experts, base=str(tiny_timm["base"]), backbone="backbone",
                             merge_method=method, merge_options=options, calibration=calibration,
                             task_names=["a", "b"]),
        ],
    )
    trainer.predict(model, datamodule=data, return_predictions=False)
    results = {k: v for d in trainer.test(model, datamodule=data, verbose=False) for k, v in d.items()}
    assert set(results) == {"acc_0", "acc_1"}

    # the same merge + calibration through MagicModule / the timm adapter on the same calibration samples
    ref = MagicModule(
        adapter=TimmAdapter(TIMM_NAME, experts=experts, base=str(tiny_timm["base"]), task_names=["a", "b"],
                            model_kwargs=TIMM_KWARGS),
        merge_method=method, merge_options=options, calibration=calibration,
    )
    dm = TaskDataModule(["a", "b"], calibration={t: ds for t, ds in zip("ab", calib)}, samples_per_task=3)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False).predict(ref, datamodule=dm, return_predictions=False)

    report = json.loads((tmp_path / "calibration_report.json").read_text())
    xi, want = report["coefficients"], ref.calibration_record.coefficients
    assert xi.keys() == want.keys() and max(abs(xi[k] - want[k]) for k in xi) <= 1e-6
    assert report["config"].get("sensitive_detected") == ref.calibration_record.config.get("sensitive_detected")
    for key, value in ref.model.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=0, atol=1e-6)

    # written atomically by the writer, loadable into the project's backbone
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.backbone.state_dict().items())
    steps = [s["step"] for s in report["steps"]]
    # the same steps as MagicModule records: the plug-in merges through the same function
    want_steps = {"dsc": ["load", "merge", "wsc", "fsc", "write"], "fsc": ["load", "merge", "fsc", "write"],
                  "detect": ["load", "merge", "probe", "fsc", "write"]}
    assert steps == want_steps[calibration if isinstance(calibration, str) else "detect"]
    assert report["magnitude_deviation"]["before"] and report["magnitude_deviation"]["after"]
    assert report["inputs"]["base"]["path"].endswith("base.safetensors")
    assert (tmp_path / "calibration_report.png").is_file()


def test_plugin_options_are_checked_before_any_work(tiny_timm):
    with pytest.raises(ValueError, match="unknown calibration 'dcs'"):
        MagicCalibration(experts=[str(tiny_timm["a"])], calibration="dcs")
    with pytest.raises(ValueError, match="merge method"):
        MagicCalibration(experts=[str(tiny_timm["a"])], merge_method="tie")


def test_wrong_backbone_path_lists_children(tiny_timm):
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      callbacks=[MagicCalibration(experts=[str(tiny_timm["a"])], backbone="encoder")])
    with pytest.raises(AttributeError, match=r"no submodule 'encoder' \(its children: \['backbone', 'heads'\]\)"):
        trainer.predict(LitMultiTask(), datamodule=LitData(_datasets(1, 2), []), return_predictions=False)


def test_the_plug_ins_old_option_names_warn_and_mean_the_same(tiny_timm):
    with pytest.warns(DeprecationWarning, match="merge_method=, merge_options="):
        old = MagicCalibration(experts=[str(tiny_timm["a"])], method="ties", options={"density": 0.5})
    new = MagicCalibration(experts=[str(tiny_timm["a"])], merge_method="ties", merge_options={"density": 0.5})
    assert (old.merge_method, old.merge_options) == (new.merge_method, new.merge_options) == ("ties", {"density": 0.5})
