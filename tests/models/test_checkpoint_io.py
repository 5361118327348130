"""Checkpoint I/O: pread-based safetensors reader, planned sharded writer, atomic save_pretrained and support files."""

from __future__ import annotations

import json
import logging
import os
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from magic_pl.models.io import (
    SUPPORT_FILES,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    copy_support_files,
    parse_size,
    save_pretrained_atomic,
    save_sharded_safetensors,
)
from magic_pl.output import MANIFEST, OutputError
from magic_pl.statedict import CheckpointError, LazyStateDict, load_state_dict


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(50, 8, generator=g).to(torch.bfloat16),
        "lin.weight": torch.randn(16, 8, generator=g),
        "lin.bias": torch.randn(16, generator=g).half(),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int32),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def test_reader_matches_safetensors(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    reader = SafetensorsReader.from_path(tmp_path / "m.safetensors")
    assert set(reader) == set(state) and reader.metadata == {"format": "pt"}
    for k, v in state.items():
        assert reader.shape(k) == v.shape and reader.dtype(k) == v.dtype
        assert torch.equal(reader[k], v), k
    torch.testing.assert_close(reader.read_rows("emb.weight", 10, 13), state["emb.weight"][10:13])
    torch.testing.assert_close(reader.read_rows("emb.weight", 48, 99), state["emb.weight"][48:])
    t = reader["lin.weight"]
    t.add_(1)  # a fresh tensor: the file and later reads are unaffected
    assert torch.equal(reader["lin.weight"], state["lin.weight"])
    reader.close()


def test_sharded_writer_plans_shards_and_index(tmp_path):
    state = _state()
    out = save_sharded_safetensors(state, tmp_path / "ckpt", max_shard_size=1000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") for s in shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    loaded = {}
    for s in shards:
        loaded.update(load_file(str(out / s)))  # the reference reader accepts our files
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    lazy = load_state_dict(out)
    assert isinstance(lazy, LazyStateDict) and torch.equal(lazy["lin.weight"], state["lin.weight"])
    assert torch.equal(SafetensorsReader.from_path(out)["emb.weight"], state["emb.weight"])
    # a single shard is model.safetensors without an index, like transformers
    single = save_sharded_safetensors(state, tmp_path / "one", max_shard_size="1GB")
    assert sorted(p.name for p in single.iterdir()) == [MANIFEST, "model.safetensors"]


def test_writer_any_order_row_blocks_and_missing(tmp_path):
    w = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    plan = [("a", (10, 4), torch.float32), ("b", (3,), torch.int64)]
    with ShardedSafetensorsWriter(tmp_path / "x", plan, max_shard_size="1MB") as writer:
        writer.write("b", torch.tensor([1, 2, 3]))
        writer.write("a", w[6:], row_offset=6)
        writer.write("a", w[:6], row_offset=0)
    got = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert torch.equal(got["a"], w) and torch.equal(got["b"], torch.tensor([1, 2, 3]))
    writer = ShardedSafetensorsWriter(tmp_path / "y", plan)
    writer.write("a", w)
    with pytest.raises(CheckpointError, match=r"never written.*'b'"):
        writer.close()
    with pytest.raises(CheckpointError, match="planned dtype"):
        ShardedSafetensorsWriter(tmp_path / "z", plan).write("a", w.double())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1.5KB") == 1500
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("lots")


def test_save_pretrained_atomic_replaces_its_own_output_and_copies(tmp_path):
    from transformers import BertConfig, BertModel

    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "special_tokens_map.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"not copied")
    model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputError, match="not written by magic-pl"):  # a user's directory is never replaced
        save_pretrained_atomic(model, out, support_from=src)
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    (out / "stale.txt").unlink()
    save_pretrained_atomic(model, out, extra_files={"stale.txt": "from an earlier run"})
    save_pretrained_atomic(model, out, support_from=src, extra_files={"report.json": "{}"})
    names = sorted(p.name for p in out.iterdir())
    assert names == [MANIFEST, "config.json", "model.safetensors", "report.json", "special_tokens_map.json",
                     "tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    reloaded = BertModel.from_pretrained(out)
    assert torch.equal(reloaded.pooler.dense.weight, model.pooler.dense.weight)
    assert copy_support_files(src, out) == []  # existing files are kept


@pytest.mark.timeout(20)  # a FIFO among the side files must be skipped, not opened
def test_copy_support_files_copies_only_known_regular_files(tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (tmp_path / "secret").write_text("SECRET outside the model folder")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (src / name).write_text(f"content of {name}")
    (src / "notes.txt").write_text("not a side file")
    (src / "modeling_custom.py").write_text("import os")
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "sub").mkdir()
    (src / "sub" / "config.json").write_text("nested")
    (src / "special_tokens_map.json").mkdir()  # a known name, but a directory
    os.symlink(tmp_path / "secret", src / "merges.txt")  # a known name linking outside
    os.symlink(tmp_path / "secret", src / "leak.txt")
    os.symlink("tokenizer.json", src / "added_tokens.json")  # a link inside the folder is followed
    os.symlink(tmp_path / "gone", src / "spiece.model")  # dangling
    os.mkfifo(src / "vocab.json")
    with caplog.at_level(logging.WARNING, logger="magic_pl.models.io"):
        copied = copy_support_files(src, out)
    assert copied == ["added_tokens.json", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert sorted(p.name for p in out.iterdir()) == copied
    for p in out.iterdir():
        assert not p.is_symlink() and p.is_file(), p
        assert "SECRET" not in p.read_text()
    assert (out / "added_tokens.json").read_text() == "content of tokenizer.json"
    assert (out / "vocab.txt").read_text() == "content of vocab.txt"
    warned = caplog.text
    assert "merges.txt" in warned and "outside" in warned
    assert "vocab.json" in warned and "special_tokens_map.json" in warned and "not a regular file" in warned
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "spiece.model"} <= SUPPORT_FILES
    assert not any(n.endswith((".safetensors", ".bin", ".py")) for n in SUPPORT_FILES)
    # overwrite replaces a link at the destination instead of writing through it
    os.symlink(tmp_path / "secret", out / "generation_config.json")
    (src / "generation_config.json").write_text("{}")
    assert copy_support_files(src, out, overwrite=True)[:3] == ["added_tokens.json", "config.json",
                                                                 "generation_config.json"]
    assert (tmp_path / "secret").read_text() == "SECRET outside the model folder"
    assert not (out / "generation_config.json").is_symlink()


def _raw(path, header: dict, data_bytes: int):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))
    return path


