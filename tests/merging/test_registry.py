"""The method registry: every registered method describes itself (paper, options with rules, traits), and the
front doors (validate_merge_options, merge, merge_tensor, method_options) ask the object, not the name."""

from __future__ import annotations

import inspect
from typing import Annotated

import pytest
import torch

from magic_pl.merging import (
    DATA_MERGE_METHODS,
    MERGE_METHODS,
    METHODS,
    MergeMethod,
    get_method,
    merge,
    merge_method,
    merge_models,
    merge_tensor,
    validate_merge_options,
)
from magic_pl.merging import method as method_module
from magic_pl.merging import steps as steps_module
from magic_pl.merging.method import Linear
from magic_pl.merging.options import Flag, Interval, Rule, Scale
from magic_pl.merging.registry import method_options
from magic_pl.merging.ties import ties


def _taus(k: int, *shape: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(k)]


def _k_for(spec: MergeMethod) -> int:
    """A K every per-tensor method takes with its default options."""
    for k in (3, 2, 1):
        if spec.task_count_error(k, {}) is None:
            return k
    raise AssertionError(f"{spec.name}: no K in 1..3 is allowed")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_describes_itself(name):
    spec = get_method(name)
    assert isinstance(spec, MergeMethod) and spec.name == name
    assert "arXiv" in spec.paper or any(str(y) in spec.paper for y in range(1980, 2030)), spec.paper
    assert spec.fn.__doc__, "the function documents its defaults"
    for option, o in {**spec.option_specs(), **spec.driver_options}.items():
        assert isinstance(o.rule, Rule), option
        o.rule(name, option, o.default)  # every default passes its own rule
    assert spec.min_tasks >= 1 and (spec.max_tasks is None or spec.max_tasks >= spec.min_tasks)
    assert isinstance(spec.row_separable, bool) and isinstance(spec.needs_data, bool)
    assert all(getattr(steps_module, s.__name__, None) is s for s in spec.steps), "steps are shared step functions"
    params = inspect.signature(spec.fn).parameters
    if spec.needs_data:
        assert name in DATA_MERGE_METHODS and name not in MERGE_METHODS
        assert not spec.row_separable and spec.linear is None
    else:
        assert name in MERGE_METHODS and name not in DATA_MERGE_METHODS
        assert "name" in params and params["name"].kind is inspect.Parameter.KEYWORD_ONLY
        assert ("base" in params) == (spec.needs_base is not False), "only methods that use the base take it"


def test_views_are_name_mappings_that_front_doors_iterate():
    assert set(MERGE_METHODS) | set(DATA_MERGE_METHODS) == set(METHODS)
    assert not set(MERGE_METHODS) & set(DATA_MERGE_METHODS)
    assert list(MERGE_METHODS)[:3] == ["weight_average", "task_arithmetic", "ties"]  # the listing order
    assert "ties" in MERGE_METHODS and "regmean" in DATA_MERGE_METHODS and "tie" not in METHODS
    assert all(isinstance(n, str) for n in METHODS) and len(METHODS) == len(list(METHODS))
    taus = _taus(3, 6, 4)
    assert torch.equal(MERGE_METHODS["ties"](taus, density=0.5), ties(taus, density=0.5))  # the object calls fn
    with pytest.raises(ValueError, match="unknown merge method 'tie'; valid methods: weight_average"):
        get_method("tie")


def test_validate_merge_options_uses_each_methods_rules():
    for name, spec in MERGE_METHODS.items():
        defaults = spec.defaults()
        assert method_options(name) == defaults
        for option, o in spec.options.items():
            # a string is never a valid value of a numeric, boolean or optional option: its own rule says so
            if o.default is None or isinstance(o.default, (bool, int, float)):
                with pytest.raises(ValueError, match=rf"merge method '{name}': option {option}="):
                    validate_merge_options(name, {option: "not a value"}, driver=False)
    assert validate_merge_options("ties", {"global_topk": True}) == {"global_topk": True}  # a driver option
    assert set(get_method("ties").driver_options) == {"global_topk"}
    # dare takes its `then` method's options, chosen by the caller's `then`
    assert "density" in get_method("dare").option_specs({"then": "ties"})
    assert "density" not in get_method("dare").option_specs({"then": "task_arithmetic"})


