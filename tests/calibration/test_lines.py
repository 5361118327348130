"""LiNeS: per-family depth rules, the linear factor, parameters outside blocks, the paper's alpha for merging, and
LiNeS as a calibration setting (``lines``, ``lines_fsc``)."""

from __future__ import annotations

import pytest
import torch
from calib_helpers import make_task_vectors, merged_model
from torch import nn

from magic_pl.calibration import PRESETS, CalibrationSetting, FeatureSpaceCalibrator, resolve_setting
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
        ("net._blocks.12._depthwise_conv.weight", 12),  # efficientnet_pytorch / efficientnet-lite-pytorch
        ("net._conv_stem.weight", None),
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
    # no key in a block: alpha everywhere, and a warning that beta did nothing
    with pytest.warns(UserWarning, match="no parameter name matches a block rule"):
        assert lines_factors(["conv1.weight", "fc.bias"], alpha=0.5, beta=1.0) == {"conv1.weight": 0.5, "fc.bias": 0.5}


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
    assert out["bn.running_var"] is tau["bn.running_var"]
    assert out["bn.num_batches_tracked"] is tau["bn.num_batches_tracked"]


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


# --- LiNeS as a calibration setting ------------------------------------------------------------------------------
class _Stack(nn.Module):
    """Embedding, three ``layers.N`` blocks (LiNeS depth 0..2), BatchNorm and a head outside the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(3)])
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(self.norm(h))


def _stack_setup():
    torch.manual_seed(0)
    base = _Stack().eval()
    tvs = make_task_vectors(base, 3, scale=0.2)
    tau_ta = {k: 0.4 * sum(tv[k] for tv in tvs) for k in tvs[0]}
    return base, tvs, tau_ta


def _by_hand(tau_m, tvs, alpha, beta):
    """LiNeS recomputed from its definition: block i of 3 gets alpha + beta i / 2, others alpha; BN stats kept."""
    if alpha is None:  # ||sum_k tau_k||_1 / (K ||tau_m||_1) over the scaled keys
        keys = [k for k in tau_m if "running" not in k]
        alpha = (sum(float(sum(tv[k] for tv in tvs).double().abs().sum()) for k in keys)
                 / (len(tvs) * sum(float(tau_m[k].double().abs().sum()) for k in keys)))
    out = {}
    for k, v in tau_m.items():
        if "running" in k:
            out[k] = v
            continue
        i = int(k.split(".")[1]) if k.startswith("layers.") else 0
        out[k] = v * (alpha + beta * i / 2)
    return out, alpha


@pytest.mark.parametrize("spec, alpha, beta", [("lines", None, 0.5),
                                               ("wsc:weight_method=lines,lines_alpha=0.3,lines_beta=0.8", 0.3, 0.8),
                                               ("wsc:weight_method=lines,lines_beta=0,lines_depth=layers", None, 0.0)])
def test_lines_setting_equals_the_direct_call_and_the_definition(spec, alpha, beta):
    base, tvs, tau_ta = _stack_setup()
    m = merged_model(base, tau_ta)
    rep = resolve_setting(spec).calibrate(base, m, tvs, tau_ta)
    assert rep.space == "wsc" and rep.row_scales == {} and rep.setting == resolve_setting(spec).to_string()
    direct = merged_model(base, lines_scaling(tau_ta, alpha=alpha, beta=beta, task_vectors=tvs))
    hand_tau, hand_alpha = _by_hand(tau_ta, tvs, alpha, beta)
    if alpha is None:
        assert hand_alpha == pytest.approx(1 / (0.4 * 3), rel=1e-6)  # 1 / (lambda K) for Task Arithmetic
    hand = merged_model(base, hand_tau)
    for key, v in m.state_dict().items():
        torch.testing.assert_close(v, direct.state_dict()[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(v, hand.state_dict()[key], rtol=0, atol=1e-6)
    # the deepest block moved by its own factor, the BatchNorm statistics did not move at all
    plain = merged_model(base, tau_ta).state_dict()
    assert not torch.allclose(m.state_dict()["layers.2.weight"], plain["layers.2.weight"])
    assert torch.equal(m.state_dict()["norm.running_var"], plain["norm.running_var"])
    # merged_tv=None: tau_m is read back from the merged model
    m2 = merged_model(base, tau_ta)
    resolve_setting(spec).calibrate(base, m2, tvs)
    for key, v in m2.state_dict().items():
        torch.testing.assert_close(v, m.state_dict()[key], rtol=0, atol=1e-6)


def test_lines_fsc_is_lines_then_fsc_on_the_scaled_model():
    base, tvs, tau_ta = _stack_setup()
    batches = {k: [torch.randn(2, 4)] for k in range(3)}
    m = merged_model(base, tau_ta)
    rep = PRESETS["lines_fsc"].calibrate(base, m, tvs, tau_ta, batches)
    ref = merged_model(base, lines_scaling(tau_ta, beta=0.5, task_vectors=tvs))
    cal = FeatureSpaceCalibrator(base, ref, tvs)
    for k, bs in batches.items():
        cal.update(k, bs[0])
    want = cal.fold().coefficients
    assert rep.space == "dsc" and set(rep.coefficients) == set(want)
    assert max(abs(rep.coefficients[k] - want[k]) for k in want) <= 1e-6


def test_lines_strings_round_trip_and_bad_options_are_refused_by_name():
    s = resolve_setting("wsc:weight_method=lines,lines_beta=0.25,lines_alpha=0.1,lines_depth=hf_encoder")
    assert (s.weight_method, s.lines_alpha, s.lines_beta, s.lines_depth) == ("lines", 0.1, 0.25, "hf_encoder")
    assert resolve_setting(s.to_string()) == s
    assert s.to_string() == "wsc:weight_method=lines,lines_alpha=0.1,lines_beta=0.25,lines_depth=hf_encoder"
    assert resolve_setting("lines").to_string() == "wsc:weight_method=lines"
    assert resolve_setting("lines_fsc") == CalibrationSetting(space="dsc", weight_method="lines")
    assert resolve_setting("wsc:weight_method=lines,lines_alpha=none").lines_alpha is None
    assert resolve_setting(s.to_dict()) == s
    for bad, match in [("lines_beta=-0.1", "'lines': beta='-0.1'"), ("lines_beta=nan", "'lines': beta"),
                       ("lines_alpha=inf", "'lines': alpha"), ("lines_alpha=x", "'lines': alpha='x'"),
                       ("lines_depth=blocks", "'lines': depth='blocks'.*group"), ("lines_depth=(", "depth='\\('")]:
        with pytest.raises(ValueError, match=match):
            resolve_setting("wsc:weight_method=lines," + bad)
    with pytest.raises(ValueError, match="weight_method='line'"):
        resolve_setting("wsc:weight_method=line")
