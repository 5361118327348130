"""Parity and speed of magic-pl's ``featcal`` calibration step against the FeatCal authors' reference code; prints JSON.

FeatCal (Gu et al., arXiv 2605.13030; reference code github.com/egangu/featcal). Both calibrate the same merged
model built here in memory: a tiny random-initialised Hugging Face CLIP vision tower (``CLIPVisionConfig``: hidden
``--hidden``, ``--layers`` encoder layers, ``--heads`` heads, 32 x 32 images, 8 x 8 patches), a base and ``--k``
experts (the base plus seeded Gaussian noise), the task-arithmetic merge ``theta0 + --scale sum_k tau_k`` and
``--samples`` random images per task (each task's pixels shifted by its own offset). Settings: the reference run
script's, which are magic-pl's defaults (ridge lambda 0.05, anchor rho 2.2, teacher mix alpha 0.25, eps 1e-8,
biases and LayerNorms calibrated, calibration batches of 16), and the reference's CLIP last-block token weighting,
which for magic-pl is ``last_block_token_weight=0.01``.

The reference runs through its own entry point, ``featcal.featcal.CLIPFeatCalibrator.calibrate`` (its layer loop,
``collect_layer_statistics`` and ``solver.merge_layer_parameters_with_featcal_stats``), with one method overridden:
``prepare_first_layer_inputs``, which in the reference loads each task's dataset; here it feeds the same random
images, computing the first layer's inputs with the reference's own ``_clip_first_layer_input`` per batch of 16, as
the original does. The reference's ``featcal.featcal`` imports ``featcal.data``, which imports Hugging Face
``datasets`` (used only to load those datasets); when ``datasets`` is not installed, a stub module named ``datasets``
(whose ``load_dataset`` raises) is put in ``sys.modules`` so that the import succeeds, and the JSON says so
(``stubbed_modules``). Nothing else of the reference is replaced; ``open_clip`` is not needed.

magic-pl runs ``CalibrationSetting([FeatCalStep(last_block_token_weight=0.01)]).calibrate`` on the same base, task
vectors, merged model and batches. Each run starts from its own copy of the merged model (copied outside the timing).

Reported, over the calibrated tensors (every Linear and LayerNorm tensor of the encoder layers; the embeddings and
the pre/post LayerNorms are left as merged by both, checked in ``outside_layers_max_abs_diff``):
``max_abs_diff`` = max |ours - reference|, ``max_rel_diff`` = max |ours - reference| / max |reference|, the worst
tensors, and ``time_ratio`` = our time / the reference's, best of ``--repeats`` each, timed in this process,
interleaved (ours, reference, reference without ``gc.collect``, ours ...).

The reference calls ``gc.collect()`` after each task's first-layer inputs and after each layer; in a process holding
torch and transformers one call costs about 0.1-0.2 s, far more than this tiny model's arithmetic, so the reference
is also timed with those calls made no-ops (``reference_without_gc_s``, ``time_ratio_without_gc``: the cost of the
computation alone; ``reference_without_gc_same_result`` checks that it gives the same tensors).

Expect differences of order 1e-6: the reference solves in float32, magic-pl in float64 (statistics are float32 sums
in both). The largest are in the last layer's LayerNorm biases (the reference's float32 2 x 2 solve), which are small
tensors, so ``max_per_tensor_rel_diff`` (each tensor's max |difference| over its own max |reference|) reads about
1e-4; with the reference's solves in float64 they fall to about 6e-7 (absolute) and 1e-6 (per tensor), the float32
statistics' rounding (an off-line check, not done here).

The reference reads ``model.vision_model.embeddings``, ``.pre_layrnorm`` and ``.encoder.layers``: the layout of
``CLIPVisionModel`` before transformers 5, which puts those modules on the model itself. Under transformers 5 the
reference gets each model inside a wrapper module whose ``vision_model`` is the model (no copy, nothing changed).

The reference is never a dependency of magic-pl; put its ``src`` directory on the path at run time::

    git -C /path/to/featcal archive HEAD | tar -x -C /tmp/featcal_ref   # or a clone of github.com/egangu/featcal
    python benchmarks/bench_featcal_reference.py --reference-src /tmp/featcal_ref/src

Without ``--reference-src`` (or when the reference does not import) it prints JSON saying the reference is not
available and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.util
import io
import json
import platform
import sys
import time
import types
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magic_pl.calibration import CalibrationSetting
from magic_pl.calibration.featcal import FeatCalStep

SD = dict[str, torch.Tensor]
LAYERS = "encoder.layers."  # in the state-dict keys: "vision_model." before it in transformers < 5
BATCH = 16  # the reference's calibration_batch_size, and magic-pl's FeatCal batch_size


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace) -> dict[str, Any]:
    """The tiny CLIP vision tower: base, experts, task vectors, merged model and images per task."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=args.heads, image_size=32,
                              patch_size=8, num_channels=3)
    config._attn_implementation = "eager"  # the same attention kernel in every forward
    torch.manual_seed(args.seed)
    base = CLIPVisionModel(config).eval()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    float_keys = [k for k, v in base_state.items() if v.dtype.is_floating_point]
    experts, taus = [], []
    for t in range(args.k):
        expert = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(args.seed + 100 + t)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(args.noise * torch.randn(p.shape, generator=gen))
        experts.append(expert.eval())
        state = expert.state_dict()
        taus.append({k: state[k] - base_state[k] for k in float_keys})
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key in float_keys:
            merged.state_dict()[key].add_(args.scale * sum(tau[key] for tau in taus))
    images = {t: torch.randn(args.samples, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 200 + t))
              + 0.25 * t for t in range(args.k)}
    return {"config": config, "base": base, "base_state": base_state, "experts": experts, "taus": taus,
            "merged": merged, "images": images}


