"""Custom operators (torch.library) over AutoSculpt's kernels."""
from .attention import block_sparse_attention
from .conv import pattern_conv2d
from .pool import max_pool2d

__all__ = ["block_sparse_attention", "max_pool2d", "pattern_conv2d"]
