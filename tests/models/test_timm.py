"""timm: body merged, heads per task; timm state dicts (.pth) and safetensors; BN integer buffers from the base."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import calibrate, perturb

from magic_pl.models import TimmAdapter
from magic_pl.models.timm import load_timm_saved
from magic_pl.statedict import CheckpointError, load_state_dict, save_state_dict


def _write_experts(tmp_path, arch, classes, *, suffix=".pth", **kw):
    import timm

    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, num_classes=1000, **kw)
    save_state_dict(base.state_dict(), tmp_path / "base.safetensors")
    paths = []
    for i, n in enumerate(classes):
        torch.manual_seed(100 + i)
        expert = timm.create_model(arch, pretrained=False, num_classes=n, **kw)
        body = {k: v for k, v in base.state_dict().items() if k in expert.state_dict()
                and v.shape == expert.state_dict()[k].shape}
        expert.load_state_dict(body, strict=False)
        perturb(expert, seed=i + 1)
        for name, buf in expert.named_buffers():
            if name.endswith("num_batches_tracked"):
                buf.fill_(1000 + i)  # integer buffers differ per expert; the merged model takes the base's
            elif name.endswith("running_var"):
                buf.mul_(1.5 + i)
        sd = expert.state_dict()
        path = tmp_path / f"task{i}{suffix}"
        if suffix == ".pth":
            torch.save(sd, path)
        else:
            save_state_dict(sd, path)
        paths.append(str(path))
    return base, paths


@pytest.mark.parametrize("arch,suffix", [("test_resnet", ".pth"), ("test_byobnet", ".safetensors")])
def test_timm_merge_calibrate_save_reload(tmp_path, arch, suffix):
    base, paths = _write_experts(tmp_path, arch, [3, 5], suffix=suffix)
    adapter = TimmAdapter(arch, paths, base=str(tmp_path / "base.safetensors"), task_names=["digits", "shapes"])
    setup = adapter.setup()
    assert setup.heads["digits"].out_features == 3 and setup.heads["shapes"].out_features == 5
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model, _, report = calibrate(setup, batches={0: [(x[:1],)], 1: [(x[1:],)]})
    assert len(report.folded) > 5
    # integer buffers come from the base, never merged
    for k, v in model.state_dict().items():
        if not v.dtype.is_floating_point:
            assert torch.equal(v, setup.base.state_dict()[k]), k
    out = setup.save(model, tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["tasks"]["digits"]["num_classes"] == 3
    for task in setup.task_names:
        with torch.no_grad():
            ref = setup.task_model(task, model)(x)
            got = load_timm_saved(out, task)(x)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        # the per-task file is an ordinary timm checkpoint in the experts' format
        full = load_state_dict(out / config["tasks"][task]["checkpoint"])
        assert (out / config["tasks"][task]["checkpoint"]).suffix == suffix
        import timm

        m = timm.create_model(arch, num_classes=config["tasks"][task]["num_classes"])
        m.load_state_dict(dict(full), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(x), ref, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(load_timm_saved(out)(x), model(x), rtol=0, atol=0)


def test_timm_heads_are_the_experts_heads(tmp_path):
    _, paths = _write_experts(tmp_path, "test_vit", [4, 2], img_size=32)
    setup = TimmAdapter("test_vit", paths, base=str(tmp_path / "base.safetensors"),
                        model_kwargs={"img_size": 32}).setup()
    e0 = torch.load(paths[0], weights_only=True)
    torch.testing.assert_close(setup.heads["task0"].weight, e0["head.weight"])
    assert "head.weight" not in setup.experts[0]
    tv = setup.task_vectors()[0]
    torch.testing.assert_close(tv["blocks.0.mlp.fc1.weight"],
                               e0["blocks.0.mlp.fc1.weight"] - setup.base.state_dict()["blocks.0.mlp.fc1.weight"])


def test_timm_wrong_architecture_is_a_clear_error(tmp_path):
    import timm

    _, paths = _write_experts(tmp_path, "test_resnet", [3])
    other = timm.create_model("test_efficientnet", num_classes=3)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not match timm architecture 'test_resnet'"):
        TimmAdapter("test_resnet", [paths[0], str(tmp_path / "other.pth")],
                    base=str(tmp_path / "base.safetensors")).setup()


def test_timm_needs_a_base():
    with pytest.raises(ValueError, match="pretrained=True"):
        TimmAdapter("test_resnet", ["x.pth"])
