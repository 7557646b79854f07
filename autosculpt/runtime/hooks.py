"""What the latency model learns from running a model once: its prunable layers with their real
input shapes (forward hooks), a copy whose prunable layers are stubs (the remainder), and which
epilogues inference fusion moves into each layer."""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..patterns import PatternSet

__all__ = ["run_once", "collect_layers", "stub_layers", "fusable_epilogues"]


def run_once(model: nn.Module, example_input: torch.Tensor, hooks: list) -> None:
    """One eval-mode, no-grad forward pass (for ``hooks`` to record what they need); then removes the
    hooks and restores the training mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def collect_layers(model: nn.Module, example_input: torch.Tensor, pattern_set: PatternSet) -> Dict[str, dict]:
    """Prunable convs (kernel matching the pattern set, zero padding) and their real input shapes:
    name -> ``{"in_shape", "c_in", "c_out", "kernel_size", "stride", "padding", "dilation", "groups", "bias"}``."""
    from ..graph.build import is_prunable_conv

    shapes: Dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if is_prunable_conv(m, pattern_set):
            def record(mod, args, name=name):
                shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is unchanged

            hooks.append(m.register_forward_pre_hook(record))
    run_once(model, example_input, hooks)
    modules = dict(model.named_modules())
    layers = {}
    for name, shape in shapes.items():
        m = modules[name]
        layers[name] = {
            "in_shape": shape, "c_in": m.in_channels, "c_out": m.out_channels, "kernel_size": tuple(m.kernel_size),
            "stride": tuple(m.stride), "padding": tuple(m.padding), "dilation": tuple(m.dilation), "groups": m.groups,
            "bias": m.bias is not None,
        }
    return layers


class _ConvStub(nn.Module):
    """Stands in for a conv: returns its output tensor (zeros, recorded once) at no compute cost."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, residual=None):
        return self.out if residual is None else self.out + residual


def stub_layers(model: nn.Module, example_input: torch.Tensor, names: List[str]) -> nn.Module:
    """A copy of ``model`` whose modules ``names`` return a fixed zero tensor of their output's shape."""
    from ..plan import set_submodule

    model = copy.deepcopy(model).eval()
    outs: Dict[str, torch.Tensor] = {}
    run_once(model, example_input, [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: outs.__setitem__(n, torch.zeros_like(out))) for n in names])
    for n in names:
        set_submodule(model, n, _ConvStub(outs[n]))
    return model


def fusable_epilogues(model: nn.Module, example_input: torch.Tensor, pattern_set: PatternSet,
                      names: List[str]) -> Dict[str, Tuple[bool, bool]]:
    """For each prunable layer in ``names``: (ReLU fused, shortcut add fused) when it becomes a pattern
    conv and the model is fused for inference. Empty when the model cannot be fused (fx)."""
    from ..fuse import fuse_for_inference
    from ..plan import dense_plan, sparsify

    plan = dense_plan(model, pattern_set)
    plan["layers"] = {n: layer for n, layer in plan["layers"].items() if n in names}
    was_training = model.training
    try:
        with torch.no_grad():
            gm = fuse_for_inference(sparsify(model.eval(), plan, backend="torch").eval(), example_input)
    except ValueError:
        return {}
    finally:
        model.train(was_training)
    out: Dict[str, Tuple[bool, bool]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in plan["layers"]:
            out[node.target] = (getattr(gm.get_submodule(node.target), "activation", None) == "relu",
                                "residual" in node.kwargs)
    return out
