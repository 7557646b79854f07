"""A whole fused, channels-last model as one C++ call: the ``"autosculpt_graph"`` deployment route.

:class:`GraphExecutorModel` walks the ``torch.fx`` graph of a model that :func:`autosculpt.fuse_for_inference`
produced (BatchNorm folded, adds and ReLUs in the conv epilogues) and turns it into a list of steps of
``autosculpt._C.GraphExecutor``: every conv (pattern or dense, any kernel size up to 64 taps, groups 1)
and every linear layer through AutoSculpt's NHWC kernel with its epilogue, max-pool, global average
pool, adds and ReLUs in C++, over activation buffers allocated once per input shape (reused when a
value is dead: liveness over the graph). Nothing runs in Python between layers, so per-layer costs
(module calls, output allocations, torch's dispatch for pooling and the classifier) disappear: on a
CIFAR ResNet-20 they were a third of the fused model's time.

What it covers: ``PatternConv2d`` / ``nn.Conv2d`` (groups 1 through the pattern kernel; depthwise convs,
one filter per channel, vectorised over channels in NHWC), ``nn.Linear``, ``FastMaxPool2d`` /
``nn.MaxPool2d`` (dilation 1, floor mode), ``nn.AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` to 1×1
(or to the input's own size), ``mean`` over H and W, flatten, adds of equal shapes, ReLU and ReLU6
(fused into the producing conv or add when it is the only reader), SiLU and sigmoid (modules or
functions, a step of their own), a feature map times a per-channel ``(N, C, 1, 1)`` scale
(squeeze-excitation), dropout, identity and torchvision's stochastic depth (inference: EfficientNet).
Any other node raises :class:`UnsupportedGraph` naming it: the deployment race
then reports the route as skipped and uses another one.

Non-finite inputs: a pattern conv skips its dropped taps, where ``conv2d(x, weight * mask)`` computes
``0 * inf = NaN``. The executor checks the input of every conv with dropped taps; when a value is not
finite the call is run through the module form instead (exactly the reference semantics).
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import _ext
from ._fx import symbolic_trace
from .fuse import FastMaxPool2d

__all__ = ["GraphExecutorModel", "UnsupportedGraph"]


class UnsupportedGraph(ValueError):
    """The model holds an operation the graph executor does not run (the message names the node)."""


_RELU = {F.relu, torch.relu, torch.relu_}
_INF = float("inf")
_ADD = {operator.add, operator.iadd, torch.add}
_FLATTEN_FN = {torch.flatten}
_WEIGHTS_PER_IMAGE = 64  # see conv_step: weights (floats) per image's input + output floats run image by image


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


class _Value:
    """A tensor of the graph: its storage (buffer slot, shared by aliases), logical shape and, for a
    flattened NHWC map, the (C, H, W) it came from (a following linear layer permutes its weights)."""

    def __init__(self, storage: int, shape: Tuple[int, ...], flat_from: Optional[Tuple[int, int, int]] = None):
        self.storage, self.shape, self.flat_from = storage, shape, flat_from


class GraphExecutorModel(nn.Module):
    """``module`` (a fused, channels-last model in eval mode) run as one C++ call per forward.

    Args:
        module: what to run (typically ``fuse_for_inference(model, x, dense_convs=True)`` moved to
            channels_last); kept as ``.source`` and used for inputs that are not finite.
        example_input: a batch of the model's input (its shape is planned at once; other shapes are
            planned on their first call).

    Raises :class:`UnsupportedGraph` when the model holds an operation the executor does not cover,
    and ``ValueError`` for a model torch.fx cannot trace.
    """

    def __init__(self, module: nn.Module, example_input: torch.Tensor):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        if not isinstance(example_input, torch.Tensor) or example_input.ndim != 4:
            raise ValueError("example_input: expected a 4-D (N, C, H, W) tensor")
        self.source = module
        try:
            self._gm = module if isinstance(module, torch.fx.GraphModule) else symbolic_trace(module)
        except Exception as exc:  # noqa: BLE001 - fx raises many types; the route is skipped with the reason
            raise ValueError(f"module: torch.fx cannot trace it ({type(exc).__name__}: {exc})") from exc
        self._plans: Dict[tuple, tuple] = {}
        self._step_names: Dict[tuple, List[str]] = {}
        self._reordered: Dict[tuple, List[str]] = {}
        self._plan(example_input)

    # -- running -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.dtype != torch.float32 or not x.is_cpu:
            raise ValueError("x: expected a float32 CPU tensor of shape (N, C, H, W)")
        x = x.contiguous(memory_format=torch.channels_last)
        plan = self._plans.get(tuple(x.shape)) or self._plan(x)
        executor, out_shape, channels_last, _keep = plan
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(out_shape, dtype=torch.float32, memory_format=fmt)
        if not executor.run(x.data_ptr(), out.data_ptr(), torch.get_num_threads()):
            with torch.no_grad():
                return self.source(x)  # a non-finite value reached a pattern conv: the exact module form
        return out

    def bound_call(self, x: torch.Tensor) -> Callable[[], None]:
        """A zero-argument call running the C++ steps on ``x`` into an output buffer of its own: the
        executor alone, without the Python of :meth:`forward` (a layer timed alone, as it runs inside
        a whole model). ``x`` must stay alive and finite; the output is overwritten on every call."""
        x = x.contiguous(memory_format=torch.channels_last)
        executor, out_shape, channels_last, _keep = self._plans.get(tuple(x.shape)) or self._plan(x)
        out = torch.empty(out_shape, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        ptr_x, ptr_out = x.data_ptr(), out.data_ptr()

        def call():
            if not executor.run(ptr_x, ptr_out, torch.get_num_threads()):
                raise ValueError("x: holds non-finite values (the executor runs finite inputs only)")
            return out

        call.keep = (x, out)  # the buffers the pointers refer to
        return call

    @torch.no_grad()
    def step_times(self, x: torch.Tensor, repeats: int = 20) -> List[Tuple[str, float]]:
        """``(node name, median ms)`` of every C++ step at ``x``'s shape over ``repeats`` runs: where a
        forward's time goes (benchmarks and tuning; the steps run as in :meth:`forward`). Memory-bound
        steps can pass cost to their neighbours (a step that leaves its output in L3 makes the next one
        slower): judge a change by the whole forward, timed interleaved, not by the step sum."""
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
        x = x.contiguous(memory_format=torch.channels_last)
        plan = self._plans.get(tuple(x.shape)) or self._plan(x)
        executor, out_shape, channels_last, _keep = plan
        out = torch.empty(out_shape, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        runs = []
        for _ in range(repeats + 1):
            sec = torch.zeros(executor.num_steps, dtype=torch.float64)
            if not executor.run_timed(x.data_ptr(), out.data_ptr(), torch.get_num_threads(), sec.data_ptr()):
                raise ValueError("x: holds non-finite values (the executor runs finite inputs only)")
            runs.append(sec)
        med = torch.stack(runs[1:]).median(0).values * 1e3
        return list(zip(self._step_names[tuple(x.shape)], med.tolist()))

    def batch_schedule(self, x: torch.Tensor, threads: Optional[int] = None) -> Tuple[bool, List[str]]:
        """How a batch shaped like ``x`` runs at ``threads`` threads (default: torch's): whether each
        thread takes whole images through the runs of per-image steps, and the names of the steps that
        run on the whole batch at once (weights large against an image's activations: classifiers,
        VGG's 512-channel convs on 2×2 maps)."""
        x = x.contiguous(memory_format=torch.channels_last)
        executor = (self._plans.get(tuple(x.shape)) or self._plan(x))[0]
        names = self._step_names[tuple(x.shape)]
        whole = [n for n, per in zip(names, executor.per_image_steps) if not per]
        return bool(executor.splits_batch(int(threads or torch.get_num_threads()))), whole

    @property
    def planned_shapes(self) -> List[Tuple[int, ...]]:
        """Input shapes planned so far (the example's at construction, others on their first call)."""
        return list(self._plans)

    @property
    def reordered_layers(self) -> List[str]:
        """Nodes (of the example input's plan) whose output channels are stored block by block: each
        kernel block of filters sharing a tap mask on consecutive channels, its readers' weights permuted
        to match (see :func:`_free_order_convs`)."""
        return list(next(iter(self._reordered.values())))

    @property
    def num_steps(self) -> int:
        """C++ steps of the example input's plan."""
        return next(iter(self._plans.values()))[0].num_steps

    # -- planning ----------------------------------------------------------------------------------
    def _plan(self, x: torch.Tensor):
        ext = _ext.require()
        gm = self._gm
        with torch.no_grad():
            ShapeProp(gm).propagate(x.contiguous(memory_format=torch.channels_last))
        modules = dict(gm.named_modules())
        values: Dict[torch.fx.Node, _Value] = {}
        storages: List[int] = []  # floats per storage
        steps: List[dict] = []
        keep: list = []  # tensors and packed convs the steps point to

        def shape_of(node) -> Tuple[int, ...]:
            tm = node.meta.get("tensor_meta")
            if tm is None or not hasattr(tm, "shape"):
                raise UnsupportedGraph(f"graph executor: node {node.format_node()} does not produce one tensor")
            if tm.dtype != torch.float32:
                raise UnsupportedGraph(f"graph executor: node {node.name} is {tm.dtype}, only float32 runs here")
            return tuple(tm.shape)

        def new_value(node, flat_from=None) -> _Value:
            shape = shape_of(node)
            numel = 1
            for d in shape:
                numel *= d
            storages.append(max(1, numel))
            v = _Value(len(storages) - 1, shape, flat_from)
            values[node] = v
            return v

        def value(arg) -> _Value:
            if not isinstance(arg, torch.fx.Node) or arg not in values:
                raise UnsupportedGraph(f"graph executor: argument {arg!r} is not a tensor of the graph")
            return values[arg]

        def alias(node, src: _Value, shape=None, flat_from=None):
            values[node] = _Value(src.storage, shape or shape_of(node), flat_from)

        def conv_step(src: _Value, node, weight, mask, bias, stride, padding, dilation, relu, residual=None,
                      geometry=None, packed=None):
            if packed is None:  # (block_order hands over the weights it packed already)
                packed = ext.PackedPatternConvNhwc(weight.data_ptr(), mask.data_ptr(), *weight.shape)
            keep.extend([packed, weight, mask, bias])
            out = new_value(node)
            n, c, h, w = geometry or (src.shape[0], src.shape[1], src.shape[2], src.shape[3])
            # image by image (see _assign_buffers) unless its weights outweigh an image's activations
            # many times over (classifiers; VGG's 512-channel convs on 2x2 maps): then the batch at once
            per_image = geometry is None and packed.executed_macs_per_pixel <= _WEIGHTS_PER_IMAGE * (
                (storages[src.storage] + storages[out.storage]) // x.shape[0])
            steps.append({"op": "conv", "in": src.storage, "res": None if residual is None else residual.storage,
                          "out": out.storage, "packed": packed, "geom": (n, h, w, c), "stride": stride,
                          "padding": padding, "dilation": dilation, "bias": bias, "relu": relu,
                          "hi": _INF, "check": not bool(mask.all()), "per_image": per_image})

        free = _free_order_convs(gm, modules)
        order: Dict[torch.fx.Node, Optional[torch.Tensor]] = {}  # stored channel j = logical channel order[j]

        def in_order(arg) -> Optional[torch.Tensor]:
            return order.get(arg) if isinstance(arg, torch.fx.Node) else None

        def block_order(node, w, mask) -> Tuple[Optional[torch.Tensor], object]:
            """The output channel order putting each kernel block on consecutive channels (None: keep),
            and the conv packed in that order (None when it was not packed here)."""
            if node not in free or bool((mask == mask[:1]).all()):
                return None, None
            perm = torch.arange(w.shape[0])
            best, best_packed, best_contig = None, None, -1
            for _ in range(3):  # the kernel's blocks of the reordered conv, until all are contiguous
                wp, mp = w[perm].contiguous(), mask[perm].contiguous()
                packed = ext.PackedPatternConvNhwc(wp.data_ptr(), mp.data_ptr(), *wp.shape)
                if packed.contiguous_blocks > best_contig:
                    best, best_packed, best_contig = perm, packed, packed.contiguous_blocks
                if best_contig == packed.num_blocks:
                    break
                perm = perm[torch.tensor(packed.filter_order, dtype=torch.long)]
            return (None if bool((best == torch.arange(w.shape[0])).all()) else best), best_packed

        def producer_step(v: _Value) -> Optional[dict]:
            for s in reversed(steps):
                if s["out"] == v.storage:
                    return s
            return None

        for node in gm.graph.nodes:
            first_step = len(steps)
            op, target = node.op, node.target
            if op == "placeholder":
                if values:
                    raise UnsupportedGraph("graph executor: the model must take one input tensor")
                new_value(node)
                continue
            if op == "output":
                out_arg = node.args[0]
                if not isinstance(out_arg, torch.fx.Node):
                    raise UnsupportedGraph("graph executor: the model must return one tensor")
                out_value = value(out_arg)
                if in_order(out_arg) is not None:  # pragma: no cover - the pre-pass keeps the output's order
                    raise AssertionError("graph executor: the output is in a permuted channel order")
                break
            mod = modules.get(target) if op == "call_module" else None
            args = node.args
            is_conv = mod is not None and (hasattr(mod, "tap_mask") or isinstance(mod, nn.Conv2d))
            if is_conv and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:
                src = value(args[0])
                if node.kwargs.get("residual") is not None or len(args) > 1 or len(src.shape) != 4:
                    raise UnsupportedGraph(f"graph executor: depthwise conv {target} with a residual input")
                act = _conv_activation(mod, target)
                c, taps = mod.out_channels, mod.kernel_size[0] * mod.kernel_size[1]
                w = mod.weight.detach().float().reshape(c, taps)
                if hasattr(mod, "tap_mask"):
                    w = w * mod.tap_mask.detach().reshape(c, taps).to(w.dtype)
                bias = mod.bias.detach().float() if mod.bias is not None else None
                pi = order[node] = in_order(args[0])  # channelwise: the input's channel order
                if pi is not None:
                    w, bias = w[pi], (bias[pi] if bias is not None else None)
                w = w.t().contiguous()  # [tap][channel]
                bias = bias.contiguous() if bias is not None else None
                keep.extend([w, bias])
                out = new_value(node)
                steps.append({"op": "depthwise", "in": src.storage, "out": out.storage, "geom": src.shape,
                              "k": tuple(mod.kernel_size), "stride": _pair(mod.stride), "padding": _pair(mod.padding),
                              "dilation": _pair(mod.dilation), "weight": w, "bias": bias, "relu": act == "relu",
                              "hi": _INF})
            elif is_conv:
                src = value(args[0])
                res = node.kwargs.get("residual", args[1] if len(args) > 1 else None)
                res_v = value(res) if res is not None else None
                if len(src.shape) != 4 or mod.groups != 1 or mod.kernel_size[0] * mod.kernel_size[1] > 64:
                    raise UnsupportedGraph(f"graph executor: conv {target} (groups {mod.groups}, kernel "
                                           f"{tuple(mod.kernel_size)}) is not covered (groups 1, up to 64 taps)")
                act = _conv_activation(mod, target)
                taps = mod.kernel_size[0] * mod.kernel_size[1]
                w = mod.weight.detach().float().contiguous()
                mask = (mod.tap_mask.detach().to(torch.uint8).contiguous() if hasattr(mod, "tap_mask")
                        else torch.ones(mod.out_channels, taps, dtype=torch.uint8))
                bias = mod.bias.detach().float().contiguous() if mod.bias is not None else None
                pi_in = in_order(args[0])
                if pi_in is not None:
                    w = w[:, pi_in].contiguous()
                if res is not None and in_order(res) is not None:  # pragma: no cover - the pre-pass forbids it
                    raise AssertionError(f"graph executor: residual of {target} in a permuted channel order")
                pi, packed = block_order(node, w, mask.view(mask.shape[0], -1))
                order[node] = pi
                if pi is not None:
                    w, mask = w[pi].contiguous(), mask[pi].contiguous()
                    bias = bias[pi].contiguous() if bias is not None else None
                conv_step(src, node, w, mask, bias, _pair(mod.stride), _pair(mod.padding), _pair(mod.dilation),
                          act == "relu", res_v, packed=packed)
            elif mod is not None and isinstance(mod, nn.Linear) or op == "call_function" and target is F.linear:
                src = value(args[0])
                if mod is not None:
                    weight, bias = mod.weight, mod.bias
                else:
                    weight = modules_param(gm, args[1])
                    bias = modules_param(gm, args[2]) if len(args) > 2 and args[2] is not None else None
                if len(src.shape) != 2:
                    raise UnsupportedGraph(f"graph executor: linear {node.name} on a {len(src.shape)}-D input")
                w = weight.detach().float()
                pi_in = in_order(args[0])
                if pi_in is not None:  # (a pooled 1x1 map or a 2-D input: the pre-pass fixes flattened maps)
                    w = w[:, pi_in]
                order[node] = None
                if src.flat_from is not None:  # flattened NCHW order -> our NHWC storage order
                    c, h, wd = src.flat_from
                    w = w.view(w.shape[0], c, h, wd).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
                w = w.contiguous().view(w.shape[0], w.shape[1], 1, 1)
                mask = torch.ones(w.shape[0], 1, dtype=torch.uint8)
                b = bias.detach().float().contiguous() if bias is not None else None
                # the batch as one row of pixels: the kernel tiles over them
                conv_step(src, node, w, mask, b, (1, 1), (0, 0), (1, 1), False,
                          geometry=(1, src.shape[1], 1, src.shape[0]))
            elif mod is not None and isinstance(mod, (nn.MaxPool2d, FastMaxPool2d)):
                src = value(args[0])
                if isinstance(mod, nn.MaxPool2d) and (_pair(mod.dilation) != (1, 1) or mod.ceil_mode or mod.return_indices):
                    raise UnsupportedGraph(f"graph executor: max-pool {target} (dilation, ceil mode or indices)")
                k = _pair(mod.kernel_size)
                s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
                p = _pair(mod.padding)
                out = new_value(node)
                steps.append({"op": "max_pool", "in": src.storage, "out": out.storage, "geom": src.shape,
                              "k": k, "s": s, "p": p})
            elif (mod is not None and isinstance(mod, nn.AdaptiveAvgPool2d)
                  or op == "call_function" and target is F.adaptive_avg_pool2d):
                src = value(args[0])
                size = _pair(mod.output_size if mod is not None else (args[1] if len(args) > 1 else node.kwargs["output_size"]))
                if size == tuple(src.shape[2:]):
                    alias(node, src)
                elif size == (1, 1):
                    out = new_value(node)
                    steps.append({"op": "mean", "in": src.storage, "out": out.storage, "geom": src.shape})
                else:
                    raise UnsupportedGraph(f"graph executor: adaptive average pool to {size} from {src.shape[2:]}")
            elif op == "call_method" and target == "mean":
                src = value(args[0])
                dims = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
                dims = {d % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims])} if dims is not None else None
                if dims != {2, 3} or len(src.shape) != 4:
                    raise UnsupportedGraph(f"graph executor: {node.format_node()} (only a mean over H and W)")
                out = new_value(node)  # (N, C) or (N, C, 1, 1): the same storage order
                steps.append({"op": "mean", "in": src.storage, "out": out.storage, "geom": src.shape})
            elif (mod is not None and isinstance(mod, nn.Flatten) or op == "call_function" and target in _FLATTEN_FN
                  or op == "call_method" and target == "flatten"):
                src = value(args[0])
                start = mod.start_dim if mod is not None else (args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0))
                end = mod.end_dim if mod is not None else node.kwargs.get("end_dim", -1)
                if len(src.shape) != 4 or start != 1 or end not in (-1, 3):
                    raise UnsupportedGraph(f"graph executor: {node.format_node()} (only flatten(x, 1) of a 4-D map)")
                _, c, h, w = src.shape
                alias(node, src, flat_from=None if h * w == 1 else (c, h, w))
            elif _activation_bound(node, mod) is not None:
                hi = _activation_bound(node, mod)
                src = value(args[0])
                prod = producer_step(src)
                sole = len(args[0].users) == 1 and src.flat_from is None
                if prod is not None and prod["op"] in ("conv", "depthwise", "add") and sole:
                    prod["relu"], prod["hi"] = True, min(prod["hi"], hi)  # fused into the producer's epilogue
                    alias(node, src)
                else:
                    out = new_value(node)
                    steps.append({"op": "clamp", "in": src.storage, "out": out.storage, "numel": storages[out.storage],
                                  "hi": hi})
            elif (smooth := _smooth_activation(node, mod)) is not None:
                src = value(args[0])
                out = new_value(node)
                steps.append({"op": "act", "in": src.storage, "out": out.storage, "numel": storages[out.storage],
                              "act": _ACT_IDS[smooth]})
            elif (op == "call_function" and target in _MUL and len(args) == 2 and not node.kwargs
                  and all(isinstance(a, torch.fx.Node) for a in args)):
                # a feature map times a per-channel vector of each image (squeeze-excitation)
                a, b = value(args[0]), value(args[1])
                fmap, vec = (a, b) if len(a.shape) == 4 and a.shape[2:] != (1, 1) else (b, a)
                vec_ok = tuple(vec.shape) in ((fmap.shape[0], fmap.shape[1], 1, 1), (fmap.shape[0], fmap.shape[1]))
                if len(fmap.shape) != 4 or not vec_ok or fmap.flat_from is not None:
                    raise UnsupportedGraph(f"graph executor: multiply of shapes {a.shape} and {b.shape} (only a map "
                                           "times a per-channel (N, C, 1, 1) scale)")
                out = new_value(node)
                steps.append({"op": "scale", "in": fmap.storage, "in2": vec.storage, "out": out.storage,
                              "geom": fmap.shape})
            elif mod is not None and isinstance(mod, (nn.Dropout, nn.Identity)) or _eval_stochastic_depth(node):
                alias(node, value(args[0]))
            elif op == "call_function" and target in _ADD and len(args) == 2 and not node.kwargs:
                a, b = value(args[0]), value(args[1])
                if a.shape != b.shape or a.flat_from != b.flat_from:
                    raise UnsupportedGraph(f"graph executor: add of shapes {a.shape} and {b.shape} (no broadcasting)")
                out = new_value(node)
                steps.append({"op": "add", "in": a.storage, "in2": b.storage, "out": out.storage,
                              "numel": storages[out.storage], "relu": False, "hi": _INF})
            else:
                what = f"module {target} ({type(mod).__name__})" if mod is not None else node.format_node()
                raise UnsupportedGraph(f"graph executor: {what} is not covered")
            if node not in order:  # channelwise ops and adds keep their input's channel order
                order[node] = in_order(args[0]) if args else None
                if len(args) > 1 and order[node] is not in_order(args[1]) and isinstance(args[1], torch.fx.Node):
                    raise AssertionError(f"graph executor: {node.name} mixes channel orders")  # pragma: no cover
            label = f"{node.name} ({type(mod).__name__})" if mod is not None else node.name
            for st in steps[first_step:]:
                st["name"] = label
        else:
            raise UnsupportedGraph("graph executor: the graph has no output")
        input_storage = values[next(n for n in gm.graph.nodes if n.op == "placeholder")].storage
        if out_value.storage == input_storage:
            raise UnsupportedGraph("graph executor: the model returns its input")
        buffer_of, sizes, private = _assign_buffers(steps, storages, input_storage, out_value.storage, int(x.shape[0]))
        executor = ext.GraphExecutor(sizes, int(x.shape[0]), private)
        for s in steps:
            _emit(executor, s, buffer_of)
        self._step_names[tuple(x.shape)] = [s["name"] for s in steps]
        self._reordered[tuple(x.shape)] = [n.name for n in gm.graph.nodes if n.op == "call_module" and order.get(n) is not None
                                           and n in free]
        out_shape = out_value.shape
        plan = (executor, out_shape, len(out_shape) == 4, keep)
        self._plans[tuple(x.shape)] = plan
        return plan


