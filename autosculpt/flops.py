"""Counting the multiply-accumulates (MACs) a model really runs, layer by layer.

Counts what is computed: a ``PatternConv2d`` counts only its kept taps (an empty filter counts
nothing), a dense conv or linear counts everything. Modules may define
``macs(inputs: tuple, output) -> int`` to count themselves (pattern attention and linear layers do).
Activations, norms and adds are not counted (they are not what pruning removes).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


def _layer_macs(module: nn.Module, inputs: tuple, output) -> int:
    from .nn.conv import PatternConv2d

    own = getattr(module, "macs", None)
    if callable(own):
        return int(own(inputs, output))
    if isinstance(module, nn.MultiheadAttention):  # in/out projections + q·k and p·v over all pairs
        x = inputs[0]
        b, length = (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])
        e = module.embed_dim
        return b * (4 * length * e * e + 2 * length * length * e)
    if isinstance(module, PatternConv2d):
        n, _, oh, ow = output.shape
        return int(module.tap_mask.sum()) * (module.in_channels // module.groups) * oh * ow * n
    if isinstance(module, nn.Conv2d):
        n, _, oh, ow = output.shape
        kh, kw = module.kernel_size
        return module.out_channels * (module.in_channels // module.groups) * kh * kw * oh * ow * n
    if isinstance(module, nn.Linear):
        return int(output.numel() // module.out_features) * module.in_features * module.out_features
    return -1  # not a counted layer


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> Dict[str, object]:
    """Runs ``model(example_input)`` once and returns ``{"total": int, "layers": {name: int}}``."""
    layers: Dict[str, int] = {}
    handles = []
    self_counting = []  # modules with their own macs(): their children are not counted again
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in self_counting):
            continue
        counts_itself = callable(getattr(module, "macs", None)) or isinstance(module, nn.MultiheadAttention)
        if counts_itself:
            self_counting.append(name)
        elif any(True for _ in module.children()):
            continue

        def hook(mod, inp, out, name=name):
            macs = _layer_macs(mod, inp, out)
            if macs >= 0:
                layers[name] = layers.get(name, 0) + macs

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {"total": sum(layers.values()), "layers": layers}


def count_params(model: nn.Module, nonzero: bool = True) -> int:
    """Parameters of a model; with ``nonzero`` only those not pruned to exactly zero are counted."""
    if not nonzero:
        return sum(p.numel() for p in model.parameters())
    return sum(int((p != 0).sum()) for p in model.parameters())
