"""Model → graph (torch.fx + torch_geometric). Imports no kernel code."""
from .build import GraphBuildError, ModelGraph, OP_TYPES, build_graph, is_prunable_conv, node_feature_names

__all__ = ["build_graph", "ModelGraph", "GraphBuildError", "OP_TYPES", "is_prunable_conv", "node_feature_names"]