def _free_order_convs(gm: torch.fx.GraphModule, modules: Dict[str, nn.Module]) -> set:
    """Conv nodes whose output channels may be stored in any order: the value flows, through
    channelwise ops only (ReLU / clamp, pooling, depthwise convs, dropout, flatten of a 1×1 map), into
    convs and linear layers alone, which read it through permuted input weights. A value that meets
    another producer's (an add, a conv's residual), the graph's input or output, or any other op keeps
    the logical order. Reordering lets the NHWC kernel store each block of filters (same tap mask) as
    vectors on consecutive channels instead of scattering them: 2x faster epilogues on 16-channel layers."""
    parent: List[int] = []
    producers: List[list] = []
    fixed: set = set()
    space: Dict[torch.fx.Node, int] = {}

    def new(producer=None, fix=False) -> int:
        parent.append(len(parent))
        producers.append([producer] if producer is not None else [])
        if fix:
            fixed.add(len(parent) - 1)
        return len(parent) - 1

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> int:
        i, j = find(i), find(j)
        if i != j:
            parent[j] = i
            producers[i] += producers[j]
            if j in fixed:
                fixed.add(i)
        return i

    def fix(arg) -> None:
        if isinstance(arg, torch.fx.Node) and arg in space:
            fixed.add(find(space[arg]))

    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        inputs = [a for a in node.all_input_nodes if a in space]
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0] in space else None
        is_conv = mod is not None and (hasattr(mod, "tap_mask") or isinstance(mod, nn.Conv2d))
        if node.op == "placeholder":
            space[node] = new(fix=True)
        elif node.op == "output":
            for a in inputs:
                fix(a)
        elif is_conv and mod.groups == 1 and first is not None:
            space[node] = new(node)
            res = node.kwargs.get("residual", node.args[1] if len(node.args) > 1 else None)
            if isinstance(res, torch.fx.Node) and res in space:
                union(space[node], space[res])
            for a in inputs:
                if a is not first and a is not res:
                    fix(a)
        elif is_conv and mod.groups == mod.in_channels == mod.out_channels and first is not None and len(inputs) == 1:
            space[node] = space[first]  # depthwise: channelwise
        elif (mod is not None and isinstance(mod, nn.Linear)) and first is not None and len(inputs) == 1:
            space[node] = new(fix=True)
        elif first is not None and len(inputs) == 1 and _channelwise(node, mod):
            shape = getattr(first.meta.get("tensor_meta"), "shape", None)
            flat = _is_flatten(node, mod)
            if flat and (shape is None or len(shape) != 4 or shape[2] * shape[3] != 1):
                fix(first)  # a flattened map with H*W > 1 interleaves channels with pixels
                space[node] = new(fix=True)
            else:
                space[node] = space[first]
        elif node.op == "call_function" and node.target in _ADD and len(inputs) == 2 and not node.kwargs:
            space[node] = union(space[inputs[0]], space[inputs[1]])
        else:
            for a in inputs:
                fix(a)
            space[node] = new(fix=True)
    out = set()
    for root in {find(i) for i in range(len(parent))}:
        if root not in fixed and len(producers[root]) == 1:
            out.add(producers[root][0])
    return out


