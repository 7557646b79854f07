"""Latency predictions from a :class:`~autosculpt.runtime.profile.Profile`: pure functions of the
profile and a plan, nothing is timed here.

A layer's predicted time is its dense conv (scaled by ``in_model_factor``) plus the epilogue fusion
would absorb, or its sparse kernel interpolated on the grid (scaled by ``sparse_in_model_factor``),
whichever is faster (``PatternConv2d`` falls back to the dense conv where the kernel would lose). A
model's is the sum over its prunable layers plus the remainder, less the epilogues already charged
to the layers.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

import torch

from ..ops.conv import conv_output_size
from ..patterns import PatternSet, masks_from_ids
from .grid import interpolate, mask_kept_fraction
from .profile import Profile

__all__ = ["plan_tap_masks", "layer_out_shape", "layer_flops", "sparse_layer_ms", "layer_ms", "unfusable_remainder_ms",
           "dense_ms", "predict", "latency_shares", "flops"]

PlanOrMasks = Union[Mapping, Mapping[str, Optional[torch.Tensor]]]


def plan_tap_masks(plan: Mapping) -> Dict[str, torch.Tensor]:
    """The (C_out, kh, kw) tap mask of each conv layer of a plan."""
    out = {}
    for name, layer in plan.get("layers", {}).items():
        if layer.get("kind") == "conv":
            ps = PatternSet.from_json(layer["pattern_set"])
            out[name] = masks_from_ids(ps, layer["pattern_ids"])
    return out


def layer_out_shape(info: dict) -> List[int]:
    """Output shape (N, C_out, OH, OW) of a profiled layer."""
    n, _, h, w = info["in_shape"]
    oh, ow = conv_output_size(h, w, *info["kernel_size"], info["stride"], info["padding"], info["dilation"])
    return [n, info["c_out"], oh, ow]


def layer_flops(info: dict, mask: Optional[torch.Tensor] = None) -> float:
    """Multiply-accumulates a profiled layer runs with ``mask`` (None: dense)."""
    n, _, oh, ow = layer_out_shape(info)
    kh, kw = info["kernel_size"]
    taps = float(mask.sum()) if mask is not None else float(info["c_out"] * kh * kw)
    return taps * (info["c_in"] // info["groups"]) * oh * ow * n


def _known(profile: Profile, name: str) -> None:
    if not profile.layers:
        raise RuntimeError("latency model: call profile(model, example_input) first")
    if name not in profile.layers:
        raise KeyError(f"layer {name!r} is not a profiled prunable layer (known: {list(profile.layers)[:5]}...)")


def sparse_layer_ms(profile: Profile, name: str, tap_mask: torch.Tensor) -> float:
    """The sparse kernel of layer ``name`` at ``tap_mask``'s kept fraction, timed alone (the grid
    interpolated; no in-model factor)."""
    _known(profile, name)
    return interpolate(profile.grid[name], mask_kept_fraction(tap_mask))


def layer_ms(profile: Profile, name: str, tap_mask: Optional[torch.Tensor] = None, path: str = "auto") -> float:
    """Predicted time of layer ``name`` with ``tap_mask`` (None = dense) in ms, with its fusable
    epilogue: separate ops after the dense conv, free in the sparse kernel. ``path`` "auto" takes the
    faster of sparse kernel and dense conv (as ``PatternConv2d`` does), "dense" / "sparse" force one."""
    _known(profile, name)
    dense = profile.in_model_factor * profile.dense_ms[name] + profile.epilogue_ms.get(name, 0.0)
    if tap_mask is None or path == "dense":
        return dense
    sparse = profile.sparse_in_model_factor * sparse_layer_ms(profile, name, tap_mask)
    return sparse if path == "sparse" else min(sparse, dense)


def unfusable_remainder_ms(profile: Profile) -> float:
    """The remainder without the epilogues that are charged to the layers."""
    return max(0.0, profile.remainder_ms - sum(profile.epilogue_ms.values()))


def dense_ms(profile: Profile) -> float:
    """Predicted latency of the dense model (remainder + dense prunable layers) in ms."""
    if not profile.layers:
        raise RuntimeError("latency model: call profile(model, example_input) first")
    return unfusable_remainder_ms(profile) + sum(layer_ms(profile, n) for n in profile.layers)


def predict(profile: Profile, plan_or_masks: PlanOrMasks) -> float:
    """Predicted latency in ms of the model sparsified by a plan (``{"version", "layers"}``; each
    layer's ``"path"`` is honoured), or with a tap mask per layer (``{name: mask or None}``, path
    "auto"). Layers not named run dense."""
    if not profile.layers:
        raise RuntimeError("latency model: call profile(model, example_input) first")
    if "layers" in plan_or_masks and isinstance(plan_or_masks.get("layers"), Mapping):
        masks = plan_tap_masks(plan_or_masks)
        paths = {n: l.get("path", "auto") for n, l in plan_or_masks["layers"].items()}
    else:
        masks, paths = {n: m for n, m in plan_or_masks.items() if m is not None}, {}
    unknown = [n for n in masks if n not in profile.layers]
    if unknown:
        raise KeyError(f"plan: layers {unknown[:3]} are not prunable layers of the profiled model")
    total = unfusable_remainder_ms(profile)
    for name in profile.layers:
        total += layer_ms(profile, name, masks.get(name), paths.get(name, "auto"))
    return total


def latency_shares(profile: Profile) -> Dict[str, float]:
    """Each prunable layer's share of the dense model's predicted latency."""
    total = dense_ms(profile)
    return {n: layer_ms(profile, n) / total for n in profile.layers}


def flops(profile: Profile, plan: Optional[Mapping] = None) -> float:
    """Multiply-accumulates of the prunable layers that actually run under ``plan`` (None = dense)."""
    if not profile.layers:
        raise RuntimeError("latency model: call profile(model, example_input) first")
    masks = plan_tap_masks(plan) if plan is not None else {}
    return sum(layer_flops(info, masks.get(n)) for n, info in profile.layers.items())
