"""CLIP: vision tower merged, zero-shot heads from class names x templates with the text tower; save as a full
CLIPModel directory + heads; reload gives the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import calibrate, clip_config, perturb, save_clip_tokenizer

from magic_pl.models import CLIPAdapter
from magic_pl.models.clip import load_zeroshot_heads
from magic_pl.models.clip_tasks import CLASSNAMES, TEMPLATES, get_classnames, load_classnames, register_classnames
from magic_pl.models.heads import zeroshot_weights
from magic_pl.statedict import CheckpointError


def _emb(out):
    """Projected features: a tensor (transformers 4) or the pooler_output of the returned output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _write(tmp_path, n_experts=2, vision_only_expert=False):
    from transformers import CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    clip = CLIPModel(clip_config())
    base = tmp_path / "base"
    clip.save_pretrained(base)
    save_clip_tokenizer(base)
    paths = []
    for i in range(n_experts):
        expert = CLIPModel.from_pretrained(base)
        perturb(expert.vision_model, seed=i + 1)
        perturb(expert.visual_projection, seed=i + 11)
        out = tmp_path / f"expert{i}"
        if vision_only_expert and i == n_experts - 1:
            expert.save_pretrained(tmp_path / "full")
            CLIPVisionModel.from_pretrained(tmp_path / "full").save_pretrained(out)
        else:
            expert.save_pretrained(out)
        paths.append(str(out))
    return base, paths


def test_clip_zero_shot_merge_calibrate_save_reload(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    base, paths = _write(tmp_path)
    adapter = CLIPAdapter(str(base), paths, task_names=["mnist", "eurosat"])
    setup = adapter.setup()
    assert setup.heads["mnist"].num_classes == 10 and setup.heads["eurosat"].num_classes == 10
    # the head is the normalised, template-averaged text embedding times exp(logit_scale)
    clip = CLIPModel.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        ids = tok([TEMPLATES["eurosat"][1].format(c) for c in CLASSNAMES["eurosat"]], padding=True, return_tensors="pt")
        one = F.normalize(_emb(clip.get_text_features(**ids)), dim=-1)
    w = setup.heads["eurosat"].weight / clip.logit_scale.exp()
    assert torch.allclose(w.norm(dim=-1), torch.ones(10), atol=1e-5)
    # averaging over templates: each class weight correlates with every single-template embedding
    assert (torch.einsum("cd,cd->c", w, one) > 0.5).all()

    px = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model, _, report = calibrate(setup, batches={0: [{"pixel_values": px[:2]}], 1: [{"pixel_values": px[2:]}]})
    assert report.folded
    out = setup.save(model, tmp_path / "merged")
    assert (out / "zeroshot_heads.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    reloaded = CLIPModel.from_pretrained(out).eval()
    heads = load_zeroshot_heads(out)
    for task in setup.task_names:
        with torch.no_grad():
            ref = setup.task_model(task, model)(pixel_values=px)
            got = heads[task](_emb(reloaded.get_image_features(pixel_values=px)))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # the text tower is the base's, untouched
    torch.testing.assert_close(reloaded.text_model.state_dict()["embeddings.token_embedding.weight"],
                               clip.text_model.state_dict()["embeddings.token_embedding.weight"])
    # precomputed heads skip the text tower and give the same heads
    again = CLIPAdapter(str(base), paths, task_names=["mnist", "eurosat"], heads_file=str(out)).setup()
    torch.testing.assert_close(again.heads["mnist"].weight, setup.heads["mnist"].weight)


def test_clip_vision_model_expert_uses_base_projection(tmp_path):
    base, paths = _write(tmp_path, vision_only_expert=True)
    setup = CLIPAdapter(str(base), paths, task_names=["svhn", "dtd"]).setup()
    tv = setup.task_vectors()[1]
    assert torch.count_nonzero(tv["visual_projection.weight"]) == 0
    assert torch.count_nonzero(tv["vision_model.encoder.layers.0.mlp.fc1.weight"]) > 0
    assert setup.heads["dtd"].num_classes == 47


def test_clip_custom_classnames_and_long_task_hook(tmp_path):
    base, paths = _write(tmp_path, n_experts=1)
    with pytest.raises(ValueError, match="register_classnames"):
        get_classnames("sun397")
    names_file = tmp_path / "ClassName.txt"
    names_file.write_text("\n".join(f"/{chr(97 + i % 26)}/class_{i}/sub" for i in range(397)) + "\n")
    names = load_classnames(names_file)
    assert names[0] == "class 0 sub" and len(names) == 397
    setup = CLIPAdapter(str(base), paths, task_names=["sun397"], classnames_files={"sun397": str(names_file)}).setup()
    assert setup.heads["sun397"].num_classes == 397
    register_classnames("cars", [f"car {i}" for i in range(196)])
    assert len(get_classnames("stanford-cars")) == 196
    with pytest.raises(ValueError, match="196 classes"):
        register_classnames("cars", ["a"])
    custom = CLIPAdapter(str(base), paths, task_names=["pets"], classnames={"pets": ["cat", "dog"]},
                         templates={"pets": ["a photo of a {}, a pet."]}).setup()
    assert custom.heads["pets"].num_classes == 2


def test_clip_mismatched_vision_tower_is_a_clear_error(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    base, paths = _write(tmp_path, n_experts=1)
    cfg = clip_config().to_dict()
    cfg["vision_config"]["num_hidden_layers"] = 3
    other = tmp_path / "other"
    CLIPModel(CLIPConfig.from_dict(cfg)).save_pretrained(other)
    with pytest.raises(CheckpointError, match="num_hidden_layers=3"):
        CLIPAdapter(str(base), [paths[0], str(other)], task_names=["mnist", "svhn"]).setup()


def test_zeroshot_weights_rejects_bad_templates():
    with pytest.raises(ValueError, match="contain"):
        zeroshot_weights(torch.nn.Linear(1, 1), lambda *a, **k: None, ["a"], ["no placeholder"])
