"""Plain-PyTorch references for every kernel. Tests compare against them; they are also the
``"torch"`` backend."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def pattern_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    tap_mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """conv2d with each filter's weights multiplied by its (kh, kw) tap mask."""
    w = weight * tap_mask[:, None].to(weight.dtype)
    return F.conv2d(torch_conv_input(x), w, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def torch_conv_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as torch's CPU convolution can take it. torch 2.13's oneDNN path crashes (segfault in the
    forward, abort in the weight gradient) on some channels_last inputs with a spatial size of 1 (e.g.
    7x1 input, stride (1, 2), padding (0, 1), dilation (1, 2), with bias), found by tests/fuzz: such
    inputs are passed contiguous (NCHW) instead. They are tiny, so the copy costs nothing."""
    if (x.ndim == 4 and x.device.type == "cpu" and min(x.shape[-2:]) == 1 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return x.contiguous()
    return x


def expand_block_mask(block_mask: torch.Tensor, block_size: int, lq: int, lk: int) -> torch.Tensor:
    """The (H, Lq, Lk) token mask of a (H, ceil(Lq/bs), ceil(Lk/bs)) block mask (any block size)."""
    dev = block_mask.device
    rows = torch.arange(lq, device=dev) // block_size
    cols = torch.arange(lk, device=dev) // block_size
    return block_mask[:, rows][:, :, cols]


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """SDPA with the per-head block mask expanded to tokens; query rows with no kept key give zeros.
    Values in dropped key blocks never reach the output (not even a NaN through a zero probability)."""
    lq, lk = q.shape[-2], k.shape[-2]
    tok = expand_block_mask(block_mask, block_size, lq, lk)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32 for half inputs, fp64 stays fp64
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~tok, float("-inf"))
    empty = ~tok.any(-1, keepdim=True)  # (H, Lq, 1)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    vc = v.to(compute)
    if bool(torch.isfinite(vc).all()):
        return (probs @ vc).to(q.dtype)
    # A NaN/inf value row a query does not attend must not give 0 * NaN = NaN: sum the kept terms only,
    # in chunks of query rows (bounded memory).
    out = probs.new_empty(probs.shape[:-1] + (v.shape[-1],))
    rows = max(1, (1 << 24) // max(1, probs.shape[0] * probs.shape[1] * lk * v.shape[-1]))
    for r0 in range(0, lq, rows):
        p = probs[..., r0:r0 + rows, :, None]
        keep = tok[:, r0:r0 + rows, :, None]
        out[..., r0:r0 + rows, :] = torch.where(keep, p * vc[..., None, :, :], 0.0).sum(-2)
    return out.to(q.dtype)
