"""Regression tests for the hardening issue's kernel items (stale weights, NaN/Inf, sizes, drop-in
shapes). Each test is named after the item it proves fixed."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosculpt as asc
from autosculpt.nn import PatternConv2d
from autosculpt.ops import block_sparse_attention, pattern_conv2d
from autosculpt.reference import block_sparse_attention_ref, pattern_conv2d_ref

HAS_CPU = asc.runtime.available_backends()["cpu"]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")


def _masked_ref(layer: PatternConv2d, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.detach() * layer.tap_mask[:, None].to(layer.weight.dtype)
    return F.conv2d(x, w, layer.bias.detach(), layer.stride, layer.padding, layer.dilation, layer.groups)


def _layer(path="sparse", seed=0):
    torch.manual_seed(seed)
    mask = torch.rand(8, 3, 3) < 0.5
    mask[0] = True
    return PatternConv2d.from_dense(nn.Conv2d(4, 8, 3, padding=1), mask, path=path)


@needs_cpu
@pytest.mark.parametrize("opt_name", ["Adam", "AdamW", "SGD", "Adagrad"])
def test_item1_fused_optimizer_step_repacks(opt_name):
    layer = _layer()
    x = torch.randn(2, 4, 9, 9)
    kwargs = {"lr": 0.1, "fused": True}
    opt = getattr(torch.optim, opt_name)(layer.parameters(), **kwargs)
    with torch.no_grad():
        layer(x)  # packs the weights
    for _ in range(2):
        layer(x).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)


@needs_cpu
@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("write", ["data_mul", "data_copy", "weight_mul"])
def test_item1_data_writes_repack(path, write):
    layer = _layer(path)
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        before = layer(x).clone()
        if write == "data_mul":
            layer.weight.data.mul_(3.0)
        elif write == "data_copy":
            layer.weight.data.copy_(torch.randn_like(layer.weight) * layer.tap_mask[:, None])
        else:
            layer.weight.mul_(-1.0)
        after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _masked_ref(layer, x), atol=1e-4, rtol=1e-4)


@needs_cpu
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_item1_tap_mask_in_place_write(path):
    layer = _layer(path)
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        layer(x)
        layer.tap_mask[0, 1, 1] = False  # in place, through indexing
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)
        layer.tap_mask.data[1].fill_(False)  # in place, through .data (no version bump)
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)


@needs_cpu
def test_item1_frozen_inference_form_follows_optimizer_steps():
    """A frozen (inference-snapshot) layer still repacks after optimizer steps and version bumps."""
    layer = _layer().freeze()
    x = torch.randn(1, 4, 7, 7)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)
        layer.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)