@pytest.mark.parametrize("name", [n for n, m in MERGE_METHODS.items() if m.row_separable])
def test_row_separable_methods_give_the_same_bits_on_row_blocks(name):
    spec = get_method(name)
    taus = _taus(_k_for(spec), 9, 5, seed=3)
    whole = merge_tensor(name, taus, name="layer.weight")
    blocks = [merge_tensor(name, [t[a:b] for t in taus], name="layer.weight") for a, b in ((0, 4), (4, 5), (5, 9))]
    assert torch.equal(torch.cat(blocks), whole)


@pytest.mark.parametrize("name", [n for n, m in MERGE_METHODS.items() if m.linear is not None])
def test_linear_coefficients_match_the_method(name):
    spec = get_method(name)
    taus = _taus(3, 7, 4, seed=5)
    combination = spec.linear_weights(3, {})
    assert isinstance(combination, Linear) and len(combination.coefficients) == 3
    expected = sum(c * t.double() for c, t in zip(combination.coefficients, taus))
    torch.testing.assert_close(merge_tensor(name, taus).double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not a linear combination"):
        get_method("ties").linear_weights(3, {})


def test_data_methods_are_refused_by_the_per_tensor_doors():
    taus = _taus(2, 3)
    with pytest.raises(ValueError, match="not a per-tensor rule"):
        merge_tensor("regmean", taus)
    with pytest.raises(ValueError, match="data-based merge"):
        merge("regmean_plusplus", [{"w": t} for t in taus])
    assert validate_merge_options("regmean_plusplus", {"blocks": ["layers.0"]}) == {"blocks": ["layers.0"]}
    with pytest.raises(ValueError, match="option blocks='layers' must be a list of module names"):
        validate_merge_options("regmean_plusplus", {"blocks": "layers"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'seed'"):
        validate_merge_options("regmean", {"seed": 0})


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for methods defined in a test (the real one is left as it was)."""
    monkeypatch.setattr(method_module, "_REGISTRY", dict(method_module._REGISTRY))


def _gain_at_most_double(options):
    if options["gain"] > 2 * options["floor"]:
        raise ValueError("toy: gain must be at most twice the floor")


def test_a_new_method_is_one_decorated_function(scratch_registry):
    @merge_method(name="toy", paper="Nobody, 2025", min_tasks=2, max_tasks=3, row_separable=True,
                  needs_base=lambda options: options["from_base"], check=_gain_at_most_double,
                  linear=lambda k, options: Linear((options["gain"],) * k, float(k)))
    def toy(taus, *, name: str = "", base=None, gain: Annotated[float, Interval(0.0, 4.0)] = 1.0,
            floor: Scale = 1.0, from_base: Annotated[bool, Flag()] = False):
        """``gain * mean_k tau_k`` (plus the base when ``from_base``)."""
        out = torch.stack(list(taus)).mean(0) * gain
        return out + base if from_base else out

    assert "toy" in MERGE_METHODS and method_options("toy") == {"gain": 1.0, "floor": 1.0, "from_base": False}
    with pytest.raises(ValueError, match=r"merge method 'toy': option gain=5 must lie in \[0, 4\]"):
        validate_merge_options("toy", {"gain": 5})
    with pytest.raises(ValueError, match="twice the floor"):
        validate_merge_options("toy", {"gain": 3.0})
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'scale' for merge method 'toy'; valid options: floor"):
        validate_merge_options("toy", {"scale": 1.0})
    tvs = [{"w": t} for t in _taus(4, 3, 2)]
    with pytest.raises(ValueError, match="'toy' needs 2 to 3 task vectors, got K = 4"):
        merge("toy", tvs)
    out = merge("toy", tvs[:2], gain=2.0)
    torch.testing.assert_close(out["w"], tvs[0]["w"] + tvs[1]["w"])
    with pytest.raises(ValueError, match="needs the base model"):
        merge("toy", tvs[:2], from_base=True)
    base = {"w": torch.ones(3, 2)}
    full = merge_models(base, [{"w": base["w"] + tv["w"]} for tv in tvs[:2]], "toy", from_base=True)
    assert full["w"].shape == (3, 2)


def test_the_decorator_refuses_options_without_a_rule_and_duplicate_names(scratch_registry):
    with pytest.raises(TypeError, match="option 'alpha' needs a default and one rule"):
        @merge_method(name="no_rule", paper="-")
        def no_rule(taus, *, name: str = "", alpha: float = 0.5):
            """-"""

    with pytest.raises(ValueError, match="merge method 'ties' is registered twice"):
        @merge_method(name="ties", paper="-")
        def again(taus, *, name: str = ""):
            """-"""
