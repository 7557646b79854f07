"""Drop-in modules that run AutoSculpt's pattern-sparse kernels."""
from .attention import PatternAttention
from .conv import PatternConv2d
from .linear import PatternLinear

__all__ = ["PatternAttention", "PatternConv2d", "PatternLinear"]
