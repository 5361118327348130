"""Folding is exact: the folded model equals a reference applying f0 + xi (fm - f0) at every calibrated module."""

from __future__ import annotations

import copy

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model, reference_model, run_update, weight_average
from torch import nn

from magic_pl.calibration import FeatureSpaceCalibrator
from magic_pl.calibration.folding import fold_batchnorm
from magic_pl.calibration.modules import CalibratedModule, find_units, fold_kind


def _calibrate_and_compare(build, inputs, *, dtype=torch.float32, atol=1e-5, k=3, scale=0.05, outputs=None):
    torch.manual_seed(0)
    base = build().to(dtype).eval()
    tvs = make_task_vectors(base, k, scale=scale)
    merged = merged_model(base, weight_average(tvs)).eval()
    cal = FeatureSpaceCalibrator(base, merged, tvs)
    for i, x in enumerate(inputs):
        run_update(cal, i % k, x)
    coeffs = cal.coefficients()
    assert any(abs(v - 1.0) > 0.05 for v in coeffs.values()), "test needs non-trivial coefficients"
    ref = reference_model(merged, base.state_dict(), coeffs)
    report = cal.fold()
    assert set(report.folded) | set(report.wrapped) | set(report.unchanged) == set(coeffs)
    with torch.no_grad():
        for x in inputs:
            got = merged(**x) if isinstance(x, dict) else merged(x)
            want = ref(**x) if isinstance(x, dict) else ref(x)
            pairs = outputs(got, want) if outputs else [(got, want)]
            for g, w in pairs:
                assert g.dtype == dtype
                torch.testing.assert_close(g, w, atol=atol, rtol=0)
    return report


def _vit():
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5
    )


def _images(n=3, c=3, s=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=g) for _ in range(n)]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_timm_vit_fold_exact(dtype, atol):
    report = _calibrate_and_compare(_vit, [x.to(dtype) for x in _images()], dtype=dtype, atol=atol)
    assert report.wrapped == []
    assert "blocks.0.attn.qkv" in report.folded and "patch_embed.proj" in report.folded
    assert "cls_token" in report.uncalibrated and "pos_embed" in report.uncalibrated


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg)


def _bert_inputs(n=3):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hf_outputs(got, want):
    return [(got.last_hidden_state, want.last_hidden_state), (got.pooler_output, want.pooler_output)]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_hf_bert_fold_exact(dtype, atol):
    report = _calibrate_and_compare(_bert, _bert_inputs(), dtype=dtype, atol=atol, outputs=_hf_outputs)
    assert report.wrapped == []
    assert "embeddings.word_embeddings" in report.folded
    assert "embeddings.LayerNorm" in report.folded


def _clip_vision():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    return transformers.CLIPVisionModel(cfg)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_hf_clip_vision_fold_exact(dtype, atol):
    inputs = [{"pixel_values": x.to(dtype)} for x in _images()]
    report = _calibrate_and_compare(_clip_vision, inputs, dtype=dtype, atol=atol, outputs=_hf_outputs)
    assert report.wrapped == []
    assert any(k.endswith("embeddings.class_embedding") for k in report.uncalibrated)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.features(x))


def _cnn():
    model = SmallCNN()
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_cnn_batchnorm_fold_exact(dtype, atol):
    report = _calibrate_and_compare(_cnn, [x.to(dtype) for x in _images(s=8)], dtype=dtype, atol=atol, scale=0.2)
    assert report.wrapped == []
    assert {"features.1", "features.4", "features.7", "head.1"} <= set(report.folded)


def test_fold_batchnorm_formula_float64():
    g = torch.Generator().manual_seed(0)
    bn0, bnm = nn.BatchNorm1d(5).double().eval(), nn.BatchNorm1d(5).double().eval()
    for bn in (bn0, bnm):
        with torch.no_grad():
            bn.weight.copy_(torch.randn(5, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
            bn.running_mean.copy_(torch.randn(5, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.1)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    xi = 1.7
    want = bn0(x) + xi * (bnm(x) - bn0(x))
    new = fold_batchnorm(dict(bn0.state_dict()), dict(bnm.state_dict()), bn0.eps, xi)
    bnc = copy.deepcopy(bnm)
    with torch.no_grad():
        for k, v in new.items():
            getattr(bnc, k).copy_(v)
    torch.testing.assert_close(bnc(x), want, atol=1e-12, rtol=0)
    assert torch.equal(bnc.running_var, bnm.running_var)


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.RMSNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(self.norm(h))


def test_multihead_attention_is_one_wrapped_unit():
    units = [u.name for u in find_units(AttnNet())]
    assert units == ["inp", "attn", "norm", "out"]  # attn.out_proj is part of the attn unit
    inputs = [torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        report = _calibrate_and_compare(AttnNet, [x.to(dtype) for x in inputs], dtype=dtype, atol=atol, scale=0.2)
        assert report.wrapped == ["attn"]
        assert set(report.folded) == {"inp", "norm", "out"}


def test_rmsnorm_by_class_name_folds_and_wrapper_state_dict():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(8)
    assert fold_kind(norm) == "affine"
    assert fold_kind(nn.MultiheadAttention(8, 2)) == "runtime"
    wrapper = CalibratedModule(nn.PReLU(), {"weight": torch.tensor([0.5])}, 2.0)
    assert set(wrapper.state_dict()) == {"module.weight", "base__weight", "xi"}


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 10, bias=False)
        self.dec.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.dec(torch.tanh(self.proj(self.emb(ids))))


def test_tied_weights_are_wrapped_not_folded_twice():
    inputs = [torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    report = _calibrate_and_compare(TiedNet, inputs, scale=0.2)
    assert sorted(report.wrapped) == ["dec", "emb"]
    assert report.folded == ["proj"]
