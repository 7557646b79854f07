"""Pruning plans: plain JSON data saying how each prunable module is sparsified, and ``sparsify``.

A plan is ``{"version": 1, "layers": {module_name: layer_plan}}``. Each ``layer_plan`` has a
``"kind"``; the kinds register an ``apply`` function here (``register_kind``) from the modules that
define their layers, so this module imports none of them (``import autosculpt`` imports
:mod:`autosculpt.nn`, which registers them all, before anything can call :func:`sparsify`):

- ``"conv"`` (:mod:`autosculpt.nn.conv`): ``{"kind": "conv", "pattern_set": PatternSet.to_json(),
  "pattern_ids": [C_out ints]}`` turns an ``nn.Conv2d`` into a ``PatternConv2d`` with
  ``tap_mask = masks[pattern_ids]``.
- ``"attention"`` and ``"linear"`` (:mod:`autosculpt.nn.attention`, :mod:`autosculpt.nn.linear`).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict

import torch
from torch import nn

from .patterns import PatternSet

PLAN_VERSION = 1
# kind -> fn(module, layer_plan, backend) -> replacement module
_KINDS: Dict[str, Callable[[nn.Module, dict, str], nn.Module]] = {}


def plan_int(value, name: str) -> int:
    """An integer field of a plan: a JSON integer (``3`` or ``3.0``), never a bool or a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def plan_bool(value, name: str) -> bool:
    """A boolean field of a plan: JSON ``true``/``false`` only (``"no"`` is not ``True``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value


def register_kind(kind: str, apply: Callable[[nn.Module, dict, str], nn.Module]) -> None:
    """Registers how layer plans of ``kind`` turn a module into its sparse replacement."""
    _KINDS[kind] = apply


def conv_layer_plan(pattern_set: PatternSet, pattern_ids) -> dict:
    """The layer plan for a conv whose filters get ``pattern_ids`` from ``pattern_set``."""
    return {"kind": "conv", "pattern_set": pattern_set.to_json(), "pattern_ids": [int(i) for i in pattern_ids]}


def validate_plan(plan: dict) -> dict:
    """Checks a plan's structure (not against a model); returns it. Raises ValueError on bad data."""
    if not isinstance(plan, dict):
        raise ValueError(f"plan: expected a dict, got {type(plan).__name__}")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"plan: expected version {PLAN_VERSION}, got {plan.get('version')!r}")
    layers = plan.get("layers")
    if not isinstance(layers, dict):
        raise ValueError("plan: 'layers' must be a dict of module name -> layer plan")
    for name, layer in layers.items():
        if not isinstance(name, str) or not isinstance(layer, dict):
            raise ValueError(f"plan: layer {name!r} must map a module name to a dict")
        kind = layer.get("kind")
        if kind not in _KINDS:
            raise ValueError(f"plan: layer {name!r} has unknown kind {kind!r} (known: {sorted(_KINDS)})")
    return plan


def sparsify(model: nn.Module, plan: dict, *, inplace: bool = False, backend: str = "auto") -> nn.Module:
    """Applies a plan to a model: each named module is replaced by its pattern-sparse version.

    Args:
        model: any ``nn.Module`` whose submodule names match the plan's.
        plan: a plan dict (see module docstring); validated first.
        inplace: modify ``model`` itself instead of a deep copy.
        backend: kernel backend for the new layers.
    """
    validate_plan(plan)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    for name, layer in plan["layers"].items():
        if name not in modules:
            raise KeyError(f"plan: module {name!r} not found in {type(model).__name__}")
        replacement = _KINDS[layer["kind"]](modules[name], layer, backend)
        set_submodule(target, name, replacement)
    return target


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the submodule ``name`` (dotted, e.g. ``"layer1.0.conv1"``) of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def dense_plan(model: nn.Module, pattern_set: PatternSet) -> dict:
    """A plan that keeps every tap of every conv matching ``pattern_set``'s kernel (the identity plan)."""
    full = int(torch.argmax(pattern_set.kept_taps()))
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == pattern_set.kernel_size:
            layers[name] = conv_layer_plan(pattern_set, [full] * m.out_channels)
    return {"version": PLAN_VERSION, "layers": layers}


def level_counts(pattern_set: PatternSet, n_filters: int, kept_fraction: float) -> list:
    """How many of ``n_filters`` get each pattern so the mean kept fraction is ``kept_fraction``.

    Uses the two kept-fraction levels of the set that bracket the target (e.g. PAPER6's 1/3 and 2/3
    for 0.5), and spreads each level's filters evenly over the patterns of that level. The result's
    kept fraction is the closest reachable with whole filters.
    """
    if not 0.0 <= kept_fraction <= 1.0:
        raise ValueError(f"kept_fraction: expected a value in [0, 1], got {kept_fraction}")
    fr = pattern_set.kept_fractions().tolist()
    levels = sorted(set(fr))
    hi = next(level for level in levels if level >= kept_fraction - 1e-12)
    lo = max((level for level in levels if level <= kept_fraction + 1e-12), default=hi)
    if hi == lo:
        n_hi = n_filters
    else:
        n_hi = int(round(n_filters * (kept_fraction - lo) / (hi - lo)))
    counts = [0] * len(pattern_set)
    for level, n in ((hi, n_hi), (lo, n_filters - n_hi)):
        if n == 0:
            continue
        members = [i for i, f in enumerate(fr) if f == level]
        for j, p in enumerate(members):
            counts[p] += n // len(members) + (1 if j < n % len(members) else 0)
    return counts


def uniform_plan(model: nn.Module, pattern_set: PatternSet, kept_fraction: float, layers=None) -> dict:
    """The same pattern mix in every prunable conv (kernel matching the set), filters assigned by
    weight energy (:func:`autosculpt.patterns.assign`). ``layers`` restricts it to some module names."""
    from .patterns import assign

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or tuple(m.kernel_size) != pattern_set.kernel_size:
            continue
        if layers is not None and name not in layers:
            continue
        counts = level_counts(pattern_set, m.out_channels, kept_fraction)
        out[name] = conv_layer_plan(pattern_set, assign(m.weight, pattern_set, counts))
    return {"version": PLAN_VERSION, "layers": out}
