"""Stand-in for ``bench/conv_shapes.py`` (the CPU benchmark's shape list, merged separately).

Only used by ``bench/gpu_check.py`` when ``bench.conv_shapes`` cannot be imported; it mirrors that
module's API (``ConvShape``, ``SHAPES``, ``MASK_MIXES``, ``make_tap_mask``) and its ResNet-50 / VGG-16
layers and mask mixes. Delete it once ``bench/conv_shapes.py`` is on main.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from autosculpt.patterns import PAPER6


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    c_out: int
    size: int
    stride: int = 1
    kernel: int = 3

    @property
    def padding(self) -> int:
        return self.kernel // 2


SHAPES: List[ConvShape] = [
    ConvShape("resnet50-64x56", 64, 64, 56),
    ConvShape("resnet50-128x28", 128, 128, 28),
    ConvShape("resnet50-256x14", 256, 256, 14),
    ConvShape("resnet50-512x7", 512, 512, 7),
    ConvShape("resnet50-128x56-s2", 128, 128, 56, stride=2),
    ConvShape("vgg16-128x56", 128, 128, 56),
    ConvShape("vgg16-256x28", 256, 256, 28),
    ConvShape("vgg16-512x14", 512, 512, 14),
]

_P = {name: PAPER6.masks[i] for i, name in enumerate(PAPER6.names)}
_CENTRE = torch.zeros(3, 3, dtype=torch.bool)
_CENTRE[1, 1] = True
MASK_MIXES: Dict[str, List[Tuple[torch.Tensor, float]]] = {
    "67%:right2cols+bottom2rows": [(_P["right_2cols"], 0.5), (_P["bottom_2rows"], 0.5)],
    "50%:paper6-all": [(PAPER6.masks[i], 1 / 6) for i in range(len(PAPER6))],
    "33%:rightcol+bottomrow": [(_P["right_col"], 0.5), (_P["bottom_row"], 0.5)],
    "11%:centre": [(_CENTRE, 1.0)],
}


def make_tap_mask(mix_name: str, c_out: int, seed: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
    """(c_out, 3, 3) bool mask with the mix's patterns in their shares, in a seeded random filter order."""
    mix = MASK_MIXES[mix_name]
    counts = [int(round(share * c_out)) for _, share in mix]
    counts[-1] = c_out - sum(counts[:-1])
    ids = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    ids = ids[torch.randperm(c_out, generator=torch.Generator().manual_seed(seed))]
    masks = torch.stack([m for m, _ in mix])[ids]
    return masks.to(device) if device is not None else masks
