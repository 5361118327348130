"""FeatCal (arXiv 2605.13030): the closed form against an independent float64 least-squares solve, its properties,
its options, sums over processes, and the front doors (settings, MagicModule, MagicTrainer.calibrate)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from two_ranks import run_two_ranks

from magic_pl.calibration import STEPS, CalibrationDataError, CalibrationSetting, resolve_setting
from magic_pl.calibration.featcal import FeatCalCalibrator, FeatCalStep, _stack, featcal_blocks, featcal_modules


class MLP(nn.Module):
    """Two linear layers around a LayerNorm: no stack of blocks, so each module is a block of its own."""

    def __init__(self, d_in: int = 5, d_hidden: int = 7, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class Tokens(nn.Module):
    """A stack of per-position blocks on ``[batch, positions, features]`` inputs (blocks: ``blocks.0``, ``blocks.1``;
    ``out`` lies outside them)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.Tanh()) for _ in range(2)])
        self.out = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def _setup(model: nn.Module, k: int = 2, noise: float = 0.3, scale: float = 0.5, seed: int = 0):
    """(base state, experts, task vectors, merged model): experts = base + noise, merged = task arithmetic."""
    torch.manual_seed(seed)
    base = model.eval()
    experts = []
    for i in range(k):
        e = copy.deepcopy(base)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
        experts.append(e.eval())
    state = base.state_dict()
    taus = [{key: e.state_dict()[key] - state[key] for key in state} for e in experts]
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key, v in merged.state_dict().items():
            v.add_(scale * sum(t[key] for t in taus))
    return {key: v.clone() for key, v in state.items()}, experts, taus, merged


def _data(k: int, n: int, d: int = 5, seed: int = 0) -> dict[int, Tensor]:
    return {t: torch.randn(n, d, generator=torch.Generator().manual_seed(seed + t)) + 0.5 * t for t in range(k)}


def _featcal(base, merged, taus, batches, **options) -> nn.Module:
    model = copy.deepcopy(merged)
    CalibrationSetting([FeatCalStep(**options)]).calibrate(base, model, taus, batches=batches)
    return model


# --------------------------------------------------------------------------------------------------------------------
# An independent computation: each module's problem as a float64 least-squares system, solved by numpy's lstsq
# --------------------------------------------------------------------------------------------------------------------
def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _lstsq(rows: list[np.ndarray], targets: list[np.ndarray]) -> np.ndarray:
    return np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)[0]


def _linear_np(xs, xt, w_experts, b_experts, w_anchor, b_anchor, lam, eps, stored):
    """min_W sum_k s_k mean||x_s W^T - x_t W_k^T||^2 + lam ||W - W_a||^2 + eps ||W||^2 (s_k = 1/||mean x_s x_s^T||_F),
    then min_b sum_k s_k ||W mu_s + b - W_k mu_t - b_k||^2 + lam ||b - b_a||^2 with the stored W."""
    d = xs[0].shape[1]
    s = [1.0 / np.linalg.norm(x.T @ x / len(x)) for x in xs]
    rows = [np.sqrt(sk / len(x)) * x for sk, x in zip(s, xs)] + [np.sqrt(lam) * np.eye(d), np.sqrt(eps) * np.eye(d)]
    targets = ([np.sqrt(sk / len(x)) * (t @ w.T) for sk, x, t, w in zip(s, xs, xt, w_experts)]
               + [np.sqrt(lam) * w_anchor.T, np.zeros_like(w_anchor.T)])
    w = _lstsq(rows, targets).T
    w_used = stored(w)
    o = w.shape[0]
    rows = [np.sqrt(sk) * np.eye(o) for sk in s] + [np.sqrt(lam) * np.eye(o)]
    targets = [np.sqrt(sk) * (b + wk @ t.mean(0) - w_used @ x.mean(0))
               for sk, x, t, wk, b in zip(s, xs, xt, w_experts, b_experts)] + [np.sqrt(lam) * b_anchor]
    return w, _lstsq(rows, targets)


