"""Model → graph (torch.fx + torch_geometric). Imports no kernel code."""
from .build import OP_TYPES, GraphBuildError, ModelGraph, build_graph, is_prunable_conv, node_feature_names

__all__ = ["build_graph", "ModelGraph", "GraphBuildError", "OP_TYPES", "is_prunable_conv", "node_feature_names"]
