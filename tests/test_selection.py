"""One plan selection (``autosculpt.search.select_plan``) with one settings object, shared by the search,
``random_search``, the other baselines and bench/compare.py."""
import dataclasses
import importlib
import warnings

import pytest
import torch

import autosculpt as asc
from autosculpt.budget import Budget
from autosculpt.search import Selection, SelectionSettings, select_plan

search_module = importlib.import_module("autosculpt.search")


def _timer(speedups):
    """verify(name) returning the next measured speedup of that candidate (a list per candidate)."""
    left = {k: list(v) for k, v in speedups.items()}
    calls = []

    def verify(name):
        calls.append(name)
        sp = left[name].pop(0)
        return {"measured_speedup": sp, "measured_ms": 10.0 / sp, "dense_measured_ms": 10.0, "predicted_speedup": 2.2}

    return verify, calls


def test_first_candidate_beating_the_budget_by_half_the_margin_wins():
    settings = SelectionSettings(margin=0.2, verify_top=5, tolerance=0.0)
    # "a" meets 2x but not 2.2x (margin / 2 = 0.1): "b" beats it and wins although it is second
    verify, calls = _timer({"a": [2.05, 2.05], "b": [2.3, 2.25], "c": [3.0, 3.0]})
    sel = select_plan(["a", "b", "c"], Budget(target_speedup=2.0), settings, verify=verify)
    assert isinstance(sel, Selection) and sel.choice == "b" and sel.met_budget
    assert sel.verification["measured_speedup"] == 2.25  # timed twice, judged by the slower timing
    assert calls == ["a", "a", "b", "b"] and [c for c, _ in sel.checked] == ["a", "b"]


def test_otherwise_the_first_that_meets_then_the_fastest():
    settings = SelectionSettings(margin=0.2, verify_top=2, tolerance=0.0)
    verify, _ = _timer({"a": [1.9], "b": [2.05, 2.1], "c": [5.0, 5.0]})
    sel = select_plan(["a", "b", "c"], Budget(target_speedup=2.0), settings, verify=verify)
    assert sel.choice == "b" and sel.met_budget  # "c" is beyond verify_top
    verify, _ = _timer({"a": [1.8], "b": [1.9]})
    with pytest.warns(RuntimeWarning, match="none of the 2"):
        sel = select_plan(["a", "b"], Budget(target_speedup=2.0), settings, verify=verify)
    assert sel.choice == "b" and not sel.met_budget
    # tolerance: 1.9 >= 2 * (1 - 0.05)
    verify, _ = _timer({"a": [1.9, 1.9]})
    assert select_plan(["a"], Budget(target_speedup=2.0), dataclasses.replace(settings, tolerance=0.05),
                       verify=verify).met_budget


def test_latency_and_flops_budgets_fallback_and_bad_settings():
    verify, _ = _timer({"a": [2.0, 2.0]})  # 5 ms
    assert select_plan(["a"], Budget(target_latency_ms=5.0), SelectionSettings(margin=0.0), verify=verify).met_budget
    verify, calls = _timer({"a": [1.01]})
    sel = select_plan(["a"], Budget(target_flops_ratio=0.5), verify=verify)
    assert sel.met_budget and calls == ["a"]  # FLOPs are exact: measured once, met
    with pytest.warns(RuntimeWarning, match="no evaluated plan meets the budget"):
        sel = select_plan([], Budget(target_speedup=2.0), verify=verify, fallback={"predicted_speedup": 1.5})
    assert sel == Selection({"predicted_speedup": 1.5}, None, False, [])
    with pytest.raises(ValueError, match="no candidates"):
        select_plan([], Budget(target_speedup=2.0), verify=verify)
    with pytest.raises(ValueError, match="margin"):
        SelectionSettings(margin=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        SelectionSettings(tolerance=-0.1)


def test_defaults_are_the_searchs_and_compares():
    assert SelectionSettings() == SelectionSettings(margin=asc.config.DEFAULTS["margin"], verify_top=5, tolerance=0.0)
    import bench.compare as cmp

    assert cmp.SELECTION == SelectionSettings() and cmp.TOLERANCE == SelectionSettings().tolerance


@pytest.fixture(scope="module")
def tiny():
    from autosculpt.data.digits import load_digits_splits
    from autosculpt.models import get_model

    torch.manual_seed(0)
    train, val, _ = load_digits_splits(0)
    x = torch.stack([train[i][0] for i in range(8)])
    return get_model("digits_cnn", channels=(8, 16, 16, 16)).eval(), train, val, x


def test_random_search_and_the_search_select_with_identical_settings(tiny, monkeypatch):
    pytest.importorskip("torch_geometric")
    from autosculpt.baselines import random_search, uniform_baseline
    from autosculpt.rl.ppo import PPOConfig
    from autosculpt.runtime.latency import FlopsLatencyModel

    model, train, val, x = tiny
    calls = []
    real = search_module.select_plan

    def recording(candidates, budget, settings=None, **kw):
        calls.append((kw.get("warn", True), budget, settings))
        return real(candidates, budget, settings, **kw)

    monkeypatch.setattr(search_module, "select_plan", recording)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cfg = PPOConfig(num_steps=2, num_minibatches=1, update_epochs=1)
            res = asc.search(model, train, val, target_speedup=2.0, episodes=2, progress=False, bn_batches=1,
                             latency_model=FlopsLatencyModel(), example_input=x, ppo_config=cfg)
            rnd = random_search(model, train, val, num_plans=2, latency_model=FlopsLatencyModel(), example_input=x,
                                target_speedup=2.0, bn_batches=1)
            uni = uniform_baseline(model, FlopsLatencyModel(), x, 2.0)
    finally:
        torch.set_num_threads(old)
    assert len(calls) >= 3
    (_, b_search, s_search), (_, b_random, s_random) = calls[0], calls[1]
    assert s_search == s_random == SelectionSettings() and b_search == b_random == Budget(target_speedup=2.0)
    assert all(s == s_search for _, _, s in calls[2:])  # the uniform baseline judges its plans alike
    # both aim past the budget by the same margin
    assert res.budget["margin"] == rnd.budget["margin"] == s_search.margin
    assert res.budget["limit"] == pytest.approx(rnd.budget["limit"])
    assert uni.trials  # measured and judged (2x is out of reach with this latency model's fixed costs)
