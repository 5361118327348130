"""The README's Python example runs as written (on tiny checkpoints made here) and equals the step-by-step calls."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from magic_pl import apply_task_vector, merge, save_state_dict, task_vector
from magic_pl.calibration import FeatureSpaceCalibrator

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))


def test_readme_python_example_runs_and_matches_the_steps(tmp_path, monkeypatch):
    block = next(b for b in _python_blocks() if 'resolve_setting("auto")' in b)
    torch.manual_seed(0)
    base_net = _net()
    save_state_dict(base_net.state_dict(), tmp_path / "base.safetensors")
    for k in range(4):
        expert = _net()
        expert.load_state_dict({n: v + 0.05 * torch.randn_like(v) for n, v in base_net.state_dict().items()})
        save_state_dict(expert.state_dict(), tmp_path / f"expert_{k}.safetensors")
    batches = [torch.randn(2, 6, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    monkeypatch.chdir(tmp_path)
    scope = {"model": _net(), "one_unlabelled_batch": batches, "print": lambda *a: None}
    exec(compile(block, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.setting == "fsc:sensitive=detect" and len(result.sensitive) > 0

    # the same by hand: merge, then FSC capped on the set the probe found
    base = {k: v for k, v in base_net.state_dict().items()}
    taus = [task_vector(tmp_path / f"expert_{k}.safetensors", base) for k in range(4)]
    ref = _net()
    ref.load_state_dict(apply_task_vector(base, merge("task_arithmetic", taus, scale=0.3)))
    ref.eval()
    cal = FeatureSpaceCalibrator(base, ref, taus, sensitive=result.sensitive)
    for k, b in enumerate(batches):
        cal.update(k, b)
    want = cal.fold()
    assert result.coefficients == want.coefficients
    for key, v in ref.state_dict().items():
        torch.testing.assert_close(scope["model"].state_dict()[key], v, rtol=0, atol=1e-6)
