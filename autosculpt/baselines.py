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
- :func:`taylor_filter_baseline`: the same with torch-pruning's first-order Taylor importance
  (Molchanov et al., 2019: ``|w · ∂L/∂w|`` over each dependency group), gradients from a few training
  batches.
- :func:`halp_greedy`: a latency-lookup-table greedy pruner after HALP (Shen et al., 2022) over the
  pattern action space: starting dense, repeatedly lowers the kept fraction of the layer whose next
  step loses the least importance per millisecond saved (the saving read from the latency model's
  per-layer table), until the predicted latency meets the budget; then measured end to end.
- :func:`random_search`: random plans over the search's own action space
  (:class:`autosculpt.rl.env.PruningEnv`, one uniformly random mix per layer), as many distinct plans
  as the search evaluated, aiming past the budget by the same margin, then the search's own selection
  (most accurate plan meeting the budget by prediction and when measured).

- :func:`mlp_encoder`: the encoder of the "no GNN" ablation of the search (``autosculpt.search(...,
  encoder=mlp_encoder())``): the policy sees each layer's own features, not its neighbours'.

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

__all__ = ["BaselineResult", "uniform_baseline", "filter_prune", "l1_filter_prune", "l1_filter_baseline",
           "taylor_filter_baseline", "taylor_gradients", "tap_importance", "halp_greedy", "random_search",
           "mlp_encoder"]


@dataclass
class BaselineResult:
    """What a baseline chose.

    Attributes:
        method: "uniform", "l1_filter", "taylor_filter" or "halp".
        model: the pruned model (sparsified, or with channels removed), not fine-tuned.
        plan: the pattern plan (uniform) or None (filter pruning changes the architecture).
        setting: the knob the bisection chose (kept fraction, or filter pruning ratio).
        predicted_ms: the latency model's prediction (None where it cannot predict: filter pruning).
        measured_ms, dense_measured_ms: end-to-end measurement of the pruned and the dense model, interleaved
            (the latency model's ``verify`` or ``measure_models``).
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


def taylor_gradients(model: nn.Module, train_data, *, batches: int = 4, batch_size: int = 64,
                     seed: int = 0) -> dict:
    """``{parameter name: list of per-batch gradients}`` of the cross-entropy loss on ``batches``
    training batches (a seeded random draw of ``train_data``), the model in eval mode (BatchNorm
    statistics untouched). The input of Taylor importances; the model is not modified."""
    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches: expected a positive int, got {batches!r}")
    net = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(train_data), generator=gen)[: batches * batch_size].tolist()
    grads: dict = {n: [] for n, p in net.named_parameters() if p.requires_grad}
    for b in range(0, len(idx), batch_size):
        items = [train_data[i] for i in idx[b:b + batch_size]]
        x = torch.stack([t[0] for t in items])
        y = torch.as_tensor([int(t[1]) for t in items])
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        for n, p in net.named_parameters():
            if n in grads:
                grads[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    return grads


def _importance(kind: str):
    from ._optional import require

    tp = require("torch_pruning", what="filter pruning (torch-pruning)")
    if kind == "l1":
        # Li et al.'s criterion: the L1 norm of the filters of the group's first conv only (torch-pruning's
        # default would also add the consumer's input weights and the BN scales)
        return tp, tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first")
    if kind == "taylor":
        # torch-pruning's first-order Taylor importance with its defaults (mean over the group, mean-normalised)
        return tp, tp.importance.TaylorImportance()
    raise ValueError(f"importance: expected 'l1' or 'taylor', got {kind!r}")


def filter_prune(model: nn.Module, example_input: torch.Tensor, ratio: float, importance: str = "l1",
                 gradients: Optional[dict] = None) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the channels of every prunable group removed, least
    important first (torch-pruning's dependency graph keeps residual connections consistent); the
    output layer keeps its classes. ``importance`` "l1" (filter L1 norm) or "taylor" (needs
    ``gradients`` from :func:`taylor_gradients`: their sum over batches is what torch-pruning's
    ``TaylorImportance`` reads as ``.grad``). Needs the ``torch-pruning`` package."""
    tp, imp = _importance(importance)
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio: expected the fraction of channels to remove, in [0, 1), got {ratio!r}")
    if importance == "taylor" and gradients is None:
        raise ValueError("gradients: Taylor importance needs the gradients of taylor_gradients(model, train_data)")
    pruned = copy.deepcopy(model).eval()
    if ratio == 0:
        return pruned
    if gradients is not None:
        for n, p in pruned.named_parameters():
            if n in gradients:
                p.grad = torch.stack(gradients[n]).sum(0)
    pruner = tp.pruner.MetaPruner(pruned, example_input, importance=imp,
                                  pruning_ratio=float(ratio), ignored_layers=_classifier_layers(pruned),
                                  global_pruning=False)
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned


