"""Helpers for tests/models: tiny random-initialised models in their real on-disk formats (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from magic_pl.calibration import FeatureSpaceCalibrator, weight_space_calibration
from magic_pl.merging import merge
from magic_pl.models.base import MergeSetup

WORDS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "<s>", "</s>"] + [f"w{i}" for i in range(40)]


def save_tiny_tokenizer(path: Path) -> None:
    """A word-level fast tokenizer (46 tokens) saved with save_pretrained (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)


def save_clip_tokenizer(path: Path) -> None:
    """A byte-level CLIP BPE tokenizer without merges (514 tokens: bytes, bytes</w>, <|startoftext|>, <|endoftext|>)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)


@torch.no_grad()
def perturb(model: nn.Module, seed: int, scale: float = 0.02) -> nn.Module:
    """Add seeded Gaussian noise to every floating parameter (a fake fine-tuning), in place."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return model


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=1,
              bos_token_id=4, eos_token_id=5)
    kw.update(overrides)
    return LlamaConfig(**kw)


def bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64, pad_token_id=1)
    kw.update(overrides)
    return BertConfig(**kw)


def clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=80, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16,
    )


def calibrate(setup: MergeSetup, method: str = "task_arithmetic", *, batches=None, wsc: bool = True, **options):
    """Merge + WSC (+ FSC when ``batches`` is given: {task_index: [args tuple or kwargs dict]}) -> calibrated body."""
    tvs = setup.task_vectors()
    tau = merge(method, tvs, **options)
    if wsc:
        tau = weight_space_calibration(tau, tvs)
    model = setup.merged_model(tau)
    report = None
    if batches is not None:
        cal = FeatureSpaceCalibrator(setup.base, model, tvs, modules=setup.fsc_modules(model))
        for k, items in batches.items():
            for item in items:
                if isinstance(item, dict):
                    cal.update(k, **item)
                else:
                    cal.update(k, *item)
        report = cal.fold()
        assert not report.wrapped, f"modules were wrapped instead of folded: {report.wrapped}"
    return model, tau, report