def _is_flatten(node, mod) -> bool:
    return (mod is not None and isinstance(mod, nn.Flatten) or node.op == "call_function" and node.target in _FLATTEN_FN
            or node.op == "call_method" and node.target == "flatten")


def _channelwise(node, mod) -> bool:
    """Ops of the executor that treat every channel alike (a channel permutation passes through them)."""
    if mod is not None:
        return isinstance(mod, (nn.MaxPool2d, FastMaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.Flatten,
                                nn.ReLU, nn.Hardtanh))
    if node.op == "call_function":
        return node.target in _RELU or node.target in (F.relu6, F.adaptive_avg_pool2d) or node.target in _FLATTEN_FN
    if node.op == "call_method":
        return node.target in ("relu", "relu_", "mean", "flatten")
    return False


def _conv_activation(mod: nn.Module, target: str) -> Optional[str]:
    """A conv module's fused activation (None or "relu"), after checking its padding is zeros of a
    given size: what every conv step supports."""
    if isinstance(mod.padding, str) or getattr(mod, "padding_mode", "zeros") != "zeros":
        raise UnsupportedGraph(f"graph executor: conv {target} uses padding {mod.padding!r} / "
                               f"{getattr(mod, 'padding_mode', 'zeros')!r}")
    act = getattr(mod, "activation", None)
    if act not in (None, "relu"):
        raise UnsupportedGraph(f"graph executor: conv {target} has activation {act!r}")
    return act


