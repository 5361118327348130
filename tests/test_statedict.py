"""Checkpoint core: loading formats, laziness, validation errors, task vectors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from magic_pl.statedict import (
    CheckpointError,
    LazyStateDict,
    align_to_base,
    apply_task_vector,
    atomic_path,
    is_batchnorm_stat,
    iter_task_vectors,
    load_state_dict,
    save_state_dict,
    task_vector,
    validate_experts,
)


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        "w": torch.randn(4, 3),
        "b": torch.randn(4),
        "bn.running_var": torch.rand(4) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7),
    }


def test_roundtrip_formats(tmp_path: Path):
    sd = _sd()
    save_state_dict(sd, tmp_path / "m.safetensors")
    save_state_dict(sd, tmp_path / "m.pt")
    for src in (tmp_path / "m.safetensors", tmp_path / "m.pt"):
        loaded = load_state_dict(src)
        assert set(loaded) == set(sd)
        for k in sd:
            assert torch.equal(loaded[k], sd[k]), (src, k)


def test_safetensors_is_lazy(tmp_path: Path, monkeypatch):
    save_state_dict(_sd(), tmp_path / "m.safetensors")
    lazy = load_state_dict(tmp_path / "m.safetensors")
    assert isinstance(lazy, LazyStateDict)
    assert lazy.shape("w") == torch.Size([4, 3]) and lazy.dtype("w") == torch.float32
    reads: list[str] = []
    handle = lazy._handle(tmp_path / "m.safetensors")
    orig = handle.get_tensor

    class Spy:
        def __getattr__(self, name):
            return getattr(handle, name)

        def get_tensor(self, key):
            reads.append(key)
            return orig(key)

    lazy._handles[tmp_path / "m.safetensors"] = Spy()
    _ = lazy["b"]
    assert reads == ["b"]


def test_sharded_index_and_hf_directory(tmp_path: Path):
    sd = _sd()
    save_file({"w": sd["w"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "w"}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if k == 'w' else 2}-of-00002.safetensors" for k in sd}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for src in (tmp_path, tmp_path / "model.safetensors.index.json"):
        loaded = load_state_dict(src)
        assert {k: torch.equal(loaded[k], sd[k]) for k in sd} == {k: True for k in sd}


def test_module_source_and_nested_checkpoint(tmp_path: Path):
    net = nn.Linear(3, 2)
    sd = load_state_dict(net)
    assert torch.equal(sd["weight"], net.weight.detach())
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "lightning.ckpt")
    loaded = load_state_dict(tmp_path / "lightning.ckpt")
    assert torch.equal(loaded["bias"], net.bias.detach())


def test_pickle_needs_opt_in(tmp_path: Path):
    torch.save({"w": torch.ones(2), "obj": _Opaque()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(tmp_path / "evil.pt")


class _Opaque:
    pass


def test_missing_file_and_unknown_format(tmp_path: Path):
    with pytest.raises(CheckpointError, match="nope.safetensors not found"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="x.txt"):
        load_state_dict(tmp_path / "x.txt")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        load_state_dict(tmp_path)


def test_validate_experts_errors_name_the_problem():
    base = _sd(0)
    ok = _sd(1)
    validate_experts(base, [ok])
    missing = {k: v for k, v in ok.items() if k != "b"}
    with pytest.raises(CheckpointError, match=r"expert 0 .*missing.*'b'"):
        validate_experts(base, [missing])
    extra = dict(ok, extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match="lacks.*extra"):
        validate_experts(base, [extra])
    wrong = dict(ok, w=torch.zeros(5, 3))
    with pytest.raises(CheckpointError, match=r"'w'.*\(4, 3\).*\(5, 3\)"):
        validate_experts(base, [wrong], names=["ft"])
    nan = dict(ok, b=torch.tensor([0.0, float("nan"), float("inf"), 1.0]))
    with pytest.raises(CheckpointError, match=r"'b' has 1 NaN and 1 Inf"):
        validate_experts(base, [ok, nan])
    intish = dict(ok, w=torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(CheckpointError, match="dtype mismatch for 'w'"):
        validate_experts(base, [intish])
    with pytest.raises(CheckpointError, match="at least one expert"):
        validate_experts(base, [])


def test_task_vector_float_only_and_mixed_dtypes():
    base = _sd(0)
    ft = {k: (v + 1 if v.is_floating_point() else v + 5) for k, v in _sd(1).items()}
    ft_bf16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in ft.items()}
    tau = task_vector(ft_bf16, base)
    assert "bn.num_batches_tracked" not in tau
    assert all(t.dtype == torch.float32 for t in tau.values())
    torch.testing.assert_close(tau["w"], ft_bf16["w"].float() - base["w"])
    merged = apply_task_vector(base, tau, scale=0.5)
    assert merged["w"].dtype == torch.float32
    torch.testing.assert_close(merged["w"], base["w"] + 0.5 * tau["w"])
    assert torch.equal(merged["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    # bf16 base: arithmetic in float32, result in bf16
    base16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in base.items()}
    out16 = apply_task_vector(base16, tau)
    assert out16["w"].dtype == torch.bfloat16
    assert torch.equal(out16["w"], (base16["w"].float() + tau["w"]).bfloat16())


def test_iter_task_vectors_streams_per_key():
    base, e1, e2 = _sd(0), _sd(1), _sd(2)
    got = dict(iter_task_vectors(base, [e1, e2]))
    assert list(got) == ["w", "b", "bn.running_var"]
    torch.testing.assert_close(got["b"][1], e2["b"] - base["b"])
    with pytest.raises(CheckpointError, match=r"expert 1: shape mismatch for 'w'"):
        list(iter_task_vectors(base, [e1, dict(e2, w=torch.zeros(2, 2))]))


def test_is_batchnorm_stat():
    assert is_batchnorm_stat("features.1.running_var") and is_batchnorm_stat("bn.running_mean")
    assert not is_batchnorm_stat("bn.weight") and not is_batchnorm_stat("bn.num_batches_tracked")


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path):
    target = tmp_path / "model.safetensors"
    save_state_dict({"a": torch.ones(2)}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert torch.equal(load_state_dict(target)["a"], torch.ones(2))  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    # directories are replaced whole
    out = tmp_path / "hf"
    for value in (1.0, 2.0):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            save_file({"a": torch.full((2,), value)}, str(tmp / "model.safetensors"))
    assert torch.equal(load_state_dict(out)["a"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.safetensors"]


def test_tied_weights_are_saved(tmp_path: Path):
    w = torch.randn(5, 3)
    save_state_dict({"emb.weight": w, "head.weight": w}, tmp_path / "tied.safetensors")
    loaded = load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["emb.weight"], w) and torch.equal(loaded["head.weight"], w)


class _CountingSource(dict):
    """A tensor source that counts reads of each key (shape/dtype answered without a read)."""

    def __init__(self, d):
        super().__init__(d)
        self.reads: dict[str, int] = {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return dict.__getitem__(self, key)

    def shape(self, key):
        return dict.__getitem__(self, key).shape

    def dtype(self, key):
        return dict.__getitem__(self, key).dtype


def test_validate_experts_reads_each_tensor_once_through_views():
    from magic_pl.models.base import KeyView

    base, expert = _CountingSource(_sd(0)), _CountingSource(_sd(1))
    validate_experts(KeyView(base, list(base)), [KeyView(expert, list(expert))], check_finite=True)
    assert base.reads == {"w": 1, "b": 1, "bn.running_var": 1}  # the integer buffer is never read
    assert expert.reads == {"w": 1, "b": 1, "bn.running_var": 1}
    base.reads.clear(), expert.reads.clear()
    validate_experts(KeyView(base, list(base)), [KeyView(expert, list(expert))], check_finite=False)
    assert base.reads == {} and expert.reads == {}  # shapes and dtypes only


def test_one_implementation_behind_the_public_names(tmp_path: Path):
    import magic_pl.calibration.taskvectors as cal_tv
    import magic_pl.models.base as mb
    from magic_pl.models.io import SafetensorsReader
    from magic_pl.statedict import LazyTaskVector, tensor_dtype, tensor_shape

    assert cal_tv.LazyTaskVector is LazyTaskVector is mb.LazyTaskVector
    assert mb.tensor_shape is tensor_shape and mb.tensor_dtype is tensor_dtype
    save_state_dict(_sd(), tmp_path / "m.safetensors")
    mmap, pread = LazyStateDict.from_file(tmp_path / "m.safetensors"), SafetensorsReader.from_path(tmp_path)
    assert isinstance(pread, LazyStateDict) and pread.backend == "pread" and mmap.backend == "mmap"
    for k in _sd():
        assert torch.equal(mmap[k], pread[k]) and mmap.dtype(k) == pread.dtype(k) == _sd()[k].dtype
    assert torch.equal(mmap.read_rows("w", 1, 3), pread.read_rows("w", 1, 3))
    assert torch.equal(pread.read_rows("w", 1, 3), _sd()["w"][1:3])


def test_apply_delta_keeps_float64_and_goes_through_float32_otherwise():
    from magic_pl.statedict import apply_delta

    base64 = torch.ones(3, dtype=torch.float64)
    tau = torch.full((3,), 1e-12, dtype=torch.float64)
    out = apply_delta(base64, tau)
    assert out.dtype == torch.float64 and torch.equal(out, base64 + tau) and bool((out > 1).all())
    assert torch.equal(apply_delta(base64.float(), tau), torch.ones(3))  # float32 base: the tiny step is lost
    bf = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    got = apply_delta(bf, torch.tensor([0.5, -0.25]), scale=2.0)
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.tensor([2.0, 1.5], dtype=torch.bfloat16))
    merged = apply_task_vector({"w": base64, "n": torch.tensor(2)}, {"w": tau}, scale=2.0)
    assert merged["w"].dtype == torch.float64 and torch.equal(merged["w"], 1.0 + 2 * tau)
    with pytest.raises(CheckpointError, match=r"tensor 'w' has 0 NaN and 1 Inf"):
        apply_delta(torch.ones(2, dtype=torch.float16), torch.tensor([1e6, 0.0]), key="w")  # float16 overflow


def test_task_vector_key_sets_and_finite_checks():
    base, ft = _sd(0), _sd(1)
    with pytest.raises(CheckpointError, match=r"has 1 key\(s\) the base lacks, e.g. \['extra'\]"):
        task_vector(dict(ft, extra=torch.ones(1)), base)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\) of the base, e.g. \['b'\]"):
        task_vector({k: v for k, v in ft.items() if k != "b"}, base)
    with pytest.raises(CheckpointError, match=r"has 1 key\(s\) the base lacks"):
        list(iter_task_vectors(base, [ft, dict(ft, extra=torch.ones(1))]))
    bad = dict(ft, w=ft["w"].clone())
    bad["w"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"fine-tuned checkpoint: tensor 'w' has 1 NaN"):
        task_vector(bad, base)
    tau = task_vector(bad, base, check_finite=False)  # the explicit opt-out
    assert torch.isnan(tau["w"][0, 0]) and torch.equal(tau["b"], ft["b"] - base["b"])
    with pytest.raises(CheckpointError, match=r"expert 0: tensor 'w' has 1 NaN"):
        list(iter_task_vectors(base, [bad]))


# ---------------------------------------------------------------------------------------------------------------------
# Keys written differently: body prefixes detected or given, heads left out by rule
# ---------------------------------------------------------------------------------------------------------------------
def _classifier_layout() -> tuple[dict, dict]:
    torch.manual_seed(0)
    base = {"embeddings.word.weight": torch.randn(5, 4), "encoder.0.weight": torch.randn(4, 4),
            "encoder.0.bias": torch.randn(4), "embeddings.position_ids": torch.arange(5)}
    expert = {f"bert.{k}": v + 0.1 for k, v in base.items() if k != "embeddings.position_ids"}
    expert.update({"classifier.weight": torch.randn(3, 4), "classifier.bias": torch.randn(3)})
    return base, expert


def test_task_vector_matches_a_prefixed_expert_with_a_head_to_a_bare_base():
    base, expert = _classifier_layout()
    tau = task_vector(expert, base)
    assert sorted(tau) == ["embeddings.word.weight", "encoder.0.bias", "encoder.0.weight"]  # keyed like the base
    for v in tau.values():
        torch.testing.assert_close(v, torch.full_like(v, 0.1), rtol=0, atol=1e-6)
    # the reverse layout (a prefixed base with its own head, a bare expert) and explicit prefixes give the same
    rev = task_vector({k[len("bert."):]: v for k, v in expert.items() if k.startswith("bert.")},
                      {f"bert.{k}": v for k, v in base.items()} | {"cls.weight": torch.ones(2)})
    assert sorted(rev) == [f"bert.{k}" for k in sorted(tau)]
    explicit = task_vector(expert, base, base_prefix="", expert_prefix="bert.")
    assert all(torch.equal(explicit[k], tau[k]) for k in tau)


def test_align_to_base_names_body_keys_missing_on_one_side():
    base, expert = _classifier_layout()
    del expert["bert.encoder.0.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\) of the base, e.g. \['encoder.0.bias'\].*'bert.'"):
        task_vector(expert, base)
    base, expert = _classifier_layout()
    with pytest.raises(CheckpointError, match="does not match the base"):
        task_vector(expert, base, expert_prefix="roberta.")  # a wrong explicit prefix finds no body
    heads = align_to_base(base, _classifier_layout()[1])[2]
    assert heads == ["classifier.bias", "classifier.weight"]
