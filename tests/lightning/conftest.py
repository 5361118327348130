"""Fixtures for tests/lightning: tiny timm experts on disk, shared across the session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # make helpers importable under any pytest import mode
    sys.path.insert(0, _HERE)

from lightning_helpers import make_tiny_timm, save_llama_experts  # noqa: E402


@pytest.fixture(scope="session")
def tiny_timm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"base", "a", "b"}`` -> safetensors paths of a 2-block timm ViT and two experts (3 and 4 classes)."""
    return make_tiny_timm(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def tiny_workdir(tmp_path: Path, tiny_timm: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding ``tiny_models/`` as ``configs/tiny.yaml`` expects; the cwd for the test."""
    models = tmp_path / "tiny_models"
    models.mkdir()
    for name in ("base", "a", "b"):
        (models / f"{name}.safetensors").symlink_to(tiny_timm[name])
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def llama_files(tmp_path: Path) -> Path:
    """Tiny Llama base and experts on disk, with calibration texts (:func:`lightning_helpers.save_llama_experts`)."""
    return save_llama_experts(tmp_path)
