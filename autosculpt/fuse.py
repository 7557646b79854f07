"""Inference-time fusion: fold BatchNorm into the preceding conv, and move a ResNet shortcut add and a
ReLU into :class:`~autosculpt.nn.PatternConv2d`'s kernel epilogue.

A pruned model's convs compute fewer multiply-adds, but the BatchNorm, ReLU and residual add around
them still each read and write the whole activation tensor (and cost a Python/dispatcher call each).
On small CIFAR-style CNNs those fixed costs are a third of the dense model's time, so they cap the
whole-model speedup of pattern sparsity. :func:`fuse_for_inference` removes them:

* ``conv -> BatchNorm2d`` (eval mode, running statistics): the BN's scale and shift are folded into
  the conv's weight and bias. This applies to ``nn.Conv2d`` too, so the same call gives the fair dense
  baseline (``fuse_for_inference(dense_model, x)``); a pattern conv's dropped taps stay exactly zero.
* ``PatternConv2d -> add(·, shortcut)``: the shortcut becomes the conv's ``residual`` argument, when
  its shape, dtype and device equal the conv output's (checked on ``example_input``).
* ``PatternConv2d [-> add] -> relu``: the ReLU becomes the conv's ``activation``.
* ``nn.MaxPool2d`` (any window, stride, padding; dilation 1, floor mode), for CPU inputs: replaced by
  :class:`FastMaxPool2d`, AutoSculpt's C++ max-pool, the same result ~5-8x faster than PyTorch's CPU
  max-pool on NCHW tensors (five 2x2 pools were a tenth of VGG-16; resnet18's 3x3/stride-2 stem pool
  a quarter of the pruned model).

Only edges where the conv's output has no other user are fused, so the result computes the same
function (up to float rounding of the folded BN). The model is traced with ``torch.fx`` (AutoSculpt's
layers are leaves); a model fx cannot trace gets a ``ValueError`` naming the reason.
"""
from __future__ import annotations

import copy
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ._fx import LeafTracer  # AutoSculpt's layers are leaves
from .plan import set_submodule

__all__ = ["fuse_for_inference", "FusionReport", "FastMaxPool2d", "MaxPool2x2"]

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


class FusionReport(dict):
    """Counts of what was fused: ``{"bn_folded", "residual", "relu", "max_pool"}``."""


class FastMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (any window, stride and padding; dilation 1, floor mode, no indices) through
    :func:`autosculpt.ops.max_pool2d`: the same values (NaN propagates alike), 5-8x faster than
    PyTorch's CPU pooling on NCHW tensors (a ResNet stem's 3x3/stride-2 pool: 8.6 -> 1.5 ms)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ops.pool import max_pool2d

        return max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2x2(FastMaxPool2d):
    """``nn.MaxPool2d(2)``: a :class:`FastMaxPool2d` with a 2x2 window and stride 2."""

    def __init__(self):
        super().__init__(2, 2, 0)


def _bn_scale_shift(bn: nn.BatchNorm2d):
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv_std * (bn.weight if bn.affine else 1.0)
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
    return scale, shift


@torch.no_grad()
def _fold_bn_into_pattern_conv(conv, bn: nn.BatchNorm2d):
    from .nn import PatternConv2d

    scale, shift = _bn_scale_shift(bn)
    fused = PatternConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, True, tap_mask=conv.tap_mask, backend=conv.backend, path=conv.path,
        device=conv.weight.device, dtype=conv.weight.dtype, activation=conv.activation,
    )
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(bias * scale + shift)
    fused.enforce_mask()
    return fused.train(False)


