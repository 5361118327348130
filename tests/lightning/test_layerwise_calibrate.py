"""``calibrate(layerwise=True)`` and a recipe's ``layerwise: true``: the block-by-block path gives the xi and the
weights of the whole-model path on the same tiny Llama checkpoints and samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning_helpers import LLAMA_TEXTS as TEXTS
from safetensors.torch import load_file

from magic_pl.lightning import HFDataset, MagicModule, TaskDataModule
from magic_pl.lightning.trainer import MagicTrainer
from magic_pl.models import CausalLMAdapter


def _run(root: Path, out: str, layerwise: bool, calibration: str = "fsc") -> dict:
    adapter = CausalLMAdapter(str(root / "base"), [str(root / t) for t in TEXTS], task_names=list(TEXTS))
    model = MagicModule(adapter=adapter, merge_method="ties", merge_options={"density": 0.5}, calibration=calibration)
    data = TaskDataModule(task_names=list(TEXTS), calibration={
        t: HFDataset(str(root / f"{t}.txt"), tokenizer=str(root / "base"), label_column=None) for t in TEXTS},
        samples_per_task=2)
    trainer = MagicTrainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    trainer.calibrate(model, datamodule=data, output_dir=str(root / out), layerwise=layerwise)
    return json.loads((root / out / "calibration_report.json").read_text())


@pytest.mark.parametrize("calibration", ["fsc", "dsc"])
def test_layerwise_equals_the_whole_model_path(llama_files, calibration):
    whole = _run(llama_files, "whole", False, calibration)
    blocks = _run(llama_files, "blocks", True, calibration)
    assert blocks["coefficients"].keys() == whole["coefficients"].keys() and whole["coefficients"]
    for name, xi in whole["coefficients"].items():
        assert blocks["coefficients"][name] == pytest.approx(xi, rel=1e-5), name
    a = load_file(llama_files / "whole" / "model" / "model.safetensors")
    b = load_file(llama_files / "blocks" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert blocks["config"]["layerwise"]["segments"] == 2 + 2  # stem, two blocks, head
    assert (llama_files / "blocks" / "model" / "README.md").is_file()


def test_layerwise_is_refused_where_it_cannot_run(llama_files, tmp_path):
    adapter = CausalLMAdapter(str(llama_files / "base"), [str(llama_files / t) for t in TEXTS])
    trainer = MagicTrainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match="give an output_dir"):
        trainer.calibrate(MagicModule(adapter=adapter, calibration="fsc"), layerwise=True)
    with pytest.raises(ValueError, match="needs a feature step"):
        trainer.calibrate(MagicModule(adapter=adapter, calibration="wsc"), output_dir=str(tmp_path / "o"),
                          layerwise=True)
    assert not (tmp_path / "o").exists()


def test_a_recipe_runs_layerwise(llama_files, monkeypatch):
    from magic_pl.lightning.recipe import run_recipe

    monkeypatch.chdir(llama_files)
    (llama_files / "r.yaml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": t, "parameters": {"weight": 0.5}} for t in TEXTS], "calibration": "fsc",
        "calibration_data": {t: f"{t}.txt" for t in TEXTS}, "layerwise": True}))
    result = run_recipe("r.yaml", "out")
    report = json.loads(Path(result["report"]).read_text())
    assert report["config"]["layerwise"]["mode"] == "parallel" and report["coefficients"]
