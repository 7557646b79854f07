"""The channels-last (NHWC) pattern-conv kernel against float64 F.conv2d: awkward channel counts (mixed
blocks of 32 and 16 filters, leftovers sharing union-tap blocks), strides, dilations, paddings,
kernel sizes, fused residual + ReLU; every output element written; channels_last output."""
import pytest
import torch
import torch.nn.functional as F

import autosculpt as asc
from autosculpt.ops.conv import uses_nhwc_kernel
from autosculpt.patterns import PAPER6

pytestmark = pytest.mark.skipif(not asc.runtime.available_backends()["cpu"], reason="C++ extension not built")

CASES = [
    # n, c_in, c_out, h, w, k, stride, padding, dilation, masks
    (1, 16, 64, 14, 14, 3, 1, 1, 1, "paper6"),
    (2, 13, 70, 9, 11, 3, 1, 1, 1, "paper6"),   # leftovers of every pattern share blocks
    (3, 5, 33, 10, 7, 3, 2, 1, 1, "random"),
    (1, 32, 48, 15, 15, 3, 2, 0, 1, "paper6"),
    (2, 8, 17, 12, 13, 5, 1, 2, 2, "random"),
    (1, 7, 32, 9, 9, 1, 1, 0, 1, "full"),
    (2, 3, 64, 23, 23, 7, 2, 3, 1, "full"),      # a ResNet stem
    (1, 24, 40, 6, 20, (2, 3), (1, 2), (0, 1), 1, "random"),
    (1, 9, 16, 4, 4, 3, 1, 1, 1, "empty_some"),
    (4, 16, 48, 16, 16, 3, 1, 1, 1, "paper6"),   # 2 threads: whole images per thread
    (5, 16, 40, 12, 12, 3, 2, 1, 1, "empty_some"),  # 2 threads, 5 images: threads share each image
    (2, 12, 24, 9, 17, 3, 1, 1, 1, "full"),      # 16 + 8 consecutive filters (an 8-lane block on AMD)
    (1, 10, 8, 11, 6, 3, 1, 1, 1, "full"),
    (2, 6, 17, 7, 9, 3, 1, 1, 1, "full"),       # 16 + 1 consecutive filters: a masked partial block
    (2, 9, 16, 8, 8, 3, 1, 1, 1, "paper6"),     # scattered blocks of 16 lanes: the permute epilogue
    (1, 11, 56, 6, 6, 3, 1, 1, 1, "empty_some"),  # 33-64 lanes: the two-permute epilogue
    (2, 16, 16, 10, 12, 3, 1, 1, 1, "halves"),   # two masks, 8 filters each: a split block on AMD
    (1, 7, 12, 9, 8, 3, 2, 2, 2, "halves"),      # 8 + 4 filters, dilated taps (runs of one tap)
]