def l1_filter_prune(model: nn.Module, example_input: torch.Tensor, ratio: float) -> nn.Module:
    """:func:`filter_prune` with the filters' L1 norm (Li et al., 2017)."""
    return filter_prune(model, example_input, ratio, "l1")


def _filter_baseline(method: str, model: nn.Module, latency_model, example_input: torch.Tensor, target_speedup: float,
                     importance: str, gradients: Optional[dict], tolerance, iters, max_ratio, reps,
                     selection) -> BaselineResult:
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
            pruned = filter_prune(model, example_input, key, importance, gradients)
            with torch.no_grad():  # interleaved, as the final measurement: a load change hits both alike
                ms, dense_ms = latency_model.measure_models([pruned, model], example_input, reps=reps)
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
    return BaselineResult(method, pruned, None, rec["ratio"], None, rec["measured_ms"], rec["dense_measured_ms"],
                          rec["measured_speedup"], rec["met_budget"], trials, time.perf_counter() - t0)


def l1_filter_baseline(model: nn.Module, latency_model, example_input: torch.Tensor, target_speedup: float, *,
                       tolerance: Optional[float] = None, iters: int = 8, max_ratio: float = 0.9, reps: int = 20,
                       selection=None) -> BaselineResult:
    """L1 filter pruning whose MEASURED speedup (``latency_model.measure_models``: each candidate and the
    dense model timed interleaved) meets ``target_speedup``: the largest-remaining model found by bisection
    on the channel ratio (see :func:`l1_filter_prune`). Each ratio is judged by
    :func:`~autosculpt.search.select_plan` with ``selection`` (default: the search's settings; a
    ``tolerance`` given here replaces its tolerance)."""
    return _filter_baseline("l1_filter", model, latency_model, example_input, target_speedup, "l1", None,
                            tolerance, iters, max_ratio, reps, selection)


def taylor_filter_baseline(model: nn.Module, latency_model, example_input: torch.Tensor, target_speedup: float, *,
                           train_data, grad_batches: int = 4, seed: int = 0, tolerance: Optional[float] = None,
                           iters: int = 8, max_ratio: float = 0.9, reps: int = 20, selection=None) -> BaselineResult:
    """As :func:`l1_filter_baseline` with torch-pruning's Taylor importance, its gradients from
    ``grad_batches`` batches of ``train_data`` (:func:`taylor_gradients`, seeded by ``seed``)."""
    grads = taylor_gradients(model, train_data, batches=grad_batches, seed=seed)
    return _filter_baseline("taylor_filter", model, latency_model, example_input, target_speedup, "taylor", grads,
                            tolerance, iters, max_ratio, reps, selection)


# --------------------------------------------------------------------------- HALP-style greedy


