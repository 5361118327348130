"""MergeKit recipes run by ``magic-pl merge`` and by MergeKit itself, on the same tiny Llama checkpoints: the largest
difference per method, and the time of each. Prints JSON.

MergeKit is never a dependency: install it in a separate environment (``python3 -m venv ~/peers &&
~/peers/bin/pip install mergekit``) and point ``--mergekit`` at its ``mergekit-yaml``. Without it the script says so
and measures magic-pl alone.

    python benchmarks/bench_recipe_mergekit.py --mergekit ~/peers/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

#: recipe method -> (per-model parameters of the two experts, shared parameters). Weights differ per model, densities
#: per model, and one density is a gradient over the layers, so every path of the recipe reader is used.
CASES = {
    "linear": ([{"weight": 0.6}, {"weight": 0.4}], {}),
    # the base listed among the models with its own weight: MergeKit averages it as a model
    "linear_with_base": ([{"weight": 0.6}, {"weight": 0.4}], {}),
    "task_arithmetic": ([{"weight": 0.7}, {"weight": [0.2, 0.9]}], {"lambda": 0.8}),
    "ties": ([{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": [0.3, 0.7]}], {"normalize": True}),
    "breadcrumbs": ([{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": 0.8}], {"gamma": 0.05}),
    "breadcrumbs_ties": ([{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": 0.8}], {"gamma": 0.05}),
    # random masks: MergeKit's come from torch's global generator, magic-pl's from a seeded one per tensor; the two
    # agree in distribution only, so these rows report the difference of the merged update's norm
    "dare_ties": ([{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.5}], {}),
    "della": ([{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.7, "density": 0.5, "epsilon": 0.1}],
              {}),
}
RANDOM = {"dare_ties", "della"}


def build(root: Path, hidden: int, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(i + 1)
        expert = LlamaForCausalLM(cfg)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        expert.save_pretrained(root / name)


def recipe(method: str, root: Path, mergekit: bool = False) -> str:
    """The recipe file; MergeKit's ``linear`` averages every listed model, the base included when it is named, so
    its recipe names none (magic-pl's needs the base for the task vectors: the same merge when weights normalise)."""
    import yaml

    per_model, shared = CASES[method]
    linear = method.startswith("linear")
    doc = {"merge_method": "linear" if linear else method,
           **({} if mergekit and linear else {"base_model": str(root / "base")}),
           "models": [{"model": str(root / n), "parameters": p} for n, p in zip(("a", "b"), per_model)],
           "dtype": "float32"}
    if method == "linear_with_base":
        doc["models"].insert(0, {"model": str(root / "base"), "parameters": {"weight": 0.5}})
    if shared:
        doc["parameters"] = shared
    return yaml.safe_dump(doc, sort_keys=False)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=os.path.expanduser("~/peers/bin/mergekit-yaml"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    from magic_pl.lightning.recipe import run_recipe

    have_mergekit = Path(args.mergekit).is_file()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.hidden, args.layers)
        base = tensors(root / "base")
        for method in CASES:
            text = recipe(method, root)
            (root / f"{method}.yaml").write_text(text + "calibration: none\n")
            start = time.perf_counter()
            run_recipe(root / f"{method}.yaml", root / f"mp_{method}", evaluate=False)
            row: dict[str, object] = {"magic_pl_s": round(time.perf_counter() - start, 3)}
            mine = tensors(root / f"mp_{method}" / "model")
            if have_mergekit:
                (root / f"mk_{method}.yaml").write_text(recipe(method, root, mergekit=True))
                start = time.perf_counter()
                subprocess.run([args.mergekit, str(root / f"mk_{method}.yaml"), str(root / f"mk_{method}"),
                                "--random-seed", "0"], check=True, capture_output=True)
                row["mergekit_s"] = round(time.perf_counter() - start, 3)
                theirs = tensors(root / f"mk_{method}")
                assert mine.keys() == theirs.keys(), sorted(set(mine) ^ set(theirs))
                if method in RANDOM:
                    norm = {k: float((mine[k] - base[k]).norm() / (theirs[k] - base[k]).norm().clamp_min(1e-12))
                            for k in mine}
                    row["update_norm_ratio_range"] = [round(min(norm.values()), 4), round(max(norm.values()), 4)]
                else:
                    row["max_abs_diff"] = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
                    row["max_update"] = max(float((theirs[k] - base[k]).abs().max()) for k in mine)
                shutil.rmtree(root / f"mk_{method}")
            rows[method] = row
            shutil.rmtree(root / f"mp_{method}")
    print(json.dumps({"model": f"Llama hidden {args.hidden}, {args.layers} layers, K = 2, float32",
                      "mergekit": args.mergekit if have_mergekit else None, "methods": rows}, indent=2))


if __name__ == "__main__":
    main()
