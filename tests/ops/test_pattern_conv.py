"""pattern_conv2d (the op) against the masked dense reference, on both CPU backends."""
import pytest
import torch
from conftest import requires_ext

import autosculpt as asc
from autosculpt.patterns import PAPER6
from autosculpt.reference import pattern_conv2d_ref

BACKENDS = [pytest.param("cpu", marks=requires_ext), "torch"]


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check(x, w, m, b, backend, **conv):
    out = asc.ops.pattern_conv2d(x, w, m, b, backend=backend, **conv)
    s, p, d = (conv.get(k, dflt) for k, dflt in (("stride", 1), ("padding", 0), ("dilation", 1)))
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    ref = pattern_conv2d_ref(x, w, m, b, pair(s), pair(p), pair(d), conv.get("groups", 1))
    assert out.shape == ref.shape
    assert not torch.isnan(out).any(), "kernel left output elements unwritten"
    assert _rel_err(out, ref) <= 1e-5
    return out


SHAPES = [
    # n, c_in, c_out, h, w, stride, padding
    (1, 16, 16, 8, 8, 1, 1),
    (3, 13, 20, 17, 19, 1, 1),  # odd sizes, C_in not a multiple of 8, batch 3
    (2, 7, 9, 15, 11, 2, 1),  # stride 2
    (1, 32, 24, 7, 7, 2, 0),
    (2, 5, 33, 9, 10, 1, 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_masks(poison_outputs, backend, shape):
    n, ci, co, h, w, s, p = shape
    x, wt, b = torch.randn(n, ci, h, w), torch.randn(co, ci, 3, 3), torch.randn(co)
    m = torch.rand(co, 3, 3) > 0.5
    _check(x, wt, m, b, backend, stride=s, padding=p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", range(len(PAPER6)))
def test_each_paper6_pattern_alone(poison_outputs, backend, pattern):
    x, wt, b = torch.randn(2, 11, 12, 13), torch.randn(14, 11, 3, 3), torch.randn(14)
    m = PAPER6.masks[torch.full((14,), pattern)]
    out = _check(x, wt, m, b, backend, padding=1)
    if pattern == 0:  # every filter removed: output is the bias
        assert torch.equal(out, b[None, :, None, None].expand_as(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper6_mix_with_empty_filters_and_no_bias(poison_outputs, backend):
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 5, 3, 1, 0, 4])
    x, wt = torch.randn(3, 9, 10, 10), torch.randn(12, 9, 3, 3)
    out = _check(x, wt, PAPER6.masks[ids], None, backend, stride=2, padding=1)
    assert torch.equal(out[:, ids == 0], torch.zeros_like(out[:, ids == 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_full_mask_equals_dense_conv(poison_outputs, backend):
    x, wt, b = torch.randn(2, 6, 9, 9), torch.randn(8, 6, 3, 3), torch.randn(8)
    out = _check(x, wt, torch.ones(8, 3, 3, dtype=torch.bool), b, backend, padding=1)
    assert _rel_err(out, torch.nn.functional.conv2d(x, wt, b, padding=1)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kernel,conv",
    [
        ((1, 1), {}),
        ((5, 5), {"padding": 2}),
        ((3, 3), {"dilation": 2, "padding": 2}),
        ((3, 3), {"groups": 2, "padding": 1}),
        ((3, 3), {"stride": (2, 1), "padding": (1, 0)}),
    ],
)
def test_other_kernels_and_groups(poison_outputs, backend, kernel, conv):
    g = conv.get("groups", 1)
    x, wt, b = torch.randn(2, 8, 11, 10), torch.randn(12, 8 // g, *kernel), torch.randn(12)
    _check(x, wt, torch.rand(12, *kernel) > 0.4, b, backend, **conv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise(poison_outputs, backend):
    x, wt, b = torch.randn(2, 16, 9, 9), torch.randn(16, 1, 3, 3), torch.randn(16)
    _check(x, wt, torch.rand(16, 3, 3) > 0.5, b, backend, padding=1, groups=16)
    _check(x, wt, torch.rand(16, 3, 3) > 0.5, b, backend, padding=1, stride=2, groups=16)


@requires_ext
def test_auto_uses_the_cpu_kernel_and_channels_last_input_works(poison_outputs):
    x = torch.randn(2, 8, 9, 9).to(memory_format=torch.channels_last)
    wt, m = torch.randn(10, 8, 3, 3), torch.rand(10, 3, 3) > 0.5
    out = asc.ops.pattern_conv2d(x, wt, m, padding=1)
    assert _rel_err(out, pattern_conv2d_ref(x, wt, m, None, (1, 1), (1, 1), (1, 1), 1)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_masked_reference(backend):
    x = torch.randn(2, 5, 8, 7, requires_grad=True)
    wt = torch.randn(6, 5, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    m = torch.rand(6, 3, 3) > 0.5
    out = asc.ops.pattern_conv2d(x, wt, m, b, stride=2, padding=1, backend=backend)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, wt, b), g)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, wt, b))
    ref = pattern_conv2d_ref(xr, wr, m, br, (2, 2), (1, 1), (1, 1), 1)
    rx, rw, rb = torch.autograd.grad(ref, (xr, wr, br), g)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        assert _rel_err(got, want) <= 1e-5
    assert torch.equal(gw * ~m[:, None], torch.zeros_like(gw)), "dropped taps must get exactly zero gradient"


def test_gradcheck_double_precision():
    x = torch.randn(1, 3, 5, 5, dtype=torch.double, requires_grad=True)
    wt = torch.randn(4, 3, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True)
    m = torch.rand(4, 3, 3) > 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: asc.ops.pattern_conv2d(x, w, m, b, padding=1, backend="torch"), (x, wt, b)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, wt, b = torch.randn(2, 4, 7, 7), torch.randn(5, 4, 3, 3), torch.randn(5)
    m = torch.rand(5, 3, 3) > 0.5
    args = (x, wt, m, b, [1, 1], [1, 1], [1, 1], 1, backend, 0)
    torch.library.opcheck(torch.ops.autosculpt.pattern_conv2d.default, args)
    args_grad = (x.requires_grad_(), wt.requires_grad_(), m, b.requires_grad_(), [2, 2], [0, 0], [1, 1], 1, backend, 0)
    torch.library.opcheck(torch.ops.autosculpt.pattern_conv2d.default, args_grad)


def test_compiles_without_graph_breaks():
    x, wt = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    m = torch.rand(6, 3, 3) > 0.5
    fn = torch.compile(lambda x, w: asc.ops.pattern_conv2d(x, w, m, padding=1).relu(), fullgraph=True, backend="eager")
    assert _rel_err(fn(x, wt), pattern_conv2d_ref(x, wt, m, None, (1, 1), (1, 1), (1, 1), 1).relu()) <= 1e-5


BAD = [
    (dict(x=torch.randn(8, 8)), ValueError, "x: expected 4-D"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight: expected 4-D"),
    (dict(x=torch.randint(0, 3, (1, 4, 8, 8))), TypeError, "x: expected a floating-point"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.double)), TypeError, "weight: dtype"),
    (dict(tap_mask=torch.ones(6, 3, 3)), TypeError, "tap_mask: expected a bool"),
    (dict(tap_mask=torch.ones(5, 3, 3, dtype=torch.bool)), ValueError, "tap_mask: expected shape"),
    (dict(groups=3), ValueError, "groups"),
    (dict(groups=0), ValueError, "groups"),
    (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight: expects C_in/groups"),
    (dict(bias=torch.randn(5)), ValueError, "bias: expected shape"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(stride=(1, 2, 3)), ValueError, "stride"),
    (dict(x=torch.randn(1, 4, 2, 2), padding=0), ValueError, "too small"),
    (dict(backend="gpu"), ValueError, "backend: expected one of"),
    (dict(backend="cuda"), ValueError, "backend: 'cuda' runs on CUDA tensors"),
    (dict(backend="triton"), ValueError, "backend: 'triton'"),
    (dict(x=torch.randn(1, 4, 8, 8, dtype=torch.double), weight=torch.randn(6, 4, 3, 3, dtype=torch.double),
          backend="cpu"), TypeError, "float32"),
    (dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
]


@pytest.mark.parametrize("override,exc,msg", BAD)
def test_bad_input_errors(override, exc, msg, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = dict(x=torch.randn(1, 4, 8, 8), weight=torch.randn(6, 4, 3, 3), tap_mask=torch.ones(6, 3, 3, dtype=torch.bool),
                bias=None, stride=1, padding=1, groups=1, backend="auto")
    args.update(override)
    with pytest.raises(exc, match=msg):
        asc.ops.pattern_conv2d(**args)


@requires_ext
def test_packed_weights_are_rebuilt_when_weights_change():
    from autosculpt.ops.conv import new_cache_key

    key = new_cache_key()
    x, wt = torch.randn(1, 4, 6, 6), torch.randn(5, 4, 3, 3)
    m = torch.rand(5, 3, 3) > 0.3
    first = asc.ops.pattern_conv2d(x, wt, m, padding=1, backend="cpu", _cache_key=key)
    with torch.no_grad():
        wt.mul_(2)  # in-place update, as an optimizer step does
    second = asc.ops.pattern_conv2d(x, wt, m, padding=1, backend="cpu", _cache_key=key)
    assert _rel_err(second, 2 * first) <= 1e-5
