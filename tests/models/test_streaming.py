"""Big-model path on tiny models: merge + WSC streamed from sharded bf16 safetensors equals the in-memory computation;
FSC with lazily read base and experts equals FSC with them in memory."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import llama_config, perturb, save_tiny_tokenizer

from magic_pl.calibration import FeatureSpaceCalibrator, weight_space_calibration
from magic_pl.merging import merge
from magic_pl.models import stream_merge, streaming_fsc
from magic_pl.models.io import save_sharded_safetensors
from magic_pl.models.streaming import AliasView, lazy_calibration_sources
from magic_pl.statedict import CheckpointError, LazyTaskVector, load_state_dict


def _write_family(tmp_path, k=3, dtype=torch.bfloat16, **config):
    """Base + k experts as sharded (bf16) safetensors with config.json (and a tokenizer in the base)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(**config)).to(dtype)
    model.config.save_pretrained(tmp_path / "cfg")
    paths = []
    for i in range(k + 1):
        m = model if i == 0 else perturb(_copy(model), seed=i, scale=0.05)
        sd = {n: t for n, t in m.state_dict().items() if n != "lm_head.weight" or not model.config.tie_word_embeddings}
        sd["extra.counter"] = torch.tensor([10 * i, 1], dtype=torch.int64)  # an integer buffer: copied from the base
        out = save_sharded_safetensors(sd, tmp_path / ("base" if i == 0 else f"e{i}"), max_shard_size="30KB",
                                       support_from=tmp_path / "cfg")
        paths.append(out)
    save_tiny_tokenizer(paths[0])
    return paths[0], paths[1:]


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _reference(base, experts, method, **options):
    b = {k: v for k, v in load_state_dict(base).items()}
    es = [load_state_dict(e) for e in experts]
    float_keys = [k for k in b if b[k].dtype.is_floating_point]
    tvs = [{k: e[k].float() - b[k].float() for k in float_keys} for e in es]
    tau = weight_space_calibration(merge(method, tvs, **options), tvs)
    out = {k: (b[k].float() + tau[k]).to(b[k].dtype) if k in tau else b[k] for k in b}
    return out


@pytest.mark.parametrize("method,options,chunk", [("task_arithmetic", {"scale": 0.3}, "4KB"),
                                                   ("ties", {}, "4KB")])
def test_stream_merge_equals_in_memory(tmp_path, method, options, chunk):
    base, experts = _write_family(tmp_path)
    report = stream_merge(base, experts, tmp_path / "out", merge_method=method, merge_options=options,
                          chunk_bytes=chunk, max_shard_size="40KB", device="cpu")
    assert report.copied == 1 and report.merged == report.tensors - 1 and len(report.shards) > 1
    assert report.calibrated > 0 and (report.chunked > 0) == (method == "task_arithmetic")
    got = load_state_dict(tmp_path / "out")
    ref = _reference(base, experts, method, **options)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype, k
        torch.testing.assert_close(got[k], v, rtol=0, atol=0) if not v.dtype.is_floating_point else \
            torch.testing.assert_close(got[k].float(), v.float(), rtol=2 ** -7, atol=1e-6)
    assert torch.equal(got["extra.counter"], torch.tensor([0, 1]))
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names


