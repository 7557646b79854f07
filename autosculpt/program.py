"""An exported ``deployed.pt2`` run at graph-executor speed, without the model's Python class.

``autosculpt export`` writes ``deployed.pt2``: a ``torch.export`` program of the deployed form whose
pattern layers are the ``autosculpt::pattern_conv2d`` op, with the residual adds, ReLUs, pooling and
classifier as separate ATen ops. Run through ``ExportedProgram.module()`` every op goes through
PyTorch's dispatcher, so the artifact is slower than the form the benchmarks measure (the graph
executor, :class:`autosculpt.executor.GraphExecutorModel`). :func:`executor_from_program` translates
the program back into modules and builds that executor on it:

* Every node whose inputs are all parameters, buffers or constants (``weight * mask`` of a depthwise
  pattern conv, dtype casts) is evaluated once; metadata assertions are dropped.
* ``autosculpt::pattern_conv2d`` -> ``PatternConv2d`` (its tap mask, stride, padding, dilation, groups);
  ``aten.conv2d`` / ``aten.convolution`` (not transposed) -> ``nn.Conv2d``; ``aten.linear`` ->
  ``nn.Linear``; ``aten.relu`` / ``hardtanh(0, b)`` / ``clamp(0, b)`` (in place or not) -> ``nn.ReLU`` /
  ``nn.Hardtanh``; ``aten.max_pool2d`` and ``autosculpt::max_pool2d`` -> max-pools;
  ``aten.adaptive_avg_pool2d``, ``aten.mean.dim``, ``aten.flatten.using_ints``, ``aten.add.Tensor`` of
  two activations; dropout (inference), clone, alias and detach are identities.
* The result is fused as the deployed route fuses a model (:func:`autosculpt.fuse_for_inference` with
  ``dense_convs=True``): ``add(conv, other)`` becomes the conv's ``residual`` when the conv's output
  has no other reader, so the add runs in the kernel's epilogue, and so do the ReLUs.

Any other node raises :class:`~autosculpt.executor.UnsupportedGraph` naming it (as does a conv or
pool the executor does not cover). Inputs that are not finite run through the program itself, so NaN
and inf propagate exactly as in ``ep.module()`` (a pattern conv skips its dropped taps; see
:mod:`autosculpt.executor`).
"""
from __future__ import annotations

import operator
import os
from typing import Any, Dict, Union

import torch
from torch import nn

from .fuse import FastMaxPool2d

__all__ = ["ProgramExecutor", "executor_from_program", "load_deployed", "program_to_modules"]

_aten = torch.ops.aten
# ops that only assert something about a value (no output used): dropped
_ASSERTS = {_aten._assert_tensor_metadata.default, _aten._assert_scalar.default,
            _aten.sym_constrain_range_for_size.default}
_IDENTITY = {_aten.clone.default, _aten.alias.default, _aten.detach.default, _aten.dropout.default,
             _aten.feature_dropout.default, _aten.contiguous.default}
_INPLACE = {_aten.relu_.default, _aten.hardtanh_.default, _aten.clamp_.default, _aten.add_.Tensor}


class ProgramExecutor(nn.Module):
    """An exported program run by the graph executor (built by :func:`executor_from_program`).

    ``forward(x)`` takes a float32 CPU (N, C, H, W) batch in any memory format, converts it to
    channels_last and runs the executor (a batch size seen for the first time is planned on that
    call); a batch holding NaN or inf runs through ``program`` (``ExportedProgram.module()``) instead.
    ``.executor`` is the :class:`~autosculpt.executor.GraphExecutorModel`, ``.module`` the fused
    channels-last module it was built from."""

    def __init__(self, executor: nn.Module, program: nn.Module):
        super().__init__()
        self.executor = executor
        self.module = executor.source
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
                return self.program(x)
            return self.executor(x.contiguous(memory_format=torch.channels_last))


def executor_from_program(ep: Union[torch.export.ExportedProgram, str, os.PathLike],
                          example_input: torch.Tensor) -> ProgramExecutor:
    """The graph executor computing what the exported program ``ep`` computes (see the module docstring).

    Args:
        ep: a ``torch.export.ExportedProgram`` of one image batch to one tensor (typically
            ``deployed.pt2`` of ``autosculpt export``), or the path of a saved one.
        example_input: a float32 CPU (N, C, H, W) batch of the program's input; its shape is planned
            at once (others on their first call).

    Returns a :class:`ProgramExecutor`. Raises :class:`~autosculpt.executor.UnsupportedGraph` naming
    the first node the executor does not cover.
    """
    if isinstance(ep, (str, os.PathLike)):
        import autosculpt.ops  # noqa: F401 - registers the custom ops the program calls

        ep = torch.export.load(os.fspath(ep))
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"ep: expected a torch.export.ExportedProgram or a path, got {type(ep).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim != 4:
        raise ValueError("example_input: expected a 4-D (N, C, H, W) tensor")
    if example_input.dtype != torch.float32 or not example_input.is_cpu:
        raise ValueError("example_input: the graph executor runs float32 CPU tensors")
    from .executor import GraphExecutorModel
    from .fuse import fuse_for_inference

    gm = program_to_modules(ep)
    x = example_input.contiguous(memory_format=torch.channels_last)
    fused = fuse_for_inference(gm, x, dense_convs=True).to(memory_format=torch.channels_last)
    return ProgramExecutor(GraphExecutorModel(fused, x), ep.module())


