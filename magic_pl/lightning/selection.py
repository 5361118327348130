"""Label-free recipe selection: among candidate recipes (merge method x calibration), the one whose outputs on each
task's unlabelled samples come closest to that task's expert.

Criterion: for task k with unlabelled samples x_1..x_n and the expert's outputs e_i = f_k(x_i) (logits, or the first
output tensor for models without logits), a candidate m scores

    d_k(m) = sum_i ||f_m(x_i) - e_i||^2 / sum_i ||e_i||^2,

and the selected recipe minimises the mean over tasks of d_k. Why this one: a merge is judged by how much of each
expert it keeps, and the expert's own predictions are the only label-free target there is. The squared distance of
the outputs punishes both failures a merge shows: lost magnitude (what MAGIC calibrates: outputs shrink towards 0)
and interference (outputs point elsewhere). Normalising by the expert's output energy weighs tasks equally whatever
their logit scale. It needs no labels and uses the same few samples as FSC; a recipe calibrated on these samples is
measured on them too, so the criterion favours calibrations that fit them, which is what selection on n samples can
do. ``draw`` other samples (another seed of the data module) to select on held-out ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from magic_pl.calibration.modules import prediction_tensor
from magic_pl.lightning.statistics import task_calls

__all__ = ["Candidate", "parse_candidate", "select_recipe", "chosen", "distances", "DrawScores", "CRITERION"]

CRITERION = ("mean over tasks of sum_i ||f_m(x_i) - f_k(x_i)||^2 / sum_i ||f_k(x_i)||^2 on each task's unlabelled "
             "samples (f_k: the task's expert, f_m: the candidate)")


@dataclass(frozen=True)
class Candidate:
    """One recipe: a merge method with its options and a calibration setting."""

    merge_method: str
    calibration: str
    merge_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in sorted(self.merge_options.items()))
        return f"{self.merge_method}{'(' + options + ')' if options else ''}@{self.calibration}"


def parse_candidate(spec: Union[str, Mapping[str, Any], Candidate]) -> Candidate:
    """``"method@calibration"`` (e.g. ``"ties@dsc"``, ``"tsv_m@svc+fsc"``; ``"ties"`` alone: ``@dsc``) or a mapping
    ``{merge_method, merge_options, calibration}``; both parts checked before any tensor is read."""
    from magic_pl.calibration.settings import resolve_setting
    from magic_pl.merging import validate_merge_options

    if isinstance(spec, Candidate):
        cand = spec
    elif isinstance(spec, str):
        method, _, calibration = spec.partition("@")
        cand = Candidate(method.strip(), calibration.strip() or "dsc")
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"merge_method", "merge_options", "calibration"})
        if unknown or "merge_method" not in spec:
            raise ValueError(f"a candidate is 'method@calibration' or {{merge_method, merge_options, calibration}}, "
                             f"got {dict(spec)!r}")
        cand = Candidate(spec["merge_method"], str(spec.get("calibration", "dsc")),
                         dict(spec.get("merge_options") or {}))
    else:
        raise ValueError(f"a candidate is 'method@calibration' or a mapping, got {spec!r}")
    validate_merge_options(cand.merge_method, dict(cand.merge_options))
    return Candidate(cand.merge_method, resolve_setting(cand.calibration).to_string(), dict(cand.merge_options))


@torch.no_grad()
def _outputs(module: Any, batches: Sequence[Any]) -> dict[int, list[Tensor]]:
    """Per task index, the module's float32 outputs on that task's samples, one call per sample (no padding)."""
    from magic_pl.lightning.module import split_inputs

    module.eval()
    device = next(module.parameters()).device
    out: dict[int, list[Tensor]] = {}
    for batch in batches:
        task, args, kwargs, _ = split_inputs(batch)
        for t, a, kw in task_calls(task, args, kwargs):
            a = tuple(v.to(device) if isinstance(v, Tensor) else v for v in a)
            kw = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()}
            name = module.task_names[t]
            y = prediction_tensor(module._task_models[name](*a, **kw)).detach().float().cpu()
            out.setdefault(t, []).append(y)
    return out


def distances(outputs: Mapping[int, Sequence[Tensor]], experts: Mapping[int, Sequence[Tensor]]) -> dict[int, float]:
    """``d_k`` of the module docstring per task index, from a candidate's and the experts' outputs."""
    found = {}
    for t, ref in experts.items():
        mine = outputs[t]
        num = sum(float((m.double() - e.double()).pow(2).sum()) for m, e in zip(mine, ref))
        den = sum(float(e.double().pow(2).sum()) for e in ref)
        found[t] = num / den if den > 0 else float("inf")
    return found


def select_recipe(model: Any, datamodule: Any, candidates: Sequence[Union[str, Mapping[str, Any], Candidate]],
                  trainer: Any) -> dict[str, Any]:
    """Score every candidate recipe on ``model``'s checkpoints with :data:`CRITERION` and return the ranking.

    Args:
        model: a :class:`~magic_pl.lightning.module.MagicModule` naming the checkpoints (its own merge and
            calibration are not used).
        datamodule: the unlabelled samples per task (its ``predict_dataloader``: the calibration draw).
        candidates: recipes as ``"method@calibration"`` strings or mappings (:func:`parse_candidate`).
        trainer: the Lightning ``Trainer`` that runs the calibrations (``trainer.predict``).

    Returns:
        ``{"criterion", "scores": {label: mean d_k}, "per_task": {label: {task: d_k}}, "best": label,
        "candidates": {label: {merge_method, merge_options, calibration}}}``; each method is merged once and each
        calibration starts from a copy of that merge.
    """
    from magic_pl.lightning.module import MagicModule

    parsed = [parse_candidate(c) for c in candidates]  # every candidate checked before any tensor is read
    if not parsed:
        raise ValueError("select needs at least one candidate recipe")
    labels = [c.label for c in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"candidate recipes repeat: {labels}")
    init = dict(model._init_args)
    # the experts only: any data-free merge builds the module that use_expert swaps them into
    reference = MagicModule(**{**init, "merge_method": "task_arithmetic", "merge_options": {}, "calibration": "none"})
    reference.build()
    datamodule.setup("predict")
    batches = list(datamodule.predict_dataloader())
    experts: dict[int, list[Tensor]] = {}
    for i, task in enumerate(reference.task_names):
        reference.use_expert(task)
        experts[i] = _outputs(reference, batches).get(i, [])
    missing = [reference.task_names[i] for i, v in experts.items() if not v]
    if missing:
        raise ValueError(f"select: no unlabelled samples for tasks {missing}")
    del reference
    scores: dict[str, float] = {}
    per_task: dict[str, dict[str, float]] = {}
    by_merge: dict[tuple, list[Candidate]] = {}
    for c in parsed:
        by_merge.setdefault((c.merge_method, tuple(sorted(c.merge_options.items()))), []).append(c)
    for (method, options), group in by_merge.items():
        merged = MagicModule(**{**init, "merge_method": method, "merge_options": dict(options),
                                "calibration": "none"})
        if merged.needs_calibration_data:  # a data-based merge is merged from the same samples
            trainer.predict(merged, datamodule=datamodule, return_predictions=False)
        merged.build()
        for c in group:
            m = merged.with_calibration(c.calibration) if c.calibration != "none" else merged
            if m.needs_calibration_data:
                trainer.predict(m, datamodule=datamodule, return_predictions=False)
            d = distances(_outputs(m, batches), experts)
            per_task[c.label] = {m.task_names[t]: v for t, v in d.items()}
            scores[c.label] = sum(d.values()) / len(d)
            del m
        del merged
    best = min(scores, key=scores.get)
    return {"criterion": CRITERION, "scores": scores, "per_task": per_task, "best": best,
            "candidates": {c.label: {"merge_method": c.merge_method, "merge_options": dict(c.merge_options),
                                     "calibration": c.calibration} for c in parsed}}


def chosen(result: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The winning candidate's ``{merge_method, merge_options, calibration}`` of a :func:`select_recipe` result."""
    return result["candidates"].get(result["best"])


