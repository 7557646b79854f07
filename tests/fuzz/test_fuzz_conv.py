"""Differential fuzzing of ``pattern_conv2d`` (every usable backend, forward and backward) and of the
``PatternConv2d`` drop-in, against float64 ``F.conv2d`` with zero weights at dropped taps."""
import os

import pytest
import torch
import torch.nn.functional as F
from fuzzlib import Tally, case_count, inject_nonfinite, layout, rng_for, same_values
from torch import nn

import autosculpt as asc
from autosculpt.nn import PatternConv2d
from autosculpt.ops import pattern_conv2d
from autosculpt.reference import torch_conv_input  # works around a torch 2.13 channels_last crash

HAS_CPU = asc.runtime.available_backends()["cpu"]
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _draw_conv(rng):
    """Random conv arguments: awkward sizes, groups, kernels, strides, paddings, dilations."""
    groups = rng.choice([1, 1, 1, 2, 3])
    c_in = groups * rng.randint(1, 6)
    c_out = groups * rng.randint(1, 6)
    if rng.random() < 0.1:  # depthwise
        c_in = c_out = groups = rng.randint(1, 8)
    kh, kw = rng.choice([(3, 3), (3, 3), (1, 1), (2, 3), (5, 5), (1, 3)])
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
    padding = (rng.randint(0, 2), rng.randint(0, 2))
    h = rng.randint(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 13)
    w = rng.randint(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 13)
    n = rng.choice([0, 1, 1, 2, 3])
    density = rng.choice([0.0, 0.3, 0.6, 1.0, rng.random()])
    mask = torch.rand(c_out, kh, kw) < density
    return dict(n=n, c_in=c_in, c_out=c_out, h=h, w=w, k=(kh, kw), stride=stride, padding=padding,
                dilation=dilation, groups=groups, mask=mask)


def _describe(a) -> str:
    shown = {k: v for k, v in a.items() if k != "mask"}
    return f"{shown} kept={float(a['mask'].float().mean()):.2f}"


def _reference(x, w, mask, b, a, residual=None, relu=False):
    out = F.conv2d(torch_conv_input(x).double(), w.double() * mask[:, None].double(), None if b is None else b.double(), a["stride"],
                   a["padding"], a["dilation"], a["groups"])
    if residual is not None:
        out = out + residual.double()
    return torch.relu(out) if relu else out


