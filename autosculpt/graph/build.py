"""Model → graph: trace a model with ``torch.fx`` and build a ``torch_geometric`` graph whose nodes
are the traced operations and whose edges follow the real data flow.

Residual adds, concatenations, branches and attention blocks appear as they run: an ``add`` node
has one incoming edge per operand, a ``cat`` node one per concatenated tensor, and so on. Node
features are deterministic functions of the model, the example input's shapes, the current pattern
mix and (optionally) measured latency shares — never random noise (unlike the reference code).

This module imports no kernel code: sparse layers are recognised by duck typing (a ``tap_mask``
buffer), and latency shares are passed in by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.fx
from torch import nn

from .._fx import TRACE_HINT, LeafTracer, symbolic_trace  # LeafTracer: re-exported
from ..patterns import PAPER6, PatternSet
from ..plan import is_prunable_conv  # the one definition, shared with the plans (re-exported here)

__all__ = ["build_graph", "ModelGraph", "OP_TYPES", "GraphBuildError", "is_prunable_conv", "node_feature_names"]

# Op categories of the one-hot node-type feature (order is part of the feature layout).
OP_TYPES = (
    "input", "output", "conv_prunable", "conv_depthwise", "conv_1x1", "conv_other", "linear", "norm",
    "activation", "pool", "add", "mul", "cat", "reshape", "matmul", "softmax", "attention", "dropout", "other",
)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Hardsigmoid)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_FUNC_TYPES = {
    "add": "add", "iadd": "add", "sub": "add", "mul": "mul", "imul": "mul", "truediv": "mul", "cat": "cat",
    "concat": "cat", "stack": "cat", "flatten": "reshape", "reshape": "reshape", "view": "reshape",
    "permute": "reshape", "transpose": "reshape", "contiguous": "reshape", "chunk": "reshape",
    "split": "reshape", "unbind": "reshape", "squeeze": "reshape", "unsqueeze": "reshape",
    "getitem": "reshape", "size": "reshape", "expand": "reshape", "matmul": "matmul", "bmm": "matmul",
    "linear": "linear", "softmax": "softmax", "scaled_dot_product_attention": "attention",
    "relu": "activation", "relu6": "activation", "gelu": "activation", "silu": "activation",
    "sigmoid": "activation", "tanh": "activation", "hardswish": "activation", "dropout": "dropout",
    "adaptive_avg_pool2d": "pool", "avg_pool2d": "pool", "max_pool2d": "pool", "mean": "pool",
    "layer_norm": "norm", "batch_norm": "norm",
}


class GraphBuildError(TypeError):
    """The model could not be traced into a graph (the message says what to do)."""


def node_feature_names(num_patterns: int) -> List[str]:
    """Column names of ``ModelGraph.data.x`` (the layout is fixed for a given pattern-set size)."""
    names = [f"op_{t}" for t in OP_TYPES]
    names += ["log_c_in", "log_c_out", "log_h_out", "log_w_out", "stride", "kernel_area", "groups_is_depthwise",
              "flops_share", "param_share", "w_abs_mean", "w_std", "w_filter_norm_cv", "prunable", "kept_fraction",
              "latency_share", "depth"]
    names += [f"mix_{i}" for i in range(num_patterns)]
    return names


@dataclass
class ModelGraph:
    """The traced model as a graph.

    Attributes:
        data: ``torch_geometric.data.Data`` with ``x`` (nodes × features, see
            :func:`node_feature_names`), ``edge_index`` (2 × edges, source → consumer) and
            ``prunable_index`` (the node index of each prunable layer, in ``prunable`` order).
        prunable: names of the prunable modules, in node (execution) order.
        node_names: the fx node name of each graph node.
        layers: per prunable module, ``{"c_in", "c_out", "kernel_size", "stride", "groups",
            "in_shape", "out_shape", "flops"}`` (dense multiply-accumulates for the example input).
        pattern_set: the pattern set the mix features refer to.
    """

    data: object
    prunable: List[str]
    node_names: List[str]
    layers: Dict[str, dict]
    pattern_set: PatternSet
    feature_names: List[str] = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        return int(self.data.x.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.data.edge_index.shape[1])

    def with_state(self, mixes: Optional[Mapping[str, Sequence[float]]] = None,
                   latency_shares: Optional[Mapping[str, float]] = None):
        """A copy of ``data`` whose prunable nodes carry a new pattern mix (fraction of filters per
        pattern) and/or latency shares. Unlisted layers keep their current values."""
        data = self.data.clone()
        x = data.x.clone()
        col = {n: i for i, n in enumerate(self.feature_names)}
        mix0 = col["mix_0"]
        kept = self.pattern_set.kept_fractions().float()
        for li, name in enumerate(self.prunable):
            node = int(self.data.prunable_index[li])
            if mixes is not None and name in mixes:
                mix = torch.as_tensor(mixes[name], dtype=torch.float32)
                if mix.shape != (len(self.pattern_set),):
                    raise ValueError(f"mixes[{name!r}]: expected {len(self.pattern_set)} fractions, got {tuple(mix.shape)}")
                x[node, mix0:mix0 + len(mix)] = mix
                x[node, col["kept_fraction"]] = float((mix * kept).sum())
            if latency_shares is not None and name in latency_shares:
                x[node, col["latency_share"]] = float(latency_shares[name])
        data.x = x
        return data


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return symbolic_trace(model, LeafTracer())
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        raise GraphBuildError(
            f"build_graph: torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. " + TRACE_HINT
        ) from exc


def _op_type(node: torch.fx.Node, modules: Dict[str, nn.Module], pattern_set: PatternSet) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d) or hasattr(m, "tap_mask"):
            groups = getattr(m, "groups", 1)
            if groups > 1 and groups == m.in_channels == m.out_channels:
                return "conv_depthwise" if not is_prunable_conv(m, pattern_set) else "conv_prunable"
            if is_prunable_conv(m, pattern_set):
                return "conv_prunable"
            return "conv_1x1" if tuple(m.kernel_size) == (1, 1) else "conv_other"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, _NORMS):
            return "norm"
        if isinstance(m, _ACTIVATIONS):
            return "activation"
        if isinstance(m, _POOLS):
            return "pool"
        if isinstance(m, nn.MultiheadAttention):
            return "attention"
        if isinstance(m, nn.Softmax):
            return "softmax"
        if isinstance(m, nn.Dropout):
            return "dropout"
        if isinstance(m, (nn.Flatten, nn.Identity)):
            return "reshape"
        return "other"
    name = getattr(node.target, "__name__", str(node.target)).strip("_").lower()
    return _FUNC_TYPES.get(name, "other")


def _tensor_meta_shape(node: torch.fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)) and meta and hasattr(meta[0], "shape"):
        return tuple(meta[0].shape)  # multi-output node: first tensor
    return None


def _weight_stats(w: torch.Tensor):
    w = w.detach().float()
    per_filter = w.flatten(1).norm(dim=1) if w.ndim > 1 else w.abs()
    cv = float(per_filter.std() / (per_filter.mean() + 1e-12)) if per_filter.numel() > 1 else 0.0
    return float(w.abs().mean()), float(w.std()) if w.numel() > 1 else 0.0, cv


def build_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    pattern_set: PatternSet = PAPER6,
    latency_shares: Optional[Mapping[str, float]] = None,
) -> ModelGraph:
    """Traces ``model`` and returns its data-flow graph with deterministic node features.

    Args:
        model: any ``torch.fx``-traceable module (sparsified models too).
        example_input: a tensor the model accepts; its shapes give the feature shapes and FLOPs.
        pattern_set: the pattern set: convs with its kernel size are prunable; the mix features have
            one column per pattern.
        latency_shares: optional measured latency share of each prunable layer (from
            ``runtime.LatencyModel``); zero when absent.

    Raises:
        GraphBuildError (a TypeError) when the model cannot be traced, saying what to change.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    from .._optional import require

    Data = require("torch_geometric.data", what="autosculpt.graph.build_graph").Data

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a torch.Tensor, got {type(example_input).__name__}")
    if not isinstance(pattern_set, PatternSet):
        raise TypeError(f"pattern_set: expected a PatternSet, got {type(pattern_set).__name__}")
    gm = _trace(model)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise GraphBuildError(
            f"build_graph: running {type(model).__name__} on example_input of shape {tuple(example_input.shape)} "
            f"failed: {type(exc).__name__}: {exc}. Pass an example_input the model accepts."
        ) from exc
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(nodes)}

    # Edges: every node argument that is itself a graph node is a data-flow edge (get_attr parameters
    # are folded into their consumer, they are weights, not activations).
    src, dst = [], []
    for n in nodes:
        seen = set()
        for a in n.all_input_nodes:
            if a in index and a not in seen:
                seen.add(a)
                src.append(index[a])
                dst.append(index[n])

    # Depth: longest path from the input (nodes are in topological order).
    depth = [0] * len(nodes)
    for s, d in sorted(zip(src, dst), key=lambda e: e[1]):
        depth[d] = max(depth[d], depth[s] + 1)
    max_depth = max(depth) or 1

    flops, params, info = [0.0] * len(nodes), [0.0] * len(nodes), {}
    for i, n in enumerate(nodes):
        if n.op != "call_module":
            continue
        m = modules[n.target]
        out = _tensor_meta_shape(n)
        params[i] = float(sum(p.numel() for p in m.parameters(recurse=False)))
        if (isinstance(m, nn.Conv2d) or hasattr(m, "tap_mask")) and out is not None:
            kh, kw = m.kernel_size
            flops[i] = float(out[0] * out[1] * out[2] * out[3] * (m.in_channels // m.groups) * kh * kw)
        elif isinstance(m, nn.Linear) and out is not None:
            flops[i] = float(math.prod(out) * m.in_features)
    total_flops, total_params = sum(flops) or 1.0, sum(params) or 1.0

    names = node_feature_names(len(pattern_set))
    col = {c: j for j, c in enumerate(names)}
    x = torch.zeros(len(nodes), len(names))
    prunable, prunable_index = [], []
    kept = pattern_set.kept_fractions().float()
    full = int(torch.argmax(pattern_set.kept_taps()))
    for i, n in enumerate(nodes):
        t = _op_type(n, modules, pattern_set)
        x[i, col[f"op_{t}"]] = 1.0
        out = _tensor_meta_shape(n)
        in_shape = _tensor_meta_shape(n.all_input_nodes[0]) if n.all_input_nodes else out
        if out is not None and len(out) >= 2:
            x[i, col["log_c_out"]] = math.log2(1 + out[1])
            if len(out) == 4:
                x[i, col["log_h_out"]] = math.log2(1 + out[2])
                x[i, col["log_w_out"]] = math.log2(1 + out[3])
            elif len(out) == 3:  # (B, tokens, dim): tokens as "height"
                x[i, col["log_c_out"]] = math.log2(1 + out[2])
                x[i, col["log_h_out"]] = math.log2(1 + out[1])
        if in_shape is not None and len(in_shape) >= 2:
            x[i, col["log_c_in"]] = math.log2(1 + in_shape[1 if len(in_shape) != 3 else 2])
        x[i, col["flops_share"]] = flops[i] / total_flops
        x[i, col["param_share"]] = params[i] / total_params
        x[i, col["depth"]] = depth[i] / max_depth
        if n.op == "call_module":
            m = modules[n.target]
            stride = getattr(m, "stride", 1)
            stride = stride[0] if isinstance(stride, (tuple, list)) else stride
            x[i, col["stride"]] = float(stride) if isinstance(stride, int) else 0.0
            ks = getattr(m, "kernel_size", None)
            if isinstance(ks, (tuple, list)):
                x[i, col["kernel_area"]] = float(ks[0] * ks[1]) / 9.0
            groups = getattr(m, "groups", 1)
            x[i, col["groups_is_depthwise"]] = float(groups > 1)
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.numel() > 0:
                a, s, cv = _weight_stats(w)
                x[i, col["w_abs_mean"]], x[i, col["w_std"]], x[i, col["w_filter_norm_cv"]] = a, s, cv
            if t == "conv_prunable":
                x[i, col["prunable"]] = 1.0
                prunable.append(n.target)
                prunable_index.append(i)
                mix = _current_mix(m, pattern_set, full)
                x[i, col["mix_0"]:col["mix_0"] + len(pattern_set)] = mix
                x[i, col["kept_fraction"]] = float((mix * kept).sum())
                if latency_shares is not None:
                    x[i, col["latency_share"]] = float(latency_shares.get(n.target, 0.0))
                info[n.target] = {
                    "c_in": int(m.in_channels), "c_out": int(m.out_channels), "kernel_size": list(m.kernel_size),
                    "stride": list(m.stride), "padding": list(m.padding), "groups": int(m.groups),
                    "in_shape": list(in_shape) if in_shape else None, "out_shape": list(out) if out else None,
                    "flops": int(flops[i]),
                }
    data = Data(x=x, edge_index=torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
                prunable_index=torch.tensor(prunable_index, dtype=torch.long))
    return ModelGraph(data, prunable, [n.name for n in nodes], info, pattern_set, names)


def _current_mix(m: nn.Module, pattern_set: PatternSet, full: int) -> torch.Tensor:
    """Fraction of filters using each pattern: from a sparse layer's ``tap_mask``; dense convs use
    the full pattern. Masks outside the set count towards the pattern with the nearest kept-tap count."""
    mix = torch.zeros(len(pattern_set))
    mask = getattr(m, "tap_mask", None)
    if mask is None:
        mix[full] = 1.0
        return mix
    flat = pattern_set.masks.flatten(1)
    fm = mask.detach().cpu().flatten(1)
    eq = (fm[:, None, :] == flat[None]).all(-1)  # (C_out, P)
    ids = torch.where(eq.any(1), eq.float().argmax(1),
                      (fm.sum(1, keepdim=True) - flat.sum(1)[None]).abs().argmin(1))
    mix += torch.bincount(ids, minlength=len(pattern_set)).float() / len(ids)
    return mix
