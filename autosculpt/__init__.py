"""AutoSculpt: pattern-based pruning with real pattern-sparse kernels.

Import is lean: no CUDA initialisation and no triton import happen here.
"""
from . import nn, ops, patterns, runtime
from ._version import __version__
from .fuse import fuse_for_inference
from .io import load, save
from .plan import sparsify
from .search import SearchResult, search

__all__ = ["__version__", "nn", "ops", "patterns", "runtime", "sparsify", "search", "SearchResult", "save", "load",
           "fuse_for_inference"]
