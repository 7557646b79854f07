"""The torch.fx tracer shared by the channel analysis (:mod:`autosculpt.channels`), the graph builder
(:mod:`autosculpt.graph`) and inference fusion (:mod:`autosculpt.fuse`).

It sits at the bottom of the package (it imports no autosculpt module), so every layer can use it
without an import cycle. AutoSculpt's own layers are leaves: a pattern layer (anything with a
``tap_mask``, any module defined in ``autosculpt.nn``) and the pruned attention of a channel-pruned
model (``autosculpt.channels``) are one ``call_module`` node each, never traced into.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.fx
from torch import nn

__all__ = ["LeafTracer", "symbolic_trace", "TRACE_HINT"]

#: what to tell a user whose model torch.fx cannot trace
TRACE_HINT = ("Make the model symbolically traceable: move data-dependent Python control flow (if/for over tensor "
              "values) out of forward or into a submodule, wrap free functions with torch.fx.wrap, or pass a "
              "model whose forward takes tensors only. See "
              "https://pytorch.org/docs/stable/fx.html#limitations-of-symbolic-tracing")


class LeafTracer(torch.fx.Tracer):
    """An fx tracer for which AutoSculpt's layers are leaves.

    Args:
        leaf_packages: modules whose class is defined in one of these packages are leaves (default:
            ``autosculpt.nn``, the pattern layers, and ``autosculpt.channels``, the pruned attention
            modules channel removal builds, whose forward has Python control flow).
        extra_leaf: a further predicate; a module it returns True for is a leaf too.

    Any module with a ``tap_mask`` (a sparse conv) is a leaf as well; the rest is torch.fx's default
    (``torch.nn`` layers are leaves, other modules are traced into).
    """

    def __init__(self, leaf_packages: Sequence[str] = ("autosculpt.nn", "autosculpt.channels"),
                 extra_leaf: Optional[Callable[[nn.Module], bool]] = None, **kwargs):
        super().__init__(**kwargs)
        self.leaf_packages = tuple(leaf_packages)
        self.extra_leaf = extra_leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        mod = type(m).__module__
        if hasattr(m, "tap_mask") or any(mod == p or mod.startswith(p + ".") for p in self.leaf_packages):
            return True
        if self.extra_leaf is not None and self.extra_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)


def symbolic_trace(model: nn.Module, tracer: Optional[torch.fx.Tracer] = None, class_name: Optional[str] = None
                   ) -> torch.fx.GraphModule:
    """``model`` traced by ``tracer`` (a :class:`LeafTracer` by default) as a GraphModule sharing its
    submodules and parameters. Tracing errors propagate as torch.fx raises them; callers wrap them in
    their own error type with :data:`TRACE_HINT`."""
    graph = (LeafTracer() if tracer is None else tracer).trace(model)
    if class_name is None:
        return torch.fx.GraphModule(model, graph)
    return torch.fx.GraphModule(model, graph, class_name=class_name)