def _single_module_call(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """True when ``node``'s module is called from nowhere else (its fused state is not shared)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) == 1


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _meta(node) -> Optional[tuple]:
    tm = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return None if tm is None or not hasattr(tm, "shape") else (tuple(tm.shape), tm.dtype)


def _fast_max_pool(m: nn.Module) -> Optional[nn.Module]:
    """The :class:`FastMaxPool2d` computing what ``m`` computes, or None when it does not cover ``m``
    (dilation, ceil mode, returned indices)."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    if not isinstance(m, nn.MaxPool2d) or pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
        return None
    kernel, stride, padding = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
    if kernel == stride == (2, 2) and padding == (0, 0):
        return MaxPool2x2()
    return FastMaxPool2d(kernel, stride, padding)


def fuse_for_inference(model: nn.Module, example_input: torch.Tensor, *, fold_bn: bool = True,
                       residual: bool = True, relu: bool = True, max_pool: bool = True,
                       dense_convs: bool = False) -> torch.fx.GraphModule:
    """A copy of ``model`` (in eval mode) with BatchNorm folded into convs and shortcut adds / ReLUs
    fused into ``PatternConv2d`` epilogues (see the module docstring). ``model`` is not changed.

    Args:
        model: an eval-mode model (BatchNorm must use its running statistics).
        example_input: a batch of the model's input, used to check the shapes of residual adds.
        fold_bn, residual, relu, max_pool: which rewrites to apply.
        dense_convs: also turn every plain ``nn.Conv2d`` (ungrouped, zero padding) into a
            ``PatternConv2d`` keeping all taps with ``path="auto"``: it then runs AutoSculpt's kernel
            (with the BN, shortcut add and ReLU in its epilogue) where that measures faster than
            torch's conv at its shape, and torch's conv elsewhere (the deployed form uses this).

    The returned ``GraphModule`` has an attribute ``fusion_report`` (:class:`FusionReport`). Its
    pattern layers are frozen (:meth:`PatternConv2d.freeze`): it is an inference snapshot whose
    weights are packed once; build it again after changing weights.
    """
    from .nn import PatternConv2d

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model: fuse_for_inference folds BatchNorm running statistics; call model.eval() first")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a torch.Tensor, got {type(example_input).__name__}")
    model = copy.deepcopy(model)
    try:
        graph = LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        raise ValueError(f"model: torch.fx cannot trace {type(model).__name__} for fusion ({type(exc).__name__}: {exc})") from exc
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__ + "Fused")
    report = FusionReport(bn_folded=0, residual=0, relu=0, max_pool=0)
    if dense_convs:
        report["dense_convs"] = 0
        for node in gm.graph.nodes:
            mod = gm.get_submodule(node.target) if node.op == "call_module" else None
            if type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
                full = torch.ones(mod.out_channels, *mod.kernel_size, dtype=torch.bool, device=mod.weight.device)
                set_submodule(gm, node.target, PatternConv2d.from_dense(mod, full, path="auto").eval())
                report["dense_convs"] += 1

    def conv_node(node) -> Optional[torch.fx.Node]:
        """``node`` when it calls a conv whose output feeds nothing else."""
        if not isinstance(node, torch.fx.Node) or node.op != "call_module" or len(node.users) != 1:
            return None
        return node if isinstance(gm.get_submodule(node.target), (nn.Conv2d, PatternConv2d)) else None

    if fold_bn:
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
                continue
            conv = conv_node(node.args[0]) if node.args else None
            bn = gm.get_submodule(node.target)
            if conv is None or bn.running_mean is None or not _single_module_call(gm, conv) or conv.kwargs:
                continue
            mod = gm.get_submodule(conv.target)
            if isinstance(mod, PatternConv2d):
                fused = _fold_bn_into_pattern_conv(mod, bn)
            else:
                fused = torch.nn.utils.fusion.fuse_conv_bn_eval(mod, bn)
            set_submodule(gm, conv.target, fused)
            node.replace_all_uses_with(conv)
            gm.graph.erase_node(node)
            report["bn_folded"] += 1
        gm.recompile()

    if residual:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _ADD_FUNCTIONS or len(node.args) != 2 or node.kwargs:
                continue
            for i in (0, 1):
                conv, other = conv_node(node.args[i]), node.args[1 - i]
                if conv is None or not isinstance(other, torch.fx.Node) or conv.kwargs or not _single_module_call(gm, conv):
                    continue
                mod = gm.get_submodule(conv.target)
                if not isinstance(mod, PatternConv2d) or mod.activation is not None:
                    continue
                if _meta(other) is None or _meta(other) != _meta(conv):
                    continue  # broadcasting or dtype-changing adds stay as they are
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(conv.target, args=conv.args, kwargs={"residual": other})
                new.meta = dict(conv.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                gm.graph.erase_node(conv)
                report["residual"] += 1
                break
        gm.recompile()

    if relu:
        for node in list(gm.graph.nodes):
            if not _is_relu(gm, node) or not node.args:
                continue
            src = node.args[0]
            if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
                continue
            mod = gm.get_submodule(src.target)
            if not isinstance(mod, PatternConv2d) or mod.activation is not None or not _single_module_call(gm, src):
                continue
            mod.activation = "relu"
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            report["relu"] += 1

    if max_pool and example_input.device.type == "cpu":  # cuDNN's pooling is fast: CPU only
        for node in gm.graph.nodes:
            fast = _fast_max_pool(gm.get_submodule(node.target)) if node.op == "call_module" else None
            if fast is not None:
                set_submodule(gm, node.target, fast)
                report["max_pool"] += 1

    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    for mod in gm.modules():
        if isinstance(mod, PatternConv2d):
            mod.freeze()  # an inference snapshot: weights packed once (see PatternConv2d.freeze)
    gm.fusion_report = report
    return gm


def for_inference(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """``model`` in the form AutoSculpt times and deploys it: :func:`fuse_for_inference` of it (eval
    mode) when ``torch.fx`` can trace it, otherwise the model itself with a ``RuntimeWarning`` saying
    why (timings of an unfused model are still correct, only slower)."""
    import warnings

    from .nn import PatternConv2d

    if not any(isinstance(m, (nn.BatchNorm2d, PatternConv2d)) for m in model.modules()) or isinstance(
            model, (nn.Conv2d, nn.BatchNorm2d, PatternConv2d)):
        return model  # nothing to fuse (a single layer, or a model without BN or pattern convs)
    was_training = model.training
    model.eval()
    try:
        return fuse_for_inference(model, example_input)
    except ValueError as exc:
        warnings.warn(f"fusion skipped, timing {type(model).__name__} unfused: {exc}", RuntimeWarning, stacklevel=2)
        return model
    finally:
        model.train(was_training)
