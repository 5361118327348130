"""Tiny models and data written to a temp dir for the Lightning tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tiny_models import (
    WORDS,  # noqa: F401 (re-exported)
    save_tiny_tokenizer,
)
from tiny_models import perturb as _perturb
from tiny_models import save_clip_tokenizer as clip_tokenizer  # noqa: F401 (re-exported)
from torch import nn

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

TIMM_NAME = "vit_tiny_patch16_224"
TIMM_KWARGS = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def make_tiny_timm(directory: Path, num_classes: tuple[int, ...] = (3, 4), noise: float = 0.05) -> dict[str, Path]:
    """``base.safetensors`` (timm ViT, 3 classes) and one expert per entry of ``num_classes`` (``a``, ``b``, ...):
    the base plus seeded noise, each with its own classifier head."""
    import timm

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = timm.create_model(TIMM_NAME, pretrained=False, num_classes=3, **TIMM_KWARGS)
    out = {"base": directory / "base.safetensors"}
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(out["base"]))
    base_sd = base.state_dict()
    for i, nc in enumerate(num_classes):
        name = "abcdefgh"[i]
        g = torch.Generator().manual_seed(100 + i)
        expert = timm.create_model(TIMM_NAME, pretrained=False, num_classes=nc, **TIMM_KWARGS)
        sd = {}
        for k, v in expert.state_dict().items():
            b = base_sd.get(k)
            if b is not None and b.shape == v.shape and v.is_floating_point():
                sd[k] = (b + noise * torch.randn(b.shape, generator=g)).contiguous()
            else:
                sd[k] = v.contiguous()
        out[name] = directory / f"{name}.safetensors"
        save_file(sd, str(out[name]))
    return out


def tiny_tokenizer(path: Path) -> Path:
    """Word-level fast tokenizer over :data:`WORDS` with ``[CLS]``/``[SEP]``, saved with ``save_pretrained``."""
    return save_tiny_tokenizer(path, cls_sep=True)


def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Seeded fake fine-tuning (the Lightning tests' default noise is 0.05)."""
    return _perturb(model, seed, scale)



def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_sentences(n: int, seed: int, num_labels: Optional[int] = None, length: tuple[int, int] = (3, 9),
                     column: str = "text") -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(length[0], length[1], (1,), generator=g))
        words = " ".join(f"w{int(i)}" for i in torch.randint(0, 40, (L,), generator=g))
        row = {column: words}
        if num_labels is not None:
            row["label"] = int(torch.randint(0, num_labels, (1,), generator=g))
        rows.append(row)
    return rows


def random_images(directory: Path, n: int, seed: int, num_labels: int, size: int = 20) -> list[dict]:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        name = f"{seed}_{i}.png"
        Image.fromarray(arr).save(directory / name)
        rows.append({"image": f"images/{name}", "label": int(torch.randint(0, num_labels, (1,), generator=g))})
    return rows


#: Calibration texts of the tiny Llama experts' two tasks (words of the tiny tokenizer).
LLAMA_TEXTS = {"a": "w1 w2 w3 w4 w5\nw6 w7 w8\n", "b": "w9 w10 w11\nw12 w13 w14 w15\n"}


def save_llama_experts(root: Path) -> Path:
    """A tiny untied Llama base with its word-level tokenizer at ``root/base``, one expert per :data:`LLAMA_TEXTS`
    task at ``root/<task>`` (the base plus seeded noise, 0.05) and each task's texts at ``root/<task>.txt``."""
    import sys

    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from model_fixtures import llama_config, save_tiny_tokenizer

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(tie_word_embeddings=False)).eval()
    base.save_pretrained(root / "base")
    save_tiny_tokenizer(root / "base")
    for i, task in enumerate(LLAMA_TEXTS):
        expert = LlamaForCausalLM(llama_config(tie_word_embeddings=False))
        expert.load_state_dict(base.state_dict())
        _perturb(expert, seed=i + 1, scale=0.05).save_pretrained(root / task)
        (root / f"{task}.txt").write_text(LLAMA_TEXTS[task])
    return root
