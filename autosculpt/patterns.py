"""Pattern sets: named kh×kw keep-masks, and assigning them to filters by importance.

A *pattern* is a boolean kh×kw mask of the taps a filter keeps; all input-channel kernels of one
output filter share it. ``PAPER6`` is the six 3×3 patterns of the AutoSculpt paper (index 0 keeps
nothing — the filter is removed — and index 5 keeps all nine taps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

import torch

__all__ = ["PatternSet", "PAPER6", "kept_fraction", "conv_flops", "assign", "masks_from_ids", "keep_level_grid"]


@dataclass(frozen=True)
class PatternSet:
    """An immutable, validated set of kh×kw boolean keep-masks with unique names.

    Args:
        masks: tensor-like of shape (P, kh, kw), bool or 0/1.
        names: one unique name per pattern.
    """

    masks: torch.Tensor
    names: tuple

    def __init__(self, masks, names: Sequence[str]):
        m = torch.as_tensor(masks)
        if m.ndim != 3:
            raise ValueError(f"masks: expected shape (P, kh, kw), got {tuple(m.shape)}")
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("masks: expected booleans or 0/1 values")
            m = m.bool()
        names = tuple(str(n) for n in names)
        if len(names) != m.shape[0]:
            raise ValueError(f"names: expected {m.shape[0]} names, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"names: must be unique, got {names}")
        m = m.clone()
        m.requires_grad_(False)
        object.__setattr__(self, "masks", m)
        object.__setattr__(self, "names", names)

    def __len__(self) -> int:
        return self.masks.shape[0]

    def __eq__(self, other) -> bool:
        return isinstance(other, PatternSet) and self.names == other.names and torch.equal(self.masks, other.masks)

    def __hash__(self) -> int:
        return hash((self.names, tuple(self.masks.flatten().tolist())))

    @property
    def kernel_size(self) -> tuple:
        return tuple(self.masks.shape[1:])

    def kept_taps(self) -> torch.Tensor:
        """Number of kept taps of each pattern, shape (P,)."""
        return self.masks.flatten(1).sum(1)

    def kept_fractions(self) -> torch.Tensor:
        """Fraction of the kh·kw taps each pattern keeps, shape (P,)."""
        return self.kept_taps().double() / (self.masks.shape[1] * self.masks.shape[2])

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"pattern {name!r} not in {self.names}") from None

    def to_json(self) -> dict:
        return {"names": list(self.names), "masks": self.masks.int().tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "PatternSet":
        if not isinstance(data, dict) or "names" not in data or "masks" not in data:
            raise ValueError("pattern set: expected a dict with 'names' and 'masks'")
        return cls(torch.tensor(data["masks"]), data["names"])


def _paper6() -> PatternSet:
    z = torch.zeros(6, 3, 3, dtype=torch.bool)
    z[1, :, 2] = True  # right column (3×1)
    z[2, 2, :] = True  # bottom row (1×3)
    z[3, :, 1:] = True  # right two columns (3×2)
    z[4, 1:, :] = True  # bottom two rows (2×3)
    z[5] = True  # dense
    return PatternSet(z, ["empty", "right_col", "bottom_row", "right_2cols", "bottom_2rows", "full"])


PAPER6 = _paper6()


def masks_from_ids(pattern_set: PatternSet, ids) -> torch.Tensor:
    """Per-filter tap masks (C_out, kh, kw) from per-filter pattern ids (C_out,)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 1:
        raise ValueError(f"ids: expected a 1-D sequence of pattern ids, got shape {tuple(ids.shape)}")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(pattern_set)):
        raise ValueError(f"ids: pattern ids must be in [0, {len(pattern_set)}), got {ids.min()}..{ids.max()}")
    return pattern_set.masks[ids]


def keep_level_grid(pattern_set: PatternSet) -> List[Dict[int, float]]:
    """A set's pure keep levels (distinct kept-tap counts: 9, 6, 3, 0 for PAPER6) and half/half mixes of
    adjacent levels, each as ``{kept_taps: fraction of filters}``, densest first: the search's menu of
    pattern mixes and the points at which the latency model measures each layer."""
    levels = sorted({int(t) for t in pattern_set.kept_taps()}, reverse=True)
    grid: List[Dict[int, float]] = []
    for i, lv in enumerate(levels):
        grid.append({lv: 1.0})
        if i + 1 < len(levels):
            grid.append({lv: 0.5, levels[i + 1]: 0.5})
    return grid


