"""Layer-by-layer merge + FSC on tiny random models on disk: parallel mode equals whole-model FSC (xi and weights) for
the Llama family, BERT and ViT classifiers and CLIP vision towers, a classifier's shared body equals the classifier
adapter's whole-model FSC, sequential mode equals whole-model sequential FSC, one segment's tensors at a time are
held, each expert tensor is read once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from model_fixtures import WORDS, bert_config, calibrate, llama_config, perturb, save_tiny_tokenizer

from magic_pl.calibration import FeatureSpaceCalibrator
from magic_pl.calibration.folding import fold_unit
from magic_pl.calibration.fsc import CalibrationDataError
from magic_pl.calibration.modules import find_units
from magic_pl.models import stream_merge, streaming_fsc
from magic_pl.models.layerwise import BlockPlan, block_plan, layerwise_fsc
from magic_pl.statedict import LazyStateDict, load_state_dict


def _family(tmp_path, k=2, *, tie=True, layers=3, dtype=torch.float32):
    """Base + k perturbed experts of a tiny Llama, saved with ``save_pretrained`` (tokenizer in the base)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=tie, num_hidden_layers=layers)).to(dtype)
    paths = []
    for i in range(k + 1):
        m = model if i == 0 else perturb(copy.deepcopy(model), seed=i, scale=0.05)
        out = tmp_path / ("base" if i == 0 else f"e{i}")
        m.save_pretrained(out)
        paths.append(out)
    save_tiny_tokenizer(paths[0])
    return paths[0], paths[1:]


def _batches(k=2, rows=2, length=7):
    """One padded batch per task: the attention mask reaches the blocks as the whole model builds it."""
    out = {}
    for t in range(k):
        ids = torch.randint(6, 40, (rows, length), generator=torch.Generator().manual_seed(t))
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[-1, :2] = 0
        out[t] = [{"input_ids": ids, "attention_mask": mask}]
    return out


def _whole_model(tmp_path, base, experts, batches, calibration="fsc", **merge):
    """Today's path: stream_merge (weight steps only) -> load -> streaming_fsc; returns (calibrated model, result)."""
    from transformers import AutoModelForCausalLM

    stream_merge(base, experts, tmp_path / "merged", calibration=calibration, device="cpu", **merge)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    return model, streaming_fsc(model, base, experts, batches, calibration=calibration)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("tie,calibration", [(True, "fsc"), (False, "fsc"), (False, "fsc_channel"), (True, "dsc")])
def test_parallel_equals_whole_model_fsc(tmp_path, tie, calibration):
    from transformers import AutoModelForCausalLM

    base, experts = _family(tmp_path, tie=tie)
    batches = _batches()
    merge = {"merge_method": "task_arithmetic", "merge_options": {"scale": 0.4}}
    ref_model, ref = _whole_model(tmp_path, base, experts, batches, calibration, **merge)
    report = layerwise_fsc(base, experts, batches, tmp_path / "lw", calibration=calibration, device="cpu", **merge)

    assert report.family == "llama" and report.mode == "parallel" and report.segments == 3 + 2
    assert set(report.coefficients) == set(ref.coefficients)
    assert ("lm_head" in report.coefficients) == (not tie)
    for name, xi in ref.coefficients.items():
        assert _rel(report.coefficients[name], xi) < 1e-6, name
    assert sorted(report.calibration.folded) == sorted(ref.folded) and not report.calibration.wrapped
    assert report.calibration.samples_per_task == [2, 2]
    for name, per_channel in ref.channel_coefficients.items():
        torch.testing.assert_close(torch.tensor(report.calibration.channel_coefficients[name]),
                                   torch.tensor(per_channel), rtol=1e-6, atol=1e-7)
    if calibration == "dsc":
        assert report.calibration.wsc_scales and report.calibration.space == "dsc"

    got = load_state_dict(tmp_path / "lw")
    want = {k: v for k, v in ref_model.state_dict().items() if k in load_state_dict(base)}
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lw", dtype=torch.float32).eval()
    assert (tmp_path / "lw" / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0][0]).logits, ref_model(**batches[0][0]).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config_class", ["MistralConfig", "Qwen2Config", "Qwen3Config", "OlmoConfig"])
