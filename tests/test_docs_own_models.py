"""docs/own_models.md followed literally: its file layout built here with tiny random BERT models (a BertModel base with
its tokenizer, two classifier experts) and local data files, its YAML run as written by ``magic-pl calibrate``, and the
output it describes loads in plain transformers."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from tiny_models import save_bert_classifiers

from magic_pl.lightning.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_models.md"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "stocks", "fell", "rose", "today"]


def _block(lang: str, marker: str) -> str:
    return next(b for b in re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S) if marker in b)


def _layout(root: Path) -> None:
    models = root / "models"
    save_bert_classifiers(models / "base", {models / "sentiment": 2, models / "topic": 3}, VOCAB)
    texts = {"sentiment": ["a good film", "a bad film", "good", "bad film"],
             "topic": ["stocks fell today", "stocks rose", "a film today", "good stocks"]}
    (root / "data").mkdir()
    for i, task in enumerate(("sentiment", "topic")):
        rows = [{"text": t, "label": j % (2 + i)} for j, t in enumerate(texts[task])]
        (root / "data" / f"{task}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "data" / f"{task}_calib.txt").write_text("\n".join(texts[task][:2]) + "\n")


def test_the_guide_runs_as_written(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["magic-pl"])
    (tmp_path / "my_models.yaml").write_text(_block("yaml", "# my_models.yaml"))
    command = _block("bash", "magic-pl calibrate").split()
    assert command[0] == "magic-pl"
    main(command[1:])
    out = capsys.readouterr().out
    assert "tasks: sentiment <- models/sentiment, topic <- models/topic" in out
    assert re.search(r"accuracy: calibrated [0-9.]+, uncalibrated merge [0-9.]+ \(gain [-+][0-9.]+, 95% CI", out)
    for task, classes in (("sentiment", 2), ("topic", 3)):  # the layout the guide describes
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged" / "model" / task)
        assert model.config.num_labels == classes
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged" / "model" / task)  # the tokenizer came along
        assert tokenizer("a good film")["input_ids"] == [2, 5, 6, 8, 3]
    report = json.loads((tmp_path / "merged" / "calibration_report.json").read_text())
    assert report["config"]["merge_method"] == "ties" and report["coefficients"]


def test_the_guides_recipe_runs_as_written(tmp_path, monkeypatch, capsys):
    from transformers import AutoModel

    from magic_pl.models import load_classifier

    _layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["magic-pl"])
    (tmp_path / "recipe.yaml").write_text(_block("yaml", "# recipe.yaml"))
    command = _block("bash", "magic-pl merge").split()
    main(command[1:])
    out = capsys.readouterr().out
    assert "model:  merged_recipe/model" in out and re.search(r"accuracy: calibrated [0-9.]+", out)
    model_dir = tmp_path / "merged_recipe" / "model"
    assert AutoModel.from_pretrained(model_dir).config.model_type == "bert"  # the body, once
    assert load_classifier(model_dir, "topic").config.num_labels == 3
    card = (model_dir / "README.md").read_text()
    assert "merge_method: ties" in card and "| topic | `models/topic` |" in card
    prose = DOC.read_text()  # the paths-only command the guide gives, as written
    flags = shlex.split(re.search(r"`(magic-pl calibrate --base .*?)`", prose.replace("\n", " "), re.S).group(1))
    main(flags[1:])
    written = sorted(p.name for p in (tmp_path / "merged_wsc" / "model").iterdir() if not p.name.startswith("."))
    assert written == ["README.md", "sentiment", "topic"]