def _bound(x, w, mask, a):
    """Per-element error bound: fp32 rounding of the sum of |terms| (the reference's own scale)."""
    mag = F.conv2d(torch_conv_input(x).double().abs().nan_to_num(0, 0, 0), w.double().abs() * mask[:, None], None, a["stride"],
                   a["padding"], a["dilation"], a["groups"])
    k = max(1, int(mask.sum(dim=(1, 2)).max()) * x.shape[1] // a["groups"])
    return mag * (4e-7 * k ** 0.5 + 1e-6) + 1e-6


def _backends(rng, a, nonfinite):
    names = ["torch"] + (["cpu"] if HAS_CPU else [])
    small = a["n"] * a["c_out"] * a["h"] * a["w"] <= 600
    if HAS_TRITON and small and rng.random() < 0.15:
        names.append("triton")
    return names


@pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")
def test_fuzz_pattern_conv2d(poison_outputs, monkeypatch):
    """Forward on every backend (fresh NaN-poisoned outputs: every element must be written), NaN/Inf
    inputs, channels_last and strided inputs, residual + ReLU epilogues; backward on finite inputs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tally = Tally("pattern_conv2d")
    for case in range(case_count(150)):
        rng = rng_for(tally.name, case)
        a = _draw_conv(rng)
        x = torch.randn(a["n"], a["c_in"], a["h"], a["w"])
        w = torch.randn(a["c_out"], a["c_in"] // a["groups"], *a["k"])
        b = torch.randn(a["c_out"]) if rng.random() < 0.7 else None
        nonfinite = rng.random() < 0.2
        if nonfinite:
            inject_nonfinite(rng, x, rng.randint(1, 3))
        x = layout(x, rng.choice(["contiguous", "channels_last", "strided"]))
        oh = (a["h"] + 2 * a["padding"][0] - a["dilation"][0] * (a["k"][0] - 1) - 1) // a["stride"][0] + 1
        ow = (a["w"] + 2 * a["padding"][1] - a["dilation"][1] * (a["k"][1] - 1) - 1) // a["stride"][1] + 1
        residual = torch.randn(a["n"], a["c_out"], oh, ow) if rng.random() < 0.3 else None
        relu = rng.random() < 0.3
        ref = _reference(x, w, a["mask"], b, a, residual, relu)
        bound = _bound(x, w, a["mask"], a) + (0 if residual is None else 1e-6 * residual.abs().double())
        tally.cases += 1
        for backend in _backends(rng, a, nonfinite):
            desc = f"case {case} backend={backend} {_describe(a)} nonfinite={nonfinite}"
            try:
                out = pattern_conv2d(x, w, a["mask"], b, a["stride"], a["padding"], a["dilation"], a["groups"],
                                     backend, residual=residual, activation="relu" if relu else None)
            except Exception as exc:  # noqa: BLE001 - a crash on valid input is a finding
                tally.crashes.append(f"{desc}: {type(exc).__name__}: {exc}")
                continue
            tally.compared += 1
            problem = same_values(out, ref, bound)
            if problem:
                tally.mismatches.append(f"{desc}: {problem}")
        if not nonfinite and a["n"] > 0 and rng.random() < 0.5:
            _check_backward(tally, rng, case, x, w, b, a)
    tally.check()


def _check_backward(tally, rng, case, x, w, b, a):
    backend = rng.choice(["torch"] + (["cpu"] if HAS_CPU else []))
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    bd = None if b is None else b.double().requires_grad_()
    try:
        out = pattern_conv2d(xs, ws, a["mask"], bs, a["stride"], a["padding"], a["dilation"], a["groups"], backend)
        g = torch.randn_like(out)
        out.backward(g)
    except Exception as exc:  # noqa: BLE001
        tally.crashes.append(f"case {case} backward backend={backend}: {type(exc).__name__}: {exc}")
        return
    ref = F.conv2d(torch_conv_input(xd), wd * a["mask"][:, None].double(), bd, a["stride"], a["padding"], a["dilation"], a["groups"])
    ref.backward(g.double())
    tally.compared += 1
    scale = 1e-4 * (1 + sum(float(t.abs().max()) for t in (xd.grad, wd.grad) if t.numel()))
    pairs = [("grad_x", xs.grad, xd.grad), ("grad_w", ws.grad, wd.grad)] + ([] if b is None else [("grad_b", bs.grad, bd.grad)])
    for name, got, want in pairs:
        problem = same_values(got, want, torch.tensor(scale, dtype=torch.float64))
        if problem:
            tally.mismatches.append(f"case {case} backward backend={backend} {name}: {problem}")
    dropped = ~a["mask"][:, None].expand_as(ws.grad)
    if bool((ws.grad[dropped] != 0).any()):
        tally.mismatches.append(f"case {case} backward: nonzero gradient at a dropped tap")


@pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")
def test_fuzz_pattern_conv2d_module():
    """``PatternConv2d`` (every path, eval and train, frozen and live, after in-place weight edits)
    against ``nn.Conv2d`` with the masked weights."""
    tally = Tally("PatternConv2d")
    for case in range(case_count(80)):
        module_case(tally, case)
    tally.check()


def module_case(tally: Tally, case: int) -> None:
    """One ``PatternConv2d`` case (reproduce a finding with ``module_case(Tally("x"), case)``)."""
    rng = rng_for("PatternConv2d", case)
    a = _draw_conv(rng)
    dense = nn.Conv2d(a["c_in"], a["c_out"], a["k"], a["stride"], a["padding"], a["dilation"], a["groups"],
                      bias=rng.random() < 0.7)
    path = rng.choice(["sparse", "dense", "auto"])
    layer = PatternConv2d.from_dense(dense, a["mask"], path=path)
    if rng.random() < 0.3:
        layer.freeze()
    x = torch.randn(a["n"], a["c_in"], a["h"], a["w"])
    if rng.random() < 0.15:
        inject_nonfinite(rng, x, 1)
    if rng.random() < 0.2 and a["n"] == 1:
        x = x[0]  # unbatched
    x = layout(x, rng.choice(["contiguous", "channels_last", "strided"]))
    tally.cases += 1
    desc = f"case {case} path={path} {_describe(a)}"
    try:
        for step in range(2):
            train = rng.random() < 0.4
            with torch.set_grad_enabled(train):
                out = layer(x)
                if train and out.numel():
                    out.sum().backward()
            ref = F.conv2d(torch_conv_input(x).double(), (layer.weight.detach() * layer.tap_mask[:, None]).double(),
                           None if layer.bias is None else layer.bias.detach().double(), a["stride"], a["padding"],
                           a["dilation"], a["groups"])
            tally.compared += 1
            bound = _bound(x if x.ndim == 4 else x[None], layer.weight.detach(), layer.tap_mask, a)
            problem = same_values(out.detach(), ref, bound if x.ndim == 4 else bound[0])
            if problem:
                tally.mismatches.append(f"{desc} step {step}: {problem}")
            if not layer.__dict__.get("_frozen"):
                with torch.no_grad():  # a write no version counter sees: must not leave stale packing
                    layer.weight.data.mul_(rng.choice([-1.0, 0.5, 2.0]))
            else:
                with torch.no_grad():
                    layer.weight.mul_(rng.choice([-1.0, 0.5, 2.0]))
    except Exception as exc:  # noqa: BLE001
        tally.crashes.append(f"{desc}: {type(exc).__name__}: {exc}")


if os.environ.get("AUTOSCULPT_FUZZ_CASES"):
    pytestmark = pytest.mark.slow
