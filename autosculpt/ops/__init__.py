"""Custom operators (torch.library) over AutoSculpt's kernels."""
from .conv import pattern_conv2d

__all__ = ["pattern_conv2d"]