def _layernorm_np(hs, g_experts, b_experts, g_anchor, b_anchor, lam, ln_eps):
    """Per channel: min_{g, b} sum_k mean (g z + b - g_k z - b_k)^2 + lam ((g - g_a)^2 + (b - b_a)^2)."""
    zs = [(h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + ln_eps) for h in hs]
    gain, shift = np.zeros_like(g_anchor), np.zeros_like(b_anchor)
    for c in range(len(g_anchor)):
        rows = [np.stack([z[:, c], np.ones(len(z))], 1) / np.sqrt(len(z)) for z in zs] + [np.sqrt(lam) * np.eye(2)]
        targets = ([(gk[c] * z[:, c] + bk[c]) / np.sqrt(len(z)) for z, gk, bk in zip(zs, g_experts, b_experts)]
                   + [np.sqrt(lam) * np.array([g_anchor[c], b_anchor[c]])])
        gain[c], shift[c] = _lstsq(rows, targets)
    return gain, shift


def test_closed_form_equals_an_independent_least_squares_solve():
    """fc1, norm, fc2 in forward order, each solved on the inputs the already calibrated modules before it produce
    (student) and on the expert's own inputs (teacher), with the paper's ridge, anchor and teacher mix."""
    base, experts, taus, merged = _setup(MLP())
    data = _data(2, 40)
    lam, rho, alpha, eps = 0.05, 2.2, 0.25, 1e-8
    out = _featcal(base, merged, taus, {k: [x[:15], x[15:]] for k, x in data.items()})

    m = {k: _np(v) for k, v in merged.state_dict().items()}
    b0 = {k: _np(v) for k, v in base.items()}
    ex = [{k: _np(v) for k, v in e.state_dict().items()} for e in experts]
    xs_in = [_np(data[k]) for k in range(2)]
    anchor = {k: rho * m[k] + (1 - rho) * b0[k] for k in m}
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731 (the tensor as stored)

    def ln(h, g, b):
        return g * (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5) + b

    w1, b1 = _linear_np(xs_in, xs_in, [e["fc1.weight"] for e in ex], [e["fc1.bias"] for e in ex],
                        anchor["fc1.weight"], anchor["fc1.bias"], lam, eps, f32)
    h = [x @ f32(w1).T + f32(b1) for x in xs_in]  # the norm's input in the student: fc1 calibrated
    g, beta = _layernorm_np(h, [e["norm.weight"] for e in ex], [e["norm.bias"] for e in ex], anchor["norm.weight"],
                            anchor["norm.bias"], lam, 1e-5)
    student = [np.maximum(ln(hk, f32(g), f32(beta)), 0) for hk in h]
    expert_in = [np.maximum(ln(x @ e["fc1.weight"].T + e["fc1.bias"], e["norm.weight"], e["norm.bias"]), 0)
                 for x, e in zip(xs_in, ex)]
    teacher = [alpha * xe + (1 - alpha) * x for xe, x in zip(expert_in, student)]
    w2, b2 = _linear_np(student, teacher, [e["fc2.weight"] for e in ex], [e["fc2.bias"] for e in ex],
                        anchor["fc2.weight"], anchor["fc2.bias"], lam, eps, f32)

    got = {k: _np(v) for k, v in out.state_dict().items()}
    want = {"fc1.weight": w1, "fc1.bias": b1, "norm.weight": g, "norm.bias": beta, "fc2.weight": w2, "fc2.bias": b2}
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=2e-5, err_msg=key)
        assert np.abs(got[key] - m[key]).max() > 1e-3  # every tensor moved


@pytest.mark.parametrize("options", [{"anchor": 1.0, "eps": 0.0}, {"ridge": 0.0, "eps": 0.0}])
def test_an_expert_as_the_merged_model_is_left_as_it_is(options):
    """One task whose expert is the merged model: student and teacher features coincide, so the least-squares fit is
    the expert; the anchor is the expert too with rho = 1 (the paper's rho = 2.2 extrapolates, and moves it)."""
    base, experts, taus, _ = _setup(MLP(), k=1)
    data = _data(1, 40)
    out = _featcal(base, experts[0], taus, {0: [data[0]]}, **options)
    for key, value in experts[0].state_dict().items():
        torch.testing.assert_close(out.state_dict()[key], value, rtol=1e-5, atol=2e-6)
    moved = _featcal(base, experts[0], taus, {0: [data[0]]})  # defaults: anchor 2.2
    assert not torch.allclose(moved.fc2.weight, experts[0].fc2.weight, atol=1e-4)


