"""The channel analysis behind :mod:`autosculpt.channels`: which channel elements of a traced model must be
removed together.

The model is traced with ``torch.fx`` and run once on the example input by an interpreter that, beside
each node's value, computes its *channel info*: which dimension of the tensor carries channels and, for
each position along it, an **element** id. Elements live in a union-find: every op that ties two channel
positions together (a residual add, a concatenation's consumer, a depthwise conv coupling its output to
its input, a shuffle that must keep its halves aligned) unions their elements. The weights a channel
touches are **slots** ``((module, dim, axis), index)`` attached to elements (a conv's output row, the
next conv's input column, a BatchNorm feature, a parameter's slice...). After the run, each union-find
class is one removable channel; classes touching the same set of slots' members form a group.

Nothing is guessed: an op the analysis does not know, or a known op used in a way it cannot follow
(a reshape to a fixed size, slicing channels by position, a reduction over channels, the model's
output), **blocks** the elements it touches, with a reason; a class holding a blocked element is not
prunable. This is the idea of Torch-Pruning's DepGraph (arXiv 2301.12900), on elements rather than
per-layer index mappings.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .._fx import TRACE_HINT, LeafTracer, symbolic_trace

__all__ = ["ChannelTraceError", "ChannelTracer", "trace_model", "Analysis", "analyze", "is_timm_attention",
           "ChannelInfo", "NoChannels", "Opaque", "ParamInfo", "TupleInfo", "MemberKey"]

# (module or parameter name, dim, axis): one weight dimension a channel can be removed from.
MemberKey = Tuple[str, str, Optional[int]]


class ChannelTraceError(ValueError):
    """The model could not be traced (or run) for channel analysis; the message says what to do."""


def is_timm_attention(m: nn.Module) -> bool:
    """A timm-style self-attention module: ``qkv`` and ``proj`` linears and ``num_heads`` (as
    :class:`autosculpt.models.vit.Attention`). Its forward is checked against AutoSculpt's
    re-implementation on the example input before its heads are treated as prunable."""
    if type(m).__module__.startswith("autosculpt.nn"):  # PatternAttention has its own head pruning
        return False
    qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)) or isinstance(heads, bool):
        return False
    if not isinstance(heads, int) or heads < 1 or qkv.out_features % 3:
        return False
    inner = qkv.out_features // 3
    return inner % heads == 0 and proj.in_features == inner


class ChannelTracer(LeafTracer):
    """fx tracer for channel analysis (:class:`autosculpt._fx.LeafTracer`): torch.nn layers, AutoSculpt's
    sparse layers (anything with a ``tap_mask``), the pruned attention of :mod:`autosculpt.channels.shrink`
    and timm-style attention modules are leaves."""

    def __init__(self, **kwargs):
        super().__init__(extra_leaf=is_timm_attention, **kwargs)


def trace_model(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` traced by :class:`ChannelTracer` (a GraphModule sharing its submodules and parameters)."""
    try:
        return symbolic_trace(model, ChannelTracer())
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        raise ChannelTraceError(
            f"channel analysis: torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Channel groups are found from the fx graph. " + TRACE_HINT
        ) from exc


# --------------------------------------------------------------------------- channel infos


@dataclass
class ChannelInfo:
    """The tensor's dim ``cdim`` carries channels; ``ids[i]`` is the element at position ``i``."""

    cdim: int
    ids: np.ndarray


@dataclass
class NoChannels:
    """A tensor with no channel structure (e.g. attention weights, a map reduced over channels)."""


@dataclass
class Opaque:
    """A tensor whose channel structure is unknown (the model input, an unsupported op's output): any
    channel position read from it is a fresh blocked element."""

    reason: str


@dataclass
class ParamInfo:
    """A parameter or buffer (``get_attr``), possibly viewed: ``axes[d]`` is the parameter axis the tensor's
    dim ``d`` indexes (None for an inserted or broadcast dim)."""

    target: str
    shape: Tuple[int, ...]
    axes: Tuple[Optional[int], ...]


@dataclass
class TupleInfo:
    items: List[Any]


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = []
        self.reasons: Dict[int, set] = {}  # element -> why it cannot be removed
        self.notes: Dict[int, set] = {}  # element -> caveats that do not block (LayerNorm statistics)

    def new(self, n: int, reason: Optional[str] = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if reason:
            for e in range(start, start + n):
                self.reasons[e] = {reason}
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def block(self, ids, reason: str) -> None:
        for e in np.asarray(ids).reshape(-1).tolist():
            self.reasons.setdefault(e, set()).add(reason)

    def note(self, ids, text: str) -> None:
        for e in np.asarray(ids).reshape(-1).tolist():
            self.notes.setdefault(e, set()).add(text)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(e) for e in ids.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------- op tables

_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, operator.neg, operator.pow, operator.floordiv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide, torch.neg,
    torch.abs, torch.exp, torch.sqrt, torch.rsqrt, torch.square, torch.pow, torch.maximum, torch.minimum,
    torch.clamp, torch.clip, torch.where, torch.sigmoid, torch.tanh, torch.relu, torch.relu_,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.softsign, F.logsigmoid, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "neg", "abs", "exp", "sqrt", "rsqrt",
    "square", "maximum", "minimum", "clamp", "clamp_", "clip", "relu", "relu_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "masked_fill",
}
# methods whose result depends on the tensor itself only (other tensor arguments give a dtype/device)
_SELF_ONLY_METHODS = {"contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as",
                      "type", "requires_grad_"}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
                     torch.std: "std", torch.var: "var"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var"}
_SPATIAL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d,
                      F.avg_pool2d, F.avg_pool3d, F.interpolate, F.upsample, F.pad}
_INDEX_RETURNING = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                    F.adaptive_max_pool3d}  # spatial unless asked for indices

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONVS) or (hasattr(m, "tap_mask") and hasattr(m, "in_channels") and hasattr(m, "groups"))


def _fn_name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


def _shape(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape(v) for v in value]
    return None


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --------------------------------------------------------------------------- the analysis


