"""Drop-in modules that run AutoSculpt's pattern-sparse kernels."""
from .conv import PatternConv2d

__all__ = ["PatternConv2d"]