def _activation_bound(node, mod) -> Optional[float]:
    """The upper bound of a ReLU-like node (ReLU: inf, ReLU6 / hardtanh(0, b): b), None for any other node."""
    if mod is not None:
        if isinstance(mod, nn.ReLU):
            return _INF
        if isinstance(mod, nn.Hardtanh) and mod.min_val == 0 and mod.max_val > 0:
            return float(mod.max_val)
        return None
    if node.op == "call_function" and node.target in _RELU or node.op == "call_method" and node.target in ("relu", "relu_"):
        return _INF
    if node.op == "call_function" and node.target is F.relu6:
        return 6.0
    return None


_ACT_IDS = {"silu": 1, "sigmoid": 2}  # GraphExecutor.add_act
_MUL = {operator.mul, operator.imul, torch.mul}


def _smooth_activation(node, mod) -> Optional[str]:
    """"silu" or "sigmoid" for a SiLU / sigmoid node (module, function or method), None for any other."""
    if mod is not None:
        return "silu" if isinstance(mod, nn.SiLU) else "sigmoid" if isinstance(mod, nn.Sigmoid) else None
    if node.op == "call_function":
        return "silu" if node.target is F.silu else "sigmoid" if node.target in (torch.sigmoid, F.sigmoid) else None
    if node.op == "call_method":
        return {"sigmoid": "sigmoid", "sigmoid_": "sigmoid"}.get(node.target)
    return None