class Analysis(torch.fx.Interpreter):
    """Runs the traced model once, computing each node's channel info (see the module docstring).

    After :meth:`run`: ``infos`` and ``shapes`` (by node name), ``slots`` ((key, index) -> element),
    ``key_order`` (each member key's first appearance), ``uf`` (the union-find), ``kinds`` (a short op
    kind per node, for the empty-filter folding) and ``module_calls`` (module name -> its node names).
    """

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.uf = _UnionFind()
        self.slots: Dict[Tuple[MemberKey, int], int] = {}
        self.key_order: Dict[MemberKey, int] = {}
        self.infos: Dict[str, Any] = {}
        self.shapes: Dict[str, Any] = {}
        self.kinds: Dict[str, str] = {}
        self.module_calls: Dict[str, List[str]] = {}
        self.blocked_params: Dict[str, str] = {}
        self.attention_checked: Dict[str, Optional[str]] = {}  # module -> None (verified) or why not

    # -- slots ------------------------------------------------------------------------
    def slot(self, key: MemberKey, index: int) -> int:
        e = self.slots.get((key, index))
        if e is None:
            self.key_order.setdefault(key, len(self.key_order))
            e = int(self.uf.new(1)[0])
            self.slots[(key, index)] = e
            if key[1] == "param" and key[0] in self.blocked_params:
                self.uf.block([e], self.blocked_params[key[0]])
        return e

    def slot_ids(self, key: MemberKey, n: int) -> np.ndarray:
        return np.array([self.slot(key, i) for i in range(n)], dtype=np.int64)

    def attach(self, key: MemberKey, ids: np.ndarray) -> None:
        for i, e in enumerate(ids.tolist()):
            self.uf.union(self.slot(key, i), e)

    # -- running ----------------------------------------------------------------------
    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        self.shapes[n.name] = _shape(value)
        if n.op == "call_module":
            self.module_calls.setdefault(n.target, []).append(n.name)
        info = self._analyze(n, value)
        if not _consistent(info, value):  # never trust an info that disagrees with the real tensor
            self.block_info(info, self.shapes[n.name], f"{n.name}: the analysis lost track of its channels")
            info = self.unsupported(n, "an op whose output shape the analysis did not predict")
        self.infos[n.name] = info
        return value

    def _info(self, a):
        return self.infos.get(a.name) if isinstance(a, torch.fx.Node) else None

    def _shape_of(self, a):
        return self.shapes.get(a.name) if isinstance(a, torch.fx.Node) else None

    def ids_along(self, info, d: int, shape: Sequence[int]) -> Optional[np.ndarray]:
        """The elements at each position of dim ``d`` of a tensor with ``info`` and ``shape``, or None when
        that dim carries no channels (NoChannels, or another dim is the channel dim)."""
        if isinstance(info, ChannelInfo):
            return info.ids if info.cdim == d else None
        if isinstance(info, Opaque):
            return self.uf.new(shape[d], reason=info.reason)
        if isinstance(info, ParamInfo):
            axis = info.axes[d] if d < len(info.axes) else None
            if axis is None or info.shape[axis] != shape[d]:
                return None
            return self.slot_ids((info.target, "param", axis), shape[d])
        return None

    def block_info(self, info, shape, reason: str) -> None:
        if isinstance(info, ChannelInfo):
            self.uf.block(info.ids, reason)
        elif isinstance(info, ParamInfo):
            self.blocked_params.setdefault(info.target, reason)
            for (key, _), e in list(self.slots.items()):
                if key[1] == "param" and key[0] == info.target:
                    self.uf.block([e], reason)
        elif isinstance(info, TupleInfo):
            for i, item in enumerate(info.items):
                self.block_info(item, shape[i] if isinstance(shape, list) else None, reason)

    def _tensor_args(self, n: torch.fx.Node):
        out = []
        for a in _flatten_args((n.args, n.kwargs)):
            if isinstance(a, torch.fx.Node) and a.name in self.infos and self.infos[a.name] is not None:
                out.append(a)
        return out

    def unsupported(self, n: torch.fx.Node, what: str) -> Opaque:
        reason = f"{n.name}: {what}"
        for a in self._tensor_args(n):
            self.block_info(self.infos[a.name], self.shapes[a.name], reason)
        self.kinds[n.name] = "unsupported"
        return Opaque(reason)

    def consume(self, n: torch.fx.Node, x, d: int, what: str) -> np.ndarray:
        """The elements an op reads along dim ``d`` of its input node ``x`` (fresh blocked ones where that
        dim has no channels); channels on any other dim of ``x`` are mixed by the op, so they are blocked."""
        info, shape = self._info(x), self._shape_of(x)
        if not isinstance(shape, tuple):
            return self.uf.new(0)
        d = _norm_dim(d, len(shape))
        ids = self.ids_along(info, d, shape)
        if isinstance(info, ChannelInfo) and info.cdim != d:
            self.uf.block(info.ids, f"{n.name}: {what} mixes the channels on dim {info.cdim} of its input")
        if ids is None:
            ids = self.uf.new(shape[d], reason=f"{n.name}: {what} reads dim {d} of a tensor that carries no "
                                               "prunable channels there")
        return ids

    # -- dispatch ---------------------------------------------------------------------
    def _analyze(self, n: torch.fx.Node, value):
        if n.op == "output":
            for a in _flatten_args(n.args):
                if isinstance(a, torch.fx.Node):
                    self.block_info(self._info(a), self._shape_of(a), f"model output {a.name!r}")
            self.kinds[n.name] = "output"
            return None
        if not _has_tensor(value):
            return None
        if n.op == "placeholder":
            self.kinds[n.name] = "input"
            return Opaque(f"model input {n.name!r}")
        if n.op == "get_attr":
            self.kinds[n.name] = "param"
            if isinstance(value, torch.Tensor):
                return ParamInfo(n.target, tuple(value.shape), tuple(range(value.dim())))
            return self.unsupported(n, "a non-tensor attribute")
        if n.op == "call_module":
            return self._module(n, self.module.get_submodule(n.target), value)
        if n.op == "call_function":
            return self._function(n, n.target, value)
        if n.op == "call_method":
            return self._method(n, n.target, value)
        return self.unsupported(n, f"op {n.op}")

    def _module(self, n, m: nn.Module, value):
        name = n.target
        if _is_conv(m):
            return self._conv(n, name, m, value)
        if isinstance(m, nn.Linear):
            in_ids = self.consume(n, n.args[0], -1, f"linear {name!r}")
            self.attach((name, "in", None), in_ids)
            self.kinds[n.name] = "linear"
            return ChannelInfo(value.dim() - 1, self.slot_ids((name, "out", None), m.out_features))
        if isinstance(m, _PER_CHANNEL_NORMS):
            ids = self.consume(n, n.args[0], 1, f"{type(m).__name__} {name!r}")
            self.attach((name, "features", None), ids)
            self.kinds[n.name] = "norm"
            return ChannelInfo(1, ids)
        if isinstance(m, nn.GroupNorm):
            return self._group_norm(n, name, m)
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(n, name, m, value)
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                return self._elementwise(n, [n.args[0]], value)
            ids = self.consume(n, n.args[0], 1, f"PReLU {name!r}")
            self.attach((name, "features", None), ids)
            self.kinds[n.name] = "norm"
            return ChannelInfo(1, ids)
        if isinstance(m, _ACTIVATION_MODULES):
            return self._elementwise(n, [n.args[0]], value)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax(n, n.args[0], m.dim, value)
        if isinstance(m, _SPATIAL_MODULES):
            if getattr(m, "return_indices", False):
                return self.unsupported(n, f"{type(m).__name__} with return_indices")
            return self._spatial(n, n.args[0], value)
        if isinstance(m, nn.Flatten):
            return self._reshape(n, n.args[0], value, None)
        if isinstance(m, nn.ChannelShuffle):
            return self._channel_shuffle(n, n.args[0], m.groups, value)
        if isinstance(m, nn.Embedding):
            self.kinds[n.name] = "embedding"
            return ChannelInfo(value.dim() - 1, self.slot_ids((name, "out", None), m.embedding_dim))
        if isinstance(m, nn.MultiheadAttention) or is_timm_attention(m) or hasattr(m, "attention_kind"):
            return self._attention(n, name, m, value)
        return self.unsupported(n, f"module {name!r} ({type(m).__name__}) is not supported")

    def _function(self, n, target, value):
        args, kwargs = n.args, n.kwargs
        if target in _ELEMENTWISE_FUNCTIONS:
            return self._elementwise(n, list(args) + list(kwargs.values()), value)
        if target in _SOFTMAX:
            return self._softmax(n, args[0], kwargs.get("dim", args[1] if len(args) > 1 else None), value)
        if target in _REDUCE_FUNCTIONS:
            return self._reduce(n, args[0], _arg(n, 1, "dim"), bool(_arg(n, 2, "keepdim", False)), value)
        if target in _SPATIAL_FUNCTIONS:
            if target is F.pad:
                return self._pad(n, args[0], _arg(n, 1, "pad"), value)
            return self._spatial(n, args[0], value)
        if target in _INDEX_RETURNING:
            if not isinstance(value, torch.Tensor):
                return self.unsupported(n, f"{_fn_name(target)} returning indices")
            return self._spatial(n, args[0], value)
        if target is torch.flatten:
            return self._reshape(n, args[0], value, None)
        if target is torch.reshape:
            return self._reshape(n, args[0], value, _shape_arg(args[1:]))
        if target is torch.permute:
            return self._permute(n, args[0], _int_list(args[1:]), value)
        if target is torch.transpose:
            return self._transpose(n, args[0], args[1], args[2], value)
        if target is torch.unsqueeze or target is torch.squeeze:
            return self._squeeze(n, args[0], _arg(n, 1, "dim"), target is torch.unsqueeze, value)
        if target in (torch.cat, torch.concat, torch.concatenate):
            return self._cat(n, list(args[0]), _arg(n, 1, "dim", 0), value)
        if target is torch.stack:
            return self._stack(n, list(args[0]), _arg(n, 1, "dim", 0), value)
        if target is torch.chunk:
            return self._chunk(n, args[0], _arg(n, 2, "dim", 0), value, None)
        if target is torch.split:
            return self._chunk(n, args[0], _arg(n, 2, "dim", 0), value, args[1] if len(args) > 1 else kwargs.get(
                "split_size_or_sections"))
        if target is torch.unbind:
            return self._unbind(n, args[0], _arg(n, 1, "dim", 0), value)
        if target is operator.getitem:
            return self._getitem(n, args[0], args[1], value)
        if target is builtins.getattr:
            if args[1] in ("T", "mT") and isinstance(value, torch.Tensor):
                return self._permute_to(n, args[0], value)
            return self.unsupported(n, f"attribute {args[1]!r} of a tensor")
        return self.unsupported(n, f"function {_fn_name(target)} is not supported")

    def _method(self, n, name: str, value):
        args = n.args
        if name in _SELF_ONLY_METHODS:
            return self._elementwise(n, [args[0]], value)
        if name in _ELEMENTWISE_METHODS:
            return self._elementwise(n, list(args) + list(n.kwargs.values()), value)
        if name in ("softmax", "log_softmax"):
            return self._softmax(n, args[0], _arg(n, 1, "dim"), value)
        if name in _REDUCE_METHODS:
            return self._reduce(n, args[0], _arg(n, 1, "dim"), bool(_arg(n, 2, "keepdim", False)), value)
        if name in ("view", "reshape"):
            if len(args) == 2 and isinstance(args[1], torch.fx.Node) and isinstance(value, torch.Tensor) \
                    and self.infos.get(args[1].name) is not None:  # view(dtype) / view_as-like tensor arg
                return self.unsupported(n, f"{name} with a tensor argument")
            return self._reshape(n, args[0], value, _shape_arg(args[1:]))
        if name == "flatten":
            return self._reshape(n, args[0], value, None)
        if name == "permute":
            return self._permute(n, args[0], _int_list(args[1:]), value)
        if name == "transpose":
            return self._transpose(n, args[0], args[1], args[2], value)
        if name == "t":
            return self._permute_to(n, args[0], value)
        if name in ("unsqueeze", "squeeze"):
            dims = _arg(n, 1, "dim") if len(args) <= 2 else list(args[1:])
            return self._squeeze(n, args[0], dims, name == "unsqueeze", value)
        if name in ("expand", "expand_as"):
            return self._expand(n, args[0], value)
        if name == "chunk":
            return self._chunk(n, args[0], _arg(n, 2, "dim", 0), value, None)
        if name == "split":
            return self._chunk(n, args[0], _arg(n, 2, "dim", 0), value,
                               args[1] if len(args) > 1 else n.kwargs.get("split_size"))
        if name == "unbind":
            return self._unbind(n, args[0], _arg(n, 1, "dim", 0), value)
        return self.unsupported(n, f"method {name!r} is not supported")

    # -- layers -----------------------------------------------------------------------
    def _conv(self, n, name, m, value):
        cin, cout, g = m.in_channels, m.out_channels, m.groups
        in_ids = self.consume(n, n.args[0], 1, f"conv {name!r}")
        if g == 1:
            self.attach((name, "in", None), in_ids)
            out_ids = self.slot_ids((name, "out", None), cout)
            self.kinds[n.name] = "conv"
        elif g == cin and cout % cin == 0:
            # depthwise: output channel o is computed from input channel o // k alone
            k = cout // cin
            out_ids = self.slot_ids((name, "features", None), cout)
            for o in range(cout):
                self.uf.union(out_ids[o], in_ids[o // k])
            self.kinds[n.name] = "depthwise"
        else:
            reason = f"{name}: grouped conv (groups={g}) keeps its channels (only groups=1 and depthwise are pruned)"
            self.uf.block(in_ids, reason)
            out_ids = self.slot_ids((name, "out", None), cout)
            self.uf.block(out_ids, reason)
            self.kinds[n.name] = "unsupported"
        out = ChannelInfo(1, out_ids)
        residual = n.args[1] if len(n.args) > 1 else n.kwargs.get("residual")
        if isinstance(residual, torch.fx.Node):  # PatternConv2d's fused shortcut add
            self._couple(n, out, value, residual)
        return out

    def _group_norm(self, n, name, m: nn.GroupNorm):
        ids = self.consume(n, n.args[0], 1, f"GroupNorm {name!r}")
        g, c = m.num_groups, m.num_channels
        if g == 1:
            self.uf.note(ids, f"{name}: GroupNorm(1 group) normalizes over all these channels; removing some "
                              "changes its statistics (not the same as zeroing them)")
        elif g != c:  # removing whole normalization groups keeps the other groups' statistics exact
            per = c // g
            for j in range(g):
                for i in range(1, per):
                    self.uf.union(ids[j * per], ids[j * per + i])
        self.attach((name, "features", None), ids)
        self.kinds[n.name] = "norm" if g == c else "groupnorm"
        return ChannelInfo(1, ids)

    def _layer_norm(self, n, name, m: nn.LayerNorm, value):
        k = len(m.normalized_shape)
        x = n.args[0]
        info, shape = self._info(x), self._shape_of(x)
        rank = len(shape)
        if k == 1:
            ids = self.consume(n, x, -1, f"LayerNorm {name!r}")
            self.uf.note(ids, f"{name}: LayerNorm normalizes over these channels; removing some changes its mean "
                              "and variance (not the same as zeroing them)")
            self.attach((name, "features", None), ids)
            self.kinds[n.name] = "layernorm"
            return ChannelInfo(rank - 1, ids)
        if isinstance(info, ChannelInfo) and info.cdim >= rank - k:
            return self.unsupported(n, f"LayerNorm {name!r} over several dims including channels")
        self.kinds[n.name] = "layernorm"
        return info if isinstance(info, (ChannelInfo, NoChannels)) else NoChannels()

    def _attention(self, n, name, m, value):
        """Self-attention leaves: nn.MultiheadAttention and timm-style modules. Their heads are a group;
        their input columns and output rows join the surrounding channels. The pruned re-implementation
        is checked against the module on this very call before anything is treated as prunable."""
        from .shrink import attention_replacement

        why = self.attention_checked.get(name, "")
        if why == "":
            try:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                ref = attention_replacement(m)
                with torch.no_grad():
                    got = ref(*args, **kwargs)
                why = _compare_outputs(got, value)
            except Exception as e:  # noqa: BLE001 - any failure of the re-implementation: not supported
                why = f"{type(e).__name__}: {e}"
            self.attention_checked[name] = why
        if why:
            return self.unsupported(n, f"attention {name!r} is not supported: {why}")
        timm = not isinstance(m, nn.MultiheadAttention) and getattr(m, "attention_kind", "timm") == "timm"
        heads = m.num_heads
        self.slot_ids((name, "heads", None), heads)  # each head: its own class
        if timm:
            x = n.args[0]
            self.attach((name, "in", None), self.consume(n, x, -1, f"attention {name!r}"))
            out_features = m.proj.out_features
        else:
            names = ("query", "key", "value")
            dims = ("in", "key_in", "value_in")
            for i, (arg_name, dim) in enumerate(zip(names, dims)):
                a = n.args[i] if len(n.args) > i else n.kwargs.get(arg_name)
                if a is None:
                    a = n.args[0] if len(n.args) else n.kwargs.get("query")
                self.attach((name, dim, None), self.consume(n, a, -1, f"attention {name!r}"))
            out_features = m.out_proj.out_features
            # a mask given per head (3-D attn_mask) or attention weights that are used make heads unprunable
            mask = n.kwargs.get("attn_mask", n.args[5] if len(n.args) > 5 else None)
            if isinstance(mask, torch.fx.Node) and isinstance(self._shape_of(mask), tuple) \
                    and len(self._shape_of(mask)) == 3:
                self.uf.block(self.slot_ids((name, "heads", None), heads), f"{name}: per-head attn_mask")
            for user in n.users:  # the head-averaged attention weights change when heads go
                if not (user.target is operator.getitem and user.args[1] == 0) and \
                        not (user.target is operator.getitem and not user.users):
                    self.uf.block(self.slot_ids((name, "heads", None), heads),
                                  f"{name}: its attention weights are used ({user.name})")
        self.kinds[n.name] = "attention"
        out = ChannelInfo(value.dim() - 1 if isinstance(value, torch.Tensor) else value[0].dim() - 1,
                          self.slot_ids((name, "out", None), out_features))
        if isinstance(value, torch.Tensor):
            return out
        weights = NoChannels()
        return TupleInfo([out, weights])

    # -- generic ops ------------------------------------------------------------------
    def _couple(self, n, out: ChannelInfo, value, other) -> None:
        """Unions ``out``'s channels with those of ``other`` (a tensor added to it elementwise)."""
        shape = self._shape_of(other)
        info = self._info(other)
        off = value.dim() - len(shape)
        d = out.cdim - off
        if d < 0 or shape[d] == 1:
            return
        ids = self.ids_along(info, d, shape)
        if ids is None:
            self.uf.block(out.ids, f"{n.name}: combines channels with a dim that carries none")
        else:
            self.uf.union_arrays(out.ids, ids)

    def _elementwise(self, n, operands, value):
        if not isinstance(value, torch.Tensor):
            return self.unsupported(n, "an elementwise op that does not return one tensor")
        self.kinds[n.name] = "elementwise"
        return self._join(n, operands, tuple(value.shape))

    def _join(self, n, operands, out_shape):
        """The channel info of a result that combines ``operands`` position by position (elementwise ops
        with broadcasting; a concatenation along a non-channel dim): the channel positions they share are
        unioned."""
        rank = len(out_shape)
        tensors = [a for a in operands if isinstance(a, torch.fx.Node) and isinstance(self._shape_of(a), tuple)
                   and self._info(a) is not None]
        chan = [a for a in tensors if isinstance(self._info(a), ChannelInfo)]
        if not chan:
            infos = [self._info(a) for a in tensors]
            opaque = [i for i in infos if isinstance(i, Opaque)]
            if opaque:
                return opaque[0]
            params = [a for a in tensors if isinstance(self._info(a), ParamInfo)]
            if len(params) == 1:
                p, p_shape = self._info(params[0]), self._shape_of(params[0])
                off = rank - len(p_shape)
                axes = [None] * rank
                for d in range(max(off, 0), rank):
                    if p_shape[d - off] == out_shape[d]:
                        axes[d] = p.axes[d - off]
                return ParamInfo(p.target, p.shape, tuple(axes))
            if params:
                for a in params:
                    self.block_info(self._info(a), self._shape_of(a), f"{n.name}: combines parameters")
                return Opaque(f"{n.name}: combines parameters")
            return NoChannels()
        # the output's channel dim: from an operand whose channel dim is not broadcast
        lead = None
        for a in chan:
            info, shape = self._info(a), self._shape_of(a)
            d = info.cdim + rank - len(shape)
            if shape[info.cdim] == out_shape[d]:
                lead = (a, d)
                break
        if lead is None:
            return self.unsupported(n, "broadcasts a channel dim")
        a0, d = lead
        ids = self._info(a0).ids
        for a in tensors:
            if a is a0:
                continue
            info, shape = self._info(a), self._shape_of(a)
            off = rank - len(shape)
            if isinstance(info, ChannelInfo) and info.cdim + off != d:
                reason = f"{n.name}: combines tensors whose channels lie on different dims"
                self.uf.block(info.ids, reason)
                self.uf.block(ids, reason)
                continue
            dd = d - off
            if dd < 0 or shape[dd] == 1:
                continue  # broadcast along the channel dim (a per-sample scalar, a spatial map)
            other = self.ids_along(info, dd, shape)
            if other is None:
                self.uf.block(ids, f"{n.name}: combines channels with a dim that carries none")
                continue
            self.uf.union_arrays(ids, other)
        return ChannelInfo(d, ids)

    def _softmax(self, n, x, dim, value):
        info, shape = self._info(x), self._shape_of(x)
        if dim is None or not isinstance(dim, int):
            return self.unsupported(n, "softmax without a constant dim")
        if isinstance(info, ChannelInfo) and _norm_dim(dim, len(shape)) == info.cdim:
            return self.unsupported(n, "softmax over channels")
        return self._elementwise(n, [x], value)

    def _reduce(self, n, x, dim, keepdim: bool, value):
        info, shape = self._info(x), self._shape_of(x)
        if not isinstance(value, torch.Tensor):
            return self.unsupported(n, "a reduction that does not return one tensor")
        if dim is None:
            dims = list(range(len(shape)))
        elif isinstance(dim, int):
            dims = [dim]
        elif isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
            dims = list(dim)
        else:
            return self.unsupported(n, "a reduction over a computed dim")
        dims = sorted(_norm_dim(d, len(shape)) for d in dims)
        self.kinds[n.name] = "reduce"
        if isinstance(info, ChannelInfo):
            if info.cdim in dims:
                return self.unsupported(n, "a reduction over channels")
            cdim = info.cdim if keepdim else info.cdim - sum(1 for d in dims if d < info.cdim)
            return ChannelInfo(cdim, info.ids)
        if isinstance(info, ParamInfo):
            return self.unsupported(n, "a reduction of a parameter")
        return info

    def _spatial(self, n, x, value):
        """Pooling, interpolation over the trailing 1, 2 or 3 dims (from the op's name; all but the first
        two for interpolation): channels on any other dim pass."""
        info, shape = self._info(x), self._shape_of(x)
        self.kinds[n.name] = "spatial"
        name = _fn_name(n.target) if n.op != "call_module" else type(self.module.get_submodule(n.target)).__name__
        k = next((d for d in (1, 2, 3) if f"{d}d" in name.lower()), None)
        if k is None or not isinstance(shape, tuple):
            k = max(len(shape) - 2, 1) if isinstance(shape, tuple) else 1
        if isinstance(info, ChannelInfo):
            if info.cdim >= len(shape) - k:
                return self.unsupported(n, "a spatial op over the channel dim")
            return ChannelInfo(info.cdim, info.ids)
        if isinstance(info, ParamInfo):
            return self.unsupported(n, "a spatial op on a parameter")
        return info

    def _pad(self, n, x, pad, value):
        info, shape = self._info(x), self._shape_of(x)
        if not isinstance(pad, (tuple, list)):
            return self.unsupported(n, "pad with computed sizes")
        padded = {len(shape) - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
        if isinstance(info, ChannelInfo) and info.cdim in padded:
            return self.unsupported(n, "pads the channel dim")
        self.kinds[n.name] = "spatial"
        if isinstance(info, ParamInfo):
            return self.unsupported(n, "pads a parameter")
        return info

    def _channel_shuffle(self, n, x, groups: int, value):
        ids = self.consume(n, x, 1, "ChannelShuffle")
        c = len(ids)
        if c % groups:
            return self.unsupported(n, "channel shuffle of a channel count its groups do not divide")
        arr = ids.reshape(groups, c // groups)
        for j in range(c // groups):  # keep the groups equal: channel j of every group goes together
            for g in range(1, groups):
                self.uf.union(arr[0, j], arr[g, j])
        self.kinds[n.name] = "structural"
        return ChannelInfo(1, np.repeat(arr[0], groups))

    def _reshape(self, n, x, value, shape_args):
        """view / reshape / flatten. Dims are matched in blocks of equal product; in the block holding the
        channel dim, exactly one output dim may change size (the one given as -1 or computed at run time,
        or the merged dim of a flatten), and positions along the block's other dims are coupled so that
        removing a channel removes whole slices along it."""
        info, in_shape = self._info(x), self._shape_of(x)
        out_shape = tuple(value.shape)
        self.kinds[n.name] = "structural"
        if isinstance(info, ParamInfo):
            return self._reshape_param(n, info, in_shape, out_shape)
        if not isinstance(info, ChannelInfo):
            return info
        if shape_args is None:  # flatten: nothing is a fixed size
            literal = [False] * len(out_shape)
        else:
            if len(shape_args) != len(out_shape):
                return self.unsupported(n, "reshape with a shape the analysis cannot read")
            literal = [isinstance(s, int) and s != -1 for s in shape_args]
        blocks = _reshape_blocks(in_shape, out_shape)
        if blocks is None:
            return self.unsupported(n, "a reshape the analysis cannot follow")
        ins, outs = next((i, o) for i, o in blocks if info.cdim in i)
        if not outs:
            return self.unsupported(n, "a reshape that drops the channel dim")
        in_sizes = [in_shape[k] for k in ins]
        pos = ins.index(info.cdim)
        arr = np.broadcast_to(info.ids.reshape([-1 if k == pos else 1 for k in range(len(ins))]), in_sizes)
        arr = np.ascontiguousarray(arr).reshape([out_shape[k] for k in outs])
        if len(outs) == 1:
            if literal[outs[0]]:
                return self.unsupported(n, f"reshape to a fixed size {out_shape[outs[0]]} on the channel dim "
                                           "(write -1 or a size computed from the input)")
            return ChannelInfo(outs[0], arr.reshape(-1))
        varying = [ax for ax in range(len(outs))
                   if arr.shape[ax] > 1 and not (arr == np.take(arr, [0], axis=ax)).all()]
        free = [ax for ax in varying if not literal[outs[ax]]]
        if len(free) != 1:
            return self.unsupported(n, "a reshape that splits channels over several dims with no single "
                                       "dim of run-time size")
        a = free[0]
        rows = np.moveaxis(arr, a, 0).reshape(arr.shape[a], -1)
        for row in rows:
            for e in row[1:].tolist():
                self.uf.union(row[0], e)
        return ChannelInfo(outs[a], rows[:, 0].copy())

    def _reshape_param(self, n, info: ParamInfo, in_shape, out_shape):
        # only views that insert or drop size-1 dims keep a parameter's axes readable
        if [s for s in in_shape if s != 1] != [s for s in out_shape if s != 1]:
            return self.unsupported(n, "a reshape of a parameter")
        src = [(s, a) for s, a in zip(in_shape, info.axes) if s != 1]
        axes, it = [], iter(src)
        for s in out_shape:
            axes.append(next(it)[1] if s != 1 else None)
        return ParamInfo(info.target, info.shape, tuple(axes))

    def _permute(self, n, x, dims, value):
        info = self._info(x)
        self.kinds[n.name] = "structural"
        if dims is None:
            return self.unsupported(n, "permute with computed dims")
        rank = value.dim()
        dims = [_norm_dim(d, rank) for d in dims]
        if isinstance(info, ChannelInfo):
            return ChannelInfo(dims.index(info.cdim), info.ids)
        if isinstance(info, ParamInfo):
            return ParamInfo(info.target, info.shape, tuple(info.axes[d] for d in dims))
        return info

    def _transpose(self, n, x, d0, d1, value):
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return self.unsupported(n, "transpose with computed dims")
        rank = value.dim()
        dims = list(range(rank))
        d0, d1 = _norm_dim(d0, rank), _norm_dim(d1, rank)
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return self._permute(n, x, dims, value)

    def _permute_to(self, n, x, value):  # .t(), .T, .mT
        rank = value.dim()
        dims = list(range(rank))
        if rank >= 2:
            dims[-1], dims[-2] = dims[-2], dims[-1]
        return self._permute(n, x, dims, value)

    def _squeeze(self, n, x, dims, unsqueeze: bool, value):
        """unsqueeze(dim) / squeeze([dims]): a size-1 dim inserted or removed."""
        info, in_shape = self._info(x), self._shape_of(x)
        out_rank = value.dim()
        self.kinds[n.name] = "structural"
        if unsqueeze:
            if not isinstance(dims, int):
                return self.unsupported(n, "unsqueeze of a computed dim")
            d = _norm_dim(dims, out_rank)
            mapping = list(range(len(in_shape)))
            mapping.insert(d, None)
        else:
            if dims is None:
                removed = {i for i, s in enumerate(in_shape) if s == 1}
            elif isinstance(dims, int):
                removed = {_norm_dim(dims, len(in_shape))}
            elif isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims):
                removed = {_norm_dim(d, len(in_shape)) for d in dims}
            else:
                return self.unsupported(n, "squeeze of a computed dim")
            removed = {d for d in removed if in_shape[d] == 1}
            mapping = [i for i in range(len(in_shape)) if i not in removed]
        if len(mapping) != out_rank:
            return self.unsupported(n, "a squeeze the analysis cannot follow")
        if isinstance(info, ChannelInfo):
            if info.cdim not in mapping:
                return self.unsupported(n, "squeezes the channel dim away")
            return ChannelInfo(mapping.index(info.cdim), info.ids)
        if isinstance(info, ParamInfo):
            return ParamInfo(info.target, info.shape, tuple(None if m is None else info.axes[m] for m in mapping))
        return info

    def _expand(self, n, x, value):
        info, in_shape = self._info(x), self._shape_of(x)
        out_shape = tuple(value.shape)
        off = len(out_shape) - len(in_shape)
        self.kinds[n.name] = "structural"
        if isinstance(info, ChannelInfo):
            if in_shape[info.cdim] != out_shape[info.cdim + off]:
                return self.unsupported(n, "expands the channel dim")
            return ChannelInfo(info.cdim + off, info.ids)
        if isinstance(info, ParamInfo):
            axes = [None] * off + [a if s == o else None for a, s, o in zip(info.axes, in_shape, out_shape[off:])]
            return ParamInfo(info.target, info.shape, tuple(axes))
        return info

    def _cat(self, n, parts, dim, value):
        if not isinstance(dim, int):
            return self.unsupported(n, "cat over a computed dim")
        rank = value.dim()
        dim = _norm_dim(dim, rank)
        parts = [p for p in parts if isinstance(p, torch.fx.Node)]
        infos = [self._info(p) for p in parts]
        self.kinds[n.name] = "structural"
        if any(isinstance(i, ChannelInfo) and i.cdim == dim for i in infos):
            pieces = []
            for p, info in zip(parts, infos):
                shape = self._shape_of(p)
                ids = self.ids_along(info, dim, shape)
                if ids is None:
                    ids = self.uf.new(shape[dim], reason=f"{n.name}: concatenates channels with a tensor that "
                                                         "carries none on that dim")
                if isinstance(info, ChannelInfo) and info.cdim != dim:
                    self.uf.block(info.ids, f"{n.name}: concatenates tensors with channels on different dims")
                pieces.append(ids)
            return ChannelInfo(dim, np.concatenate(pieces))
        # along another dim: every part shares the channel positions
        chan = [(p, i) for p, i in zip(parts, infos) if isinstance(i, ChannelInfo)]
        if not chan:
            if any(isinstance(i, Opaque) for i in infos):
                return next(i for i in infos if isinstance(i, Opaque))
            if any(isinstance(i, ParamInfo) for i in infos):
                return self.unsupported(n, "concatenates parameters")
            return NoChannels()
        return self._join(n, parts, tuple(value.shape))

    def _stack(self, n, parts, dim, value):
        if not isinstance(dim, int):
            return self.unsupported(n, "stack over a computed dim")
        rank = value.dim()
        dim = _norm_dim(dim, rank)
        parts = [p for p in parts if isinstance(p, torch.fx.Node)]
        infos = [self._info(p) for p in parts]
        if not any(isinstance(i, ChannelInfo) for i in infos):
            if any(isinstance(i, (Opaque, ParamInfo)) for i in infos):
                return self.unsupported(n, "stacks tensors of unknown channels")
            return NoChannels()
        cdims = {i.cdim for i in infos if isinstance(i, ChannelInfo)}
        if len(cdims) != 1 or any(not isinstance(i, ChannelInfo) for i in infos):
            return self.unsupported(n, "stacks tensors with different channel dims")
        c = cdims.pop()
        ids = infos[0].ids
        for i in infos[1:]:
            self.uf.union_arrays(ids, i.ids)
        self.kinds[n.name] = "structural"
        return ChannelInfo(c + 1 if dim <= c else c, ids)

    def _chunk(self, n, x, dim, value, split_arg):
        info, shape = self._info(x), self._shape_of(x)
        if not isinstance(dim, int) or not isinstance(value, (tuple, list)):
            return self.unsupported(n, "a split over a computed dim")
        dim = _norm_dim(dim, len(shape))
        sizes = [t.shape[dim] for t in value]
        self.kinds[n.name] = "structural"
        if not isinstance(info, ChannelInfo) or info.cdim != dim:
            if isinstance(info, ParamInfo):
                return self.unsupported(n, "splits a parameter")
            return TupleInfo([info for _ in value])
        if split_arg is not None and not isinstance(split_arg, torch.fx.Node):
            return self.unsupported(n, f"split of the channels into fixed sizes {sizes}")
        if len(set(sizes)) != 1:
            return self.unsupported(n, "split of the channels into unequal pieces")
        k = sizes[0]
        arr = info.ids.reshape(len(sizes), k)
        for j in range(k):  # the pieces must stay equal: position j of every piece goes together
            for p in range(1, len(sizes)):
                self.uf.union(arr[0, j], arr[p, j])
        return TupleInfo([ChannelInfo(dim, arr[p].copy()) for p in range(len(sizes))])

    def _unbind(self, n, x, dim, value):
        info, shape = self._info(x), self._shape_of(x)
        if not isinstance(dim, int):
            return self.unsupported(n, "unbind over a computed dim")
        dim = _norm_dim(dim, len(shape))
        if isinstance(info, ChannelInfo):
            if info.cdim == dim:
                return self.unsupported(n, "unbinds the channels")
            c = info.cdim - (1 if info.cdim > dim else 0)
            self.kinds[n.name] = "structural"
            return TupleInfo([ChannelInfo(c, info.ids) for _ in value])
        if isinstance(info, ParamInfo):
            return self.unsupported(n, "unbinds a parameter")
        return TupleInfo([info for _ in value])

    def _getitem(self, n, x, index, value):
        info, shape = self._info(x), self._shape_of(x)
        if isinstance(info, TupleInfo):
            if isinstance(index, int):
                self.kinds[n.name] = "structural"
                return info.items[index]
            return self.unsupported(n, "indexes a tuple with a computed index")
        if not isinstance(shape, tuple):
            return self.unsupported(n, "indexes a value the analysis cannot follow")
        self.kinds[n.name] = "structural"
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (torch.fx.Node, list, torch.Tensor)) and not _is_full_slice(i) for i in idx):
            return self.unsupported(n, "advanced or computed indexing")
        n_ellipsis = sum(1 for i in idx if i is Ellipsis)
        if n_ellipsis > 1:
            return self.unsupported(n, "indexing with several ellipses")
        consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: List[Any] = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(shape) - consumed))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None)))
        # map input dims to output dims
        mapping: List[Optional[int]] = []  # output dim -> input dim (None for inserted)
        d_in = 0
        for i in expanded:
            if i is None:
                mapping.append(None)
            elif isinstance(i, int):
                d_in += 1
            else:
                mapping.append(d_in)
                d_in += 1
        sliced = {}  # input dim -> slice, for non-full slices
        d_in = 0
        for i in expanded:
            if i is None:
                continue
            if isinstance(i, slice) and not _is_full_slice(i):
                sliced[d_in] = i
            if isinstance(i, int):
                sliced[d_in] = i
            d_in += 1
        if isinstance(info, ChannelInfo):
            if info.cdim in sliced:
                return self.unsupported(n, "indexes channels by position")
            return ChannelInfo(mapping.index(info.cdim), info.ids)
        if isinstance(info, ParamInfo):
            if any(info.axes[d] is not None for d in sliced):
                return self.unsupported(n, "indexes a parameter by position")
            return ParamInfo(info.target, info.shape, tuple(None if m is None else info.axes[m] for m in mapping))
        return info


