"""The CLIP / BERT / Llama configs, run as users run them (``magic-pl calibrate -c <config>``) with tiny
random-initialised models of the same classes and local data files: only paths are overridden."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from lightning_helpers import (
    CONFIGS,
    clip_tokenizer,
    perturb,
    random_images,
    random_sentences,
    tiny_tokenizer,
    write_jsonl,
)

from magic_pl.lightning.cli import main


@pytest.fixture(autouse=True)
def _argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["magic-pl"])
    monkeypatch.chdir(tmp_path)  # a stray log directory would land here (_report checks there is none)


def _override(config: str, tmp: Path, models: dict[str, Any], data_file: Callable[[str, str], Path],
              processor: dict[str, str]) -> Path:
    """Load ``configs/<config>``, point model and data paths at ``tmp`` and run on one CPU; returns the new file."""
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    cfg["trainer"].update(accelerator="cpu", devices=1, enable_progress_bar=False)
    cfg["model"]["init_args"]["adapter"]["init_args"].update(models)
    init = cfg["data"]["init_args"]
    init["num_workers"] = 0
    for split_key, split in (("test", "test"), ("calibration", "train")):
        for task, spec in init[split_key].items():
            args = spec["init_args"]
            args.pop("name", None)  # hub configuration names do not apply to local files
            args["path"] = str(data_file(task, split))
            for k, v in processor.items():
                if k in args:
                    args[k] = v
    cfg["output_dir"] = str(tmp / "out")
    path = tmp / config
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _report(tmp: Path) -> dict:
    # the config's default logger writes under the output directory, nowhere else
    assert len(list((tmp / "out" / "logs").rglob("metrics.csv"))) == 1 and not (tmp / "magic_pl_logs").exists()
    return json.loads((tmp / "out" / "calibration_report.json").read_text())


def test_clip_vit_b32_8task_config(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    from magic_pl.models.clip_tasks import get_classnames

    tasks = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    config = CLIPConfig(
        text_config=dict(vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=256, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    base = tmp_path / "clip-vit-base-patch32"
    clip = CLIPModel(config)
    clip.save_pretrained(base)
    clip_tokenizer(base)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(base)
    experts = []
    for i, task in enumerate(tasks):  # fine-tuned image encoders as CLIPVisionModel directories (FusionBench layout)
        vision = CLIPVisionModel(config.vision_config)
        tower = getattr(vision, "vision_model", vision)  # transformers 5 dropped the "vision_model" level
        tower.load_state_dict(clip.vision_model.state_dict())
        perturb(vision, seed=i)
        vision.save_pretrained(tmp_path / f"clip-vit-base-patch32_{task}")
        experts.append(str(tmp_path / f"clip-vit-base-patch32_{task}"))
    names = {"sun397": [f"scene {i}" for i in range(5)], "stanford-cars": [f"car {i}" for i in range(4)]}
    files = {}
    for task, ns in names.items():
        files[task] = str(tmp_path / f"{task}.txt")
        Path(files[task]).write_text("\n".join(ns) + "\n")
    n_classes = {t: len(names[t]) if t in names else len(get_classnames(t)) for t in tasks}

    def data_file(task: str, split: str) -> Path:
        rows = random_images(tmp_path / "images", 5 if split == "test" else 2, hash((task, split)) % 1000,
                             n_classes[task])
        return write_jsonl(tmp_path / f"{task}_{split}.jsonl", rows)

    cfg = _override("clip_vit_b32_8tasks.yaml", tmp_path,
                    {"base": str(base), "experts": experts, "classnames_files": files},
                    data_file, {"image_processor": str(base)})
    main(["calibrate", "-c", str(cfg)])
    report = _report(tmp_path)
    assert report["task_names"] == tasks and report["config"]["adapter"] == "CLIPAdapter"
    assert set(report["metrics"]) == {f"test/acc/{t}" for t in tasks} | {"test/acc/avg"}
    assert report["coefficients"] and not report["modules"]["wrapped"]
    saved = CLIPModel.from_pretrained(tmp_path / "out" / "model")  # a full CLIP directory
    assert (tmp_path / "out" / "model" / "zeroshot_heads.safetensors").is_file()
    assert not torch.equal(saved.vision_model.encoder.layers[0].mlp.fc1.weight,
                           clip.vision_model.encoder.layers[0].mlp.fc1.weight)


def test_bert_sequence_classification_config(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel

    cfg_yaml = yaml.safe_load((CONFIGS / "bert_sequence_classification.yaml").read_text())
    tasks = cfg_yaml["model"]["init_args"]["adapter"]["init_args"]["task_names"]
    labels = {"sst2": 2, "rotten_tomatoes": 2, "imdb": 2, "ag_news": 4}
    config = BertConfig(vocab_size=46, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=1)
    torch.manual_seed(0)
    base_dir = tmp_path / "bert-base-uncased"
    base = BertModel(config)
    base.save_pretrained(base_dir)
    tok = tiny_tokenizer(base_dir)
    experts = []
    for i, task in enumerate(tasks):
        m = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": labels[task]}))
        m.bert.load_state_dict(base.state_dict(), strict=False)
        perturb(m.bert, seed=i)
        m.save_pretrained(tmp_path / task)
        tiny_tokenizer(tmp_path / task)
        experts.append(str(tmp_path / task))

    def data_file(task: str, split: str) -> Path:
        rows = random_sentences(7 if split == "test" else 2, hash((task, split)) % 1000, labels[task])
        for r in rows:
            r["sentence"] = r["text"]
        return write_jsonl(tmp_path / f"{task}_{split}.jsonl", rows)

    cfg = _override("bert_sequence_classification.yaml", tmp_path, {"base": str(base_dir), "experts": experts},
                    data_file, {"tokenizer": str(tok)})
    main(["calibrate", "-c", str(cfg)])
    report = _report(tmp_path)
    assert report["config"]["merge_method"] == "ties" and report["config"]["adapter"] == "SequenceClassificationAdapter"
    assert set(report["metrics"]) == {f"test/acc/{t}" for t in tasks} | {"test/acc/avg"}
    assert report["coefficients"] and not report["modules"]["wrapped"]
    for task in tasks:  # one ordinary save_pretrained classifier per task
        clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model" / task)
        assert clf.config.num_labels == labels[task]


def test_llama_causal_lm_config(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg_yaml = yaml.safe_load((CONFIGS / "llama_causal_lm.yaml").read_text())
    tasks = cfg_yaml["model"]["init_args"]["adapter"]["init_args"]["task_names"]
    config = LlamaConfig(vocab_size=46, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=1, bos_token_id=4, eos_token_id=5)
    torch.manual_seed(0)
    base_dir = tmp_path / "Llama-2-13b-hf"
    base = LlamaForCausalLM(config)
    base.save_pretrained(base_dir)
    tok = tiny_tokenizer(base_dir)
    experts = []
    for i, task in enumerate(tasks):
        m = LlamaForCausalLM(config)
        m.load_state_dict(base.state_dict())
        perturb(m, seed=i, scale=0.02)
        m.save_pretrained(tmp_path / task)
        experts.append(str(tmp_path / task))

    def data_file(task: str, split: str) -> Path:
        rows = random_sentences(5 if split == "test" else 2, hash((task, split)) % 1000)
        for j, r in enumerate(rows):
            r.update(instruction=r["text"], input="w1", output="w2 w3", question=r["text"], answer=f"w{j}")
        return write_jsonl(tmp_path / f"{task}_{split}.jsonl", rows)

    cfg = _override("llama_causal_lm.yaml", tmp_path, {"base": str(base_dir), "experts": experts},
                    data_file, {"tokenizer": str(tok)})
    main(["calibrate", "-c", str(cfg)])
    report = _report(tmp_path)
    assert report["config"]["trainer"]["precision"] == "bf16-true"
    assert set(report["metrics"]) == {f"test/acc/{t}" for t in tasks} | {"test/acc/avg"}
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    xi = report["coefficients"]
    assert "model.embed_tokens" in xi and "lm_head" not in xi  # tied: calibrated once, by the canonical owner
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
