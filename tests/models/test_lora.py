"""PEFT LoRA adapters written by hand in the PEFT on-disk format: exact task vectors, dense merge + calibration +
save + reload, and the low-rank output path (WSC as row scales of B)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import calibrate

from magic_pl.models import CausalLMAdapter, LoRAAdapter, merge_lora_lowrank, save_lora_adapter
from magic_pl.models.lora import LoRACheckpoint, LoRAModule, lora_delta
from magic_pl.statedict import CheckpointError


def write_lora(path, base_model, *, targets=("q_proj", "v_proj"), r=4, alpha=8, seed=0, rslora=False,
               rank_pattern=None, embed=False, base_name="base"):
    """A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    rank_pattern = rank_pattern or {}
    tensors = {}
    for name, mod in base_model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(mod, torch.nn.Linear) and leaf in targets:
            rk = rank_pattern.get(leaf, r)
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rk, mod.in_features, generator=g) * 0.1
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, rk, generator=g) * 0.1
        if embed and isinstance(mod, torch.nn.Embedding):
            tensors[f"base_model.model.{name}.lora_embedding_A"] = torch.randn(r, mod.num_embeddings, generator=g) * .1
            tensors[f"base_model.model.{name}.lora_embedding_B"] = torch.randn(mod.embedding_dim, r, generator=g) * .1
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": list(targets) + (["embed_tokens"] if embed else []), "rank_pattern": rank_pattern,
              "alpha_pattern": {}, "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": base_name,
              "lora_dropout": 0.0}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _ids(seed):
    return torch.randint(6, 40, (2, 6), generator=torch.Generator().manual_seed(seed))