def _compare_outputs(got, want) -> str:
    """'' when the re-implemented attention's output matches the module's, else why not."""
    if isinstance(want, torch.Tensor):
        got = got[0] if isinstance(got, tuple) and not isinstance(want, tuple) else got
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return "its output has another structure than the re-implementation's"
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return "its forward differs from a standard self-attention on the example input"
        return ""
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return "its output has another structure than the re-implementation's"
        for g, w in zip(got, want):
            if (g is None) != (w is None):
                return "its attention weights output differs"
            if w is not None:
                why = _compare_outputs(g, w)
                if why:
                    return why
        return ""
    return "its output is not a tensor"


def _consistent(info, value) -> bool:
    if isinstance(info, ChannelInfo):
        return isinstance(value, torch.Tensor) and 0 <= info.cdim < value.dim() and \
            value.shape[info.cdim] == len(info.ids)
    if isinstance(info, ParamInfo):
        return isinstance(value, torch.Tensor) and len(info.axes) == value.dim() and all(
            a is None or info.shape[a] == value.shape[d] or value.shape[d] == 1 for d, a in enumerate(info.axes))
    if isinstance(info, TupleInfo):
        return isinstance(value, (tuple, list)) and len(value) == len(info.items) and all(
            _consistent(i, v) for i, v in zip(info.items, value))
    return True