def tap_importance(model: nn.Module, layers, kind: str = "taylor", gradients: Optional[dict] = None) -> dict:
    """``{layer: (C_out, kh, kw) importance of each tap}`` for the named convs: "taylor" the
    first-order Taylor estimate of the loss change when the tap's weights are zeroed,
    ``Σ_batches Σ_c_in (w · ∂L/∂w)²`` (Molchanov et al., 2019; ``gradients`` from
    :func:`taylor_gradients`), comparable across layers; "magnitude" ``Σ_c_in w²`` divided by the
    layer's total (each layer's share of its own weight energy)."""
    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        w = mods[name].weight.detach().double()
        if kind == "taylor":
            if gradients is None:
                raise ValueError("gradients: Taylor importance needs the gradients of taylor_gradients(model, train_data)")
            gs = gradients[f"{name}.weight"]
            out[name] = sum((w * g.double()).pow(2) for g in gs).sum(1)
        elif kind == "magnitude":
            e = w.pow(2).sum(1)
            out[name] = e / e.sum().clamp_min(1e-30)
        else:
            raise ValueError(f"importance: expected 'taylor' or 'magnitude', got {kind!r}")
    return out


def halp_greedy(model: nn.Module, latency_model, example_input: torch.Tensor, target_speedup: float, *,
                train_data=None, importance="taylor", grad_batches: int = 4, seed: int = 0,
                pattern_set: PatternSet = PAPER6, steps_per_level: int = 4, min_kept: float = 1.0 / 9,
                tolerance: Optional[float] = None, max_refits: int = 3, selection=None) -> BaselineResult:
    """Latency-lookup-table greedy pruning (after HALP, Shen et al. 2022) in the pattern action space.

    Every prunable conv (a layer the latency model profiled) moves down a ladder of kept fractions,
    ``1, 1 - d, 1 - 2d, ... ≥ min_kept`` with ``d = (gap between the pattern set's kept-fraction
    levels) / steps_per_level``; at each kept fraction its filters get patterns by
    :func:`autosculpt.plan.level_counts` and :func:`autosculpt.patterns.assign`, keeping the most
    important taps. Starting dense, each step takes, over all layers, the move to the layer's next
    rung that saves time (the first lower rung whose lookup-table latency,
    ``latency_model.layer_ms``, is smaller: a sparse kernel slower than the dense conv saves
    nothing) with the least importance lost per millisecond saved, until the predicted latency is
    within ``dense_ms / target``. The plan is then measured end to end and judged by
    :func:`~autosculpt.search.select_plan` with ``selection`` (the search's settings by default); if
    the measurement misses, the limit is tightened by the measured/predicted ratio and the greedy
    continues from where it stopped (at most ``max_refits`` times).

    Args:
        importance: "taylor" (needs ``train_data``: gradients of ``grad_batches`` batches), "magnitude",
            or a ``{layer: (C_out, kh, kw) tensor}`` of tap importances (see :func:`tap_importance`).

    Returns a :class:`BaselineResult` (method "halp"; ``setting`` the plan's mean kept fraction over
    the prunable filters); ``trials`` holds one entry per end-to-end check, the last one with
    ``steps_taken``: every greedy step (layer, rungs, importance lost, milliseconds saved, their
    ratio, and every layer's candidate ratio at that point).
    """
    from .patterns import assign
    from .plan import conv_layer_plan, level_counts
    from .search import select_plan

    t0 = time.perf_counter()
    target = _check_target(target_speedup)
    settings = _selection(selection, tolerance)
    budget = Budget(target_speedup=target)
    if not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"steps_per_level: expected a positive int, got {steps_per_level!r}")
    _ensure_profiled(latency_model, model, example_input)
    model = copy.deepcopy(model).eval()
    layers = list(latency_model.layers)
    if isinstance(importance, str):
        grads = None
        if importance == "taylor":
            if train_data is None:
                raise ValueError("train_data: Taylor importance needs training batches")
            grads = taylor_gradients(model, train_data, batches=grad_batches, seed=seed)
        imp = tap_importance(model, layers, importance, grads)
    else:
        imp = {n: torch.as_tensor(importance[n]).double() for n in layers}
    levels = sorted(set(pattern_set.kept_fractions().tolist()))
    gap = min((b - a for a, b in zip(levels, levels[1:]) if b - a > 1e-9), default=1.0)
    d = gap / steps_per_level
    ladder = [1.0 - k * d for k in range(int((1.0 - min_kept) / d + 1e-9) + 1)]
    mods = dict(model.named_modules())
    masks = pattern_set.masks.double()

    rungs: dict = {}  # (layer, rung) -> (pattern ids, kept importance, ms)

    def rung(name: str, k: int):
        if (name, k) not in rungs:
            w = mods[name].weight
            counts = level_counts(pattern_set, w.shape[0], ladder[k])
            score = imp[name]
            ids = assign(score.sqrt().unsqueeze(1).to(w.dtype), pattern_set, counts)  # maximises kept importance
            mask = masks[ids]
            kept = float((score * mask).sum())
            rungs[(name, k)] = (ids, kept, latency_model.layer_ms(name, mask.to(torch.float32)))
        return rungs[(name, k)]

    state = {n: 0 for n in layers}

    def plan_of(st):
        return {"version": 1, "layers": {n: conv_layer_plan(pattern_set, rung(n, k)[0]) for n, k in st.items() if k > 0}}

    def candidate(name: str):
        k0 = state[name]
        _, imp0, ms0 = rung(name, k0)
        for k in range(k0 + 1, len(ladder)):
            _, imp1, ms1 = rung(name, k)
            if ms0 - ms1 > 1e-12:
                return k, imp0 - imp1, ms0 - ms1
        return None

    predicted = latency_model.predict(plan_of(state))
    limit = latency_model.dense_ms() / target
    steps: List[dict] = []
    trials: List[dict] = []
    best = None
    for _ in range(max_refits + 1):
        while predicted > limit:
            cands = {n: c for n in layers if (c := candidate(n)) is not None}
            if not cands:
                break
            ratios = {n: c[1] / c[2] for n, c in cands.items()}
            name = min(ratios, key=lambda n: (ratios[n], layers.index(n)))
            k, d_imp, d_ms = cands[name]
            steps.append({"layer": name, "from": ladder[state[name]], "to": ladder[k], "importance_lost": d_imp,
                          "ms_saved": d_ms, "ratio": ratios[name], "candidates": ratios})
            state[name] = k
            predicted -= d_ms
        plan = plan_of(state)
        predicted = latency_model.predict(plan)
        _, v, ok, _ = select_plan([plan], budget, settings, warn=False,
                                  verify=lambda p: latency_model.verify(model, p, example_input))
        trials.append({"limit_ms": limit, "steps": len(steps), **v, "met_budget": ok})
        if best is None or ok or v["measured_speedup"] > best[1]["measured_speedup"]:
            best = (plan, v, ok)
        if ok or predicted > limit:  # met, or the ladder is exhausted
            break
        limit *= v["predicted_ms"] / v["measured_ms"] * v["dense_measured_ms"] / v["dense_predicted_ms"]
    plan, v, ok = best
    trials[-1]["steps_taken"] = steps
    fracs = pattern_set.kept_fractions().double()
    kept_taps = sum(float(fracs[torch.as_tensor(plan["layers"][n]["pattern_ids"])].sum()) if n in plan["layers"]
                    else float(mods[n].weight.shape[0]) for n in layers)
    kept = kept_taps / max(sum(mods[n].weight.shape[0] for n in layers), 1)
    return BaselineResult("halp", sparsify(model, plan), plan, kept, v["predicted_ms"], v["measured_ms"],
                          v["dense_measured_ms"], v["measured_speedup"], ok, trials, time.perf_counter() - t0)


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


def mlp_encoder(pattern_set: PatternSet = PAPER6, hidden: int = 64, layers: int = 2) -> nn.Module:
    """An :class:`autosculpt.rl.policy.MLPEncoder` sized for the search's observations with
    ``pattern_set`` (node features + per-layer state columns), for ``autosculpt.search(..., encoder=...)``:
    the ablation of the GNN (same width and depth, no message passing)."""
    from .graph import node_feature_names
    from .rl.env import LAYER_STATE_FEATURES
    from .rl.policy import MLPEncoder

    in_dim = len(node_feature_names(len(pattern_set))) + len(LAYER_STATE_FEATURES) + len(pattern_set)
    return MLPEncoder(in_dim, hidden, layers)
