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


#: Calibration texts of the tiny BERT classifiers' two tasks (:func:`bert_classifier_files`).
BERT_TEXTS = {"sentiment": "a good film\na bad film\ngood\n", "topic": "stocks fell today\nstocks rose\na film today\n"}


@pytest.fixture
def bert_classifier_files(tmp_path: Path) -> Path:
    """A tiny ``BertModel`` base with its tokenizer at ``tmp_path/base``, one ``BertForSequenceClassification`` expert
    per :data:`BERT_TEXTS` task at ``tmp_path/<task>`` (2 and 3 labels: the heads differ per task) and each task's
    texts at ``tmp_path/<task>.txt``."""
    from tiny_models import save_bert_classifiers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "stocks", "fell", "rose",
             "today"]
    save_bert_classifiers(tmp_path / "base", {tmp_path / t: 2 + i for i, t in enumerate(BERT_TEXTS)}, vocab)
    for task, text in BERT_TEXTS.items():
        (tmp_path / f"{task}.txt").write_text(text)
    return tmp_path
