"""The README's Python example runs as written on a real ``BertForSequenceClassification`` layout (tiny, random, made
here: a ``BertModel`` base with its tokenizer and two classifier experts saved with ``save_pretrained``), and equals an
independent step-by-step computation."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import save_bert_classifiers
from transformers import BertModel, BertTokenizer

from magic_pl import merge
from magic_pl.calibration import FeatureSpaceCalibrator, weight_space_calibration

README = Path(__file__).resolve().parents[1] / "README.md"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fine", "film", "stocks", "fell", "today", "##s"]


def _python_block(marker: str) -> str:
    return next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in b)


def _build(root: Path) -> None:
    save_bert_classifiers(root / "bert-base", {root / "experts" / "sentiment": 2, root / "experts" / "topic": 3}, VOCAB)


def test_readme_python_example_runs_on_bert_classifiers_and_matches_the_steps(tmp_path, monkeypatch):
    _build(tmp_path)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"print": lambda *a: None}
    exec(compile(_python_block("task_vector("), "README.md", "exec"), scope)

    # the task vectors by hand: the expert's "bert." keys minus the base's, the classifier left out
    base = load_file(str(tmp_path / "bert-base" / "model.safetensors"))
    taus = []
    for task in ("sentiment", "topic"):
        expert = load_file(str(tmp_path / "experts" / task / "model.safetensors"))
        assert any(k.startswith("classifier.") for k in expert)
        taus.append({k: expert[f"bert.{k}"].float() - v.float() for k, v in base.items() if v.is_floating_point()})
    for got, want in zip(scope["taus"], taus):
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)

    # DSC by hand: WSC on the TIES task vector, then FSC on one sample per task, folded
    tau_m = merge("ties", taus)
    wsc = weight_space_calibration(tau_m, taus)
    ref = BertModel.from_pretrained(tmp_path / "bert-base")
    ref.load_state_dict({k: v + wsc[k] if k in wsc else v for k, v in base.items()})
    ref.eval()
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "bert-base")
    cal = FeatureSpaceCalibrator(base, ref, taus)
    for k, text in enumerate(["a fine film", "stocks fell today"]):
        cal.update(k, **tokenizer([text], return_tensors="pt"))
    want = cal.fold()
    assert scope["result"].coefficients == want.coefficients and len(want.coefficients) > 10

    # the saved model reloads in plain transformers with the calibrated weights
    merged = BertModel.from_pretrained(tmp_path / "merged")
    for key, v in ref.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], v, rtol=0, atol=1e-6)
