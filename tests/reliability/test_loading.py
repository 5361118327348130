"""Bad inputs get a short error that says what is wrong and names the file; nothing is written or deleted.

One table: each row builds its bad input in ``tmp_path``, calls one entry point, and names the error text expected
(and text that must not appear). Every row also checks that the directory is exactly as before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import save_file

from magic_pl.models.io import save_sharded_safetensors
from magic_pl.statedict import (
    LazyStateDict,
    LazyTaskVector,
    iter_task_vectors,
    load_state_dict,
    save_state_dict,
    task_vector,
    validate_experts,
)


def _sd(seed: int = 0, rows: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(rows, 3, generator=g), "b": torch.randn(4, generator=g), "steps": torch.tensor(3)}


def _with(sd: dict, key: str, index: int, value: float) -> dict:
    out = {k: v.clone() for k, v in sd.items()}
    out[key].view(-1)[index] = value
    return out


def _tiny_bert(path: Path, *, labels: Optional[int] = None, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=16)
    torch.manual_seed(seed)
    if labels is None:
        model = BertModel(cfg)
    else:
        cfg.num_labels = labels
        model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    return path


# -- rows -------------------------------------------------------------------------------------------------------------
def random_pt(d: Path) -> Callable:
    (d / "model.pt").write_bytes(os.urandom(256))
    return lambda: load_state_dict(d / "model.pt")


def empty_pt(d: Path) -> Callable:
    (d / "model.pt").write_bytes(b"")
    return lambda: load_state_dict(d / "model.pt")


def random_zip_pt(d: Path) -> Callable:
    import zipfile

    with zipfile.ZipFile(d / "model.pt", "w") as z:
        z.writestr("notes.txt", "not a torch archive")
    return lambda: load_state_dict(d / "model.pt")


def pickle_with_code(d: Path) -> Callable:
    torch.save({"w": torch.ones(2), "obj": argparse.Namespace(a=1)}, d / "evil.pt")
    return lambda: load_state_dict(d / "evil.pt")


def random_safetensors(d: Path) -> Callable:
    (d / "model.safetensors").write_bytes(os.urandom(256))
    return lambda: load_state_dict(d / "model.safetensors")


def empty_safetensors(d: Path) -> Callable:
    (d / "model.safetensors").write_bytes(b"")
    return lambda: load_state_dict(d / "model.safetensors")


def truncated_safetensors(d: Path) -> Callable:
    save_file(_sd(), str(d / "full.safetensors"))
    raw = (d / "full.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(raw[: len(raw) - 20])
    return lambda: load_state_dict(d / "cut.safetensors")


def missing_file(d: Path) -> Callable:
    return lambda: load_state_dict(d / "nope.safetensors")


def missing_hf_dir(d: Path) -> Callable:
    from magic_pl.models import SequenceClassificationAdapter

    return lambda: SequenceClassificationAdapter(str(d / "no_base"), [str(d / "no_expert")]).setup()


def missing_hf_expert(d: Path) -> Callable:
    from magic_pl.models import SequenceClassificationAdapter

    _tiny_bert(d / "base")
    return lambda: SequenceClassificationAdapter(str(d / "base"), [str(d / "gone" / "expert")]).setup()


def missing_lora_adapter(d: Path) -> Callable:
    from magic_pl.models.lora import LoRACheckpoint

    return lambda: LoRACheckpoint(d / "adapter")


def index_shard_lacks_key(d: Path) -> Callable:
    save_file({"w": torch.ones(2)}, str(d / "model-1.safetensors"))
    weight_map = {"w": "model-1.safetensors", "b": "model-1.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return lambda: load_state_dict(d)


def bin_index_shard_lacks_key(d: Path) -> Callable:
    torch.save({"w": torch.ones(2)}, d / "pytorch_model-1.bin")
    weight_map = {"w": "pytorch_model-1.bin", "b": "pytorch_model-1.bin"}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return lambda: load_state_dict(d)


def index_missing_shard(d: Path) -> Callable:
    weight_map = {"w": "model-7.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return lambda: load_state_dict(d / "model.safetensors.index.json")


def empty_dir(d: Path) -> Callable:
    (d / "ckpt").mkdir()
    return lambda: load_state_dict(d / "ckpt")


def unknown_format(d: Path) -> Callable:
    (d / "weights.npz").write_bytes(b"123")
    return lambda: load_state_dict(d / "weights.npz")


def expert_other_width(d: Path) -> Callable:
    save_file(_sd(0), str(d / "base.safetensors"))
    save_file(_sd(1, rows=5), str(d / "wide.safetensors"))
    return lambda: validate_experts(load_state_dict(d / "base.safetensors"),
                                    [load_state_dict(d / "wide.safetensors")], names=["expert 0"], check_finite=False)


def timm_expert_other_width(d: Path) -> Callable:
    import timm

    from magic_pl.models import TimmAdapter

    torch.save(timm.create_model("test_vit", num_classes=3).state_dict(), d / "base.pth")
    torch.save(timm.create_model("test_vit", num_classes=3, embed_dim=48).state_dict(), d / "wide.pth")
    return lambda: TimmAdapter("test_vit", [str(d / "wide.pth")], base=str(d / "base.pth")).setup()


def timm_base_other_width(d: Path) -> Callable:
    import timm

    from magic_pl.models import TimmAdapter

    torch.save(timm.create_model("test_vit", num_classes=3, embed_dim=48).state_dict(), d / "wide.pth")
    torch.save(timm.create_model("test_vit", num_classes=3).state_dict(), d / "e.pth")
    return lambda: TimmAdapter("test_vit", [str(d / "e.pth")], base=str(d / "wide.pth")).setup()


def extra_expert_key(d: Path) -> Callable:
    save_file(_sd(0), str(d / "base.safetensors"))
    save_file({**_sd(1), "extra.weight": torch.ones(2)}, str(d / "expert.safetensors"))
    return lambda: task_vector(d / "expert.safetensors", d / "base.safetensors")


def nan_in_expert(d: Path) -> Callable:
    save_file(_sd(0), str(d / "base.safetensors"))
    save_file(_with(_sd(1), "w", 2, float("nan")), str(d / "expert.safetensors"))
    return lambda: task_vector(d / "expert.safetensors", d / "base.safetensors")


def inf_in_base(d: Path) -> Callable:
    save_file(_with(_sd(0), "b", 1, float("inf")), str(d / "base.safetensors"))
    save_file(_sd(1), str(d / "expert.safetensors"))
    return lambda: task_vector(d / "expert.safetensors", d / "base.safetensors")


def nan_through_lazy_view(d: Path) -> Callable:
    save_file(_sd(0), str(d / "base.safetensors"))
    save_file(_with(_sd(1), "b", 0, float("nan")), str(d / "expert.safetensors"))
    tv = LazyTaskVector(LazyStateDict.from_file(d / "expert.safetensors"), load_state_dict(d / "base.safetensors"),
                        name="expert 'a'")
    return lambda: tv["b"]


def nan_in_streamed_experts(d: Path) -> Callable:
    base, experts = _sd(0), [_sd(1), _with(_sd(2), "w", 5, float("nan"))]
    save_file(base, str(d / "base.safetensors"))
    for i, e in enumerate(experts):
        save_file(e, str(d / f"e{i}.safetensors"))
    return lambda: list(iter_task_vectors(load_state_dict(d / "base.safetensors"),
                                          [load_state_dict(d / f"e{i}.safetensors") for i in range(2)]))


def nan_in_stream_merge(d: Path) -> Callable:
    from magic_pl.models import stream_merge

    (d / "base").mkdir()
    (d / "e0").mkdir()
    save_file(_sd(0), str(d / "base" / "model.safetensors"))
    save_file(_with(_sd(1), "w", 0, float("-inf")), str(d / "e0" / "model.safetensors"))
    return lambda: stream_merge(d / "base", [d / "e0"], d / "out", device="cpu", check_config=False)


def nan_in_merge_setup(d: Path) -> Callable:
    from torch import nn

    from magic_pl.models.base import MergeSetup

    body = nn.Linear(3, 2)
    save_file(_with({k: v.detach() for k, v in body.state_dict().items()}, "bias", 1, float("nan")),
              str(d / "expert.safetensors"))
    setup = MergeSetup(base=body, experts=[load_state_dict(d / "expert.safetensors")], task_names=["a"])
    return lambda: [dict(tv) for tv in setup.task_vectors()]


def nan_in_lora_adapter(d: Path) -> Callable:
    from magic_pl.models.lora import LoRACheckpoint

    a = d / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.fc.lora_A.weight": torch.ones(2, 3),
               "base_model.model.fc.lora_B.weight": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])},
              str(a / "adapter_model.safetensors"))
    return lambda: LoRACheckpoint(a).delta("fc.weight")


def hf_expert_pickle_with_code(d: Path) -> Callable:
    from magic_pl.models import SequenceClassificationAdapter

    _tiny_bert(d / "base")
    expert = _tiny_bert(d / "expert", labels=2)
    lazy = load_state_dict(expert)
    state = {k: lazy[k].clone() for k in lazy}
    (expert / "model.safetensors").unlink()
    torch.save({**state, "note": argparse.Namespace(a=1)}, expert / "pytorch_model.bin")
    return lambda: SequenceClassificationAdapter(str(d / "base"), [str(expert)]).setup()


def save_into_user_dir(d: Path) -> Callable:
    (d / "some_dir").mkdir()
    (d / "some_dir" / "mine.txt").write_text("keep")
    return lambda: save_state_dict({"a": torch.ones(2)}, d / "some_dir")


def sharded_save_over_user_dir(d: Path) -> Callable:
    (d / "out").mkdir()
    (d / "out" / "mine.txt").write_text("keep")
    return lambda: save_sharded_safetensors({"a": torch.ones(2)}, d / "out")


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (JSON text, unchecked) and data section."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _one_tensor_header(**entry) -> bytes:
    return json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **entry}}).encode()


def _bad_header(header: bytes, data: bytes = bytes(16), backend: str = "mmap") -> Callable[[Path], Callable]:
    """A row builder: ``bad.safetensors`` with ``header``, read whole through ``backend``."""

    def build(d: Path) -> Callable:
        _raw_safetensors(d / "bad.safetensors", header, data)
        return lambda: [t for t in LazyStateDict.from_file(d / "bad.safetensors", backend=backend).values()]

    return build


_TWO_OVERLAPPING = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
_DUPLICATE_KEY = (b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                  b'"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}')


def deep_json_header(d: Path) -> Callable:
    _raw_safetensors(d / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    return lambda: load_state_dict(d / "deep.safetensors")


def _index(name: str, value: object, shard_writer: Callable[[Path], None]) -> Callable[[Path], Callable]:
    """A row builder: a directory with a real shard and index ``name`` whose weight_map sends ``w`` to ``value``."""

    def build(d: Path) -> Callable:
        (d / "outside.safetensors").write_bytes(b"")
        (d / "ckpt").mkdir()
        shard_writer(d / "ckpt")
        (d / "ckpt" / name).write_text(json.dumps({"weight_map": {"w": value}}))
        return lambda: load_state_dict(d / "ckpt")

    return build


def _st_shard(folder: Path) -> None:
    save_file({"w": torch.ones(2)}, str(folder / "model-1.safetensors"))


def _bin_shard(folder: Path) -> None:
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model-1.bin")


def index_escapes_to_a_real_file(d: Path) -> Callable:
    save_file({"w": torch.ones(2)}, str(d / "elsewhere.safetensors"))
    (d / "ckpt").mkdir()
    (d / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    return lambda: dict(load_state_dict(d / "ckpt"))


def _fifo(name: str, via_dir: bool = False) -> Callable[[Path], Callable]:
    """A row builder: a FIFO named ``name`` (no writer ever opens it: reading it would block forever)."""

    def build(d: Path) -> Callable:
        (d / "ckpt").mkdir()
        os.mkfifo(d / "ckpt" / name)
        return lambda: load_state_dict(d / "ckpt" if via_dir else d / "ckpt" / name)

    return build


def merge_nan_in_memory(d: Path) -> Callable:
    from magic_pl.merging import merge

    tvs = [_sd(1), _with(_sd(2), "w", 3, float("nan"))]
    for tv in tvs:
        del tv["steps"]
    return lambda: merge("dare", tvs, p=0.9)  # DARE's drop would hide the NaN nine times out of ten


@dataclass(frozen=True)
class Row:
    build: Callable[[Path], Callable]
    expect: str  # regex the message must match (the file name included)
    forbid: Optional[str] = None  # regex it must not match


ROWS = {
    "random bytes .pt": Row(random_pt, r"model\.pt is not a torch checkpoint"),
    "empty .pt": Row(empty_pt, r"model\.pt is not a torch checkpoint \(an empty file\)"),
    "zip that is no torch archive": Row(random_zip_pt, r"model\.pt is not a torch checkpoint", r"weights_only"),
    "pickle carrying code": Row(pickle_with_code, r"evil\.pt holds Python objects beyond tensors.*trust_pickle=True",
                                r"not a torch checkpoint"),
    "random bytes .safetensors": Row(random_safetensors, r"model\.safetensors is not a safetensors file"),
    "empty .safetensors": Row(empty_safetensors, r"model\.safetensors is not a safetensors file"),
    "truncated .safetensors": Row(truncated_safetensors, r"cut\.safetensors is truncated or corrupt"),
    "missing file": Row(missing_file, r"nope\.safetensors not found"),
    "missing HF directory": Row(missing_hf_dir, r"no_base not found", r"Repo id"),
    "missing HF expert directory": Row(missing_hf_expert, r"gone/expert not found", r"Repo id"),
    "missing LoRA adapter": Row(missing_lora_adapter, r"adapter not found"),
    "index names a key its shard lacks": Row(index_shard_lacks_key, r"shard .*model-1\.safetensors lacks key 'b'"),
    "bin index names a key its shard lacks": Row(bin_index_shard_lacks_key,
                                                 r"shard .*pytorch_model-1\.bin lacks key 'b'"),
    "index names a missing shard": Row(index_missing_shard, r"model-7\.safetensors .*not found"),
    "directory without weights": Row(empty_dir, r"ckpt holds no model weights"),
    "unknown format": Row(unknown_format, r"cannot tell the format of .*weights\.npz"),
    "expert of another width": Row(expert_other_width,
                                   r"wide\.safetensors\): shape mismatch for 'w': base \(4, 3\) vs expert \(5, 3\)"),
    "timm expert of another width": Row(timm_expert_other_width,
                                        r"wide\.pth\): shape mismatch for 'cls_token': checkpoint \(1, 1, 48\) vs "
                                        r"timm 'test_vit' \(1, 1, 64\)", r"classifier head"),
    "timm base of another width": Row(timm_base_other_width,
                                      r"wide\.pth: shape mismatch for 'cls_token': checkpoint \(1, 1, 48\)"),
    "expert with extra keys (task_vector)": Row(extra_expert_key,
                                                r"expert\.safetensors does not match the base .* \['extra\.weight'\]"),
    "NaN in an expert (task_vector)": Row(nan_in_expert, r"expert\.safetensors: tensor 'w' has 1 NaN and 0 Inf"),
    "Inf in the base (task_vector)": Row(inf_in_base, r"base\.safetensors: tensor 'b' has 0 NaN and 1 Inf"),
    "NaN through the lazy task vector": Row(nan_through_lazy_view,
                                            r"expert 'a' \(.*expert\.safetensors\): tensor 'b' has 1 NaN"),
    "NaN in a streamed expert (iter_task_vectors)": Row(nan_in_streamed_experts,
                                                        r"expert 1 \(.*e1\.safetensors\): tensor 'w' has 1 NaN"),
    "-Inf in an expert (stream_merge)": Row(nan_in_stream_merge,
                                            r"e0/model\.safetensors\): tensor 'w' has 0 NaN and 1 Inf"),
    "NaN in an adapter's expert (MergeSetup)": Row(nan_in_merge_setup,
                                                   r"expert 'a' \(.*expert\.safetensors\): tensor 'bias' has 1 NaN"),
    "NaN in a LoRA factor": Row(nan_in_lora_adapter, r"adapter_model\.safetensors: tensor 'fc lora_B' has 1 NaN"),
    "HF expert pickle carrying code": Row(hf_expert_pickle_with_code,
                                          r"pytorch_model\.bin holds Python objects beyond tensors"),
    "safetensors shape too large [mmap]": Row(
        _bad_header(_one_tensor_header(shape=[2**40, 2**40])),
        r"bad\.safetensors is not a valid safetensors file: tensor 'w' has 16 bytes of data but shape "
        r"\[1099511627776x1099511627776\] F32 needs more than", r"SafetensorError|overflow"),
    "safetensors overlapping offsets [mmap]": Row(
        _bad_header(_TWO_OVERLAPPING, bytes(24)),
        r"bad\.safetensors .*tensor 'b' \(bytes 8\.\.24\) overlaps the tensor before it", r"SafetensorError"),
    "safetensors overlapping offsets [pread]": Row(
        _bad_header(_TWO_OVERLAPPING, bytes(24), "pread"),
        r"bad\.safetensors .*tensor 'b' \(bytes 8\.\.24\) overlaps the tensor before it"),
    "safetensors bytes != shape x dtype [mmap]": Row(
        _bad_header(_one_tensor_header(shape=[3])), r"bad\.safetensors .*tensor 'w' has 16 bytes of data but shape "
        r"\[3\] F32 needs 12", r"SafetensorError"),
    "safetensors bytes != shape x dtype [pread]": Row(
        _bad_header(_one_tensor_header(dtype="F16"), backend="pread"),
        r"bad\.safetensors .*tensor 'w' has 16 bytes of data but shape \[4\] F16 needs 8"),
    "safetensors duplicate key [mmap]": Row(_bad_header(_DUPLICATE_KEY), r"bad\.safetensors .*key 'w' appears twice"),
    "safetensors duplicate key [pread]": Row(_bad_header(_DUPLICATE_KEY, backend="pread"),
                                             r"bad\.safetensors .*key 'w' appears twice"),
    "safetensors offsets past the file [pread]": Row(
        _bad_header(_one_tensor_header(data_offsets=[0, 16]), bytes(8), "pread"),
        r"bad\.safetensors is truncated or corrupt: tensor 'w' lies outside the file"),
    "safetensors gap after the data [pread]": Row(
        _bad_header(_one_tensor_header(), bytes(20), "pread"), r"bad\.safetensors .*4 byte\(s\) after the last"),
    "safetensors negative dimension [pread]": Row(
        _bad_header(_one_tensor_header(shape=[-4]), backend="pread"),
        r"bad\.safetensors .*tensor 'w' has shape \[-4\]; dimensions must be non-negative integers"),
    "safetensors float offsets [pread]": Row(
        _bad_header(_one_tensor_header(data_offsets=[0.0, 16.0]), backend="pread"),
        r"bad\.safetensors .*tensor 'w' has data_offsets \[0\.0, 16\.0\]"),
    "safetensors unknown dtype [pread]": Row(
        _bad_header(_one_tensor_header(dtype="Q7"), backend="pread"), r"bad\.safetensors .*tensor 'w' has dtype 'Q7'"),
    "safetensors metadata not str->str [mmap]": Row(
        _bad_header(json.dumps({"__metadata__": {"format": 1},
                                "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()),
        r"bad\.safetensors .*__metadata__ must map strings to strings", r"SafetensorError"),
    "safetensors header nested 100000 deep": Row(deep_json_header, r"deep\.safetensors .*nested too deeply",
                                                 r"RecursionError|recursion"),
    "index value not a string": Row(_index("model.safetensors.index.json", 5, _st_shard),
                                    r"index .*model\.safetensors\.index\.json: weight_map\['w'\] is int 5"),
    "bin index value a list": Row(_index("pytorch_model.bin.index.json", ["x"], _bin_shard),
                                  r"index .*pytorch_model\.bin\.index\.json: weight_map\['w'\] is list"),
    "index value an absolute path": Row(
        _index("model.safetensors.index.json", "/etc/model.safetensors", _st_shard),
        r"model\.safetensors\.index\.json: weight_map\['w'\] = '/etc/model\.safetensors' is not a file name"),
    "bin index value with ..": Row(_index("pytorch_model.bin.index.json", "../outside.safetensors", _bin_shard),
                                   r"pytorch_model\.bin\.index\.json: weight_map\['w'\] = '\.\./outside"),
    "index pointing at a real file outside": Row(index_escapes_to_a_real_file,
                                                 r"weight_map\['w'\] = '\.\./elsewhere\.safetensors' is not a file"),
    "FIFO named e.pt": Row(_fifo("e.pt"), r"ckpt/e\.pt is a FIFO, not a regular file"),
    "FIFO named e.safetensors": Row(_fifo("e.safetensors"), r"ckpt/e\.safetensors is a FIFO, not a regular file"),
    "FIFO named e.ckpt": Row(_fifo("e.ckpt"), r"ckpt/e\.ckpt is a FIFO, not a regular file"),
    "FIFO named as an index": Row(_fifo("model.safetensors.index.json"),
                                  r"ckpt/model\.safetensors\.index\.json is a FIFO, not a regular file"),
    "FIFO as a directory's weights": Row(_fifo("pytorch_model.bin", via_dir=True),
                                         r"ckpt/pytorch_model\.bin is a FIFO, not a regular file"),
    "NaN in an in-memory task vector (merge)": Row(merge_nan_in_memory,
                                                   r"task vector 1: tensor 'w' has 1 NaN and 0 Inf values"),
    "save_state_dict onto a directory": Row(save_into_user_dir, r"some_dir is an existing directory"),
    "sharded save over a user directory": Row(sharded_save_over_user_dir,
                                              r"out exists and was not written by magic-pl"),
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (nanoseconds)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


@pytest.mark.timeout(20)  # a FIFO row that regresses would block forever on open
@pytest.mark.parametrize("case", list(ROWS))
def test_bad_input_gives_a_clear_error_and_touches_nothing(case: str, tmp_path: Path):
    row = ROWS[case]
    call = row.build(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as info:  # CheckpointError and OutputError are ValueErrors
        call()
    message = str(info.value)
    assert re.search(row.expect, message), f"{case}: {message}"
    if row.forbid is not None:
        assert not re.search(row.forbid, message), f"{case}: {message}"
    assert len(message) < 600, f"{case}: error too long: {message}"
    assert snapshot(tmp_path) == before, f"{case}: files were written or deleted"


def test_legacy_pt_loads_with_the_safe_unpickler(tmp_path: Path):
    sd = _sd()
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pt").read_bytes()[:2] != b"PK"  # really the legacy format
    loaded = load_state_dict(tmp_path / "legacy.pt")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_trust_pickle_reaches_the_hf_adapters(tmp_path: Path):
    """With trust_pickle the expert's pickle is unpickled (and then refused for its non-tensor entry), proving the
    option reached the adapter's loading."""
    from magic_pl.models import SequenceClassificationAdapter

    hf_expert_pickle_with_code(tmp_path)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: entries \['note'\] are not tensors"):
        SequenceClassificationAdapter(str(tmp_path / "base"), [str(tmp_path / "expert")], trust_pickle=True).setup()
