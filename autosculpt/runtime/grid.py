"""The latency grid: at which pattern mixes a layer's sparse kernel is measured, and how times at
other mixes are interpolated.

The grid points are the pattern set's keep levels and half/half mixes of adjacent levels
(:func:`autosculpt.patterns.keep_level_grid`). Each is measured with a representative tap mask
(:func:`grid_mask`); a layer's sparse time at any mix is the piecewise-linear interpolation in the
kept-tap fraction between the measured points (:func:`interpolate`).
"""
from __future__ import annotations

from typing import List, Mapping, Sequence, Tuple

import torch

from ..patterns import PatternSet, block_friendly_counts

__all__ = ["grid_mask", "mix_signature", "mask_kept_fraction", "interpolate"]


def grid_mask(pattern_set: PatternSet, level_fractions: Mapping[int, float], c_out: int, seed: int = 0) -> torch.Tensor:
    """A representative tap mask for a grid point: each level's filters spread over the patterns of
    that level as plans spread them (:func:`autosculpt.patterns.block_friendly_counts`: whole kernel
    blocks of one pattern); filter order is a fixed random permutation (as after importance assignment)."""
    taps = pattern_set.kept_taps()
    counts = [0] * len(pattern_set)
    used = 0
    items = sorted(level_fractions.items(), reverse=True)
    for j, (lv, frac) in enumerate(items):
        n = c_out - used if j == len(items) - 1 else int(round(frac * c_out))
        used += n
        members = [p for p in range(len(pattern_set)) if int(taps[p]) == lv]
        for k in range(n):
            counts[members[k % len(members)]] += 1
    ids: List[int] = [p for p, c in enumerate(block_friendly_counts(pattern_set, counts)) for _ in range(c)]
    perm = torch.randperm(c_out, generator=torch.Generator().manual_seed(seed))
    return pattern_set.masks[torch.tensor(ids)[perm]]


def mix_signature(mask: torch.Tensor) -> str:
    """Order-free signature of a tap mask: each distinct pattern (as bits) with its filter count (a cache key part)."""
    flat = mask.flatten(1).to(torch.uint8)
    uniq, counts = torch.unique(flat, dim=0, return_counts=True)
    parts = ["".join(str(int(b)) for b in row) + f"x{int(c)}" for row, c in zip(uniq, counts)]
    return ";".join(sorted(parts))


def mask_kept_fraction(mask: torch.Tensor) -> float:
    """The fraction of a tap mask's taps that are kept, exactly (integer counts, one division): the
    grid's abscissa, for measured points and queries alike."""
    return float(int(mask.sum())) / mask.numel()


def interpolate(points: Sequence[Tuple[float, float]], kept: float) -> float:
    """The time at kept fraction ``kept`` from measured ``(kept fraction, ms)`` points sorted by
    fraction: piecewise linear between them, clamped to the end points outside."""
    if kept <= points[0][0]:
        return points[0][1]
    for (k0, t0), (k1, t1) in zip(points, points[1:]):
        if kept == k1:
            return t1  # a measured point exactly (no rounding through the interpolation formula)
        if kept < k1:
            return t0 + (t1 - t0) * (kept - k0) / max(k1 - k0, 1e-12)
    return points[-1][1]
