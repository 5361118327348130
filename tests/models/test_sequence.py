"""Hugging Face classifiers: BERT / RoBERTa sequence classification and ViT image classification; encoder merged,
heads per task, per-task save_pretrained directories reloaded by the Auto classes."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import WORDS, bert_config, calibrate, perturb, save_tiny_tokenizer

from magic_pl.models import HFClassifierAdapter, ImageClassificationAdapter, SequenceClassificationAdapter
from magic_pl.statedict import CheckpointError


def _write(tmp_path, encoder_cls, cls_cls, config, labels, *, tokenizer=True):
    torch.manual_seed(0)
    encoder = encoder_cls(config)
    base = tmp_path / "base"
    encoder.save_pretrained(base)
    if tokenizer:
        save_tiny_tokenizer(base)
    paths = []
    for i, n in enumerate(labels):
        cfg = type(config).from_dict({**config.to_dict(), "num_labels": n})
        model = cls_cls.from_pretrained(base, config=cfg)
        perturb(model, seed=i + 1)
        out = tmp_path / f"task{i}"
        model.save_pretrained(out)
        if tokenizer:
            save_tiny_tokenizer(out)
        paths.append(str(out))
    return base, paths


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(6, len(WORDS), (2, 9), generator=g),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_sequence_classification_roundtrip(tmp_path, family):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertForSequenceClassification,
        BertModel,
        RobertaConfig,
        RobertaForSequenceClassification,
        RobertaModel,
    )

    if family == "bert":
        enc, cls, cfg = BertModel, BertForSequenceClassification, bert_config()
    else:
        enc, cls = RobertaModel, RobertaForSequenceClassification
        cfg = RobertaConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=70, pad_token_id=1)
    base, paths = _write(tmp_path, enc, cls, cfg, [3, 2])
    setup = SequenceClassificationAdapter(str(base), paths, task_names=["sent", "topic"]).setup()
    # the body is the classifier's own encoder (RoBERTa classifiers have no pooler)
    assert set(setup.base.state_dict()) == set(setup.experts[0].keys()) | set(setup.tied)
    model, _, report = calibrate(setup, batches={k: [_tokens(k)] for k in range(2)})
    assert report.folded
    out = setup.save(model, tmp_path / "merged")
    for task, n in (("sent", 3), ("topic", 2)):
        x = _tokens(10)
        with torch.no_grad():
            ref = setup.task_model(task, model)(**x).logits
        assert ref.shape == (2, n)
        reloaded = AutoModelForSequenceClassification.from_pretrained(out / task).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**x).logits, ref, rtol=0, atol=0)
        assert AutoTokenizer.from_pretrained(out / task) is not None
    # the heads are the experts' own classifier weights
    e1 = cls.from_pretrained(paths[1])
    head_key = "classifier.weight" if family == "bert" else "classifier.out_proj.weight"
    torch.testing.assert_close(setup.heads["topic"].state_dict()[head_key], e1.state_dict()[head_key])
    mt = setup.multitask_model(model)
    with torch.no_grad():
        torch.testing.assert_close(mt(**_tokens(3), task="topic"),
                                   setup.task_model("topic", model)(**_tokens(3)).logits)


def test_vit_image_classification_roundtrip(tmp_path):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                    patch_size=8)
    base, paths = _write(tmp_path, ViTModel, ViTForImageClassification, cfg, [4, 6], tokenizer=False)
    setup = ImageClassificationAdapter(str(base), paths).setup()
    # transformers 5 renames ViT keys on load (encoder.layer.N.attention.attention.query -> layers.N.attention.q_proj):
    # the experts then come through from_pretrained, and their task vectors are still exact.
    e0 = ViTForImageClassification.from_pretrained(paths[0]).vit.state_dict()
    key = "layers.0.attention.q_proj.weight"
    torch.testing.assert_close(setup.task_vectors()[0][key], e0[key] - setup.base.state_dict()[key])
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model, _, _ = calibrate(setup, method="ties", batches={0: [(px[:1],)], 1: [(px[1:],)]})
    out = setup.save(model, tmp_path / "merged")
    for task in setup.task_names:
        with torch.no_grad():
            ref = setup.task_model(task, model)(pixel_values=px).logits
            got = AutoModelForImageClassification.from_pretrained(out / task).eval()(pixel_values=px).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_mismatched_encoder_is_a_clear_error(tmp_path):
    from transformers import BertForSequenceClassification, BertModel

    base, paths = _write(tmp_path, BertModel, BertForSequenceClassification, bert_config(), [3], tokenizer=False)
    other = tmp_path / "other"
    perturb(BertForSequenceClassification(bert_config(intermediate_size=48, num_labels=3)), 5).save_pretrained(other)
    with pytest.raises(CheckpointError, match="intermediate_size=48"):
        HFClassifierAdapter(str(base), [paths[0], str(other)]).setup()
