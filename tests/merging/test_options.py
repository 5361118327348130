"""validate_merge_options: unknown, non-finite and out-of-range options refused by name before any tensor is read;
the drivers' finiteness check and LAPACK errors name the key and the method."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import pytest
import torch

from magic_pl.merging import MERGE_METHODS, MergeError, get_method, merge, merge_models, validate_merge_options
from magic_pl.merging.registry import method_options
from magic_pl.statedict import CheckpointError


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_accepts_its_own_defaults(method):
    defaults = method_options(method)
    # method_options lists every `then` method's options (dare, larv); keep those of the default `then`
    # (dare's TA takes no density, larv's Iso-C no density, rank_fraction, ...)
    defaults = {k: v for k, v in defaults.items() if k in get_method(method).option_specs(defaults)}
    assert validate_merge_options(method, defaults) == defaults


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("task_arithmetic", {"scale": float("nan")}, r"'task_arithmetic'.*scale=nan must be finite"),
        ("task_arithmetic", {"scale": math.inf}, "must be finite"),
        ("task_arithmetic", {"scale": 3000.0}, r"scale=3000.0 is out of range \(\|scale\| <= 1000\)"),
        ("task_arithmetic", {"scale": "0.3"}, "must be a real number"),
        ("ties", {"density": 0.0}, r"'ties'.*density=0.0 must lie in \(0, 1\]"),
        ("ties", {"density": 1.5}, r"density=1.5 must lie in \(0, 1\]"),
        ("ties", {"density": True}, "must be a real number"),
        ("ties", {"thresholds": [0.1, -1.0]}, "thresholds.*>= 0"),
        ("dare", {"p": 1.0}, r"'dare'.*p=1.0 must lie in \[0, 1\)"),
        ("dare", {"then": "iso_c"}, r"then='iso_c' must be one of 'task_arithmetic', 'ties'"),
        ("dare", {"then": "ties", "density": 2.0}, "density=2.0"),
        ("breadcrumbs", {"beta": 0.9, "gamma": 0.5}, "gamma=0.5 must be >= beta=0.9"),
        ("breadcrumbs", {"beta": -0.1}, r"beta=-0.1 must lie in \[0, 1\]"),
        ("consensus", {"min_tasks": 0}, r"min_tasks=0 must lie in \[1, inf\]"),
        ("consensus", {"min_tasks": 2.5}, "min_tasks=2.5 must be an integer"),
        ("consensus", {"tall_lambda": [0.2, float("nan")]}, "tall_lambda.*must be finite"),
        ("tsv_m", {"rank_fraction": 0.0}, r"rank_fraction=0.0 must lie in \(0, 1\]"),
        ("iso_c", {"matrix_exclude": "embed("}, "matrix_exclude='embed\\(' is not a valid regex"),
        ("iso_cts", {"common_fraction": 1.2}, "common_fraction=1.2"),
        ("slerp", {"t": -0.1}, r"'slerp'.*t=-0.1 must lie in \[0, 1\]"),
        ("della", {"epsilon": 0.6}, r"epsilon=0.6 must lie in \[0, 0.5\)"),
        ("wudi", {"steps": 10**9}, "steps=1000000000 must lie in"),
    ],
)
def test_bad_values_are_refused_by_name(method, options, message):
    with pytest.raises(ValueError, match=message):
        validate_merge_options(method, options)


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'lambda_'.*'ties'.*valid options: density, global_topk"):
        validate_merge_options("ties", {"lambda_": 0.3})
    with pytest.raises(ValueError, match="global_topk needs all tensors"):
        validate_merge_options("ties", {"global_topk": True}, driver=False)
    with pytest.raises(ValueError, match="unknown merge method 'tie'"):
        validate_merge_options("tie", {})


def test_driver_options_travel_with_the_method_options():
    """Front doors take one dict (``--merge_options '{"density": 0.2, "bn_stats": "base"}'``): the drivers' own
    options are checked there too, and refused for a single tensor."""
    assert validate_merge_options("ties", {"density": 0.2, "bn_stats": "base", "seed": 3}) == {
        "density": 0.2, "bn_stats": "base", "seed": 3}
    with pytest.raises(ValueError, match="unknown bn_stats='mean'"):
        validate_merge_options("task_arithmetic", {"bn_stats": "mean"})
    with pytest.raises(ValueError, match="seed must be an integer, got 0.5"):
        validate_merge_options("dare", {"seed": 0.5})
    with pytest.raises(ValueError, match="unknown option.*'bn_stats'"):
        validate_merge_options("ties", {"bn_stats": "base"}, driver=False)


def test_values_are_normalised():
    assert validate_merge_options("ties", {"density": 1, "scale": 2}) == {"density": 1.0, "scale": 2.0}
    assert isinstance(validate_merge_options("consensus", {"min_tasks": 3})["min_tasks"], int)


class _Untouchable(Mapping[str, torch.Tensor]):
    """A task vector whose tensors must not be read."""

    def __getitem__(self, key: str) -> torch.Tensor:
        raise AssertionError(f"tensor {key!r} was read before the options were validated")

    def __iter__(self) -> Iterator[str]:
        return iter(["w"])

    def __len__(self) -> int:
        return 1


def test_drivers_validate_before_reading_any_tensor():
    tvs = [_Untouchable(), _Untouchable()]
    with pytest.raises(ValueError, match="density=0.0"):
        merge("ties", tvs, density=0.0)
    with pytest.raises(ValueError, match="seed=1.5 must be an integer"):
        merge("dare", tvs, seed=1.5)
    with pytest.raises(ValueError, match="t=2"):
        merge_models(_Untouchable(), tvs, "slerp", t=2)
    with pytest.raises(ValueError, match="K = 3"):
        merge("slerp", tvs + [_Untouchable()])


def test_non_finite_results_name_the_key_and_the_method():
    # finite inputs whose sum overflows float32: the output check names the method and the key
    tvs = [{"a": torch.ones(3), "enc.w": torch.full((2, 2), 3e38)} for _ in range(2)]
    with pytest.raises(MergeError, match=r"'task_arithmetic' produced 4 non-finite value\(s\) for 'enc\.w'"):
        merge("task_arithmetic", tvs, scale=1.0)
    # a non-finite input is refused as it is read, naming the task vector and the key
    tvs = [{"a": torch.ones(3), "enc.w": torch.ones(2, 2)}, {"a": torch.ones(3), "enc.w": torch.ones(2, 2)}]
    tvs[1]["enc.w"][0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="task vector 1: tensor 'enc.w' has 0 NaN and 1 Inf"):
        merge("ties", tvs)


def test_linalg_errors_name_the_key(monkeypatch):
    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    tvs = [{"blocks.0.mlp.weight": torch.randn(4, 3)} for _ in range(2)]
    for method in ("tsv_m", "iso_c", "iso_cts"):
        with pytest.raises(MergeError, match=rf"'{method}' failed on 'blocks\.0\.mlp\.weight'.*converge"):
            merge(method, tvs)