def test_other_llama_family_models_equal_whole_model_fsc(tmp_path, config_class):
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, config_class)(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=1,
        bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    paths = []
    for i in range(3):
        m = model if i == 0 else perturb(copy.deepcopy(model), seed=i, scale=0.05)
        m.save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    batches = _batches()
    report = layerwise_fsc(paths[0], paths[1:], batches, tmp_path / "lw", device="cpu")
    _, ref = _whole_model(tmp_path, paths[0], paths[1:], batches)
    assert set(report.coefficients) == set(ref.coefficients)
    for name, xi in ref.coefficients.items():
        assert _rel(report.coefficients[name], xi) < 1e-6, name


def test_sequential_equals_whole_model_sequential_fsc(tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = _family(tmp_path, tie=False)
    batches = _batches()
    stream_merge(base, experts, tmp_path / "merged", calibration="none", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base_sd = {k: v.float() for k, v in load_state_dict(base).items()}
    tvs = [{k: v.float() - base_sd[k] for k, v in load_state_dict(e).items()} for e in experts]
    # the exact definition: every module measured with all modules executed before it calibrated
    cal = FeatureSpaceCalibrator(base_sd, merged, tvs, mode="sequential", tol=0)
    for k, items in batches.items():
        cal.update(k, **items[0])
    ref = cal.fold()

    seq = layerwise_fsc(base, experts, batches, tmp_path / "seq", mode="sequential", tol=0, device="cpu")
    par = layerwise_fsc(base, experts, batches, tmp_path / "par", device="cpu")
    assert seq.mode == "sequential" and seq.calibration.mode == "sequential"
    assert set(seq.coefficients) == set(ref.coefficients)
    for name, xi in ref.coefficients.items():
        assert _rel(seq.coefficients[name], xi) < 1e-5, name
    # the first module sees the same input either way; later ones see calibrated inputs
    first = "model.embed_tokens"
    assert seq.coefficients[first] == pytest.approx(par.coefficients[first], rel=1e-6)
    assert max(_rel(seq.coefficients[n], par.coefficients[n]) for n in par.coefficients) > 1e-3
    got = load_state_dict(tmp_path / "seq")
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def test_one_segment_held_at_a_time_and_each_expert_tensor_read_once(tmp_path, monkeypatch):
    K, layers = 3, 6
    base, experts = _family(tmp_path, k=K, tie=False, layers=layers)
    reads: dict[tuple[str, str], int] = {}
    original = LazyStateDict.__getitem__

    def counting(self, key):
        file = str(self.file_of(key)) if hasattr(self, "file_of") else "?"
        reads[(file, key)] = reads.get((file, key), 0) + 1
        return original(self, key)

    monkeypatch.setattr(LazyStateDict, "__getitem__", counting)
    report = layerwise_fsc(base, experts, _batches(K), tmp_path / "lw", device="cpu")
    # base, K task vectors and the merged tensors of the largest segment, never more: K + 2 copies of one segment
    assert report.peak_segment_bytes <= (K + 2) * report.max_segment_bytes
    assert report.peak_segment_bytes < (K + 2) * report.model_bytes / 3
    assert report.max_segment_bytes < report.model_bytes / 3
    assert report.leaked_bytes == 0  # every segment was freed before the next was read
    assert reads and max(reads.values()) == 1  # every tensor of every checkpoint read once


def test_bf16_checkpoints_compute_in_float32_and_keep_their_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    from magic_pl.merging import merge

    base, experts = _family(tmp_path, dtype=torch.bfloat16)
    batches = _batches()
    report = layerwise_fsc(base, experts, batches, tmp_path / "lw", device="cpu")
    assert report.dtype == "float32"
    got = load_state_dict(tmp_path / "lw")
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "lw").parameters()).dtype == torch.bfloat16

    # the whole-model computation in float32 on the unrounded merge theta0 + tau_m: the same xi, and the written
    # weights are its calibrated weights rounded once to bf16
    b = {k: v.float() for k, v in load_state_dict(base).items()}
    tvs = [{k: v.float() - b[k] for k, v in load_state_dict(e).items()} for e in experts]
    tau = merge("task_arithmetic", tvs)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        state = model.state_dict()
        for key, t in tau.items():
            state[key].copy_(b[key] + t)
    cal = FeatureSpaceCalibrator(b, model, tvs, modules=list(report.coefficients))
    for k, items in batches.items():
        cal.update(k, **items[0])
    ref = cal.fold()
    for name, xi in ref.coefficients.items():
        assert _rel(report.coefficients[name], xi) < 1e-6, name
    for key, value in got.items():
        torch.testing.assert_close(value.float(), model.state_dict()[key].to(torch.bfloat16).float(), rtol=2 ** -7,
                                   atol=0, msg=key)


def test_explicit_modules_calibrate_only_those(tmp_path):
    base, experts = _family(tmp_path, layers=2)
    names = ["model.layers.1.mlp.down_proj", "model.norm"]
    report = layerwise_fsc(base, experts, _batches(), tmp_path / "lw", modules=names, device="cpu")
    assert sorted(report.coefficients) == sorted(names)


@torch.no_grad()
def test_float32_fold_is_in_place_and_matches_float64():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    base = {k: v.detach().clone() - 0.1 for k, v in lin.state_dict().items()}
    unit = find_units(lin)[0]
    ref = copy.deepcopy(lin)
    fold_unit(ref, find_units(ref)[0], base, 0.7)
    ptr = lin.weight.data_ptr()
    fold_unit(lin, unit, base, 0.7, dtype=torch.float32)
    assert lin.weight.data_ptr() == ptr
    torch.testing.assert_close(lin.weight, ref.weight, rtol=0, atol=1e-7)
    xi = torch.linspace(0.5, 1.5, 8)
    per = copy.deepcopy(ref)
    fold_unit(per, find_units(per)[0], base, xi, dtype=torch.float32)
    expected = base["weight"] + xi[:, None] * (ref.weight.detach() - base["weight"])
    torch.testing.assert_close(per.weight.detach(), expected, rtol=0, atol=1e-6)


def _save_base_and_experts(model, root: Path, k: int = 2):
    """``model`` saved as the base at ``root/m0`` and K experts (base + seeded noise 0.05) at ``root/m1..mK``."""
    paths = []
    for i in range(k + 1):
        m = model if i == 0 else perturb(copy.deepcopy(model), seed=i, scale=0.05)
        m.save_pretrained(root / f"m{i}")
        paths.append(root / f"m{i}")
    return paths[0], paths[1:]


def test_bert_sequence_classifier_parallel_equals_whole_model(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(num_labels=3)).eval()
    base, experts = _save_base_and_experts(model, tmp_path)
    batches = _batches()
    report = layerwise_fsc(base, experts, batches, tmp_path / "lw", device="cpu")
    assert report.family == "bert-sequence-classification"

    stream_merge(base, experts, tmp_path / "merged", calibration="none", device="cpu")
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    base_sd = dict(load_state_dict(base))
    tvs = [{k: v - base_sd[k] for k, v in load_state_dict(e).items() if v.dtype.is_floating_point} for e in experts]
    cal = FeatureSpaceCalibrator(base_sd, merged, tvs)
    for k, items in batches.items():
        cal.update(k, **items[0])
    ref = cal.fold()
    assert set(report.coefficients) == set(ref.coefficients)
    for name, xi in ref.coefficients.items():
        assert _rel(report.coefficients[name], xi) < 1e-6, name
    got = load_state_dict(tmp_path / "lw")
    for key, value in merged.state_dict().items():
        if key in got:
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def _vision_config(kind):
    from transformers import CLIPVisionConfig, ViTConfig

    if kind == "vit":
        return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=16, patch_size=8, num_labels=3)
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=16, patch_size=8, projection_dim=16)


