"""``magic-pl merge RECIPE OUT``: a MergeKit-style recipe on tiny Hugging Face and timm experts written to disk, the
adapter picked from the checkpoints, one shared body plus per-task heads written with a model card, and the recipe's
errors named before any checkpoint is read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import save_bert_classifiers

from magic_pl.lightning.cli import main
from magic_pl.lightning.recipe import RecipeError, load_recipe, parse_recipe, run_recipe

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "stocks", "fell", "rose", "today"]
TEXTS = {"sentiment": ["a good film", "a bad film", "good", "bad film"],
         "topic": ["stocks fell today", "stocks rose", "a film today", "good stocks"]}


@pytest.fixture
def bert_files(tmp_path, monkeypatch):
    """models/{base,sentiment,topic} and data/<task>_{test.jsonl,calib.txt} under tmp_path (the working directory)."""
    models = tmp_path / "models"
    save_bert_classifiers(models / "base", {models / "sentiment": 2, models / "topic": 3}, VOCAB)
    (tmp_path / "data").mkdir()
    for i, task in enumerate(TEXTS):
        rows = [{"text": t, "label": j % (2 + i)} for j, t in enumerate(TEXTS[task])]
        (tmp_path / "data" / f"{task}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "data" / f"{task}_calib.txt").write_text("\n".join(TEXTS[task][:2]) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["magic-pl"])
    return tmp_path


def _recipe(path: Path, **doc) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _body(sd: dict, prefix: str = "bert.") -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def test_task_arithmetic_recipe_writes_one_body_with_mergekits_tensors(bert_files, capsys):
    from transformers import AutoConfig

    recipe = _recipe(bert_files / "recipe.yaml", merge_method="task_arithmetic", base_model="models/base",
                     models=[{"model": "models/base"},  # MergeKit lists the base too: skipped
                             {"model": "models/sentiment", "parameters": {"weight": 0.7}},
                             {"model": "models/topic", "parameters": {"weight": 0.4}}],
                     parameters={"lambda": 0.5}, dtype="float32", calibration="none",
                     test_data={"sentiment": "data/sentiment_test.jsonl", "topic": "data/topic_test.jsonl"})
    main(["merge", str(recipe), "merged"])
    out = capsys.readouterr().out
    assert "model:  merged/model" in out and "tasks: sentiment <- models/sentiment, topic <- models/topic" in out
    model_dir = bert_files / "merged" / "model"
    # one body, not one per task: the encoder's tensors once, plus small heads
    assert sorted(p.name for p in model_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert sorted(p.name for p in (model_dir / "heads").iterdir()) == ["sentiment", "tasks.json", "topic"]
    merged = load_file(model_dir / "model.safetensors")
    base = load_file(bert_files / "models" / "base" / "model.safetensors")
    experts = [_body(load_file(bert_files / "models" / t / "model.safetensors")) for t in ("sentiment", "topic")]
    for key, value in merged.items():  # MergeKit's task arithmetic: base + lambda * sum_k w_k tau_k
        want = base[key] + 0.5 * (0.7 * (experts[0][key] - base[key]) + 0.4 * (experts[1][key] - base[key]))
        torch.testing.assert_close(value, want, rtol=0, atol=2e-7)
    for task, classes in (("sentiment", 2), ("topic", 3)):
        head = load_file(model_dir / "heads" / task / "model.safetensors")
        expert = load_file(bert_files / "models" / task / "model.safetensors")
        assert head.keys() == {"classifier.weight", "classifier.bias"}
        assert torch.equal(head["classifier.weight"], expert["classifier.weight"])
        assert AutoConfig.from_pretrained(model_dir / "heads" / task).num_labels == classes
    card = (model_dir / "README.md").read_text()
    assert "base_model: models/base" in card and "merge_method: task_arithmetic" in card  # the recipe, quoted
    assert "| sentiment | `models/sentiment` |" in card
    assert (bert_files / "merged" / "calibration_report.json").is_file()


def test_shared_layout_loads_the_experts_classifier_with_the_merged_body(bert_files):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from magic_pl.models import load_classifier

    recipe = _recipe(bert_files / "r.yaml", merge_method="ties", base_model="models/base",
                     models=[{"model": "models/sentiment", "parameters": {"weight": 1.0, "density": 0.5}},
                             {"model": "models/topic", "parameters": {"weight": 0.7, "density": [0.3, 0.7]}}],
                     calibration="dsc", dtype="bfloat16",
                     calibration_data={"sentiment": "data/sentiment_calib.txt", "topic": "data/topic_calib.txt"},
                     test_data={"sentiment": "data/sentiment_test.jsonl", "topic": "data/topic_test.jsonl"})
    result = run_recipe(recipe, "out")
    model_dir = Path(result["model"])
    assert all(v.dtype == torch.bfloat16 for v in load_file(model_dir / "model.safetensors").values())
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["a good film", "stocks fell today"], return_tensors="pt", padding=True)
    for task in ("sentiment", "topic"):
        mine = load_classifier(model_dir, task)
        # the same classifier assembled by hand from plain transformers: body from the output, head from its file
        config = AutoConfig.from_pretrained(model_dir / "heads" / task)
        plain = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)
        plain.load_state_dict(load_file(model_dir / "heads" / task / "model.safetensors"), strict=False)
        with torch.no_grad():
            torch.testing.assert_close(mine(**batch).logits, plain.eval()(**batch).logits)
    report = json.loads((Path("out") / "calibration_report.json").read_text())
    assert report["config"]["merge_method"] == "gta" and report["coefficients"]
    assert report["comparison"]["experts_on_own_task"].keys() == {"sentiment", "topic"}


def test_timm_weight_files_recipe_with_an_image_folder(tmp_path, monkeypatch):
    import timm
    from PIL import Image
    from transformers import ViTImageProcessor

    from magic_pl.models.timm import load_timm_saved

    monkeypatch.chdir(tmp_path)
    kw = {"img_size": 32}
    torch.manual_seed(0)
    base = timm.create_model("test_vit", num_classes=0, **kw)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    for task, n in (("cars", 3), ("pets", 2)):
        expert = timm.create_model("test_vit", num_classes=n, **kw)
        sd = {**expert.state_dict(), **{k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}}
        torch.save(sd, tmp_path / f"{task}.pth")
        folder = tmp_path / "images" / task
        folder.mkdir(parents=True)
        for j in range(2):
            Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(folder / f"{j}.png")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "proc")
    recipe = _recipe(tmp_path / "r.yaml", merge_method="ties", base_model="base.pth", architecture="test_vit",
                     model_kwargs=kw, models=[{"model": "cars.pth", "parameters": {"weight": 1, "density": 0.4}},
                                              {"model": "pets.pth", "parameters": {"weight": 1, "density": 0.4}}],
                     calibration="fsc",
                     calibration_data={t: {"path": f"images/{t}", "image_processor": "proc"}
                                       for t in ("cars", "pets")})
    result = run_recipe(recipe, "out")
    model_dir = Path(result["model"])
    # body + heads, no per-task full checkpoints
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == [
        "README.md", "config.json", "heads", "model.safetensors"]
    cars = load_timm_saved(model_dir, "cars")
    assert cars.get_classifier().out_features == 3
    assert json.loads((Path("out") / "calibration_report.json").read_text())["coefficients"]


@pytest.mark.parametrize("doc,where", [
    ({"slices": []}, "slices: layer slicing"),
    ({"merge_method": "karcher"}, "merge_method: 'karcher' is not supported"),
    ({"models": [{"model": "models/nope"}]}, "models[0].model: models/nope does not exist"),
    ({"models": [{"model": "models/sentiment", "parameters": {"densty": 0.5}}, {"model": "models/topic"}]},
     "models[0].parameters.densty: not a per-model parameter"),
    ({"parameters": {"lamda": 0.5}}, "parameters.lamda: not a parameter of ties"),
    ({"parameters": {"density": 1.5}}, "parameters: merge method 'gta': option densities"),
    ({"calibration": "dsc"}, "calibration: 'dsc' needs a few unlabelled samples"),
    ({"calibration_data": {"sports": "data/topic_calib.txt"}}, "calibration_data.sports: not a task"),
    ({"calibration_data": {"topic": {"path": "data/topic_calib.txt", "txt_column": "x"}}},
     "calibration_data.topic.txt_column: unknown option"),
    ({"tokenizer_source": "union"}, "tokenizer_source: 'union' merges vocabularies"),
    ({"dtype": "int8"}, "dtype: 'int8'"),
    ({"push_to_hub": "no-owner"}, "push_to_hub: must be a Hub repository id"),
    ({"colour": 1}, "colour: unknown key"),
])
def test_recipe_errors_name_the_key(bert_files, doc, where):
    recipe = {"merge_method": "ties", "base_model": "models/base",
              "models": [{"model": "models/sentiment"}, {"model": "models/topic"}], **doc}
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(bert_files / "bad.yaml", **recipe))
    assert str(err.value).startswith(f"{bert_files / 'bad.yaml'}: ") and where in str(err.value)


def test_cli_error_is_one_line(bert_files, capsys):
    _recipe(bert_files / "bad.yaml", merge_method="ties", base_model="models/base", models=["models/nope"])
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "bad.yaml", "out"])
    assert exit_.value.code == 2
    assert "magic-pl: error: bad.yaml: models[0].model: models/nope does not exist" in capsys.readouterr().err
    assert not (bert_files / "out").exists()


def test_mergekit_defaults_per_method(bert_files):
    base = {"base_model": "models/base", "models": ["models/sentiment", "models/topic"], "calibration": "wsc"}
    ties = parse_recipe({"merge_method": "ties", **base})
    assert ties.method == "gta" and ties.merge_options["sparsify"] == "magnitude"
    assert ties.merge_options["normalize"] is True and ties.merge_options["num_layers"] == 2
    dare = parse_recipe({"merge_method": "dare_linear", **base, "parameters": {"density": 0.3, "lambda": 2}})
    assert dare.merge_options["rescale"] is True and dare.merge_options.get("normalize") is None
    assert dare.merge_options["densities"] == [0.3, 0.3] and dare.merge_options["scale"] == 2
    linear = parse_recipe({**base, "merge_method": "linear",
                           "models": [{"model": "models/base", "parameters": {"weight": 0.5}}, *base["models"]]})
    assert linear.merge_options["base_weight"] == 0.5 and linear.models == base["models"]
    tsv = parse_recipe({"merge_method": "tsv_m", **base, "parameters": {"scale": 0.5}})
    assert tsv.method == "tsv_m" and tsv.merge_options["scale"] == 0.5  # magic-pl's own methods by name
    assert parse_recipe({"merge_method": "ties", **base, "task_names": ["pos", "news"]}).task_names == ["pos", "news"]


def test_adapter_is_picked_from_the_checkpoints(tmp_path):
    from magic_pl.lightning.recipe import Recipe, detect_adapter
    from magic_pl.models import CausalLMAdapter, LoRAAdapter

    for name, cfg in (("base", {"architectures": ["LlamaForCausalLM"]}), ("a", {"architectures": ["LlamaForCausalLM"]}),
                      ("b", {"architectures": ["LlamaForCausalLM"]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    recipe = Recipe(base_model=str(tmp_path / "base"), models=[str(tmp_path / "a"), str(tmp_path / "b")],
                    task_names=None, merge_method="ties", method="gta", merge_options={})
    assert isinstance(detect_adapter(recipe), CausalLMAdapter)
    for name in ("a", "b"):
        (tmp_path / name / "adapter_config.json").write_text("{}")
    assert isinstance(detect_adapter(recipe), LoRAAdapter)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    recipe.models = [str(tmp_path / "c")]
    with pytest.raises(RecipeError, match="BertForMaskedLM has no adapter picked from files"):
        detect_adapter(recipe)


def test_push_to_hub_uploads_the_model_folder(bert_files, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    recipe = _recipe(bert_files / "r.yaml", merge_method="linear", base_model="models/base",
                     models=["models/sentiment", "models/topic"], calibration="wsc", push_to_hub="me/merged")
    result = run_recipe(recipe, "out")
    assert result["hub"] == "https://huggingface.co/me/merged"
    assert calls[0] == ("create", "me/merged", True)
    assert calls[1][0] == "upload" and "README.md" in calls[1][2] and "model.safetensors" in calls[1][2]
