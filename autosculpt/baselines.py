"""Baselines that reach a speed budget without the learned search, for honest comparisons.

Each baseline gets the same budget as :func:`autosculpt.search`: a target speedup of the pruned model
over the dense one, checked with the same latency model (a measured ``LatencyModel`` or the
deterministic ``FlopsLatencyModel``) at the same example input, and judged by the search's own plan
selection (:func:`autosculpt.search.select_plan`) with the same
:class:`~autosculpt.search.SelectionSettings` (default: the search's defaults).

- :func:`uniform_baseline`: the same pattern mix in every prunable conv
  (:func:`autosculpt.plan.uniform_plan`); the kept fraction is the largest one whose predicted
  latency meets the budget (bisection), then the plan is measured end to end; if the measurement
  misses, the limit is tightened by the measured/predicted ratio and the bisection repeated.
- :func:`l1_filter_baseline`: L1-norm filter pruning (Li et al., 2017) with channels physically
  removed by `torch-pruning <https://github.com/VainF/Torch-Pruning>`_ (an optional dependency: the
  ``bench`` extra); the same pruning ratio in every layer, bisected until the MEASURED speedup meets
  the budget.
- :func:`random_search`: random plans over the search's own action space
  (:class:`autosculpt.rl.env.PruningEnv`, one uniformly random mix per layer), as many distinct plans
  as the search evaluated, aiming past the budget by the same margin, then the search's own selection
  (most accurate plan meeting the budget by prediction and when measured).

None of them fine-tunes: the caller fine-tunes every method's result the same way.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .budget import Budget
from .patterns import PAPER6, PatternSet
from .plan import sparsify, uniform_plan

__all__ = ["BaselineResult", "uniform_baseline", "l1_filter_prune", "l1_filter_baseline", "random_search"]


@dataclass
class BaselineResult:
    """What a baseline chose.

    Attributes:
        method: "uniform" or "l1_filter".
        model: the pruned model (sparsified, or with channels removed), not fine-tuned.
        plan: the pattern plan (uniform) or None (filter pruning changes the architecture).
        setting: the knob the bisection chose (kept fraction, or filter pruning ratio).
        predicted_ms: the latency model's prediction (None where it cannot predict: filter pruning).
        measured_ms, dense_measured_ms: end-to-end measurement with the latency model's ``measure_model``.
        measured_speedup: ``dense_measured_ms / measured_ms``.
        met_budget: the measured speedup meets the target (``SelectionSettings.meets``: ≥ target ×
            (1 - tolerance)), judged by :func:`autosculpt.search.select_plan`.
        trials: every setting tried, with its latency numbers.
        wall_time_s: time the baseline took.
    """

    method: str
    model: nn.Module
    plan: Optional[dict]
    setting: float
    predicted_ms: Optional[float]
    measured_ms: float
    dense_measured_ms: float
    measured_speedup: float
    met_budget: bool
    trials: List[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


def _check_target(target_speedup) -> float:
    if not isinstance(target_speedup, (int, float)) or isinstance(target_speedup, bool) or not target_speedup > 1:
        raise ValueError(f"target_speedup: expected a number > 1 (e.g. 2.0), got {target_speedup!r}")
    return float(target_speedup)


def _selection(selection, tolerance):
    """The selection settings a baseline judges its plan by: ``selection`` (default: the search's), with
    ``tolerance`` instead of its own when one is given."""
    from .search import SelectionSettings

    settings = SelectionSettings() if selection is None else selection
    if not isinstance(settings, SelectionSettings):
        raise TypeError(f"selection: expected a SelectionSettings, got {type(settings).__name__}")
    if tolerance is not None:
        if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
            raise ValueError(f"tolerance: expected a fraction in [0, 1), got {tolerance!r}")
        settings = dataclasses.replace(settings, tolerance=float(tolerance))
    return settings


def _ensure_profiled(latency_model, model: nn.Module, example_input: torch.Tensor) -> None:
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a torch.Tensor, got {type(example_input).__name__}")
    if not latency_model.layers:
        latency_model.profile(model, example_input)


def _largest_meeting(predict, limit: float, lo: float, hi: float, iters: int) -> float:
    """Largest x in [lo, hi] with predict(x) <= limit, assuming predict grows with x (bisection);
    ``lo`` when even ``lo`` misses."""
    if predict(hi) <= limit:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if predict(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def uniform_baseline(model: nn.Module, latency_model, example_input: torch.Tensor, target_speedup: float, *,
                     pattern_set: PatternSet = PAPER6, tolerance: Optional[float] = None, iters: int = 16,
                     max_refits: int = 3, min_kept: float = 1.0 / 9, selection=None) -> BaselineResult:
    """Uniform pattern plan meeting ``target_speedup`` (see the module docstring).

    Args:
        model: the trained dense model (not modified).
        latency_model: a ``LatencyModel`` or ``FlopsLatencyModel`` (profiled here if it is not yet).
        example_input: the batch the budget is measured at.
        target_speedup: dense / pruned latency to reach (> 1).
        pattern_set: the patterns (the search's by default).
        tolerance: measured speedup may fall short of the target by this fraction (noise); None: the
            selection's (the search's: ``SelectionSettings.tolerance``).
        iters: bisection steps on the kept fraction.
        max_refits: how often the limit is tightened when the measurement misses the prediction.
        min_kept: the smallest kept fraction tried (below one tap in nine the network is gone).
        selection: the :class:`~autosculpt.search.SelectionSettings` each bisected plan is measured and
            judged with (:func:`~autosculpt.search.select_plan`); default: the search's.
    """
    from .search import select_plan

    t0 = time.perf_counter()
    target = _check_target(target_speedup)
    settings = _selection(selection, tolerance)
    budget = Budget(target_speedup=target)
    _ensure_profiled(latency_model, model, example_input)
    model = copy.deepcopy(model).eval()
    plans = {}

    def plan_for(f: float) -> dict:
        key = round(f, 6)
        if key not in plans:
            plans[key] = uniform_plan(model, pattern_set, key, layers=set(latency_model.layers))
        return plans[key]

    predicted = lambda f: latency_model.predict(plan_for(f))  # noqa: E731
    limit = latency_model.dense_ms() / target
    trials: List[dict] = []
    best = None
    for _ in range(max_refits + 1):
        f = _largest_meeting(predicted, limit, min_kept, 1.0, iters)
        plan = plan_for(f)
        _, v, ok, _ = select_plan([plan], budget, settings, warn=False,
                                  verify=lambda p: latency_model.verify(model, p, example_input))
        trials.append({"kept_fraction": f, "limit_ms": limit, **v, "met_budget": ok})
        if best is None or ok or v["measured_speedup"] > best[1]["measured_speedup"]:
            best = (f, v, ok)
        if ok or f <= min_kept + 1e-9:
            break
        # the kernels ran slower than predicted: ask the prediction for proportionally more
        limit *= v["predicted_ms"] / v["measured_ms"] * v["dense_measured_ms"] / v["dense_predicted_ms"]
    f, v, ok = best
    plan = plan_for(f)
    return BaselineResult("uniform", sparsify(model, plan), plan, f, v["predicted_ms"], v["measured_ms"],
                          v["dense_measured_ms"], v["measured_speedup"], ok, trials, time.perf_counter() - t0)


def _classifier_layers(model: nn.Module) -> List[nn.Module]:
    """The output layer (last Linear, or last conv if there is no Linear): its outputs are the classes."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return [linears[-1]]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1:]


def l1_filter_prune(model: nn.Module, example_input: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the channels of every prunable group removed, smallest
    filter L1 norm first (torch-pruning's dependency graph keeps residual connections consistent); the output
    layer keeps its classes. Needs the ``torch-pruning`` package."""
    from ._optional import require

    tp = require("torch_pruning", what="l1_filter_prune (torch-pruning)")
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio: expected the fraction of channels to remove, in [0, 1), got {ratio!r}")
    pruned = copy.deepcopy(model).eval()
    if ratio == 0:
        return pruned
    # Li et al.'s criterion: the L1 norm of the filters of the group's first conv only (torch-pruning's
    # default would also add the consumer's input weights and the BN scales)
    importance = tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first")
    pruner = tp.pruner.MetaPruner(pruned, example_input, importance=importance,
                                  pruning_ratio=float(ratio), ignored_layers=_classifier_layers(pruned),
                                  global_pruning=False)
    pruner.step()
    return pruned


def l1_filter_baseline(model: nn.Module, latency_model, example_input: torch.Tensor, target_speedup: float, *,
                       tolerance: Optional[float] = None, iters: int = 8, max_ratio: float = 0.9, reps: int = 20,
                       selection=None) -> BaselineResult:
    """L1 filter pruning whose MEASURED speedup (``latency_model.measure_model``, dense re-measured
    beside each candidate) meets ``target_speedup``: the largest-remaining model found by bisection
    on the channel ratio (see :func:`l1_filter_prune`). Each ratio is judged by
    :func:`~autosculpt.search.select_plan` with ``selection`` (default: the search's settings; a
    ``tolerance`` given here replaces its tolerance)."""
    from .search import select_plan

    t0 = time.perf_counter()
    target = _check_target(target_speedup)
    settings = _selection(selection, tolerance)
    budget = Budget(target_speedup=target)
    _ensure_profiled(latency_model, model, example_input)
    model = copy.deepcopy(model).eval()
    trials: List[dict] = []
    cache = {}

    def measure(r: float) -> dict:
        key = round(r, 6)
        if key not in cache:
            pruned = l1_filter_prune(model, example_input, key)
            with torch.no_grad():
                ms = latency_model.measure_model(pruned, example_input, reps=reps)
                dense_ms = latency_model.measure_model(model, example_input, reps=reps)
            rec = {"ratio": key, "measured_ms": ms, "dense_measured_ms": dense_ms, "measured_speedup": dense_ms / ms}
            # measured once (the timing is cached per ratio), judged like every other plan
            rec["met_budget"] = select_plan([rec], budget, settings, verify=lambda r: r, warn=False).met_budget
            trials.append(rec)
            cache[key] = (pruned, rec)
        return cache[key][1]

    # bisection on the ratio (speedup grows with it): the smallest ratio whose measurement meets the budget
    lo, hi = 0.0, max_ratio
    if measure(hi)["met_budget"]:
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if measure(mid)["met_budget"]:
                hi = mid
            else:
                lo = mid
        chosen = hi
    else:
        chosen = max(cache, key=lambda k: cache[k][1]["measured_speedup"])
    pruned, rec = cache[round(chosen, 6)]
    return BaselineResult("l1_filter", pruned, None, rec["ratio"], None, rec["measured_ms"], rec["dense_measured_ms"],
                          rec["measured_speedup"], rec["met_budget"], trials, time.perf_counter() - t0)


def random_search(model: nn.Module, train_data, val_data, *, num_plans: int, latency_model, example_input: torch.Tensor,
                  target_speedup: Optional[float] = None, target_latency_ms: Optional[float] = None,
                  target_flops_ratio: Optional[float] = None, seed: int = 0, pattern_set: PatternSet = PAPER6,
                  bn_batches: int = 2, penalty: float = 2.0, selection=None, max_draws_factor: int = 20):
    """Random search over the search's action space; returns an ``autosculpt.search.SearchResult``.

    Draws one uniformly random mix per prunable layer until ``num_plans`` distinct plans were
    evaluated by :class:`~autosculpt.rl.env.PruningEnv` (same BN recalibration, validation accuracy
    and latency prediction as the search, aiming past a speed budget by the same margin), then selects
    exactly like the search does (:func:`autosculpt.search.select_plan` with the same
    ``selection``, default the search's :class:`~autosculpt.search.SelectionSettings`): the most
    accurate plan meeting the budget by prediction, confirmed by an end-to-end measurement.
    """
    from .rl.env import PruningEnv
    from .search import SearchResult, select_plan
    from .train import evaluate

    t0 = time.perf_counter()
    if not isinstance(num_plans, int) or isinstance(num_plans, bool) or num_plans < 1:
        raise ValueError(f"num_plans: expected a positive int, got {num_plans!r}")
    budget = Budget(target_speedup, target_latency_ms, target_flops_ratio)
    settings = _selection(selection, None)
    _ensure_profiled(latency_model, model, example_input)
    model = copy.deepcopy(model).eval()
    env = PruningEnv(model, train_data, val_data, latency_model, example_input, budget.with_margin(settings.margin),
                     pattern_set,
                     bn_batches=bn_batches, penalty=penalty, seed=seed)
    gen = torch.Generator().manual_seed(int(seed))
    draws = 0
    while len(env.evaluations) < num_plans and draws < num_plans * max_draws_factor:
        action = torch.randint(len(env.menu), (env.num_layers,), generator=gen)
        env.record_for(action)
        draws += 1
    history = sorted(env.evaluations.values(), key=lambda r: r["index"])
    dense = {"val_acc": evaluate(model, val_data), "predicted_ms": env.dense_ms, "measured_ms": None,
             "flops": env.dense_flops}
    best, verification, met, checked = select_plan(env.in_budget_by_accuracy(), budget, settings,
                                                   verify=env.verify_record, on_measured=env.note_measured,
                                                   fallback=env.best_by_reward())
    if checked:
        dense["measured_ms"] = checked[-1][1]["dense_measured_ms"]
    return SearchResult(
        best_plan=env.plan_for(best["action"]), best_record=best, history=history,
        budget={**budget.as_dict(), "margin": settings.margin, "limit": env.limit, "uses_flops": budget.uses_flops},
        dense=dense, met_budget=met, verification=verification,
        settings={"seed": seed, "num_plans": num_plans, "draws": draws, "method": "random",
                  "selection": dataclasses.asdict(settings)},
        wall_time_s=time.perf_counter() - t0,
    )
