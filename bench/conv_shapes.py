"""Layer shapes and tap masks for the pattern-conv benchmarks (torch only, device-agnostic).

The CPU benchmark (bench/bench_conv.py) and the GPU benchmark import this module, so both measure the
same layers with the same masks. Everything here builds plain tensors; pass ``device=`` to move them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from autosculpt.patterns import PAPER6


@dataclass(frozen=True)
class ConvShape:
    """One 3×3 convolution layer: ``c_in -> c_out`` on ``size×size`` inputs."""

    name: str
    c_in: int
    c_out: int
    size: int
    stride: int = 1
    kernel: int = 3

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def dense_macs(self, batch: int = 1) -> int:
        """Multiply-accumulates of the dense layer for ``batch`` images."""
        return batch * self.c_out * self.c_in * self.kernel**2 * self.out_size**2


# CIFAR ResNet-56 (16/32/64 channels at 32/16/8 px), ResNet-50 bottleneck 3×3 convs (64..512 channels at
# 56..7 px), VGG-16 layers (128..512 channels at 56..14 px), and two stride-2 downsampling convs.
SHAPES: List[ConvShape] = [
    ConvShape("resnet56-16x32", 16, 16, 32),
    ConvShape("resnet56-32x16", 32, 32, 16),
    ConvShape("resnet56-64x8", 64, 64, 8),
    ConvShape("resnet56-16to32-s2", 16, 32, 32, stride=2),
    ConvShape("resnet50-64x56", 64, 64, 56),
    ConvShape("resnet50-128x28", 128, 128, 28),
    ConvShape("resnet50-256x14", 256, 256, 14),
    ConvShape("resnet50-512x7", 512, 512, 7),
    ConvShape("resnet50-128x56-s2", 128, 128, 56, stride=2),
    ConvShape("vgg16-128x56", 128, 128, 56),
    ConvShape("vgg16-256x28", 256, 256, 28),
    ConvShape("vgg16-512x14", 512, 512, 14),
]

QUICK_SHAPES: List[str] = ["resnet56-32x16", "resnet56-64x8", "resnet50-128x28", "resnet50-512x7"]


def _pattern(name: str) -> torch.Tensor:
    return PAPER6.masks[PAPER6.index(name)]


def _centre() -> torch.Tensor:
    m = torch.zeros(3, 3, dtype=torch.bool)
    m[1, 1] = True
    return m


# mask name -> list of (3×3 pattern, share of the filters). Shares are split as evenly as possible.
MASK_MIXES: Dict[str, List[Tuple[torch.Tensor, float]]] = {
    # 67%: two 6-tap PAPER6 patterns, half of the filters each
    "67%:right2cols+bottom2rows": [(_pattern("right_2cols"), 0.5), (_pattern("bottom_2rows"), 0.5)],
    # 50%: all six PAPER6 patterns in equal shares (mean 4.5 of 9 taps, incl. removed and full filters)
    "50%:paper6-all": [(PAPER6.masks[i], 1 / 6) for i in range(len(PAPER6))],
    # 33%: the two 3-tap PAPER6 patterns, half each
    "33%:rightcol+bottomrow": [(_pattern("right_col"), 0.5), (_pattern("bottom_row"), 0.5)],
    # 11%: one tap (the centre) for every filter
    "11%:centre": [(_centre(), 1.0)],
}


def make_tap_mask(mix_name: str, c_out: int, seed: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
    """A (c_out, 3, 3) bool tap mask: the patterns of ``MASK_MIXES[mix_name]`` in their shares, assigned
    to filters in a seeded random order (so filters sharing a pattern are not contiguous)."""
    mix = MASK_MIXES[mix_name]
    counts = [int(round(share * c_out)) for _, share in mix]
    counts[-1] = c_out - sum(counts[:-1])
    ids = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    g = torch.Generator().manual_seed(seed)
    ids = ids[torch.randperm(c_out, generator=g)]
    masks = torch.stack([m for m, _ in mix])
    return masks[ids].to(device) if device is not None else masks[ids]


def make_layer_inputs(shape: ConvShape, batch: int, seed: int = 0, device=None, dtype=torch.float32):
    """Random (x, weight, bias) for a layer, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, shape.c_in, shape.size, shape.size, generator=g, dtype=dtype)
    w = torch.randn(shape.c_out, shape.c_in, shape.kernel, shape.kernel, generator=g, dtype=dtype) * 0.1
    b = torch.randn(shape.c_out, generator=g, dtype=dtype)
    return x.to(device), w.to(device), b.to(device)


def shape_by_name(name: str) -> ConvShape:
    for s in SHAPES:
        if s.name == name:
            return s
    raise KeyError(f"unknown shape {name!r}; known: {[s.name for s in SHAPES]}")