def test_streamed_model_loads_and_streaming_fsc_matches_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = _write_family(tmp_path, k=2)
    for d in [base, *experts]:  # drop the test-only integer buffer so transformers loads the directories strictly
        sd = {k: v for k, v in load_state_dict(d).items() if k != "extra.counter"}
        save_sharded_safetensors(sd, d, max_shard_size="30KB", support_from=tmp_path / "cfg")
    save_tiny_tokenizer(base)
    stream_merge(base, experts, tmp_path / "out", merge_method="task_arithmetic", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = {k: torch.randint(6, 40, (1, 5), generator=torch.Generator().manual_seed(k)) for k in range(2)}
    batches = {k: [(ids[k],)] for k in range(2)}

    lazy_model = _copy(merged)
    report = streaming_fsc(lazy_model, base, experts, batches)
    assert "lm_head" not in report.coefficients and not report.wrapped
    assert lazy_model.lm_head.weight is lazy_model.model.embed_tokens.weight

    # the same with base and task vectors in memory
    base_sd = {k: v.float() for k, v in load_state_dict(base).items()}
    tvs = [{k: v.float() - base_sd[k] for k, v in load_state_dict(e).items()} for e in experts]
    modules = [m for m in report.coefficients]
    cal = FeatureSpaceCalibrator(base_sd, merged, tvs, modules=modules)
    for k, b in batches.items():
        cal.update(k, *b[0])
    ref = cal.fold()
    for name, xi in ref.coefficients.items():
        assert report.coefficients[name] == pytest.approx(xi, rel=1e-5), name
    with torch.no_grad():
        torch.testing.assert_close(lazy_model(ids[0]).logits, merged(ids[0]).logits)


def test_lazy_sources_resolve_tied_aliases(tmp_path):
    base, experts = _write_family(tmp_path, k=1)
    b, tvs = lazy_calibration_sources(base, experts, tied={"lm_head.weight": "model.embed_tokens.weight"})
    assert isinstance(b, AliasView) and "lm_head.weight" in b
    assert torch.equal(b["lm_head.weight"], b["model.embed_tokens.weight"])
    assert isinstance(tvs[0], LazyTaskVector)
    torch.testing.assert_close(tvs[0]["lm_head.weight"], tvs[0]["model.embed_tokens.weight"])


def test_stream_merge_errors(tmp_path):
    base, experts = _write_family(tmp_path, k=1)
    with pytest.raises(ValueError, match="global_topk"):
        stream_merge(base, experts, tmp_path / "o", merge_method="ties", merge_options={"global_topk": True})
    (tmp_path / "big").mkdir()
    big_base, big = _write_family(tmp_path / "big", k=1, vocab_size=60)
    with pytest.raises(CheckpointError, match=r"vocab_size=60.*vocabularies differ"):
        stream_merge(base, big, tmp_path / "o")
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model\.embed_tokens\.weight'.*vocabularies"):
        stream_merge(base, big, tmp_path / "o", check_config=False)
    (tmp_path / "untied").mkdir()
    _, untied = _write_family(tmp_path / "untied", k=1, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="lm_head"):
        stream_merge(base, untied, tmp_path / "o", check_config=False)
    assert not (tmp_path / "o").exists()


def test_streamed_dsc_equals_the_python_driver(tmp_path):
    """stream_merge (WSC step) + streaming_fsc (feature step) of one setting equal CalibrationSetting.calibrate on the
    same in-memory model and task vectors."""
    from transformers import AutoModelForCausalLM

    from magic_pl.calibration import resolve_setting

    base, experts = _write_family(tmp_path, k=2, dtype=torch.float32)
    setting = "dsc:gate=paper"
    stream_merge(base, experts, tmp_path / "m", merge_method="task_arithmetic", calibration=setting, device="cpu")
    stream_merge(base, experts, tmp_path / "ta", merge_method="task_arithmetic", calibration="none", device="cpu")
    ids = {k: torch.randint(6, 40, (1, 5), generator=torch.Generator().manual_seed(k)) for k in range(2)}
    batches = {k: [(ids[k],)] for k in range(2)}
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    result = streaming_fsc(streamed, base, experts, batches, calibration=setting)
    assert result.setting == "dsc:gate=paper" and result.coefficients

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ta", dtype=torch.float32).eval()  # theta0 + tau_m
    base_sd = {k: v.float() for k, v in load_state_dict(base).items() if v.dtype.is_floating_point}
    tvs = [{k: v.float() - base_sd[k] for k, v in load_state_dict(e).items() if k in base_sd} for e in experts]
    tau_m = {k: v.float() - base_sd[k] for k, v in ref.state_dict().items() if k in base_sd}
    want = resolve_setting(setting).calibrate(base_sd, ref, tvs, tau_m, batches, modules=list(result.coefficients))
    assert max(abs(result.coefficients[n] - x) for n, x in want.coefficients.items()) <= 1e-6
    got = streamed.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_streaming_settings_that_need_a_probe_say_so(tmp_path):
    base, experts = _write_family(tmp_path, k=1)
    with pytest.raises(ValueError, match="detects its sensitive set on data"):
        stream_merge(base, experts, tmp_path / "o", calibration="wsc_gated_detect", device="cpu")
    with pytest.raises(ValueError, match="has no feature step"):
        streaming_fsc(torch.nn.Linear(2, 2), base, experts, {}, calibration="wsc")
    with pytest.raises(ValueError, match="give sensitive="):
        streaming_fsc(torch.nn.Linear(2, 2), base, experts, {}, calibration="auto")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["nan_one_sample", "nan_all_samples", "inf_one_sample", "no_samples"])
