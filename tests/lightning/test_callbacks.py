"""Writer and report callbacks: atomic output (a crash leaves no partial model), report contents."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer
from lightning_helpers import TIMM_KWARGS, TIMM_NAME
from torch import nn

from magic_pl.lightning import CalibratedModelWriter, CalibrationReport, MagicModule, RandomTaskDataset, TaskDataModule
from magic_pl.lightning.report import CalibrationRecord, plot_record, sha256_path
from magic_pl.lightning.writer import save_module
from magic_pl.models import TimmAdapter


def _module(tiny_timm, **kw) -> MagicModule:
    adapter = TimmAdapter(TIMM_NAME, experts=[str(tiny_timm["a"]), str(tiny_timm["b"])], base=str(tiny_timm["base"]),
                          task_names=["a", "b"], model_kwargs=TIMM_KWARGS)
    kw = {"merge_method": "task_arithmetic", "calibration": "dsc", **kw}  # the paper's recipe unless a test names one
    return MagicModule(adapter=adapter, **kw)


def _data() -> TaskDataModule:
    test = {"a": RandomTaskDataset(5, (3, 16, 16), 3, seed=1), "b": RandomTaskDataset(5, (3, 16, 16), 4, seed=2)}
    return TaskDataModule(["a", "b"], test=test, samples_per_task=2)


def _trainer(*callbacks) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=list(callbacks))


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


class Boom(RuntimeError):
    pass


def test_crash_during_calibration_writes_nothing(tiny_timm, tmp_path, monkeypatch):
    mod = _module(tiny_timm, calibration="fsc")
    calls = {"n": 0}
    original = mod.predict_step

    def failing(batch, batch_idx, dataloader_idx=0):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("worker lost")
        return original(batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(mod, "predict_step", failing)
    writer = CalibratedModelWriter(tmp_path / "model")
    with pytest.raises(Boom):
        _trainer(writer, CalibrationReport(tmp_path)).predict(mod, datamodule=_data(), return_predictions=False)
    assert not (tmp_path / "model").exists() and writer.written is None
    assert not (tmp_path / "calibration_report.json").exists()
    assert _leftovers(tmp_path) == []


def test_writer_refuses_a_directory_magic_pl_did_not_write_before_any_work(tiny_timm, tmp_path):
    from magic_pl.output import OutputError

    user = tmp_path / "model"
    user.mkdir()
    (user / "NOTES.txt").write_text("the user's own notes")
    mod = _module(tiny_timm, calibration="dsc")
    with pytest.raises(OutputError, match="model"):
        _trainer(CalibratedModelWriter(user)).predict(mod, datamodule=_data(), return_predictions=False)
    assert mod.model is None  # refused in setup, before any checkpoint was read
    assert sorted(p.name for p in user.iterdir()) == ["NOTES.txt"] and _leftovers(tmp_path) == []


def test_crash_while_saving_leaves_no_partial_model_and_keeps_the_old_one(tiny_timm, tmp_path, monkeypatch):
    import magic_pl.models.timm as timm_adapter

    old = tmp_path / "model"
    _trainer(CalibratedModelWriter(old)).predict(_module(tiny_timm, calibration="dsc"), datamodule=_data(),
                                                 return_predictions=False)  # an earlier complete result
    before = {p.name: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    real_save = timm_adapter.save_state_dict
    calls = {"n": 0}

    def save_then_die(state, path, **kw):
        calls["n"] += 1
        real_save(state, path, **kw)  # a real file lands in the temporary directory...
        if calls["n"] == 2:
            raise Boom("disk full")  # ...then the process dies mid-write

    monkeypatch.setattr(timm_adapter, "save_state_dict", save_then_die)
    mod = _module(tiny_timm, calibration="fsc")
    with pytest.raises(Boom):
        _trainer(CalibratedModelWriter(old)).predict(mod, datamodule=_data(), return_predictions=False)
    assert calls["n"] == 2
    assert {p.name: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before  # untouched, no partial model
    assert _leftovers(tmp_path) == []


def test_writer_writes_at_test_start_when_nothing_was_written(tiny_timm, tmp_path):
    mod = _module(tiny_timm, calibration="wsc")
    writer = CalibratedModelWriter(tmp_path / "model")
    _trainer(writer).test(mod, datamodule=_data(), verbose=False)
    assert writer.written == tmp_path / "model"
    assert {p.name for p in (tmp_path / "model").iterdir()} >= {"model.safetensors", "config.json", "heads"}


def test_save_module_plain_and_hf(tmp_path):
    from transformers import BertConfig, BertModel

    body = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    save_module(body, tmp_path / "plain", heads={"t": nn.Linear(4, 2)})
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [".magic-pl.json", "heads", "model.safetensors"]
    hf = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32))
    save_module(hf, tmp_path / "hf")
    again = BertModel.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), again.state_dict().values()))


def test_report_plot_and_hash(tmp_path):
    from magic_pl.calibration import CalibrationResult

    rec = CalibrationRecord(deviation_before={"a": 0.4, "b": 0.5}, deviation_after={"a": 1.0, "b": 1.1})
    rec.set_fold(CalibrationResult(coefficients={"a": 1.2, "b": 0.9}, wrapped=["b"], statistic="ratio_of_means"))
    assert rec.wrapped == ["b"] and rec.coefficients["a"] == 1.2
    png = plot_record(rec, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "w.bin").write_bytes(b"abc")
    assert sha256_path(tmp_path / "w.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    doc = rec.to_dict()
    assert doc["coefficient_summary"]["max"] == 1.2 and doc["magnitude_deviation"]["mean_after"] == pytest.approx(1.05)
    assert doc["modules"]["wrapped"] == ["b"] and doc["fsc_settings"]["statistic"] == "ratio_of_means"
    json.dumps(doc, allow_nan=False)


def test_the_plug_in_finds_each_checkpoints_body_under_its_own_prefix_and_leaves_heads_out():
    from magic_pl.lightning.callbacks import WeightSources
    from magic_pl.statedict import CheckpointError

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    body = {k: v.clone() for k, v in backbone.state_dict().items()}
    # a classifier expert of a bare body ("bert." + a head), a Lightning checkpoint base ("model.backbone." + a head)
    expert = {**{f"bert.{k}": v + 0.5 for k, v in body.items()}, "classifier.weight": torch.ones(2, 4)}
    base = {**{f"model.backbone.{k}": v for k, v in body.items()}, "model.head.weight": torch.ones(2, 4)}
    sources = WeightSources(backbone, [expert], base)
    assert sorted(sources.experts[0]) == sorted(body) == sorted(sources.base_state)
    for tau in sources.task_vectors()[0].values():
        torch.testing.assert_close(tau, torch.full_like(tau, 0.5), rtol=0, atol=1e-6)
    explicit = WeightSources(backbone, [expert], base, key_prefix="bert.", base_key_prefix="model.backbone.")
    assert all(torch.equal(explicit.experts[0][k], sources.experts[0][k]) for k in body)
    with pytest.raises(CheckpointError, match=r"lacks 4 key\(s\) of the model with key prefix 'roberta\.'"):
        WeightSources(backbone, [expert], base, key_prefix="roberta.", base_key_prefix="model.backbone.")


def test_writer_copies_the_tokenizer_next_to_a_saved_backbone(tmp_path):
    from tiny_models import save_tiny_tokenizer
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from magic_pl.lightning.writer import save_module

    source = save_tiny_tokenizer(tmp_path / "base", cls_sep=True)
    body = BertModel(BertConfig(vocab_size=46, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16))
    save_module(body, tmp_path / "out", support_from=source)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("w1 w2")["input_ids"] == \
        AutoTokenizer.from_pretrained(source)("w1 w2")["input_ids"]
    reloaded = AutoModel.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), body.state_dict().values()))
