"""``autosculpt bench kernels``: the pattern conv kernel against the dense conv, side by side.

Layer shapes of the built-in models at batch 1 and 8; four pattern mixes of the paper's six
patterns. Medians of interleaved repeats at the current thread count (see bench/ for full sweeps).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["bench_kernels", "KERNEL_SHAPES"]

# (label, batch, C_in, C_out, H, W, stride)
KERNEL_SHAPES = (
    ("digits_cnn conv2", 8, 64, 128, 8, 8, 1),
    ("digits_cnn conv4", 8, 128, 128, 4, 4, 1),
    ("resnet stage1", 1, 16, 16, 32, 32, 1),
    ("resnet stage3", 8, 64, 64, 8, 8, 1),
    ("vgg16 block3", 1, 256, 256, 8, 8, 1),
)
# name -> kept-tap levels per filter share, as PAPER6 ids
MIXES = {"all 9 taps": [5], "6 taps": [3, 4], "3 taps": [1, 2], "paper mix": [0, 1, 2, 3, 4, 5]}


def bench_kernels(reps: int = 30, progress: bool = True, seed: int = 0) -> str:
    """Runs the kernel table and returns it as text."""
    from .measure import measure_latency
    from .nn.conv import PatternConv2d
    from .patterns import PAPER6, masks_from_ids
    from .report import format_table

    g = torch.Generator().manual_seed(seed)
    rows = []
    items = [(s, m) for s in KERNEL_SHAPES for m in MIXES]
    if progress:
        from ._optional import tqdm

        items = tqdm(items, desc="bench kernels", unit="case", leave=False)
    for (label, n, cin, cout, h, w, stride), mix in items:
        conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        ids = torch.tensor(MIXES[mix])[torch.randint(len(MIXES[mix]), (cout,), generator=g)]
        sparse = PatternConv2d.from_dense(conv, masks_from_ids(PAPER6, ids), path="sparse")
        x = torch.randn(n, cin, h, w, generator=g)
        t = measure_latency({"dense": conv, "sparse": sparse}, x, reps=reps, form="eager")
        rows.append([f"{label} b{n} {cin}->{cout} {h}x{w}", mix, f"{100 * sparse.kept_fraction():.0f}%",
                     f"{t['dense']:.4f}", f"{t['sparse']:.4f}", f"{t['dense'] / t['sparse']:.2f}x"])
    head = f"pattern conv (backend auto) vs dense conv, {torch.get_num_threads()} threads, median ms of {reps}"
    return head + "\n" + format_table(rows, header=("layer", "mix", "kept", "dense ms", "sparse ms", "speedup"))
