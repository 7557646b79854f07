"""Registers the ``"triton"`` backend of ``pattern_conv2d`` (imported lazily by ``ops.conv``).

CUDA tensors run the compiled, autotuned Triton kernel; CPU tensors (fp32, with ``TRITON_INTERPRET=1``,
checked by ``ops.backends.check_backend``) run the same kernel body in Triton's interpreter.
"""
from __future__ import annotations

import torch

from .._triton import kernels
from . import _pattern_groups
from ._pattern_groups import fp32_conv_precision
from .conv import CONV_BACKENDS, conv_output_size

_kernels = kernels("pattern_conv")


def triton_conv(x, weight, tap_mask, bias, stride, padding, dilation, groups, cache_key, config=None):
    """``pattern_conv2d`` through the Triton kernel (see ``ops.conv.CONV_BACKENDS``)."""
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x: backend 'triton' runs on CUDA (or, interpreted, CPU) tensors, got {x.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x: backend 'triton' supports float16, bfloat16 and float32, got {x.dtype}")
    meta, packed = _pattern_groups.prepared(weight, tap_mask, groups, cache_key)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    b = bias.detach().contiguous() if bias is not None else None
    precision = fp32_conv_precision() if (x.dtype == torch.float32 and x.is_cuda) else "ieee"
    oh, ow = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    out = _pattern_groups.empty_output(x, weight.shape[0], oh, ow)
    return _kernels.pattern_conv2d_triton(
        x, packed, b, meta.perm, meta.tiles, meta.taps, meta.tile_offsets,
        (weight.shape[2], weight.shape[3]), weight.shape[0], weight.shape[1],
        tuple(stride), tuple(padding), tuple(dilation), input_precision=precision, config=config, out=out,
    )


CONV_BACKENDS["triton"] = triton_conv