@pytest.mark.parametrize("statistic", ["mean_of_ratios", "ratio_of_means"])
def test_streaming_fsc_nonfinite_or_missing_data_is_an_error_naming_task_and_module(tmp_path, statistic, where):
    """NaN/Inf in one task's calibration data (or none of it) is an error naming the task and the module, never xi
    from the other task only or 1; the merged model is left as it was."""
    import copy

    from magic_pl.calibration.fsc import CalibrationDataError
    from magic_pl.statedict import save_state_dict

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    experts = [perturb(copy.deepcopy(base), seed=i, scale=0.1) for i in (1, 2)]
    base_path = save_state_dict(base.state_dict(), tmp_path / "base.safetensors")
    paths = [save_state_dict(e.state_dict(), tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            p.add_(0.5 * sum(dict(e.named_parameters())[name] - dict(base.named_parameters())[name] for e in experts))
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    xs = {k: torch.randn(2, 6, generator=g) for k in range(2)}
    if where == "nan_one_sample":
        xs[1][1, 4] = float("nan")
    elif where == "nan_all_samples":
        xs[1][:] = float("nan")
    elif where == "inf_one_sample":
        xs[1][0, 0] = float("-inf")
    else:
        del xs[1]
    with pytest.raises(CalibrationDataError) as info:
        streaming_fsc(merged, base_path, paths, {k: [(x,)] for k, x in xs.items()},
                      calibration=f"fsc:statistic={statistic}", task_names=["a", "b"])
    msg = str(info.value)
    if where == "no_samples":
        assert "too few for: b (0)" in msg
    else:
        assert "task 'b'" in msg and "module '0'" in msg and "check the calibration inputs" in msg, msg
    assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())


@pytest.mark.parametrize("setting", ["scale:scale.factor=0.8", "wsc:gate=paper"])
def test_streamed_weight_steps_equal_setting_calibrate_bit_for_bit(tmp_path, setting):
    """Each row-separable weight step, given one key's row block at a time, writes what CalibrationSetting.calibrate
    writes on the whole in-memory model."""
    from transformers import AutoModelForCausalLM

    from magic_pl.calibration.dsc import write_task_vector
    from magic_pl.calibration.settings import resolve_setting

    base, experts = _write_family(tmp_path, k=2, dtype=torch.float32)
    report = stream_merge(base, experts, tmp_path / "m", merge_method="task_arithmetic", calibration=setting,
                          chunk_bytes="4KB", device="cpu")
    assert report.chunked > 0 and report.calibrated > 0
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_sd = {k: v for k, v in load_state_dict(base).items() if v.dtype.is_floating_point}
    tvs = [{k: v - base_sd[k] for k, v in load_state_dict(e).items() if k in base_sd} for e in experts]
    tau_m = merge("task_arithmetic", tvs)
    write_task_vector(base_sd, model, tau_m, tau_m)  # theta0 + tau_m, what the calibration starts from
    resolve_setting(setting).calibrate(base_sd, model, tvs, tau_m)
    got = load_state_dict(tmp_path / "m")
    for k, v in model.state_dict().items():
        if k in got:
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("setting", ["svc", "lines"])
def test_stream_merge_refuses_whole_model_weight_steps(tmp_path, setting):
    base, experts = _write_family(tmp_path, k=1)
    with pytest.raises(ValueError, match=rf"\['{setting}'\] need the whole model"):
        stream_merge(base, experts, tmp_path / "o", calibration=setting, device="cpu")
    assert not (tmp_path / "o").exists()


def test_stream_merge_deprecated_option_names_warn_and_agree(tmp_path):
    base, experts = _write_family(tmp_path, k=2)
    with pytest.warns(DeprecationWarning, match="merge_method"):
        stream_merge(base, experts, tmp_path / "old", method="ties", method_options={"density": 0.5}, device="cpu")
    stream_merge(base, experts, tmp_path / "new", merge_method="ties", merge_options={"density": 0.5}, device="cpu")
    old, new = load_state_dict(tmp_path / "old"), load_state_dict(tmp_path / "new")
    assert all(torch.equal(old[k], new[k]) for k in new)
