"""Per-layer actions: a small menu of pattern mixes, and turning a chosen mix into per-filter
pattern ids with :func:`autosculpt.patterns.assign`.

A *mix* says what fraction of a layer's filters keep how many taps: ``{kept_taps: fraction}``.
The menu holds the pattern set's keep levels (9, 6, 3 taps for PAPER6) and half/half mixes of
adjacent levels, densest first; the all-empty level is left out (it would delete the layer's output
entirely), its half/half mix with the next level is kept. For PAPER6 the menu keeps
100%, 83%, 67%, 50%, 33% and 17% of the layer's weights.

Which filter gets which pattern is decided by weight energy, not by the policy: filters are first
split over keep levels maximising the kept energy (an exact assignment problem on each filter's best
pattern within a level), then ``patterns.assign`` gives the per-pattern counts this implies to the
filters (again exact), so the orientation (right column vs bottom row...) follows the weights.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..patterns import PatternSet, assign, block_friendly_counts, keep_level_grid

__all__ = ["MixMenu"]


class MixMenu:
    """The action menu of one pattern set (same for every layer)."""

    def __init__(self, pattern_set: PatternSet):
        self.pattern_set = pattern_set
        self.entries: List[Dict[int, float]] = [g for g in keep_level_grid(pattern_set) if g != {0: 1.0}]
        taps = pattern_set.kept_taps()
        area = float(pattern_set.masks.shape[1] * pattern_set.masks.shape[2])
        self.kept_fractions = [sum(lv * f for lv, f in e.items()) / area for e in self.entries]
        self._levels = sorted({int(t) for t in taps}, reverse=True)
        self._members = {lv: [p for p in range(len(pattern_set)) if int(taps[p]) == lv] for lv in self._levels}

    def __len__(self) -> int:
        return len(self.entries)

    def level_counts(self, index: int, c_out: int) -> Dict[int, int]:
        """Filters per keep level for menu entry ``index`` in a layer with ``c_out`` filters."""
        if not 0 <= index < len(self.entries):
            raise ValueError(f"action: menu index must be in [0, {len(self.entries)}), got {index}")
        items = sorted(self.entries[index].items(), reverse=True)
        counts, used = {}, 0
        for j, (lv, frac) in enumerate(items):
            n = c_out - used if j == len(items) - 1 else int(round(frac * c_out))
            counts[lv] = n
            used += n
        return counts

    def pattern_ids(self, weight: torch.Tensor, index: int) -> torch.Tensor:
        """Per-filter pattern ids (C_out,) for menu entry ``index``, assigned by weight energy."""
        from .._optional import require

        linear_sum_assignment = require("scipy.optimize", what="the pruning search").linear_sum_assignment

        ps = self.pattern_set
        c_out = weight.shape[0]
        counts = self.level_counts(index, c_out)
        energy = weight.detach().double().pow(2).sum(1).flatten(1)  # (C_out, taps)
        gain = energy @ ps.masks.flatten(1).double().T  # (C_out, P)
        levels = [lv for lv in self._levels if counts.get(lv, 0) > 0]
        best_in_level = torch.stack([gain[:, self._members[lv]].max(1).values for lv in levels], 1)
        argbest = [torch.tensor(self._members[lv])[gain[:, self._members[lv]].argmax(1)] for lv in levels]
        slots = [j for j, lv in enumerate(levels) for _ in range(counts[lv])]
        rows, cols = linear_sum_assignment(-best_in_level[:, slots].numpy())
        level_of = torch.empty(c_out, dtype=torch.long)
        level_of[torch.as_tensor(rows)] = torch.as_tensor([slots[c] for c in cols])
        preferred = torch.stack(argbest, 1).gather(1, level_of[:, None]).squeeze(1)
        per_pattern = block_friendly_counts(ps, torch.bincount(preferred, minlength=len(ps)).tolist())
        return assign(weight, ps, per_pattern)

    def mix_fractions(self, ids: Sequence[int]) -> torch.Tensor:
        """Fraction of filters per pattern (the graph's mix feature) for per-filter ids."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        return torch.bincount(ids, minlength=len(self.pattern_set)).float() / len(ids)
