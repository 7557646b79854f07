"""``max_pool2d``: the C++ CPU max-pool for inference (any window, stride, padding; dilation 1, floor
mode), as the custom op ``torch.ops.autosculpt.max_pool2d`` (fake impl registered, so
``torch.compile`` / ``torch.export`` see one op).

PyTorch's CPU max-pool on NCHW float32 tensors computes indices and runs a generic loop: it was a
quarter of a pruned resnet18's time. The C++ kernel computes the same values (NaN propagates alike);
anything it does not cover (other devices or dtypes, autograd, channels_last input, where torch's own
pooling is already vectorised over channels) runs ``F.max_pool2d`` itself.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _ext
from .conv import as_pair

__all__ = ["max_pool2d", "pool_output_size"]

IntPair = Union[int, Sequence[int]]


def pool_output_size(h: int, w: int, kernel: Tuple[int, int], stride: Tuple[int, int],
                     padding: Tuple[int, int]) -> Tuple[int, int]:
    """Output height and width of a floor-mode pooling window."""
    return (h + 2 * padding[0] - kernel[0]) // stride[0] + 1, (w + 2 * padding[1] - kernel[1]) // stride[1] + 1


def max_pool2d(x: torch.Tensor, kernel_size: IntPair, stride: IntPair = None, padding: IntPair = 0) -> torch.Tensor:
    """Equals ``F.max_pool2d(x, kernel_size, stride, padding)`` (floor mode, dilation 1) for 3-D or 4-D
    ``x``; the C++ kernel runs for CPU float32 inference, ``F.max_pool2d`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(f"x: expected (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    kernel = as_pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else as_pair(stride, "stride")
    padding = as_pair(padding, "padding")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"kernel_size/stride must be >= 1 and padding >= 0, got {kernel}, {stride}, {padding}")
    if padding[0] * 2 > kernel[0] or padding[1] * 2 > kernel[1]:
        raise ValueError(f"padding: must be at most half the kernel size, got padding {padding} for kernel {kernel}")
    oh, ow = pool_output_size(x.shape[-2], x.shape[-1], kernel, stride, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[-2:])} is too small for a {kernel} window with padding {padding}")
    channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    usable = (x.device.type == "cpu" and x.dtype == torch.float32 and _ext.extension() is not None
              and not channels_last  # torch's channels-last CPU pooling is vectorised over channels already
              and not (torch.is_grad_enabled() and x.requires_grad))
    if not usable:
        return F.max_pool2d(x, kernel, stride, padding)
    if not torch.compiler.is_compiling() and type(x) is torch.Tensor:
        return _cpu_kernel(x, kernel, stride, padding)  # eager: the op's body without ~30 us of dispatch
    return torch.ops.autosculpt.max_pool2d(x, list(kernel), list(stride), list(padding))


@torch.library.custom_op("autosculpt::max_pool2d", mutates_args=())
def _max_pool2d_op(x: torch.Tensor, kernel: List[int], stride: List[int], padding: List[int]) -> torch.Tensor:
    channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.device.type != "cpu" or x.dtype != torch.float32 or channels_last:
        return F.max_pool2d(x, kernel, stride, padding)
    return _cpu_kernel(x, kernel, stride, padding)


def _cpu_kernel(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    ext = _ext.require()
    xc = x.contiguous()
    h, w = xc.shape[-2:]
    oh, ow = pool_output_size(h, w, tuple(kernel), tuple(stride), tuple(padding))
    out = xc.new_empty(xc.shape[:-2] + (oh, ow))
    planes = xc.numel() // max(1, h * w)
    if planes:
        ext.max_pool2d_nchw(xc.data_ptr(), out.data_ptr(), planes, h, w, kernel[0], kernel[1], stride[0], stride[1],
                            padding[0], padding[1], oh, ow, torch.get_num_threads())
    return out


@_max_pool2d_op.register_fake
def _(x, kernel, stride, padding):
    oh, ow = pool_output_size(x.shape[-2], x.shape[-1], tuple(kernel), tuple(stride), tuple(padding))
    channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(x.shape[:-2] + (oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)