@pytest.mark.parametrize("header,data_bytes,expect", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, 20, r"tensor 'b' \(bytes 12\.\.20\) overlaps"),
    ({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 16]}}, 16,
     r"'w' has 16 bytes .* \[2x3\] BF16 needs 12"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, 16, r"'w' has data_offsets \[-16, 0\]"),
    ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, r"'w' has shape \[True\]; dimensions"),
    ({"w": {"dtype": "F32", "shape": [4]}}, 16, r"'w' has data_offsets None"),
    ({"__metadata__": ["x"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4, "__metadata__"),
])
def test_both_backends_refuse_a_bad_header_with_one_message(tmp_path, header, data_bytes, expect):
    path = _raw(tmp_path / "bad.safetensors", header, data_bytes)
    messages = []
    for backend in ("mmap", "pread"):
        with pytest.raises(CheckpointError) as info:
            LazyStateDict.from_file(path, backend=backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert str(path) in messages[0] and "SafetensorError" not in messages[0]
    assert re.search(expect, messages[0]), messages[0]


def test_valid_edge_headers_still_load_on_both_backends(tmp_path):
    """Zero-size tensors and scalars tile the data section too: the validator must not refuse them."""
    state = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "v": torch.arange(3, dtype=torch.int16)}
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"a": "b"})
    for backend in ("mmap", "pread"):
        lazy = LazyStateDict.from_file(tmp_path / "m.safetensors", backend=backend)
        assert lazy.metadata == {"a": "b"}
        for k, v in state.items():
            assert torch.equal(lazy[k], v), (backend, k)
