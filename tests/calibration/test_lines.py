"""LiNeS: per-family depth rules, the linear factor, parameters outside blocks, the paper's alpha for merging."""

from __future__ import annotations

import pytest
import torch

from magic_pl.calibration.lines import layer_index, lines_alpha, lines_factors, lines_scaling


@pytest.mark.parametrize(
    "key,index",
    [
        ("blocks.11.attn.qkv.weight", 11),  # timm
        ("visual.transformer.resblocks.3.mlp.c_fc.weight", 3),  # open_clip
        ("vit.encoder.layer.7.attention.output.dense.weight", 7),  # HF ViT / BERT
        ("vision_model.encoder.layers.10.self_attn.q_proj.weight", 10),  # HF CLIP
        ("model.layers.31.mlp.down_proj.weight", 31),  # Llama
        ("transformer.h.5.attn.c_attn.weight", 5),  # GPT-2
        ("patch_embed.proj.weight", None),
        ("head.weight", None),
        ("model.embed_tokens.weight", None),
    ],
)
def test_layer_index_per_family(key, index):
    assert layer_index(key) == index


def test_factors_rise_linearly_and_outside_blocks_take_alpha():
    keys = [f"blocks.{i}.mlp.fc1.weight" for i in range(4)] + ["cls_token", "head.weight"]
    f = lines_factors(keys, alpha=0.2, beta=0.6)
    assert [f[f"blocks.{i}.mlp.fc1.weight"] for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f["cls_token"] == 0.2 and f["head.weight"] == 0.2
    # num_layers can be larger than the blocks present (e.g. a partial state dict).
    assert lines_factors(["blocks.1.w"], alpha=0.0, beta=1.0, num_layers=5)["blocks.1.w"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="'blocks.3.w' is in block 3 but num_layers=2"):
        lines_factors(["blocks.3.w"], alpha=0.0, beta=1.0, num_layers=2)
    # An explicit family or regex; a callable.
    assert lines_factors(["layers.2.x", "blocks.1.x"], alpha=0, beta=1, depth="timm")["layers.2.x"] == 0
    assert lines_factors(["stage(3).w"], alpha=0, beta=1, depth=r"stage\((\d)\)", num_layers=4)["stage(3).w"] == 1
    assert lines_factors(["a"], alpha=1, beta=1, depth=lambda k: 0, num_layers=2)["a"] == 1


def test_lines_scaling_scales_each_tensor_and_leaves_bn_stats_and_ints():
    tau = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2),
        "model.layers.1.input_layernorm.weight": torch.ones(2),
        "model.layers.2.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bfloat16),
        "model.embed_tokens.weight": torch.ones(3, 2),
        "bn.running_var": torch.ones(2),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    out = lines_scaling(tau, alpha=0.5, beta=1.0)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], torch.full((2, 2), 0.5))
    assert torch.equal(out["model.layers.1.input_layernorm.weight"], torch.full((2,), 1.0))
    assert out["model.layers.2.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"].float(), torch.full((2, 2), 1.5))
    assert torch.equal(out["model.embed_tokens.weight"], torch.full((3, 2), 0.5))
    assert out["bn.running_var"] is tau["bn.running_var"] and out["bn.num_batches_tracked"] is tau["bn.num_batches_tracked"]


def test_paper_alpha_for_task_arithmetic_is_one_over_lambda_k():
    g = torch.Generator().manual_seed(0)
    tvs = [{"blocks.0.w": torch.randn(3, 4, generator=g), "blocks.1.w": torch.randn(3, 4, generator=g),
            "head.b": torch.randn(3, generator=g)} for _ in range(4)]
    ta = {k: 0.3 * sum(tv[k] for tv in tvs) for k in tvs[0]}
    for norm in ("l1", "l2"):
        assert lines_alpha(ta, tvs, norm=norm) == pytest.approx(1 / (0.3 * 4), rel=1e-6)
    out = lines_scaling(ta, beta=0.5, task_vectors=tvs)
    mean = {k: sum(tv[k] for tv in tvs) / 4 for k in tvs[0]}
    torch.testing.assert_close(out["blocks.0.w"], mean["blocks.0.w"])  # the first block gets the plain average
    torch.testing.assert_close(out["head.b"], mean["head.b"])
    torch.testing.assert_close(out["blocks.1.w"], ta["blocks.1.w"] * (1 / 1.2 + 0.5))
    # Another merge: alpha = ||sum tau|| / (K ||tau_m||) in L1.
    other = {k: v.sign() * 0.1 for k, v in ta.items()}
    l1_sum = sum(float(sum(tv[k] for tv in tvs).abs().sum()) for k in ta)
    l1_m = sum(float(v.abs().sum()) for v in other.values())
    assert lines_alpha(other, tvs) == pytest.approx(l1_sum / (4 * l1_m), rel=1e-6)
    with pytest.raises(ValueError, match="needs task_vectors"):
        lines_scaling(ta, beta=0.5)
    with pytest.raises(ValueError, match="beta=nan"):
        lines_scaling(ta, beta=float("nan"), alpha=1.0)