def load_deployed(path: Union[str, os.PathLike], example_input: torch.Tensor) -> ProgramExecutor:
    """A saved ``deployed.pt2`` (``autosculpt export``) loaded to run at graph-executor speed:
    :func:`executor_from_program` of ``torch.export.load(path)``. The batch size is free (each new one
    is planned on its first call); ``example_input`` is one batch of the model's input."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(f"path: no file {path!r}")
    return executor_from_program(path, example_input)


def _unsupported(node: torch.fx.Node, why: str = "is not covered"):
    from .executor import UnsupportedGraph

    return UnsupportedGraph(f"program executor: node {node.name} ({node.format_node()}) {why}")


def program_to_modules(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The ATen graph of ``ep`` as a ``torch.fx.GraphModule`` of modules (the executor's vocabulary),
    constant subgraphs folded. Raises :class:`~autosculpt.executor.UnsupportedGraph` naming the first
    node it cannot translate."""
    from torch.export.graph_signature import InputKind, OutputKind

    from .executor import UnsupportedGraph

    sig = ep.graph_signature
    consts: Dict[str, Any] = {}
    n_user = 0
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            n_user += 1
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            consts[spec.arg.name] = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            consts[spec.arg.name] = ep.constants[spec.target]
        else:
            raise UnsupportedGraph(f"program executor: input {spec.arg.name} of kind {spec.kind.name} is not covered")
    if n_user != 1:
        raise UnsupportedGraph(f"program executor: the program must take one input tensor (it takes {n_user})")
    outs = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if outs or sum(1 for s in sig.output_specs) != 1:
        raise UnsupportedGraph("program executor: the program must return one tensor and mutate no buffer")

    root = nn.Module()
    graph = torch.fx.Graph()
    env: Dict[torch.fx.Node, Any] = {}  # node -> new fx node (a value of the input) or a folded constant
    out_node = None

    def is_value(a) -> bool:
        return isinstance(a, torch.fx.Node)

    def lower(a):
        """A source argument: its folded constant or its node in the new graph."""
        return torch.fx.node.map_arg(a, lambda n: env[n])

    def const_tensor(node, a, what):
        v = lower(a)
        if v is not None and not isinstance(v, torch.Tensor):
            raise _unsupported(node, f"has a {what} that is not a constant tensor")
        return v

    def add_module(node, mod: nn.Module, x) -> torch.fx.Node:
        name = node.name
        root.add_module(name, mod)
        return graph.call_module(name, (x,))

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            env[node] = consts[node.name] if node.name in consts else graph.placeholder("x")
            continue
        if node.op == "output":
            res = node.args[0]
            res = res[0] if isinstance(res, (tuple, list)) and len(res) == 1 else res
            out = env.get(res) if is_value(res) else None
            if not isinstance(out, torch.fx.Node):
                raise UnsupportedGraph("program executor: the program's output is not computed from its input")
            out_node = graph.output(out)
            continue
        if node.op != "call_function":
            raise _unsupported(node)
        target = node.target
        inputs = node.all_input_nodes
        if all(not isinstance(env[a], torch.fx.Node) for a in inputs):  # constant subgraph: fold it
            with torch.no_grad():
                env[node] = target(*lower(node.args), **lower(node.kwargs))
            continue
        if target in _ASSERTS:
            continue  # a metadata check of a value the executor computes in the asserted form
        args = list(node.args)
        kw = dict(node.kwargs)

        def arg(i, name, default=None):
            return args[i] if len(args) > i else kw.get(name, default)

        x = lower(args[0]) if args else None
        if args and not isinstance(x, torch.fx.Node):
            raise _unsupported(node, "takes a constant where the executor needs an activation")
        if target == torch.ops.autosculpt.pattern_conv2d.default:
            from .nn import PatternConv2d

            weight = const_tensor(node, args[1], "weight")
            mask = const_tensor(node, args[2], "tap mask")
            bias = const_tensor(node, args[3], "bias")
            groups = int(args[7])
            conv = PatternConv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), tuple(args[4]),
                                 tuple(args[5]), tuple(args[6]), groups, bias is not None, tap_mask=mask.to(torch.bool),
                                 backend=str(args[8]), dtype=weight.dtype).eval()
            with torch.no_grad():
                conv.weight.copy_(weight)
                if bias is not None:
                    conv.bias.copy_(bias)
            conv.enforce_mask()
            env[node] = add_module(node, conv, x)
        elif target in (_aten.conv2d.default, _aten.convolution.default):
            weight = const_tensor(node, args[1], "weight")
            bias = const_tensor(node, arg(2, "bias"), "bias")
            if target == _aten.convolution.default:
                if arg(6, "transposed"):
                    raise _unsupported(node, "(a transposed conv) is not covered")
                stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
            else:
                stride, padding = arg(3, "stride", 1), arg(4, "padding", 0)
                dilation, groups = arg(5, "dilation", 1), arg(6, "groups", 1)
            if weight.ndim != 4:
                raise _unsupported(node, f"(a {weight.ndim - 2}-D conv) is not covered")
            groups = int(groups)
            conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), _pair(stride),
                             _pair(padding), _pair(dilation), groups, bias is not None, dtype=weight.dtype).eval()
            with torch.no_grad():
                conv.weight.copy_(weight)
                if bias is not None:
                    conv.bias.copy_(bias)
            env[node] = add_module(node, conv, x)
        elif target == _aten.linear.default:
            weight = const_tensor(node, args[1], "weight")
            bias = const_tensor(node, arg(2, "bias"), "bias")
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, dtype=weight.dtype).eval()
            with torch.no_grad():
                lin.weight.copy_(weight)
                if bias is not None:
                    lin.bias.copy_(bias)
            env[node] = add_module(node, lin, x)
        elif target in (_aten.relu.default, _aten.relu_.default):
            env[node] = add_module(node, nn.ReLU(), x)
        elif target in (_aten.hardtanh.default, _aten.hardtanh_.default, _aten.clamp.default, _aten.clamp_.default):
            clamp = target in (_aten.clamp.default, _aten.clamp_.default)
            lo = arg(1, "min", None if clamp else -1.0)
            hi = arg(2, "max", None if clamp else 1.0)
            if lo != 0 or (hi is not None and not hi > 0):
                raise _unsupported(node, "(only a clamp to [0, b], b > 0: ReLU / ReLU6) is not covered")
            env[node] = add_module(node, nn.ReLU() if hi is None else nn.Hardtanh(0.0, float(hi)), x)
        elif target in (_aten.add.Tensor, _aten.add_.Tensor):
            other = lower(args[1]) if len(args) > 1 else None
            if not isinstance(other, torch.fx.Node) or arg(2, "alpha", 1) != 1:
                raise _unsupported(node, "(only the sum of two activations) is not covered")
            env[node] = graph.call_function(operator.add, (x, other))
        elif target == _aten.max_pool2d.default:
            kernel = _pair(args[1])
            stride = arg(2, "stride", None) or kernel
            pool = nn.MaxPool2d(kernel, _pair(stride), _pair(arg(3, "padding", 0)), _pair(arg(4, "dilation", 1)),
                                ceil_mode=bool(arg(5, "ceil_mode", False)))
            env[node] = add_module(node, pool, x)
        elif target == torch.ops.autosculpt.max_pool2d.default:
            env[node] = add_module(node, FastMaxPool2d(_pair(args[1]), _pair(args[2]), _pair(args[3])), x)
        elif target == _aten.adaptive_avg_pool2d.default:
            env[node] = add_module(node, nn.AdaptiveAvgPool2d(tuple(arg(1, "output_size"))), x)
        elif target == _aten.mean.dim:
            if arg(3, "dtype") is not None:
                raise _unsupported(node, "(a mean with a dtype) is not covered")
            dims = arg(1, "dim")
            env[node] = graph.call_method("mean", (x, tuple(dims) if isinstance(dims, (list, tuple)) else dims),
                                          {"keepdim": bool(arg(2, "keepdim", False))})
        elif target == _aten.flatten.using_ints:
            env[node] = graph.call_function(torch.flatten, (x, int(arg(1, "start_dim", 0))),
                                            {"end_dim": int(arg(2, "end_dim", -1))})
        elif target in _IDENTITY:
            if target in (_aten.dropout.default, _aten.feature_dropout.default) and arg(2, "train"):
                raise _unsupported(node, "(dropout in training mode) is not covered")
            env[node] = x
        else:
            raise _unsupported(node)
        if target in _INPLACE and is_value(args[0]):
            env[args[0]] = env[node]  # later readers of the mutated tensor read the result
    if out_node is None:
        raise UnsupportedGraph("program executor: the program has no output")
    gm = torch.fx.GraphModule(root, graph, class_name="DeployedProgram")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _pair(v):
    if isinstance(v, (list, tuple)):
        return tuple(int(i) for i in v) if len(v) == 2 else (int(v[0]),) * 2
    return (int(v), int(v))