def _masks(kind, c_out, kh, kw):
    if kind == "paper6":
        return PAPER6.masks[torch.randint(1, 6, (c_out,))]
    if kind == "full":
        return torch.ones(c_out, kh, kw, dtype=torch.bool)
    if kind == "halves":  # filters 0-7 keep columns 0-1, the others columns 1-2: one block, two halves
        m = torch.zeros(c_out, kh, kw, dtype=torch.bool)
        m[:8, :, :2], m[8:, :, 1:] = True, True
        return m
    m = torch.rand(c_out, kh, kw) < 0.5
    if kind == "empty_some":
        m[::3] = False
    return m


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("epilogue", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_nhwc_kernel_matches_reference(case, epilogue, threads, poison_outputs):
    n, c_in, c_out, h, w, k, s, p, d, kind = case
    kh, kw = (k, k) if isinstance(k, int) else k
    torch.manual_seed(hash(case) % 1000)
    x = torch.randn(n, c_in, h, w).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(c_out, c_in, kh, kw), torch.randn(c_out)
    m = _masks(kind, c_out, kh, kw)
    assert uses_nhwc_kernel(x, wt, 1)
    ref = F.conv2d(x.double(), wt.double() * m[:, None], b.double(), s, p, d)
    residual = torch.randn(ref.shape) if epilogue else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = asc.ops.pattern_conv2d(x, wt, m, b, s, p, d, backend="cpu", residual=residual,
                                     activation="relu" if epilogue else None)
    finally:
        torch.set_num_threads(old)
    if epilogue:
        ref = torch.relu(ref + residual.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not out.isnan().any(), "an output element was not written"
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_nhwc_layer_and_nan_semantics():
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(6, 20, 3, padding=1)
    layer = asc.nn.PatternConv2d.from_dense(conv, PAPER6.masks[torch.randint(0, 6, (20,))], path="sparse")
    x = torch.randn(2, 6, 8, 8)
    x[0, 2, 3, 3] = float("nan")
    xcl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = layer(x), layer(xcl)
    ref = F.conv2d(x, layer.weight * layer.tap_mask[:, None], layer.bias, padding=1)
    assert b.is_contiguous(memory_format=torch.channels_last)
    for out in (a, b):
        assert torch.equal(out.isnan(), ref.isnan())
        torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-5)


def _packed(w, m):
    from autosculpt import _C

    w, m = w.contiguous(), m.to(torch.uint8).reshape(m.shape[0], -1).contiguous()
    return _C.PackedPatternConvNhwc(w.data_ptr(), m.data_ptr(), *w.shape), (w, m)


def _run_packed(conv, x, b, residual):
    n, c_in, h, w = x.shape
    xh = x.permute(0, 2, 3, 1).contiguous()
    out = torch.full((n, h, w, b.numel()), float("nan"))
    rh = residual.permute(0, 2, 3, 1).contiguous() if residual is not None else None  # alive during the call
    conv.forward(xh.data_ptr(), b.data_ptr(), out.data_ptr(), n, h, w, 1, 1, 1, 1, 1, 1, 1,
                 rh.data_ptr() if rh is not None else 0, True)
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize("c_out", [16, 40, 70, 130])
def test_filter_order_puts_every_block_on_consecutive_channels(c_out):
    """Permuting a conv's filters into ``filter_order`` gives the same blocks on consecutive output
    channels (vector stores), and the permuted conv computes the permuted output."""
    torch.manual_seed(c_out)
    c_in = 12
    wt, b = torch.randn(c_out, c_in, 3, 3), torch.randn(c_out)
    m = PAPER6.masks[torch.randint(0, 6, (c_out,))]
    conv, keep = _packed(wt, m)
    order = torch.tensor(conv.filter_order, dtype=torch.long)
    assert sorted(order.tolist()) == list(range(c_out))
    assert conv.contiguous_blocks < conv.num_blocks  # random masks: scattered blocks
    perm, keep2 = _packed(wt[order], m[order])
    assert perm.num_blocks == conv.num_blocks and perm.contiguous_blocks == perm.num_blocks
    x, res = torch.randn(2, c_in, 7, 5), torch.randn(2, c_out, 7, 5)
    ref = torch.relu(F.conv2d(x.double(), wt.double() * m[:, None], b.double(), padding=1) + res.double())
    got = _run_packed(conv, x, b, res)
    got_perm = _run_packed(perm, x, b[order], res[:, order])
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_perm.double(), ref[:, order], atol=1e-4, rtol=1e-4)


def _amd_avx512() -> bool:
    """The kernel's own condition for split blocks (cpu_prefers_8_lanes: AVX-512VL on an AMD CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    return "AuthenticAMD" in text and " avx512vl" in text


@pytest.mark.parametrize("c_out,c_in", [(16, 16), (12, 5), (48, 10)])
def test_split_blocks_match_reference_and_the_portable_path(c_out, c_in):
    """Blocks whose two 8-filter halves keep different taps (where 256-bit FMAs are cheaper: AMD) run
    the taps both keep on 16 lanes and each half's own on 8; the result equals the reference and the
    portable kernel, and the executed MACs count 8 lanes for the halves' own taps."""
    torch.manual_seed(c_out + c_in)
    wt, b = torch.randn(c_out, c_in, 3, 3), torch.randn(c_out)
    m = torch.zeros(c_out, 3, 3, dtype=torch.bool)
    for f in range(c_out):  # per 16 filters: 8 keep columns 0-1 (6 taps), 8 column 2 and row 0 (5 taps)
        if f % 16 < 8:
            m[f, :, :2] = True
        else:
            m[f, :, 2], m[f, 0, :] = True, True
    conv, keep = _packed(wt, m)
    if _amd_avx512():
        # (48 filters: whole 16-filter blocks of each mask, the 8 + 8 left over share a split block)
        assert conv.split_blocks == 1
        if c_out <= 16:  # row 0 columns 0-1 kept by both halves; 4 taps only the low half; 3 the high
            assert conv.executed_macs_per_pixel == (2 * 16 + (4 + 3) * 8) * c_in
    x, res = torch.randn(3, c_in, 9, 11), torch.randn(3, c_out, 9, 11)
    ref = torch.relu(F.conv2d(x.double(), wt.double() * m[:, None], b.double(), padding=1) + res.double())
    got = _run_packed(conv, x, b, res)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    xh, rh = x.permute(0, 2, 3, 1).contiguous(), res.permute(0, 2, 3, 1).contiguous()
    out = torch.full((3, 9, 11, c_out), float("nan"))
    conv.forward(xh.data_ptr(), b.data_ptr(), out.data_ptr(), 3, 9, 11, 1, 1, 1, 1, 1, 1, 1, rh.data_ptr(), True,
                 force_generic=True)
    torch.testing.assert_close(out.permute(0, 3, 1, 2).double(), ref, atol=1e-4, rtol=1e-4)