# --------------------------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------------------------
def import_reference(src: str | None) -> tuple[Any, list[str], str | None]:
    """(the reference's ``featcal.featcal`` module or None, stubbed module names, why it is not available)."""
    if not src:
        return None, [], "no --reference-src given"
    path = Path(src).expanduser().resolve()
    if not (path / "featcal" / "featcal.py").is_file():
        return None, [], f"{path} has no featcal/featcal.py (pass the reference's src directory)"
    sys.path.insert(0, str(path))
    stubbed = []
    if importlib.util.find_spec("datasets") is None:  # imported by featcal.data, used only to load datasets
        stub = types.ModuleType("datasets")

        def load_dataset(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("datasets is stubbed in this benchmark: the reference's data loading is not used")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
        stubbed.append("datasets")
    try:
        module = importlib.import_module("featcal.featcal")
    except Exception as exc:  # noqa: BLE001 - report any import failure as "not available"
        return None, stubbed, f"importing featcal.featcal from {path} failed: {type(exc).__name__}: {exc}"
    return module, stubbed, None


class VisionModelWrapper(nn.Module):
    """``.vision_model``: the reference reads ``model.vision_model.embeddings``/``.pre_layrnorm``/``.encoder.layers``,
    the layout of ``CLIPVisionModel`` before transformers 5, which puts those modules on the model itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_model = model


def as_reference_model(model: nn.Module) -> nn.Module:
    return model if hasattr(model, "vision_model") else VisionModelWrapper(model)


def reference_runner(ref: Any, inputs: dict[str, Any]) -> Callable[[], nn.Module]:
    """One reference calibration of a fresh copy of the merged model, through ``CLIPFeatCalibrator.calibrate``."""
    images = inputs["images"]
    tasks = [f"task{t}" for t in images]

    class InMemoryCalibrator(ref.CLIPFeatCalibrator):
        """The reference calibrator, its first-layer inputs computed from ``images`` instead of task datasets."""

        @torch.no_grad()
        def prepare_first_layer_inputs(self, *, merged_model, expert_models, tasks):
            student, expert_in = {}, {}
            merged_model.to(self.device).eval()
            for name in tasks:
                x = images[int(name.removeprefix("task"))]
                batches = [x[i:i + self.config.calibration_batch_size].to(self.device)
                           for i in range(0, len(x), self.config.calibration_batch_size)]
                expert = expert_models[name].to(self.device).eval()
                student[name] = [ref._clip_first_layer_input(merged_model, b).detach().cpu() for b in batches]
                expert_in[name] = [ref._clip_first_layer_input(expert, b).detach().cpu() for b in batches]
            return student, expert_in

    config = ref.FeatCalConfig(num_calibration_examples=max(len(x) for x in images.values()),
                               calibration_batch_size=BATCH, lambda_ratio=0.05, anchor_blend_rho=2.2,
                               teacher_interp_alpha=0.25, covariance_eps=1e-8, calibrate_bias=True,
                               calibrate_layernorm=True)
    base = as_reference_model(inputs["base"])
    experts = {name: as_reference_model(e) for name, e in zip(tasks, inputs["experts"])}

    def run(model: nn.Module) -> nn.Module:
        calibrator = InMemoryCalibrator(config, processor=None, device=torch.device("cpu"))
        calibrator.calibrate(merged_model=as_reference_model(model), base_model=base, expert_models=experts,
                             tasks=tasks)
        return model  # calibrated in place (through the wrapper)

    return run


@contextlib.contextmanager
def without_gc_collect(ref: Any):
    """The reference module's ``gc.collect()`` calls made no-ops (its attribute ``gc`` swapped, then restored)."""
    saved = ref.gc
    ref.gc = types.SimpleNamespace(collect=lambda *args, **kwargs: 0)
    try:
        yield
    finally:
        ref.gc = saved


def ours_runner(inputs: dict[str, Any]) -> Callable[[nn.Module], nn.Module]:
    setting = CalibrationSetting([FeatCalStep(ridge=0.05, anchor=2.2, teacher_mix=0.25, eps=1e-8,
                                              last_block_token_weight=0.01)])
    batches = {t: [x[i:i + BATCH] for i in range(0, len(x), BATCH)] for t, x in inputs["images"].items()}

    def run(model: nn.Module) -> nn.Module:
        setting.calibrate(inputs["base_state"], model, inputs["taus"], batches=batches)
        return model

    return run


# --------------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------------
def timed(fn: Callable[[nn.Module], nn.Module], merged: nn.Module) -> tuple[SD, float]:
    model = copy.deepcopy(merged)
    sink = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):  # progress bars
        t0 = time.perf_counter()
        out = fn(model)
        elapsed = time.perf_counter() - t0
    return {k: v.detach().clone() for k, v in out.state_dict().items()}, elapsed