def test_it_is_deterministic_and_batching_only_reorders_sums():
    base, _, taus, merged = _setup(MLP(), k=3)
    data = _data(3, 24)
    one = _featcal(base, merged, taus, {k: [x] for k, x in data.items()})
    again = _featcal(base, merged, taus, {k: [x] for k, x in data.items()})
    per_sample = _featcal(base, merged, taus, [(k, x[i:i + 1]) for k, x in data.items() for i in range(len(x))])
    for key, value in one.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)
        torch.testing.assert_close(per_sample.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_more_samples_bring_the_features_closer_to_the_experts():
    """Held-out outputs against each expert's on its own task: closer with 8 samples per task than uncalibrated, and
    closer still with 256."""

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.norm = nn.Linear(8, 24), nn.LayerNorm(24)
            self.fc2, self.fc3 = nn.Linear(24, 24), nn.Linear(24, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc3(torch.relu(self.fc2(torch.relu(self.norm(self.fc1(x))))))

    base, experts, taus, merged = _setup(Deep(), k=3, scale=0.3)
    shift = [torch.randn(8, generator=torch.Generator().manual_seed(50 + k)) for k in range(3)]

    def draw(n: int, seed: int) -> dict[int, Tensor]:
        return {k: torch.randn(n, 8, generator=torch.Generator().manual_seed(seed + k)) + shift[k] for k in range(3)}

    test = draw(500, 1000)

    @torch.no_grad()
    def drift(model: nn.Module) -> float:
        return sum(float((model(test[k]) - experts[k](test[k])).pow(2).mean()) for k in range(3)) / 3

    few = _featcal(base, merged, taus, {k: [x] for k, x in draw(8, 0).items()})
    many = _featcal(base, merged, taus, {k: [x] for k, x in draw(256, 0).items()})
    assert drift(many) < drift(few) < drift(merged)


def test_the_last_block_weighs_the_first_position_only_when_asked():
    """With weight 0 on every position but the first, the last block is fitted to the first positions alone (here
    equal to a run on those positions only); the earlier block still sees every position. Outside the blocks nothing
    changes."""
    base, _, taus, merged = _setup(Tokens(), k=2)
    x = {k: torch.randn(10, 4, 6, generator=torch.Generator().manual_seed(k)) for k in range(2)}
    assert featcal_blocks(merged, featcal_modules(merged, taus[0])) == {
        "blocks.0": ["blocks.0.0", "blocks.0.1"], "blocks.1": ["blocks.1.0", "blocks.1.1"]}
    weighted = _featcal(base, merged, taus, {k: [v] for k, v in x.items()}, last_block_token_weight=0.0)
    full = _featcal(base, merged, taus, {k: [v] for k, v in x.items()})
    w, f = weighted.state_dict(), full.state_dict()
    for key in w:
        if key.startswith("blocks.0."):
            assert torch.equal(w[key], f[key])
        elif key.startswith("blocks.1."):
            assert not torch.allclose(w[key], f[key], atol=1e-4)
        else:  # "out" lies outside every block
            assert torch.equal(w[key], merged.state_dict()[key])
    # block 0 left out of the task vectors (merged there = base): only the last block is calibrated, and its inputs
    # at the first position do not depend on the others (the blocks act per position)
    taus = [{k: v for k, v in t.items() if not k.startswith("blocks.0.")} for t in taus]
    only_last = copy.deepcopy(merged)
    only_last.blocks[0].load_state_dict({k[len("blocks.0."):]: v for k, v in base.items() if k.startswith("blocks.0.")})
    weighted = _featcal(base, only_last, taus, {k: [v] for k, v in x.items()}, last_block_token_weight=0.0)
    first = _featcal(base, only_last, taus, {k: [v[:, :1]] for k, v in x.items()})
    for key, value in first.state_dict().items():
        torch.testing.assert_close(weighted.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", ["halves", "one_task_each"])
def test_statistics_summed_over_two_processes_equal_one_process(split):
    """Each process feeds its share and sums every block's statistics once with the other's (plus one sum for the
    sample counts and the forward order): both write the same weights, those of one process with all the data."""
    base, _, taus, merged = _setup(MLP(), k=2)
    data = _data(2, 20)
    calls = [(k, x[i:i + 1]) for k, x in data.items() for i in range(len(x))]
    if split == "halves":
        shares = [calls[0::2], calls[1::2]]
    else:  # each process sees one task only
        shares = [[c for c in calls if c[0] == 0], [c for c in calls if c[0] == 1]]
    whole = _featcal(base, merged, taus, calls)
    models = [copy.deepcopy(merged) for _ in range(2)]

    def run(rank: int, reduce) -> None:
        cal = FeatCalCalibrator(base, models[rank], taus)
        for k, x in shares[rank]:
            cal.update(k, x)
        cal.finalize(reduce)
        assert cal.fold().samples_per_task == [20, 20]

    _, summer = run_two_ranks(run)
    assert summer.calls == [4, 4]  # the counts and order, then one per block (fc1, norm, fc2)
    for key, value in whole.state_dict().items():
        assert torch.equal(models[0].state_dict()[key], models[1].state_dict()[key])
        torch.testing.assert_close(models[0].state_dict()[key], value, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Options, errors, registry
# --------------------------------------------------------------------------------------------------------------------
def test_the_step_is_registered_with_the_reference_defaults_and_round_trips():
    assert STEPS["featcal"] is FeatCalStep and FeatCalStep.kind == "feature"
    assert FeatCalStep().options() == {"ridge": 0.05, "anchor": 2.2, "teacher_mix": 0.25, "eps": 1e-8,
                                       "calibrate_bias": True, "calibrate_layernorm": True,
                                       "last_block_token_weight": 1.0}
    s = resolve_setting("wsc+featcal:featcal.ridge=0.1,featcal.calibrate_bias=false,featcal.anchor=-1")
    assert s.feature_step == FeatCalStep(ridge=0.1, calibrate_bias=False, anchor=-1.0)
    assert resolve_setting(s.to_string()) == s and resolve_setting(s.to_dict()) == s
    assert s.to_string() == "wsc+featcal:featcal.ridge=0.1,featcal.anchor=-1,featcal.calibrate_bias=False"


@pytest.mark.parametrize("spec, match", [
    ("featcal:featcal.ridge=-1", "'featcal': ridge='-1' must be a finite number in \\[0, 1e6\\]"),
    ("featcal:featcal.teacher_mix=1.5", "'featcal': teacher_mix='1.5' must be a finite number in \\[0, 1\\]"),
    ("featcal:featcal.eps=nan", "'featcal': eps='nan' must be"),
    ("featcal:featcal.anchor=inf", "'featcal': anchor='inf' must be"),
    ("featcal:featcal.calibrate_bias=maybe", "'featcal': calibrate_bias='maybe' must be true or false"),
    ("featcal:featcal.last_block_token_weight=2", "'featcal': last_block_token_weight='2' must be"),
    ("featcal:featcal.rho=2", "'featcal': unknown option\\(s\\) \\['rho'\\]"),
    ("featcal+wsc", "the feature step 'featcal' must come last"),
    ("fsc+featcal", "the feature step 'fsc' must come last"),
])
def test_bad_options_are_refused_by_name(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_setting(spec)


def test_missing_tasks_and_nonfinite_data_are_errors():
    base, _, taus, merged = _setup(MLP(), k=2)
    data = _data(2, 8)
    with pytest.raises(CalibrationDataError, match="none for task '1'"):
        _featcal(base, merged, taus, {0: [data[0]]})
    bad = data[1].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CalibrationDataError, match="task '1' gives non-finite features at module 'fc1'"):
        _featcal(base, merged, taus, {0: [data[0]], 1: [bad]})
    cal = FeatCalCalibrator(base, copy.deepcopy(merged), taus)
    with pytest.raises(IndexError, match="task_index 2 is out of range"):
        cal.update(2, data[0])
    with pytest.raises(ValueError, match="no nn.Linear or nn.LayerNorm"):
        FeatCalCalibrator(base, nn.Sequential(nn.ReLU()), taus)


def test_stacking_keeps_calls_that_cannot_be_concatenated_apart():
    a, b = torch.ones(1, 3), torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    calls = [((a,), {"attention_mask": mask}), ((b,), {"attention_mask": mask}), ((torch.ones(1, 4),), {}),
             ((a,), {"flag": True}), ((b,), {"flag": False})]
    out = _stack(calls, limit=16)
    assert len(out) == 4 and out[0][0][0].shape == (2, 3) and out[0][1]["attention_mask"].shape == (2, 3)
    assert [len(_stack(calls[:2] * 3, limit=n)) for n in (1, 2, 4, 6)] == [6, 3, 2, 1]


# --------------------------------------------------------------------------------------------------------------------
# Front doors
# --------------------------------------------------------------------------------------------------------------------
def test_through_magic_module_predict_it_equals_the_core(tmp_path):
    """MagicModule feeds the predict batches one sample at a time (stacked again by the calibrator) and records the
    step under its name; the weights equal the core run by hand on the same samples."""
    from lightning.pytorch import Trainer

    from magic_pl.lightning import MagicModule, RandomTaskDataset, TaskDataModule
    from magic_pl.statedict import task_vector

    base_model = MLP(6, 16, 8)
    base, experts, _, _ = _setup(base_model, k=3, noise=0.1)
    heads = [nn.Linear(8, n) for n in (3, 4, 2)]
    data = {t: RandomTaskDataset(11, (6,), n, seed=i) for i, (t, n) in enumerate(zip("xyz", (3, 4, 2)))}
    dm = TaskDataModule(list("xyz"), test=data, samples_per_task=3, seed=2, batch_size=4)
    mod = MagicModule(model=copy.deepcopy(base_model), experts=experts, heads=heads, task_names=list("xyz"),
                      merge_method="ties", merge_options={"density": 0.5}, calibration="featcal:featcal.ridge=0.1")
    assert mod.needs_calibration_data
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False).predict(mod, datamodule=dm, return_predictions=False)
    assert mod.run.done and not mod.needs_calibration_data

    from magic_pl.merging import merge_models

    ref = copy.deepcopy(base_model)
    ref.load_state_dict(merge_models(base_model, experts, "ties", density=0.5))
    taus = [task_vector(e, base_model) for e in experts]
    calib = dm.calibration_dataset()
    pairs = [(calib[i]["task"], calib[i]["inputs"][None]) for i in range(len(calib))]
    resolve_setting("featcal:featcal.ridge=0.1").calibrate(base_model.state_dict(), ref.eval(), taus, batches=pairs)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mod.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    step = next(s for s in mod.calibration_record.steps if s["step"] == "featcal")
    assert step["rounds"] == 3 and step["modules"] == 3 and step["samples_per_task"] == [3, 3, 3]
    assert mod.calibration_record.folded == ["fc1", "norm", "fc2"]


def test_magic_trainer_calibrate_runs_it_end_to_end(tmp_path):
    """The tiny timm ViT (blocks: an nn.Sequential of transformer blocks) through MagicTrainer.calibrate: saved,
    evaluated, compared with the uncalibrated merge, and only the blocks' Linear and LayerNorm tensors change."""
    from safetensors.torch import load_file

    from magic_pl.lightning import MagicModule, MagicTrainer, RandomTaskDataset, TaskDataModule
    from magic_pl.lightning.tiny_inputs import TinyTimmAdapter, build_tiny_timm

    inputs = build_tiny_timm(tmp_path / "cache")
    test = {t: RandomTaskDataset(12, (3, 16, 16), n, seed=i) for i, (t, n) in enumerate(zip("ab", (3, 4)))}

    def module(calibration: str) -> MagicModule:
        adapter = TinyTimmAdapter(base=str(inputs["base"]), experts=[str(inputs[e]) for e in "ab"],
                                  task_names=["a", "b"])
        return MagicModule(adapter=adapter, calibration=calibration)

    trainer = MagicTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    res = trainer.calibrate(module("featcal"), datamodule=TaskDataModule(["a", "b"], test=test, samples_per_task=2),
                            output_dir=str(tmp_path / "out"))
    assert res["metrics"] and res["comparison"]["uncalibrated"]
    plain = trainer.calibrate(module("none"), datamodule=TaskDataModule(["a", "b"], test=test, samples_per_task=2),
                              output_dir=str(tmp_path / "plain"), compare=False)
    assert plain["metrics"]
    cal = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    uncal = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    changed = {k for k in cal if not torch.equal(cal[k], uncal[k])}
    assert changed and all(".blocks." in f".{k}" for k in changed)
    assert all(k.rpartition(".")[0].rpartition(".")[2] in ("qkv", "proj", "fc1", "fc2", "norm1", "norm2")
               for k in changed)