def _eval_stochastic_depth(node) -> bool:
    """torchvision's ``stochastic_depth(x, p, mode, training=False)`` (traced as a leaf function): the identity."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "stochastic_depth":
        return False
    if not getattr(node.target, "__module__", "").startswith("torchvision."):
        return False
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
    return training is False


def modules_param(gm: torch.fx.GraphModule, node) -> torch.Tensor:
    """The parameter a ``get_attr`` node reads (F.linear's weight in a traced graph)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise UnsupportedGraph(f"graph executor: linear weight {node!r} is not a parameter")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _assign_buffers(steps: List[dict], storages: List[int], input_storage: int, output_storage: int,
                    batch: int = 1):
    """Buffers for the storages: ``(buffer id per storage, floats of each shared buffer, floats of each
    private buffer)``.

    The executor runs each maximal run of per-image steps (a *segment*) image by image, so that an
    image's activations stay in cache from layer to layer (threads take whole images). A storage made
    and used up inside one segment needs one image's worth, private to the thread running the image:
    a private buffer (ids after the shared ones), reused once every step of the segment reading it has
    run (per image, steps run in order). Every other storage (the input, the output, values crossing
    segments) holds the whole batch in a shared buffer (ids 0: the caller's input, 1: its output,
    2...: owned), reused only after the last segment reading it is complete: while one image runs a
    segment's later steps, another may still be reading its earlier values."""
    seg: List[int] = []  # segment number of each step
    for i, s in enumerate(steps):
        same = i and s.get("per_image", True) and steps[i - 1].get("per_image", True)
        seg.append(seg[-1] if same else (seg[-1] + 1 if seg else 0))
    producer: Dict[int, int] = {s["out"]: i for i, s in enumerate(steps)}
    readers: Dict[int, List[int]] = {}
    for i, s in enumerate(steps):
        for key in ("in", "in2", "res"):
            if s.get(key) is not None:
                readers.setdefault(s[key], []).append(i)
    fixed = {input_storage: 0, output_storage: 1}

    def private_ok(st: int) -> bool:
        i = producer[st]
        return (st not in fixed and steps[i].get("per_image", True)
                and all(seg[r] == seg[i] for r in readers.get(st, [])))

    buffer_of = dict(fixed)
    # shared: live from the producer's segment to the last reader's, freed when that segment is done
    sizes = [0, 0]
    free: List[int] = []
    last_seg = {st: max([seg[r] for r in readers.get(st, [])] + [seg[producer[st]]]) for st in producer}
    release: Dict[int, List[int]] = {}
    # private: per segment, live from the producer step to the last reader step
    psizes: List[int] = []
    pfree: List[int] = []
    last_step = {st: max(readers.get(st, [producer[st]])) for st in producer}

    def take(pool: List[int], sz: List[int], need: int) -> int:
        fits = [b for b in pool if sz[b] >= need]
        if fits:
            b = min(fits, key=lambda k: sz[k])
        elif pool:
            b = max(pool, key=lambda k: sz[k])
            sz[b] = need
        else:
            sz.append(need)
            return len(sz) - 1
        pool.remove(b)
        return b

    private_of: Dict[int, int] = {}
    for i, s in enumerate(steps):
        if i and seg[i] != seg[i - 1]:  # a new segment: earlier segments' dead shared values are free
            for b in release.pop(seg[i - 1], []):
                free.append(b)
            pfree = list(range(len(psizes)))
        st = s["out"]
        if st not in buffer_of and st not in private_of:
            if private_ok(st):
                private_of[st] = take(pfree, psizes, max(1, storages[st] // batch))
            else:
                buffer_of[st] = take(free, sizes, storages[st])
                release.setdefault(last_seg[st], []).append(buffer_of[st])
        for key in ("in", "in2", "res"):
            src = s.get(key)
            if src is not None and src in private_of and last_step[src] == i and private_of[src] not in pfree:
                pfree.append(private_of[src])
    n_shared = len(sizes)
    for st, b in private_of.items():
        buffer_of[st] = n_shared + b
    return buffer_of, [int(max(1, v)) for v in sizes], [int(max(1, v)) for v in psizes]


def _emit(executor, s: dict, buffer_of: Dict[int, int]) -> None:
    op = s["op"]
    if op == "conv":
        n, h, w, c = s["geom"]
        res = -1 if s["res"] is None else buffer_of[s["res"]]
        bias = s["bias"].data_ptr() if s["bias"] is not None else 0
        executor.add_conv(s["packed"], buffer_of[s["in"]], res, buffer_of[s["out"]], n, h, w, c, *s["stride"],
                          *s["padding"], *s["dilation"], bias, s["relu"], s["hi"], s["check"], s["per_image"])
    elif op == "depthwise":
        n, c, h, w = s["geom"]
        bias = s["bias"].data_ptr() if s["bias"] is not None else 0
        executor.add_depthwise(buffer_of[s["in"]], buffer_of[s["out"]], n, h, w, c, *s["k"], *s["stride"],
                               *s["padding"], *s["dilation"], s["weight"].data_ptr(), bias, s["relu"], s["hi"])
    elif op == "max_pool":
        n, c, h, w = s["geom"]
        executor.add_max_pool(buffer_of[s["in"]], buffer_of[s["out"]], n, h, w, c, *s["k"], *s["s"], *s["p"])
    elif op == "mean":
        n, c, h, w = s["geom"]
        executor.add_mean_hw(buffer_of[s["in"]], buffer_of[s["out"]], n, h, w, c)
    elif op == "add":
        executor.add_add(buffer_of[s["in"]], buffer_of[s["in2"]], buffer_of[s["out"]], s["numel"], s["relu"], s["hi"])
    elif op == "clamp":
        executor.add_clamp(buffer_of[s["in"]], buffer_of[s["out"]], s["numel"], True, s["hi"])
    elif op == "act":
        executor.add_act(buffer_of[s["in"]], buffer_of[s["out"]], s["numel"], s["act"])
    elif op == "scale":
        n, c, h, w = s["geom"]
        executor.add_scale(buffer_of[s["in"]], buffer_of[s["in2"]], buffer_of[s["out"]], n, h, w, c)
    else:  # pragma: no cover - the planner only builds the ops above
        raise AssertionError(op)