def differences(ours: SD, ref: SD, merged: SD) -> dict[str, Any]:
    calibrated = [k for k in ref if LAYERS in k and ref[k].dtype.is_floating_point]
    outside = [k for k in ref if LAYERS not in k and ref[k].dtype.is_floating_point]
    diff = {k: float((ours[k].double() - ref[k].double()).abs().max()) for k in calibrated}
    scale = max(float(ref[k].double().abs().max()) for k in calibrated)
    moved = {k: float((ref[k].double() - merged[k].double()).abs().max()) for k in calibrated}
    worst = sorted(diff, key=diff.get, reverse=True)[:5]
    rel = {k: diff[k] / max(float(ref[k].double().abs().max()), 1e-30) for k in calibrated}
    return {
        "tensors": len(calibrated),
        "max_abs_diff": float(f"{max(diff.values()):.3g}"),
        "max_rel_diff": float(f"{max(diff.values()) / scale:.3g}"),
        "max_per_tensor_rel_diff": float(f"{max(rel.values()):.3g}"),
        "worst": {k.partition(LAYERS)[2]: float(f"{diff[k]:.3g}") for k in worst},
        "min_calibration_change": float(f"{min(moved.values()):.3g}"),  # both really moved every tensor
        "outside_layers_max_abs_diff": max((float((ours[k] - ref[k]).abs().max()) for k in outside), default=0.0),
        "outside_layers_changed": max((float((ref[k] - merged[k]).abs().max()) for k in outside), default=0.0),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-src", default=None,
                        help="the reference's src directory (holds featcal/); default: none, reference not run")
    parser.add_argument("--k", type=int, default=3, help="number of experts / tasks (default 3)")
    parser.add_argument("--samples", type=int, default=24, help="random images per task (default 24)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden width (default 32)")
    parser.add_argument("--layers", type=int, default=3, help="encoder layers (default 3)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--noise", type=float, default=0.02, help="std of each expert's noise (default 0.02)")
    parser.add_argument("--scale", type=float, default=0.3, help="task-arithmetic scale (default 0.3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (default 3)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "magic-pl featcal vs the FeatCal reference code on a tiny random HF CLIP vision tower",
        "date": datetime.date.today().isoformat(),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers")},
        "k": args.k,
        "samples_per_task": args.samples,
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "image": 32, "patch": 8},
        "settings": {"ridge": 0.05, "anchor": 2.2, "teacher_mix": 0.25, "eps": 1e-8, "last_block_token_weight": 0.01,
                     "batch_size": BATCH},
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    ref, stubbed, why = import_reference(args.reference_src)
    result["reference_available"] = ref is not None
    if stubbed:
        result["stubbed_modules"] = stubbed
    if ref is None:
        result["reason"] = why
        print(json.dumps(result, indent=2))
        return result
    result["reference_version"] = getattr(sys.modules.get("featcal"), "__version__", None)
    inputs = build(args)
    merged_state = {k: v.detach().clone() for k, v in inputs["merged"].state_dict().items()}
    ours, theirs = ours_runner(inputs), reference_runner(ref, inputs)
    t_ours, t_ref, t_nogc = [], [], []
    a = b = c = None
    for _ in range(max(1, args.repeats)):
        a, ta = timed(ours, inputs["merged"])
        b, tb = timed(theirs, inputs["merged"])
        with without_gc_collect(ref):
            c, tc = timed(theirs, inputs["merged"])
        t_ours.append(ta)
        t_ref.append(tb)
        t_nogc.append(tc)
    result["parity"] = differences(a, b, merged_state)
    result["reference_without_gc_same_result"] = all(torch.equal(b[k], c[k]) for k in b)
    result["ours_s"] = round(min(t_ours), 4)
    result["reference_s"] = round(min(t_ref), 4)
    result["time_ratio"] = round(min(t_ours) / min(t_ref), 3)
    result["reference_without_gc_s"] = round(min(t_nogc), 4)
    result["time_ratio_without_gc"] = round(min(t_ours) / min(t_nogc), 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
