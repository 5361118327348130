"""Fixtures for tests/models: tiny random-initialised models written to tmp_path in their real on-disk formats."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # make model_fixtures importable under any pytest import mode
    sys.path.insert(0, _HERE)

from model_fixtures import llama_config, perturb, save_tiny_tokenizer  # noqa: E402  (needs the sys.path entry above)


@pytest.fixture
def make_llama(tmp_path: Path) -> Callable[..., Path]:
    """``make_llama(name, seed=None, **config)``: a tiny LlamaForCausalLM directory (tokenizer included); ``seed``
    perturbs a copy of the base (an expert)."""
    from transformers import LlamaForCausalLM

    def make(name: str, seed: int | None = None, base_seed: int = 0, **overrides) -> Path:
        torch.manual_seed(base_seed)
        model = LlamaForCausalLM(llama_config(**overrides))
        if seed is not None:
            perturb(model, seed)
        out = tmp_path / name
        model.save_pretrained(out)
        save_tiny_tokenizer(out)
        return out

    return make


