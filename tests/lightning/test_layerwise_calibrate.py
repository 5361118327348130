"""``calibrate(layerwise=True)`` and a recipe's ``layerwise: true``: the block-by-block path gives the xi and the
weights of the whole-model path on the same tiny Llama checkpoints and samples, and on tiny BERT classifiers (the
shared encoder calibrated block by block, the per-task heads kept, the adapter's layout written)."""

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
from magic_pl.models import CausalLMAdapter, SequenceClassificationAdapter

BERT_TASKS = ["sentiment", "topic"]


def _calibrate(root: Path, out: str, adapter, tasks, layerwise: bool, calibration: str = "fsc") -> dict:
    """``calibrate`` with TIES on ``adapter``'s experts and two unlabelled texts per task (``root/<task>.txt``);
    returns the report."""
    model = MagicModule(adapter=adapter, merge_method="ties", merge_options={"density": 0.5}, calibration=calibration)
    data = TaskDataModule(task_names=list(tasks), calibration={
        t: HFDataset(str(root / f"{t}.txt"), tokenizer=str(root / "base"), label_column=None) for t in tasks},
        samples_per_task=2)
    trainer = MagicTrainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    trainer.calibrate(model, datamodule=data, output_dir=str(root / out), layerwise=layerwise)
    return json.loads((root / out / "calibration_report.json").read_text())


def _run(root: Path, out: str, layerwise: bool, calibration: str = "fsc") -> dict:
    adapter = CausalLMAdapter(str(root / "base"), [str(root / t) for t in TEXTS], task_names=list(TEXTS))
    return _calibrate(root, out, adapter, list(TEXTS), layerwise, calibration)


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
    from transformers import RobertaConfig

    adapter = CausalLMAdapter(str(llama_files / "base"), [str(llama_files / t) for t in TEXTS])
    trainer = MagicTrainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match="give an output_dir"):
        trainer.calibrate(MagicModule(adapter=adapter, calibration="fsc"), layerwise=True)
    with pytest.raises(ValueError, match="needs a feature step"):
        trainer.calibrate(MagicModule(adapter=adapter, calibration="wsc"), output_dir=str(tmp_path / "o"),
                          layerwise=True)
    # a classifier adapter whose architecture has no block plan: named, before anything is read or written
    RobertaConfig(num_hidden_layers=1).save_pretrained(tmp_path / "roberta")
    roberta = SequenceClassificationAdapter(str(tmp_path / "roberta"), [str(tmp_path / "roberta")])
    with pytest.raises(ValueError, match=r"no block plan for the body of AutoModelForSequenceClassification .*"
                                         r"'roberta'.*layerwise false"):
        trainer.calibrate(MagicModule(adapter=roberta, calibration="fsc"), output_dir=str(tmp_path / "o"),
                          layerwise=True)
    # a module without a layerwise path (no adapter)
    body = torch.nn.Linear(2, 2)
    plain = MagicModule(model=body, experts=[body.state_dict()], calibration="fsc")
    with pytest.raises(ValueError, match="causal LM .* or a Hugging Face classifier"):
        trainer.calibrate(plain, output_dir=str(tmp_path / "o"), layerwise=True)
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


def _run_classifiers(root: Path, out: str, layerwise: bool, layout: str) -> dict:
    adapter = SequenceClassificationAdapter(str(root / "base"), [str(root / t) for t in BERT_TASKS],
                                            task_names=BERT_TASKS, layout=layout)
    return _calibrate(root, out, adapter, BERT_TASKS, layerwise)


@pytest.mark.parametrize("layout", ["per_task", "shared"])
def test_layerwise_classifiers_equal_the_whole_model_path(bert_classifier_files, layout):
    root = bert_classifier_files
    whole = _run_classifiers(root, "whole", False, layout)
    blocks = _run_classifiers(root, "blocks", True, layout)
    # xi of the shared encoder's modules (the heads are per task, never merged nor calibrated)
    assert blocks["coefficients"].keys() == whole["coefficients"].keys()
    assert "pooler.dense" in whole["coefficients"] and "encoder.layer.1.output.dense" in whole["coefficients"]
    assert not any(name.startswith("classifier") for name in whole["coefficients"])
    for name, xi in whole["coefficients"].items():
        assert blocks["coefficients"][name] == pytest.approx(xi, rel=1e-6), name
    assert blocks["config"]["layerwise"]["calibrated"] == "shared body"
    assert blocks["config"]["layerwise"]["segments"] == 2 + 2  # embeddings, two blocks, pooler
    # the same files in the adapter's layout, the same tensors in them
    a_dir, b_dir = root / "whole" / "model", root / "blocks" / "model"
    files = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*") if p.is_file() and p.name != "README.md")
    assert files == sorted(p.relative_to(b_dir) for p in b_dir.rglob("*") if p.is_file() and p.name != "README.md")
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == (2 if layout == "per_task" else 3)
    for f in weights:
        a, b = load_file(a_dir / f), load_file(b_dir / f)
        assert a.keys() == b.keys(), f
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{f}: {k}")
    # calibration changed the encoder: the comparison is not between two copies of the base
    base = load_file(root / "base" / "model.safetensors")
    merged = load_file(a_dir / ("sentiment/model.safetensors" if layout == "per_task" else "model.safetensors"))
    key = "encoder.layer.0.output.dense.weight"
    assert not torch.allclose(merged[("bert." if layout == "per_task" else "") + key], base[key])
