"""AutoSculpt: pattern-based pruning with real pattern-sparse kernels.

Import is lean: no CUDA initialisation and no triton import happen here.
"""
from . import nn, ops, patterns, runtime
from ._version import __version__
from .budget import Budget
from .deploy import optimize_for_inference
from .fuse import fuse_for_inference
from .io import load, save
from .plan import sparsify
from .program import load_deployed
from .search import SearchResult, SelectionSettings, search, select_plan

__all__ = ["__version__", "nn", "ops", "patterns", "runtime", "sparsify", "search", "SearchResult", "Budget",
           "SelectionSettings", "select_plan", "save", "load", "fuse_for_inference", "optimize_for_inference",
           "load_deployed"]
