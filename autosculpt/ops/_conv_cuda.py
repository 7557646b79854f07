"""Registers the ``"cuda"`` backend of ``pattern_conv2d`` (imported lazily by ``ops.conv``).

The CUDA C++ kernel (csrc/cuda/pattern_conv.cu) takes raw device pointers and the caller's current
stream as an integer handle, so it runs in torch's stream order without linking libtorch.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import _pattern_groups
from .conv import CONV_BACKENDS, conv_output_size

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# 32-filter tiles halve the work each input tile is reused for, so they must save clearly more than that
# costs: used when the 64-wide layout runs > 1.25x the tile work of the 32-wide one (a guess until
# measured on a GPU; bench/NOTES.md "GPU pattern conv").
NARROW_TILE_GAIN = 1.25


def choose_block_n(meta) -> int:
    """The CUDA kernel's tile width for a layer: 64, or 32 where narrow tiles skip much more work."""
    work = meta.executed_macs_per_pixel
    return 32 if work[64] > NARROW_TILE_GAIN * work[32] else 64


def cuda_conv(x, weight, tap_mask, bias, stride, padding, dilation, groups, cache_key):
    """``pattern_conv2d`` through the CUDA C++ kernel (see ``ops.conv.CONV_BACKENDS``)."""
    ext = _ext.require()
    if not getattr(ext, "cuda_built", False):
        raise RuntimeError("backend 'cuda': this build has no CUDA kernels (rebuild with AUTOSCULPT_CUDA=1)")
    if x.device.type != "cuda":
        raise ValueError(f"x: backend 'cuda' runs on CUDA tensors, got a tensor on {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"x: backend 'cuda' supports float16, bfloat16 and float32, got {x.dtype}")
    meta, packed = _pattern_groups.prepared(weight, tap_mask, groups, cache_key)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding, dilation)
    out = _pattern_groups.empty_output(x, weight.shape[0], oh, ow)
    if out.numel() == 0:
        return out
    b = bias.detach().contiguous() if bias is not None else None
    block_n = choose_block_n(meta)
    row0, n_ftiles = meta.tile_table(block_n)
    tiles = meta.tiles[row0 : row0 + n_ftiles]
    allow_tf32 = x.dtype == torch.float32 and _pattern_groups.fp32_conv_precision() == "tf32"
    ext.pattern_conv2d_cuda(
        x.data_ptr(), packed.data_ptr(), b.data_ptr() if b is not None else 0, out.data_ptr(),
        meta.perm.data_ptr(), tiles.data_ptr(), meta.taps.data_ptr(),
        n, weight.shape[1], h, w, oh, ow, kw, tuple(x.stride()), tuple(out.stride()),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], n_ftiles, block_n,
        _DTYPE_CODES[x.dtype], allow_tf32, x.device.index, torch.cuda.current_stream(x.device).cuda_stream,
    )
    return out


CONV_BACKENDS["cuda"] = cuda_conv