class DrawScores:
    """:data:`CRITERION` of modules on several draws of unlabelled samples, for a benchmark that evaluates many
    recipes: the experts' outputs are computed once per draw.

    Args:
        reference: a built ``MagicModule`` on the benchmark's checkpoints; its body is replaced by each expert in turn
            (:meth:`~magic_pl.lightning.module.MagicModule.use_expert`), so it is spent afterwards.
        draws: one data module per draw (its ``predict_dataloader``: that draw's samples).
    """

    def __init__(self, reference: Any, draws: Sequence[Any]) -> None:
        self.batches: list[list[Any]] = []
        self.experts: list[dict[int, list[Tensor]]] = []
        for datamodule in draws:
            datamodule.setup("predict")
            batches = list(datamodule.predict_dataloader())
            experts = {}
            for i, task in enumerate(reference.task_names):
                reference.use_expert(task)
                experts[i] = _outputs(reference, batches).get(i, [])
            self.batches.append(batches)
            self.experts.append(experts)

    def __len__(self) -> int:
        return len(self.batches)

    def score(self, module: Any, draw: int) -> float:
        """The mean over tasks of ``d_k`` for ``module`` on draw ``draw``'s samples."""
        d = distances(_outputs(module, self.batches[draw]), self.experts[draw])
        return sum(d.values()) / len(d)