def _pixels(k=2):
    g = torch.Generator().manual_seed(0)
    return {t: [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}] for t in range(k)}


@pytest.mark.parametrize("kind,family", [("ViTForImageClassification", "vit-image-classification"),
                                         ("CLIPVisionModel", "clip-vision"),
                                         ("CLIPVisionModelWithProjection", "clip-vision-projection")])
def test_vision_models_parallel_equal_whole_model(tmp_path, kind, family):
    import transformers

    cls = getattr(transformers, kind)
    torch.manual_seed(0)
    model = cls(_vision_config("vit" if kind.startswith("ViT") else "clip")).eval()
    base, experts = _save_base_and_experts(model, tmp_path)
    batches = _pixels()
    report = layerwise_fsc(base, experts, batches, tmp_path / "lw", device="cpu")
    assert report.family == family and report.segments == 1 + 2 + 1

    # the whole model, loaded as transformers loads it (transformers 5 renames ViT's and CLIP's checkpoint keys)
    stream_merge(base, experts, tmp_path / "merged", calibration="none", device="cpu")
    merged = cls.from_pretrained(tmp_path / "merged").eval()
    base_sd = cls.from_pretrained(base).state_dict()
    tvs = [{k: v - base_sd[k] for k, v in cls.from_pretrained(e).state_dict().items() if v.dtype.is_floating_point}
           for e in experts]
    cal = FeatureSpaceCalibrator(base_sd, merged, tvs)
    for k, items in batches.items():
        cal.update(k, **items[0])
    ref = cal.fold()
    assert set(report.coefficients) == set(ref.coefficients) and not report.calibration.wrapped
    # the head's first module after the class-token slice: calibrated on that token only, as in the whole model
    pooled = {"ViTForImageClassification": "classifier", "CLIPVisionModel": "post_layernorm",
              "CLIPVisionModelWithProjection": "visual_projection"}[kind]
    assert pooled in report.coefficients
    for name, xi in ref.coefficients.items():
        assert _rel(report.coefficients[name], xi) < 1e-6, name
    # written under the base's own key names, and the calibrated model's weights
    assert set(load_state_dict(tmp_path / "lw")) == set(load_state_dict(base))
    got = cls.from_pretrained(tmp_path / "lw").eval()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        out = got(**batches[0][0])
        want = merged(**batches[0][0])
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_classifier_body_equals_the_adapters_whole_model_fsc(tmp_path, kind):
    """``body_of``: an ``AutoModel`` base, classifier experts with heads of different sizes; only the shared encoder
    is merged and calibrated, as :class:`HFClassifierAdapter` does with the whole body in memory."""
    from transformers import BertForSequenceClassification, BertModel, ViTForImageClassification, ViTModel

    from magic_pl.models import ImageClassificationAdapter, SequenceClassificationAdapter

    if kind == "bert":
        config, enc, cls, adapter_cls = bert_config(), BertModel, BertForSequenceClassification, \
            SequenceClassificationAdapter
        g = torch.Generator().manual_seed(0)
        batches = {t: [{"input_ids": torch.randint(6, len(WORDS), (2, 9), generator=g),
                        "attention_mask": torch.ones(2, 9, dtype=torch.long)}] for t in range(2)}
    else:
        config, enc, cls, adapter_cls = _vision_config("vit"), ViTModel, ViTForImageClassification, \
            ImageClassificationAdapter
        batches = _pixels()
    torch.manual_seed(0)
    enc(config).save_pretrained(tmp_path / "base")  # ViTModel: with a pooler the classifiers' body lacks
    experts = []
    for i, labels in enumerate((3, 2)):
        cfg = type(config).from_dict({**config.to_dict(), "num_labels": labels})
        model = perturb(cls.from_pretrained(tmp_path / "base", config=cfg), seed=i + 1, scale=0.05)
        model.save_pretrained(tmp_path / f"t{i}")
        experts.append(str(tmp_path / f"t{i}"))
    adapter = adapter_cls(str(tmp_path / "base"), experts)
    merge = {"merge_method": "ties", "merge_options": {"density": 0.5}}
    report = layerwise_fsc(tmp_path / "base", experts, batches, tmp_path / "lw", device="cpu",
                           body_of=adapter.auto_class, **merge)
    assert report.family == f"{kind}-{'sequence' if kind == 'bert' else 'image'}-classification body"

    ref_body, _, ref = calibrate(adapter.setup(), "ties", batches=batches, wsc=False, density=0.5)
    assert set(report.coefficients) == set(ref.coefficients)
    assert ("pooler.dense" in report.coefficients) == (kind == "bert")  # BERT's classifiers pool, ViT's do not
    for name, xi in ref.coefficients.items():
        assert _rel(report.coefficients[name], xi) < 1e-6, name
    written = set(load_state_dict(tmp_path / "lw"))
    assert not any(k.startswith(("bert.", "vit.", "classifier.")) for k in written)  # the body alone, unprefixed
    assert any(k.startswith("pooler.") for k in written) == (kind == "bert")  # not ViTModel's pooler of the base
    # loaded as the adapter loads a base: into the classifier class, only the head missing
    got = getattr(cls.from_pretrained(tmp_path / "lw"), cls.base_model_prefix).state_dict()
    for key, value in ref_body.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def test_errors_name_the_way_out(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="whole-model path"):
        block_plan(GPT2Config())
    mixed = llama_config()
    mixed.model_type = "llama"
    mixed.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="mixes layer types"):
        block_plan(mixed)
    assert isinstance(block_plan(llama_config()), BlockPlan)
    with pytest.raises(ValueError, match="no block plan for the body of AutoModelForSequenceClassification"):
        block_plan(GPT2Config(), body_of="AutoModelForSequenceClassification")
    assert block_plan(bert_config(), body_of="AutoModelForSequenceClassification").body("bert").head == ("pooler",)

    base, experts = _family(tmp_path, layers=1)
    with pytest.raises(ValueError, match="no feature step"):
        layerwise_fsc(base, experts, _batches(), tmp_path / "o", calibration="wsc", device="cpu")
    with pytest.raises(ValueError, match="detects its sensitive set"):
        layerwise_fsc(base, experts, _batches(), tmp_path / "o", calibration="auto", device="cpu")
    with pytest.raises(CalibrationDataError, match="task 1"):
        layerwise_fsc(base, experts, {0: _batches()[0]}, tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()  # nothing is written when calibration fails
