"""Shared helpers for the calibration tests: tiny models, synthetic experts and an independent reference forward."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call


def make_task_vectors(model: nn.Module, k: int, *, scale: float = 0.05, seed: int = 0) -> list[dict[str, Tensor]]:
    """K random task vectors over the model's floating state (BatchNorm variances kept positive by the merge)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        tv = {}
        for key, v in model.state_dict().items():
            if not v.dtype.is_floating_point:
                continue
            noise = torch.randn(v.shape, generator=g, dtype=torch.float32) * scale
            if key.endswith("running_var"):
                noise = noise.abs()  # expert variances stay positive
            tv[key] = noise.to(v.dtype)
        out.append(tv)
    return out


def merged_model(base: nn.Module, tau_m: Mapping[str, Tensor]) -> nn.Module:
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key, v in merged.state_dict().items():
            if key in tau_m:
                v.copy_((v.double() + tau_m[key].double()).to(v.dtype))
    return merged.eval()


def weight_average(tvs: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {k: sum(tv[k] for tv in tvs) / len(tvs) for k in tvs[0]}


def _combine(f0, fm, xi):
    if isinstance(fm, Tensor):
        return f0 + xi * (fm - f0) if fm.dtype.is_floating_point else fm
    if isinstance(fm, tuple):
        return tuple(_combine(a, b, xi) for a, b in zip(f0, fm))
    return fm


def reference_model(
    merged: nn.Module, base_state: Mapping[str, Tensor], coefficients: Mapping[str, float]
) -> nn.Module:
    """A copy of the uncalibrated merged model whose every calibrated module computes f0 + xi (fm - f0) at once
    (forward hooks; f0 from the module run with the base tensors)."""
    ref = copy.deepcopy(merged)
    named = dict(ref.named_modules())
    for name, xi in coefficients.items():
        mod = named[name]
        prefix = name + "." if name else ""
        local = {}
        for n, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if t.dtype.is_floating_point and prefix + n in base_state:
                local[n] = base_state[prefix + n].clone()
        state = {"busy": False}  # per-hook re-entrancy guard (functional_call re-runs the hooked module)

        def hook(m, args, kwargs, out, local=local, xi=xi, state=state):
            if state["busy"]:
                return None
            state["busy"] = True
            try:
                f0 = functional_call(m, local, args, kwargs)
            finally:
                state["busy"] = False
            return _combine(f0, out, xi)

        mod.register_forward_hook(hook, with_kwargs=True)
    return ref


def run_update(cal, k: int, x) -> None:
    if isinstance(x, Mapping):
        cal.update(k, **x)
    else:
        cal.update(k, x)