def kept_fraction(tap_mask: torch.Tensor) -> float:
    """Fraction of a layer's weights (and MACs) kept by a (C_out, kh, kw) tap mask."""
    return float(tap_mask.float().mean())


def conv_flops(tap_mask: torch.Tensor, c_in_per_group: int, out_h: int, out_w: int, batch: int = 1) -> int:
    """Multiply-accumulates that actually run for a pattern conv: kept taps × C_in/groups × output pixels."""
    return int(tap_mask.sum()) * c_in_per_group * out_h * out_w * batch


#: output filters per block of the CPU kernels' micro-kernels (two 16-lane AVX-512 vectors)
KERNEL_BLOCK = 32


def block_friendly_counts(pattern_set: PatternSet, counts: Sequence[int], block: int = KERNEL_BLOCK) -> list:
    """``counts`` (filters per pattern) with filters moved between patterns that keep the SAME number of
    taps, so that each pattern's count is a multiple of ``block`` (then ``block // 2``) where the
    level's total allows: the layer keeps exactly the same taps and MACs, but the kernels run whole
    blocks of one pattern (two vectors of filters per broadcast input) instead of half blocks and
    leftover blocks that compute the union of several patterns' taps.

    Per level, chunks of ``block`` filters, then one of ``block // 2``, then the rest, go (largest
    first) to the member pattern with the most filters still wanted."""
    counts = [int(c) for c in counts]
    if len(counts) != len(pattern_set):
        raise ValueError(f"counts: expected {len(pattern_set)} entries, got {len(counts)}")
    if block < 2 or block % 2:
        raise ValueError(f"block: expected an even int >= 2, got {block!r}")
    taps = [int(t) for t in pattern_set.kept_taps().tolist()]
    out = [0] * len(counts)
    for level in sorted(set(taps)):
        members = [p for p, t in enumerate(taps) if t == level]
        total = sum(counts[p] for p in members)
        chunks = [block] * (total // block)
        rest = total % block
        if rest >= block // 2:
            chunks.append(block // 2)
            rest -= block // 2
        if rest:
            chunks.append(rest)
        want = {p: counts[p] for p in members}
        for c in chunks:
            p = max(members, key=lambda q: (want[q], -q))
            out[p] += c
            want[p] -= c
    return out


def assign(weight: torch.Tensor, pattern_set: PatternSet, counts: Iterable[int]) -> torch.Tensor:
    """Gives each filter a pattern so that the kept weight energy is maximal.

    Args:
        weight: conv weight (C_out, C_in, kh, kw); kh×kw must match the pattern set.
        pattern_set: the candidate patterns.
        counts: how many filters get each pattern (len == len(pattern_set), sum == C_out).

    Returns:
        LongTensor (C_out,) of pattern ids. The assignment maximises the total of
        ``sum(weight[f]**2 * mask[id[f]])`` over filters — a transportation problem solved exactly
        (scipy's linear_sum_assignment on pattern slots).
    """
    from ._optional import require

    linear_sum_assignment = require("scipy.optimize", what="autosculpt.patterns.assign").linear_sum_assignment

    if weight.ndim != 4:
        raise ValueError(f"weight: expected (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    if tuple(weight.shape[2:]) != pattern_set.kernel_size:
        raise ValueError(
            f"weight: kernel {tuple(weight.shape[2:])} does not match the pattern set's {pattern_set.kernel_size}"
        )
    counts = [int(c) for c in counts]
    if len(counts) != len(pattern_set):
        raise ValueError(f"counts: expected {len(pattern_set)} entries, got {len(counts)}")
    if any(c < 0 for c in counts) or sum(counts) != weight.shape[0]:
        raise ValueError(f"counts: must be non-negative and sum to C_out={weight.shape[0]}, got {counts}")
    energy = weight.detach().double().pow(2).sum(1).flatten(1)  # (C_out, kh*kw)
    gain = energy @ pattern_set.masks.flatten(1).double().T  # (C_out, P): energy kept by each pattern
    slots = [p for p, c in enumerate(counts) for _ in range(c)]
    cost = -gain[:, slots].numpy()
    rows, cols = linear_sum_assignment(cost)
    ids = torch.empty(weight.shape[0], dtype=torch.long)
    ids[torch.as_tensor(rows)] = torch.as_tensor([slots[c] for c in cols])
    return ids
from .attention_patterns import ATTN6, AttentionPatternSet, attention_flops, block_layout, head_block_mask  # noqa: E402,F401