def test_lora_task_vectors_are_exact(make_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama("base")
    model = AutoModelForCausalLM.from_pretrained(base)
    a0 = write_lora(tmp_path / "a0", model, seed=1)
    a1 = write_lora(tmp_path / "a1", model, seed=2, rslora=True, r=4, alpha=6, rank_pattern={"v_proj": 2})
    setup = LoRAAdapter(str(base), [str(a0), str(a1)]).setup()
    tvs = setup.task_vectors()
    key = "model.layers.1.self_attn.v_proj.weight"
    ck1 = LoRACheckpoint(a1)
    m = ck1.modules[key]
    assert m.rank == 2 and math.isclose(m.scale, 6 / math.sqrt(2))
    torch.testing.assert_close(tvs[1][key], m.B @ m.A * (6 / math.sqrt(2)))
    q = LoRACheckpoint(a0).modules["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(tvs[0]["model.layers.0.self_attn.q_proj.weight"], q.B @ q.A * 2.0)
    # untouched modules are not in the task vectors; touched modules' other tensors are zero there
    assert "model.layers.0.mlp.up_proj.weight" not in tvs[0]
    assert set(setup.fsc_modules()) == {n for n, mod in setup.base.named_modules()
                                        if n.endswith(("q_proj", "v_proj"))}


def test_lora_dense_merge_matches_merged_experts_and_reloads(make_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama("base")
    model = AutoModelForCausalLM.from_pretrained(base)
    adapters = [write_lora(tmp_path / f"a{i}", model, seed=i + 1) for i in range(3)]
    setup = LoRAAdapter(str(base), [str(a) for a in adapters]).setup()
    batches = {k: [(_ids(k),)] for k in range(3)}
    merged, tau, report = calibrate(setup, batches=batches)
    assert set(report.coefficients) == set(setup.fsc_modules())

    # The same experts as dense checkpoints (PEFT's merge_and_unload) through the generic causal-LM adapter.
    dense_paths = []
    for i, a in enumerate(adapters):
        m = AutoModelForCausalLM.from_pretrained(base)
        ck = LoRACheckpoint(a)
        with torch.no_grad():
            for key, lm in ck.modules.items():
                m.get_parameter(key).add_(lora_delta(lm))
        m.save_pretrained(tmp_path / f"dense{i}")
        dense_paths.append(str(tmp_path / f"dense{i}"))
    dense = CausalLMAdapter(str(base), dense_paths).setup()
    ref, ref_tau, _ = calibrate(dense)
    for key in tau:
        torch.testing.assert_close(tau[key], ref_tau[key], rtol=1e-4, atol=1e-6)

    out = setup.save(merged, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (out / "tokenizer.json").is_file()
    x = _ids(50)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, merged(x).logits, rtol=0, atol=0)


def test_lora_lowrank_output_equals_dense_wsc(make_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama("base", tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(base)
    adapters = [write_lora(tmp_path / "a0", model, seed=1, embed=True),
                write_lora(tmp_path / "a1", model, seed=2, r=4, rank_pattern={"v_proj": 2}, embed=True)]
    setup = LoRAAdapter(str(base), [str(a) for a in adapters]).setup()
    with pytest.warns(DeprecationWarning, match="calibration="):
        low = merge_lora_lowrank(setup, "task_arithmetic", scale=0.4, wsc=True, exclude=())
    # the dense path: task arithmetic then WSC (embeddings included here through exclude=())
    from magic_pl.calibration import weight_space_calibration
    from magic_pl.merging import merge

    tvs = setup.task_vectors()
    dense_tau = weight_space_calibration(merge("task_arithmetic", tvs, scale=0.4), tvs, exclude=())
    base_state = setup.base_state()
    low_dense = low.dense(base_state)
    assert set(low_dense) == {k for k in dense_tau if any(k in c.modules for c in setup.adapter.checkpoints)}
    for key, value in low_dense.items():
        torch.testing.assert_close(value, dense_tau[key], rtol=1e-4, atol=1e-6)
    key = "model.layers.0.self_attn.v_proj.weight"
    assert low.modules[key].rank == 4 + 2 and (low.scales[key] != 1).any()
    assert low.modules["model.embed_tokens.weight"].kind == "embedding"

    out = save_lora_adapter(low, tmp_path / "merged_lora", template=adapters[0])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"]  # v_proj has rank 6
    back = LoRACheckpoint(out)
    for key, value in low_dense.items():
        torch.testing.assert_close(back.delta(key), value, rtol=1e-5, atol=1e-7)
    # base + the saved adapter gives the same model as the dense calibrated one
    applied = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for key, m in back.modules.items():
            applied.get_parameter(key).add_(lora_delta(m))
    dense_model = setup.merged_model(dense_tau)
    x = _ids(7)
    with torch.no_grad():
        torch.testing.assert_close(applied(x).logits, dense_model(x).logits, rtol=1e-4, atol=1e-5)


def test_lora_delta_kinds():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    assert torch.allclose(lora_delta(LoRAModule("m", "linear", A, B, 0.5, fan_in_fan_out=True)), (B @ A).T * 0.5)
    emb = LoRAModule("e", "embedding", torch.randn(3, 11, generator=g), torch.randn(4, 3, generator=g), 2.0)
    assert lora_delta(emb).shape == (11, 4) and emb.transposed
    # conv: the delta reproduces the LoRA branch conv_B(conv_A(x)) as one conv
    Ac, Bc = torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    conv = LoRAModule("c", "conv", Ac, Bc, 1.5)
    x = torch.randn(1, 3, 8, 8, generator=g)
    torch.testing.assert_close(F.conv2d(x, lora_delta(conv)), F.conv2d(F.conv2d(x, Ac), Bc) * 1.5,
                               rtol=1e-4, atol=1e-5)


def test_lora_errors(make_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama("base")  # tied embeddings
    model = AutoModelForCausalLM.from_pretrained(base)
    # a LoRA on the (tied) lm_head would change the input embeddings too
    head = tmp_path / "head"
    head.mkdir()
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": torch.randn(2, 32),
               "base_model.model.lm_head.lora_B.weight": torch.randn(46, 2)}, str(head / "adapter_model.safetensors"))
    (head / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
                                                          "lora_alpha": 2}))
    with pytest.raises(CheckpointError, match="ties to 'model.embed_tokens.weight'"):
        LoRAAdapter(str(base), [str(head)]).setup()
    dora = write_lora(tmp_path / "dora", model)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        LoRACheckpoint(dora)
    bad = write_lora(tmp_path / "bad", model, targets=("q_proj",))
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError, match="rank 4.*r=8"):
        LoRACheckpoint(bad)
    ok = write_lora(tmp_path / "ok", model)
    setup = LoRAAdapter(str(base), [str(ok)]).setup()
    with pytest.raises(ValueError, match="linear methods"):
        merge_lora_lowrank(setup, "ties")


def test_lora_lowrank_calibration_setting_and_deprecated_spellings_agree(make_llama, tmp_path):
    """wsc=True/False and method= still work (with a DeprecationWarning) and give the bits of calibration= and
    merge_method=; a step that changes an adapted tensor by more than row scales is refused."""
    from transformers import AutoModelForCausalLM

    base = make_llama("base", tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(base)
    adapters = [write_lora(tmp_path / f"a{i}", model, seed=i + 1) for i in range(2)]
    setup = LoRAAdapter(str(base), [str(a) for a in adapters]).setup()

    def bits(delta):
        return {**{k + ".B": m.B for k, m in delta.modules.items()},
                **{k + ".A": m.A for k, m in delta.modules.items()},
                **{k + ".s": v for k, v in delta.scales.items()}, **delta.full}

    for wsc, calibration in ((True, "wsc"), (False, "none")):
        with pytest.warns(DeprecationWarning, match="calibration="):
            old = bits(merge_lora_lowrank(setup, "task_arithmetic", wsc=wsc))
        new = bits(merge_lora_lowrank(setup, merge_method="task_arithmetic", calibration=calibration))
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new)
        assert bool(new.keys() - {k for k in new if not k.endswith(".s")}) == wsc
    with pytest.warns(DeprecationWarning, match="merge_method="):
        old = bits(merge_lora_lowrank(setup, method="weight_average"))
    new = bits(merge_lora_lowrank(setup, merge_method="weight_average"))
    assert all(torch.equal(old[k], new[k]) for k in new)
    with pytest.raises(ValueError, match="more than row scales"):
        merge_lora_lowrank(setup, calibration="scale:scale.factor=0.5")
