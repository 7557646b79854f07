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
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """SDPA with the per-head block mask expanded to tokens; query rows with no kept key give zeros."""
    lq, lk = q.shape[-2], k.shape[-2]
    tok = block_mask.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :lq, :lk]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32 for half inputs, fp64 stays fp64
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~tok, float("-inf"))
    empty = ~tok.any(-1, keepdim=True)  # (H, Lq, 1)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return (probs @ v.to(compute)).to(q.dtype)