def _block_shared_parameters(a: "Analysis", model: nn.Module) -> None:
    """A parameter reachable under several names (tied weights) would be sliced separately per module and
    silently untied: every member holding it is blocked."""
    owners: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    shared = [names for names in owners.values() if len(names) > 1]
    if not shared:
        return
    for names in shared:
        reason = f"parameter shared by {', '.join(names)} (tied weights)"
        holders = {nm.rpartition(".")[0] for nm in names} | set(names)
        for (key, _), e in a.slots.items():
            if key[0] in holders:
                a.uf.block([e], reason)


def _flatten_args(args):
    out = []

    def visit(a):
        if isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
        elif isinstance(a, slice):
            visit((a.start, a.stop, a.step))
        else:
            out.append(a)

    visit(args)
    return out


def _arg(n: torch.fx.Node, pos: int, name: str, default=None):
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _shape_arg(rest):
    """The shape argument of view/reshape: either a sequence or the remaining positional args."""
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return list(rest)


def _int_list(rest):
    dims = _shape_arg(rest)
    return dims if all(isinstance(d, int) for d in dims) else None


def _is_full_slice(i) -> bool:
    return isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1)


def _reshape_blocks(a: Sequence[int], b: Sequence[int]):
    """Matches the dims of two shapes of equal size in blocks of equal product: [(in dims, out dims)]."""
    if 0 in a or 0 in b:
        return None
    blocks, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ins, outs, pa, pb = [], [], 1, 1
        if i < len(a):
            pa *= a[i]
            ins.append(i)
            i += 1
        if j < len(b):
            pb *= b[j]
            outs.append(j)
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                ins.append(i)
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                outs.append(j)
                j += 1
            else:
                return None
        blocks.append((ins, outs))
    return blocks


def analyze(model: nn.Module, example_input) -> Analysis:
    """Traces ``model`` and runs the channel analysis on ``example_input`` (a tensor or a tuple of
    positional inputs), in eval mode and without gradients; the model's mode is restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    gm = trace_model(model)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    analysis = Analysis(gm)
    try:
        model.eval()
        gm.eval()
        with torch.no_grad():
            analysis.run(*args)
    except ChannelTraceError:
        raise
    except Exception as exc:
        raise ChannelTraceError(f"channel analysis: running {type(model).__name__} on the example input failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    _block_shared_parameters(analysis, model)
    return analysis
