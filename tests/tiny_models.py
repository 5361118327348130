"""Shared test helpers: tiny tokenizers in their real on-disk formats, a seeded fake fine-tuning and a three-task body
with experts (no downloads).

Used by tests/models and tests/lightning (``tests/`` is on ``sys.path`` through ``tests/conftest.py``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

WORDS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "<s>", "</s>"] + [f"w{i}" for i in range(40)]


def save_tiny_tokenizer(path: Path, *, cls_sep: bool = False) -> Path:
    """A word-level fast tokenizer over :data:`WORDS` (46 tokens) saved with ``save_pretrained``; ``cls_sep`` also
    declares ``[CLS]``/``[SEP]`` as the classifier/separator tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if cls_sep else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                            eos_token="</s>", **extra).save_pretrained(path)
    return path


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


class Body(nn.Module):
    """Linear 6 -> 16, LayerNorm, ReLU, Linear 16 -> 8."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def body_tasks():
    """``(base, experts, heads, test data)`` for tasks x, y, z (3, 4 and 2 classes): a seeded :class:`Body`, three
    experts (:func:`perturb` with seeds 10, 11, 12 and scale 0.1), a head per task and 11 random test examples each."""
    from magic_pl.lightning import RandomTaskDataset

    torch.manual_seed(0)
    base = Body()
    experts = [perturb(copy.deepcopy(base), 10 + i, 0.1) for i in range(3)]
    heads = [nn.Linear(8, n) for n in (3, 4, 2)]
    data = {t: RandomTaskDataset(11, (6,), n, seed=i) for i, (t, n) in enumerate(zip("xyz", (3, 4, 2)))}
    return base, experts, heads, data


def save_bert_classifiers(base_dir: Path, experts: dict[Path, int], vocab: list[str], seed: int = 0) -> None:
    """A tiny random ``BertModel`` base (with a WordPiece tokenizer over ``vocab``) saved at ``base_dir``, and one
    ``BertForSequenceClassification`` expert per ``{directory: number of labels}``: the base's encoder plus seeded
    noise (0.02) and its own classifier head, each saved with ``save_pretrained``."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(seed)
    base = BertModel(config)
    base.save_pretrained(base_dir)
    (base_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(base_dir / "vocab.txt")).save_pretrained(base_dir)
    (base_dir / "vocab.txt").unlink()  # the fast tokenizer's files are what a save_pretrained folder holds
    for directory, num_labels in experts.items():
        expert = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": num_labels}))
        expert.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn_like(p))
        expert.save_pretrained(directory)
