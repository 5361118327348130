"""Causal LMs (tiny Llama): merge, WSC, FSC, save_pretrained (sharded too), reload; tied embeddings stay tied."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import calibrate

from magic_pl.models import CausalLMAdapter
from magic_pl.statedict import CheckpointError


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(6, 40, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_tied_llama_merge_calibrate_save_reload(make_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_llama("base")
    experts = [make_llama(f"e{i}", seed=10 + i) for i in range(3)]
    adapter = CausalLMAdapter(str(base), [str(e) for e in experts], task_names=["a", "b", "c"])
    setup = adapter.setup()
    assert setup.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in setup.task_vectors()[0]
    # lm_head is left to its canonical owner, so FSC folds everything (no runtime wrappers).
    assert "lm_head" not in setup.fsc_modules()
    model, tau, report = calibrate(setup, batches={k: [(_ids(k),)] for k in range(3)})
    assert report.coefficients and all(c > 0 for c in report.coefficients.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = _ids(99)
    with torch.no_grad():
        ref = model(x).logits
        base_logits = setup.base(x).logits
    assert not torch.allclose(ref, base_logits)

    out = setup.save(model, tmp_path / "out", max_shard_size="40KB")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # tied: written once, as transformers does
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == [7, 8]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left


def test_merged_values_are_base_plus_tau(make_llama):
    base = make_llama("base")
    experts = [make_llama(f"e{i}", seed=i + 1) for i in range(2)]
    setup = CausalLMAdapter(str(base), [str(e) for e in experts]).setup()
    tvs = setup.task_vectors()
    key = "model.layers.0.mlp.up_proj.weight"
    from safetensors.torch import load_file

    e0 = load_file(str(experts[0] / "model.safetensors"))
    torch.testing.assert_close(tvs[0][key], e0[key] - setup.base.state_dict()[key])
    model, tau, _ = calibrate(setup, wsc=False, scale=0.5)
    torch.testing.assert_close(model.state_dict()[key],
                               setup.base.state_dict()[key] + 0.5 * (tvs[0][key] + tvs[1][key]))


def test_bf16_save_dtype_keeps_caller_model(make_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama("base")
    setup = CausalLMAdapter(str(base), [str(make_llama("e", seed=3))]).setup()
    model, _, _ = calibrate(setup)
    out = setup.save(model, tmp_path / "bf16", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(reloaded.model.norm.weight.float(), model.model.norm.weight.bfloat16().float())


def test_vocabulary_mismatch_is_a_clear_error(make_llama):
    base = make_llama("base")
    bigger = make_llama("big", seed=1, vocab_size=60)
    with pytest.raises(CheckpointError, match=r"vocab_size=60.*vocab_size=46.*vocabularies differ"):
        CausalLMAdapter(str(base), [str(bigger)]).setup()


def test_tied_base_untied_expert_is_a_clear_error(make_llama):
    base = make_llama("base")
    untied = make_llama("untied", seed=1, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        CausalLMAdapter(str(base), [str(untied)]).setup()


def test_architecture_mismatch_names_field(make_llama):
    base = make_llama("base")
    deeper = make_llama("deep", seed=1, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="num_hidden_layers=3"):
        CausalLMAdapter(str(base), [str(deeper)]).setup()


def test_shape_mismatch_without_config_difference_names_key(make_llama, tmp_path):
    """A checkpoint whose tensors disagree with its own config still fails naming the key and both shapes."""
    from safetensors.torch import load_file, save_file

    base = make_llama("base")
    expert = make_llama("e", seed=1)
    sd = load_file(str(expert / "model.safetensors"))
    sd["model.embed_tokens.weight"] = torch.zeros(50, 32)
    save_file(sd, str(expert / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight.*\(46, 32\).*\(50, 32\).*vocabularies"):
        CausalLMAdapter(str(base), [str(expert)]).setup()
