"""Label-free recipe selection: the criterion's closed form, the scores against an independent computation on separately
built modules, and ``calibrate(select=...)`` / ``--select`` running the winner."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer

from magic_pl.lightning import MagicModule, RandomTaskDataset, TaskDataModule
from magic_pl.lightning.cli import main
from magic_pl.lightning.demo import DEMO_CLASSES, DEMO_TASKS, DemoAdapter
from magic_pl.lightning.module import split_inputs
from magic_pl.lightning.selection import distances, parse_candidate, select_recipe
from magic_pl.lightning.trainer import MagicTrainer


def _data(samples: int = 2) -> TaskDataModule:
    test = {t: RandomTaskDataset(num_samples=12, shape=[16], num_classes=n, seed=k)
            for k, (t, n) in enumerate(zip(DEMO_TASKS, DEMO_CLASSES))}
    return TaskDataModule(task_names=list(DEMO_TASKS), test=test, samples_per_task=samples)


def _trainer() -> Trainer:
    return MagicTrainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)


def test_distance_is_zero_at_the_expert_and_one_at_silence():
    g = torch.Generator().manual_seed(0)
    experts = {0: [torch.randn(1, 5, generator=g) for _ in range(3)], 1: [torch.randn(1, 2, generator=g)]}
    assert distances(experts, experts) == {0: 0.0, 1: 0.0}
    silent = {t: [torch.zeros_like(e) for e in v] for t, v in experts.items()}
    assert distances(silent, experts) == pytest.approx({0: 1.0, 1: 1.0})
    halved = {t: [0.5 * e for e in v] for t, v in experts.items()}  # lost magnitude costs (1 - 0.5)^2
    assert distances(halved, experts) == pytest.approx({0: 0.25, 1: 0.25})


def _independent_score(merge_method: str, calibration: str, data: TaskDataModule) -> float:
    """Build the candidate and the experts on their own, and compute the criterion with plain loops."""
    trainer = _trainer()
    cand = MagicModule(adapter=DemoAdapter(), merge_method=merge_method, calibration=calibration)
    if cand.needs_calibration_data:
        trainer.predict(cand, datamodule=data, return_predictions=False)
    cand.build()
    experts = MagicModule(adapter=DemoAdapter(), calibration="none")
    experts.build()
    data.setup("predict")
    batches = list(data.predict_dataloader())
    per_task = []
    for k, task in enumerate(cand.task_names):
        experts.use_expert(task)
        num = den = 0.0
        for batch in batches:
            t, args, kwargs, _ = split_inputs(batch)
            for i in range(args[0].shape[0] if args else 0):
                if int(t[i]) != k:
                    continue
                x = args[0][i:i + 1]
                with torch.no_grad():
                    e, m = experts(x, task=task).double(), cand(x, task=task).double()
                num += float((m - e).pow(2).sum())
                den += float(e.pow(2).sum())
        per_task.append(num / den)
    return sum(per_task) / len(per_task)


def test_scores_equal_an_independent_computation_and_the_best_is_the_minimum():
    data = _data()
    candidates = ["task_arithmetic@none", "task_arithmetic@dsc", "ties@fsc"]
    result = select_recipe(MagicModule(adapter=DemoAdapter()), data, candidates, _trainer())
    for spec in candidates:
        method, calibration = spec.split("@")
        assert result["scores"][spec] == pytest.approx(_independent_score(method, calibration, _data()), rel=1e-6)
    assert result["best"] == min(result["scores"], key=result["scores"].get)
    assert set(result["per_task"]["ties@fsc"]) == set(DEMO_TASKS)


def test_candidates_are_checked_before_any_work():
    assert parse_candidate("ties").calibration == "dsc"
    assert parse_candidate({"merge_method": "ties", "merge_options": {"density": 0.3}}).label == "ties(density=0.3)@dsc"
    with pytest.raises(ValueError, match="merge method"):
        parse_candidate("tiez@dsc")
    with pytest.raises(ValueError):
        parse_candidate("ties@fcs")
    with pytest.raises(ValueError, match="repeat"):
        select_recipe(MagicModule(adapter=DemoAdapter()), _data(), ["ties@dsc", "ties@dsc"], _trainer())


def test_calibrate_select_runs_the_winner_and_reports_the_scores(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["calibrate", "--select", "[task_arithmetic@none, ties@dsc, task_arithmetic@dsc]", "--output_dir", "out"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "calibration_report.json").read_text())
    selection = report["config"]["selection"]
    best = selection["best"]
    assert f"selected: {best}" in out
    assert (report["config"]["merge_method"], report["config"]["calibration"]) == tuple(best.split("@"))
    # the winner is the candidate with the smallest distance, and the run calibrated it again from scratch
    assert selection["scores"][best] == min(selection["scores"].values())
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--select", "[tiez@dsc]", "--output_dir", "out2"])
    assert exc.value.code == 1 and not (tmp_path / "out2").exists()
