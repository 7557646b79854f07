"""The Triton pattern-conv kernel against the PyTorch reference, under Triton's interpreter on CPU.

The interpreter is slow and has no bf16 arithmetic: shapes are tiny and fp32. CPU tensors always go
through the interpreter (triton_kernels/pattern_conv.py picks it by device); ``TRITON_INTERPRET=1`` is
set per test because ``backend="triton"`` accepts CPU tensors only with it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import autosculpt as asc  # noqa: E402
from autosculpt.ops import _pattern_groups  # noqa: E402
from autosculpt.patterns import PAPER6  # noqa: E402
from autosculpt.reference import pattern_conv2d_ref  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _kernels():
    from autosculpt._triton import kernels

    return kernels("pattern_conv")


def _check(x, w, m, b=None, stride=1, padding=0, dilation=1, groups=1, **kw):
    y = asc.ops.pattern_conv2d(x, w, m, b, stride, padding, dilation, groups, backend="triton", **kw)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    ref = pattern_conv2d_ref(x.double(), w.double(), m, None if b is None else b.double(),
                             pair(stride), pair(padding), pair(dilation), groups)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    assert err <= 1e-5 * scale, f"max abs error {err} (scale {scale})"
    return y


@pytest.mark.parametrize("pattern", range(len(PAPER6)), ids=list(PAPER6.names))
def test_each_paper6_pattern(pattern):
    torch.manual_seed(pattern)
    x = torch.randn(2, 5, 7, 6)
    w = torch.randn(6, 5, 3, 3)
    m = PAPER6.masks[pattern].expand(6, 3, 3).clone()
    y = _check(x, w, m, torch.randn(6), stride=1, padding=1)
    if pattern == 0:  # empty filters: only the bias
        assert torch.equal(y, torch.zeros_like(y) + y[:, :, :1, :1])


@pytest.mark.parametrize(
    "shape,stride,padding",
    [
        ((3, 7, 9, 11, 19), 2, 1),          # awkward sizes, stride 2
        ((1, 6, 10, 7, 13), (2, 1), (0, 2)),  # asymmetric stride and padding
        ((2, 37, 5, 6, 40), 1, 1),           # C_in > BLOCK_K (K tail), group > BLOCK_N (N tail)
    ],
)
def test_paper6_mix(shape, stride, padding):
    n, c_in, h, w_, c_out = shape
    torch.manual_seed(sum(shape))
    x = torch.randn(n, c_in, h, w_)
    w = torch.randn(c_out, c_in, 3, 3)
    m = PAPER6.masks[torch.randint(0, len(PAPER6), (c_out,))]
    _check(x, w, m, torch.randn(c_out), stride, padding)


def test_random_masks_with_empty_filters_no_bias():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 9)
    w = torch.randn(21, 4, 3, 3)
    m = torch.rand(21, 3, 3) > 0.6
    m[[0, 5, 20]] = False
    _check(x, w, m, None, 1, 1)


def test_all_filters_empty_gives_bias():
    x = torch.randn(1, 3, 5, 5)
    b = torch.randn(4)
    y = _check(x, torch.randn(4, 3, 3, 3), torch.zeros(4, 3, 3, dtype=torch.bool), b, 1, 1)
    assert torch.equal(y, b.view(1, 4, 1, 1).expand_as(y))


def test_channels_last_dilation_and_nonsquare_kernel():
    torch.manual_seed(2)
    x = torch.randn(2, 6, 9, 8).to(memory_format=torch.channels_last)
    w = torch.randn(10, 6, 2, 3)
    m = torch.rand(10, 2, 3) > 0.4
    y = _check(x, w, m, torch.randn(10), stride=(1, 2), padding=(2, 1), dilation=2)
    assert y.is_contiguous(memory_format=torch.channels_last)  # channels_last in, channels_last out (as the fake impl)


def _fake_and_real_strides(x, w, m, backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = ([1, 1], [1, 1], [1, 1], 1, backend, 0)
    real = torch.ops.autosculpt.pattern_conv2d(x, w, m, None, *args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.autosculpt.pattern_conv2d(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(m),
                                                   None, *args)
    return fake.stride(), real.stride()


@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fake_impl_strides_match_real_output(backend, channels_last):
    if backend == "cpu" and asc.runtime.build_info()["cpu_built"] is False:
        pytest.skip("extension not built")
    x = torch.randn(2, 8, 5, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fake, real = _fake_and_real_strides(x, torch.randn(4, 8, 3, 3), torch.rand(4, 3, 3) > 0.5, backend)
    assert fake == real


@pytest.mark.slow
def test_inductor_sees_the_real_output_strides():
    """torch.compile (inductor) trusts the fake impl's strides; a channels_last input on CPU must not
    trip its stride assertion, and the fused epilogue must read the right elements."""
    torch.manual_seed(9)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3)
    m = torch.rand(8, 3, 3) > 0.5

    def f(x):
        y = asc.ops.pattern_conv2d(x, w, m, None, 1, 1, backend="triton")
        return (y * 2 + 1).permute(0, 2, 3, 1).reshape(2, -1)[:, :50]

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_groups():
    torch.manual_seed(3)
    x = torch.randn(2, 6, 7, 7)
    w = torch.randn(8, 3, 3, 3)
    m = PAPER6.masks[torch.tensor([1, 2, 3, 4, 5, 0, 5, 1])]
    _check(x, w, m, torch.randn(8), 1, 1, groups=2)


def test_every_output_element_is_written():
    """The kernel itself writes all of a NaN-poisoned, channels_last output (empty filters included)."""
    torch.manual_seed(4)
    x = torch.randn(2, 5, 6, 7)
    w = torch.randn(9, 5, 3, 3)
    m = PAPER6.masks[torch.tensor([0, 1, 2, 3, 4, 5, 0, 3, 5])]
    meta = _pattern_groups.group_meta(m, 5, 1)
    packed = _pattern_groups.pack_weight(w, meta)
    out = torch.full((2, 9, 3, 4), float("nan")).to(memory_format=torch.channels_last)
    y = _kernels().pattern_conv2d_triton(
        x, packed, None, meta.perm, meta.tiles, meta.taps, meta.tile_offsets, (3, 3), 9, 5,
        (2, 2), (1, 1), (1, 1), out=out,
    )
    assert y is out
    torch.testing.assert_close(out, pattern_conv2d_ref(x, w, m, None, (2, 2), (1, 1)), rtol=1e-5, atol=1e-5)


def test_larger_blocks_config():
    """A GPU-like config (two K blocks per tap, wide N) is also right; configs only change tiling."""
    torch.manual_seed(5)
    x = torch.randn(1, 40, 6, 5)
    w = torch.randn(33, 40, 3, 3)
    m = PAPER6.masks[torch.randint(0, len(PAPER6), (33,))]
    y = _check(x, w, m, torch.randn(33), 1, 1)
    meta, packed = _pattern_groups.prepared(w, m, 1, 0)
    y2 = _kernels().pattern_conv2d_triton(
        x, packed, None, meta.perm, meta.tiles, meta.taps, meta.tile_offsets, (3, 3), 33, 40,
        (1, 1), (1, 1), (1, 1), config=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32),
    )
    torch.testing.assert_close(y2, pattern_conv2d_ref(x, w, m, None, (1, 1), (1, 1)), rtol=1e-5, atol=1e-5)
    assert not torch.equal(y, y2)  # y has a bias, y2 not: the launcher honours HAS_BIAS


def test_cached_packing_follows_weight_updates():
    torch.manual_seed(6)
    x = torch.randn(1, 3, 5, 5)
    w = torch.randn(5, 3, 3, 3)
    m = PAPER6.masks[torch.tensor([1, 2, 3, 4, 5])]
    key = asc.ops.conv.new_cache_key()
    _check(x, w, m, None, 1, 1, _cache_key=key)
    with torch.no_grad():
        w.mul_(-2.0)  # in place: same pointer, new version -> repacked
    _check(x, w, m, None, 1, 1, _cache_key=key)
    asc.ops.conv.release_cache(key)
    assert key not in _pattern_groups._PACKED


def test_torch_compile_fullgraph_and_autograd():
    torch.manual_seed(7)
    x = torch.randn(1, 4, 5, 6, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    m = PAPER6.masks[torch.tensor([1, 3, 5, 0, 2, 4])]

    def f(x, w):
        return asc.ops.pattern_conv2d(x, w, m, None, 1, 1, backend="triton")

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    ref = pattern_conv2d_ref(x, w, m, None, (1, 1), (1, 1))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
    assert (gw * (~m[:, None]).float()).abs().max() == 0  # dropped taps get no gradient


def test_group_metadata_is_consistent():
    """Every layout lists each output channel once; packed weights hold the kept taps, zeros elsewhere."""
    torch.manual_seed(8)
    c_out, c_in = 23, 3
    m = torch.rand(c_out, 3, 3) > 0.5
    m[4] = False
    w = torch.randn(c_out, c_in, 3, 3)
    meta = _pattern_groups.group_meta(m, c_in, 1)
    assert meta.kept_macs_per_pixel == int(m.sum()) * c_in
    packed = _pattern_groups.pack_weight(w, meta)
    perm, taps, a = meta.perm.tolist(), meta.taps.tolist(), _pattern_groups.ALIGN
    for bn in _pattern_groups.BLOCK_NS:
        row0, count = meta.tile_table(bn)
        covered, work = [], 0
        for col0, ncols, wbase16, ld16, tap0, ntaps, conv_group, ncols16 in meta.tiles[row0:row0 + count].tolist():
            assert 0 < ncols <= bn and conv_group == 0 and ncols16 * a >= ncols and ld16 == ncols16
            wbase, ldw = wbase16 * a, ld16 * a
            tile_taps = taps[tap0:tap0 + ntaps]
            assert len(set(tile_taps)) == ntaps
            work += ntaps * c_in * bn
            for j in range(ncols):
                co = perm[col0 + j]
                covered.append(co)
                assert set(torch.nonzero(m[co].flatten()).flatten().tolist()) <= set(tile_taps)
                for ti, t in enumerate(tile_taps):  # packed[(ti * C + ci) * ld + j] = weight, or 0 if dropped
                    for ci in range(c_in):
                        expected = w[co, ci].flatten()[t] if m[co].flatten()[t] else 0.0
                        assert packed[wbase + (ti * c_in + ci) * ldw + j] == expected
            for ti in range(ntaps):  # columns past ncols (loaded, never stored) are zero padding
                for ci in range(c_in):
                    row = wbase + (ti * c_in + ci) * ldw
                    assert (packed[row + ncols:row + ldw] == 0).all()
        assert sorted(covered) == list(range(c_out))
        assert work == meta.executed_macs_per_pixel[bn] >= meta.kept_macs_per_pixel


def test_tile_planning_merges_overlapping_partial_groups():
    """PAPER6 mixes on few filters: partial groups with shared taps share a tile, the empty group is
    folded in, and a layout never does more work than the dense layer."""
    from autosculpt.ops._pattern_groups import plan_tiles

    groups = [(0, (), [0, 1]), (0, (2, 5, 8), [2, 3]), (0, (6, 7, 8), [4]), (0, (1, 2, 4, 5, 7, 8), [5, 6]),
              (0, (3, 4, 5, 6, 7, 8), [7]), (0, tuple(range(9)), [8, 9])]
    one = plan_tiles(groups, 16)
    assert len(one) == 1 and one[0][1] == tuple(range(9)) and sorted(one[0][2]) == list(range(10))
    exact = plan_tiles(groups, 2)  # tiles of 2: nothing fits together except the single-filter partials
    assert sorted(f for _, _, fs in exact for f in fs) == list(range(10))
    assert all(len(fs) <= 2 for _, _, fs in exact)
    # disjoint taps are not merged (no work saved), an empty group merges anywhere
    apart = plan_tiles([(0, (0,), [0]), (0, (8,), [1]), (0, (), [2])], 16)
    assert sorted(len(t) for _, t, _ in apart) == [1, 1] and sorted(len(fs) for _, _, fs in apart) == [1, 2]
    # conv groups never share a tile
    assert len(plan_tiles([(0, (1,), [0]), (1, (1,), [1])], 16)) == 2
    m = PAPER6.masks[torch.arange(64) % 6]
    meta = _pattern_groups.group_meta(m, 8, 1)
    for bn in _pattern_groups.BLOCK_NS:  # never more tile work than the dense layer in the same tiles
        assert meta.executed_macs_per_pixel[bn] <= -(-64 // bn) * bn * 9 * 8


def test_bad_inputs(monkeypatch):
    x = torch.randn(1, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    m = torch.ones(4, 3, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        asc.ops.pattern_conv2d(x.double(), w.double(), m, backend="triton")
    with pytest.raises(TypeError, match="float32 only"):  # the interpreter has no half arithmetic
        asc.ops.pattern_conv2d(x.half(), w.half(), m, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        asc.ops.pattern_conv2d(x, w, m, backend="triton")


def test_import_is_lazy_and_source_checkout_loader():
    """`import autosculpt` imports no triton; the loader maps <repo>/triton_kernels to the package name."""
    code = (
        "import sys, autosculpt\n"
        "assert 'triton' not in sys.modules, 'import autosculpt imported triton'\n"
        "from autosculpt._triton import kernels\n"
        "mod = kernels('pattern_conv')\n"
        "import autosculpt.triton_kernels as pkg\n"
        "print(mod.__name__, pkg.__path__[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    name, path = res.stdout.split()
    assert name == "autosculpt.triton_kernels.pattern_conv"
    expected = REPO / "triton_kernels"
    installed = Path(path).resolve() != expected.resolve()
    assert not installed or Path(path, "pattern_conv.py").is_file()


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_gpu_code_compiles_for_hopper_with_tensor_cores_and_async_copies():
    """No GPU needed: Triton's own ptxas compiles the kernel for sm_90; the channels_last fp16 kernel
    must use wgmma (tensor cores) and cp.async pipelined loads of input and weights."""
    import triton

    try:
        from triton.backends import backends

        if "nvidia" not in backends:
            pytest.skip("triton without its NVIDIA backend")
    except ImportError:
        pytest.skip("triton backend registry not found")
    try:
        kernel = _kernels().compile_ahead("fp16", channels_last=True, arch=90, config=(128, 64, 32, 4, 3))
    except (TypeError, ImportError) as exc:  # ASTSource's signature differs across Triton releases
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {exc}")
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "no Hopper tensor-core instructions"
    assert "cp.async" in ptx, "loads are not pipelined through shared memory"
    assert kernel.metadata.shared > 0
    del triton
