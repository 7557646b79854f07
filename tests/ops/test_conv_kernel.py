"""Direct tests of the C++ CPU pattern-conv kernel against the PyTorch reference.

Every case uses fresh random inputs and weights that are non-zero at the dropped taps (the kernel must
ignore them), compares with the float64 reference, and poisons the output with NaN first so that an
element the kernel forgets to write fails. Besides the public op (``backend="cpu"``) the packed kernel
is called directly to force each SIMD path this CPU has and each threading strategy.
"""
import threading

import pytest
import torch
from conftest import requires_ext

from autosculpt import _ext
from autosculpt.ops import pattern_conv2d
from autosculpt.patterns import PAPER6
from autosculpt.reference import pattern_conv2d_ref

pytestmark = requires_ext

TOL = 1e-5  # max |out - ref| / max |ref|


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _reference(x, w, mask, b, stride, padding, dilation, groups):
    return pattern_conv2d_ref(
        x.double(), w.double(), mask, None if b is None else b.double(), _pair(stride), _pair(padding),
        _pair(dilation), groups,
    )


def _assert_close(out, ref):
    assert out.shape == ref.shape
    assert not torch.isnan(out).any(), "kernel left output elements unwritten (NaN poison survived)"
    scale = max(float(ref.abs().max()), 1e-12)
    err = float((out.double() - ref).abs().max()) / scale
    assert err <= TOL, f"relative error {err:.3e} > {TOL}"


def _random_mask(c_out, kh, kw, density, gen):
    return torch.rand(c_out, kh, kw, generator=gen) < density


def _case(n, c_in, c_out, h, w, k=3, stride=1, padding=1, dilation=1, groups=1, mask="random", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    x = torch.randn(n, c_in, h, w, generator=gen)
    wt = torch.randn(c_out, c_in // groups, kh, kw, generator=gen)
    b = torch.randn(c_out, generator=gen) if bias else None
    if isinstance(mask, torch.Tensor):
        m = mask
    elif mask == "random":
        m = _random_mask(c_out, kh, kw, 0.5, gen)
    elif mask == "empty":
        m = torch.zeros(c_out, kh, kw, dtype=torch.bool)
    elif mask == "full":
        m = torch.ones(c_out, kh, kw, dtype=torch.bool)
    elif mask == "paper6-mix":
        m = PAPER6.masks[torch.randint(0, len(PAPER6), (c_out,), generator=gen)]
    else:
        raise ValueError(mask)
    return x, wt, m, b


OP_CASES = {
    "odd-hw": dict(n=2, c_in=13, c_out=24, h=11, w=9),
    "stride2-batch3": dict(n=3, c_in=16, c_out=20, h=15, w=13, stride=2),
    "stride3-generic-gather": dict(n=2, c_in=5, c_out=7, h=14, w=13, stride=3),
    "stride-2x1-pad0": dict(n=2, c_in=8, c_out=9, h=10, w=7, stride=(2, 1), padding=0),
    "cin-not-multiple-of-8": dict(n=1, c_in=5, c_out=19, h=8, w=8),
    "empty-mask": dict(n=2, c_in=12, c_out=10, h=7, w=7, mask="empty"),
    "full-mask": dict(n=2, c_in=12, c_out=17, h=9, w=9, mask="full"),
    "paper6-mix-no-bias": dict(n=3, c_in=24, c_out=40, h=12, w=12, mask="paper6-mix", bias=False),
    "1x1": dict(n=2, c_in=17, c_out=12, h=9, w=10, k=1, padding=0),
    "1x1-stride2": dict(n=2, c_in=9, c_out=12, h=9, w=10, k=1, padding=0, stride=2),
    "5x5-pad2": dict(n=2, c_in=7, c_out=11, h=12, w=11, k=5, padding=2),
    "dilation2": dict(n=2, c_in=8, c_out=10, h=13, w=12, padding=2, dilation=2),
    "pad3-wider-than-kernel": dict(n=1, c_in=4, c_out=6, h=5, w=6, padding=3),
    "depthwise": dict(n=3, c_in=12, c_out=12, h=11, w=9, groups=12),
    "depthwise-stride2-5x5": dict(n=2, c_in=6, c_out=6, h=13, w=12, k=5, padding=2, stride=2, groups=6),
    "groups2": dict(n=2, c_in=10, c_out=14, h=9, w=8, groups=2),
    "depthwise-multiplier2": dict(n=2, c_in=6, c_out=12, h=9, w=10, groups=6),
    "tiny-image-1x1-output": dict(n=4, c_in=6, c_out=8, h=3, w=3, padding=0),
    "many-images-straddle-tiles": dict(n=7, c_in=9, c_out=26, h=5, w=7),
}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_op_matches_reference(name, poison_outputs):
    kw = dict(OP_CASES[name])
    stride, padding, dilation, groups = (kw.pop(k, d) for k, d in
                                         (("stride", 1), ("padding", 1), ("dilation", 1), ("groups", 1)))
    x, w, m, b = _case(**kw, stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = pattern_conv2d(x, w, m, b, stride, padding, dilation, groups, backend="cpu")
    _assert_close(out, _reference(x, w, m, b, stride, padding, dilation, groups))


def test_eager_inference_and_autograd_paths_agree(poison_outputs):
    # without autograd the op calls the kernel directly; with it, through the custom op: same numbers
    x, w, m, b = _case(2, 9, 14, 10, 11, mask="paper6-mix", seed=5)
    with torch.no_grad():
        fast = pattern_conv2d(x, w, m, b, 1, 1, backend="cpu")
    xg = x.clone().requires_grad_(True)
    tracked = pattern_conv2d(xg, w, m, b, 1, 1, backend="cpu")
    assert tracked.grad_fn is not None and fast.grad_fn is None
    assert torch.equal(fast, tracked.detach())
    _assert_close(fast, _reference(x, w, m, b, 1, 1, 1, 1))


def test_empty_mask_output_is_bias(poison_outputs):
    x, w, m, b = _case(2, 8, 6, 9, 9, mask="empty")
    out = pattern_conv2d(x, w, m, b, 1, 1, backend="cpu")
    assert torch.equal(out, b.view(1, -1, 1, 1).expand_as(out))
    out = pattern_conv2d(x, w, m, None, 1, 1, backend="cpu")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("pattern", range(len(PAPER6)), ids=list(PAPER6.names))
@pytest.mark.parametrize("stride", [1, 2])
def test_each_paper6_pattern_alone(pattern, stride, poison_outputs):
    c_out = 21
    m = PAPER6.masks[pattern].expand(c_out, 3, 3).clone()
    x, w, m, b = _case(2, 11, c_out, 13, 10, stride=stride, mask=m, seed=pattern)
    out = pattern_conv2d(x, w, m, b, stride, 1, backend="cpu")
    _assert_close(out, _reference(x, w, m, b, stride, 1, 1, 1))


@pytest.mark.parametrize("seed", range(4))
def test_random_masks_random_shapes(seed, poison_outputs):
    gen = torch.Generator().manual_seed(100 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    n, c_in, c_out, h, w = r(1, 3), r(1, 20), r(1, 40), r(3, 17), r(3, 17)
    k, stride = [1, 3, 5][r(0, 2)], r(1, 2)
    padding = r(0, k // 2 + 1)
    if h + 2 * padding < k or w + 2 * padding < k:
        padding = k
    x, w_, m, b = _case(n, c_in, c_out, h, w, k=k, stride=stride, padding=padding, seed=seed,
                        mask=_random_mask(c_out, k, k, float(torch.rand(1, generator=gen)), gen))
    out = pattern_conv2d(x, w_, m, b, stride, padding, backend="cpu")
    _assert_close(out, _reference(x, w_, m, b, stride, padding, 1, 1))


# ------------------------------------------------------------------ the packed kernel called directly


def _available_isas():
    level = _ext.require().simd_level()
    return {"avx512": ["avx512", "avx2", "generic"], "avx2": ["avx2", "generic"]}.get(level, ["generic"])


def _direct(x, w, m, b, stride, padding, dilation, groups, isa, threads, scheduling=None, direct_mode=None,
            residual=None, relu=False):
    ext = _ext.require()
    w = w.contiguous()
    m8 = m.to(torch.uint8).contiguous()  # kept alive while the constructor reads it
    c_out, c_in_pg, kh, kw = w.shape
    packed = ext.PackedPatternConv(w.data_ptr(), m8.data_ptr(), c_out, c_in_pg, kh, kw, groups, isa)
    if scheduling is not None:
        packed.set_scheduling(*scheduling)
    if direct_mode is not None:
        packed.set_direct(direct_mode)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, _, h, wd = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.full((n, c_out, oh, ow), float("nan"))
    packed.forward(x.data_ptr(), 0 if b is None else b.data_ptr(), out.data_ptr(), n, h, wd, sh, sw, ph, pw, dh, dw,
                   threads, 0 if residual is None else residual.data_ptr(), relu)
    return out, packed


DIRECT_CASES = {
    "3x3-mix-stride1": dict(n=2, c_in=19, c_out=45, h=13, w=11, mask="paper6-mix"),
    "3x3-random-stride2": dict(n=3, c_in=10, c_out=33, h=14, w=15, stride=2),
    "5x5-dilation2": dict(n=2, c_in=6, c_out=13, h=14, w=13, k=5, padding=3, dilation=2),
    "1x1": dict(n=2, c_in=33, c_out=20, h=7, w=9, k=1, padding=0),
    "groups3": dict(n=2, c_in=12, c_out=9, h=9, w=9, groups=3),
    "depthwise": dict(n=2, c_in=7, c_out=7, h=10, w=9, groups=7),
}

# (threads, scheduling): default heuristics; 3 threads each with its own pixels; threads sharing
# gathered tiles and splitting the filters (min_subtiles_per_thread huge).
SCHEDULES = {"auto-1t": (1, None), "private-3t": (3, (1.0, 1)), "shared-2t": (2, (1.0, 10**9)),
             "shared-5t": (5, (1.0, 10**9))}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("case", sorted(DIRECT_CASES))
@pytest.mark.parametrize("isa", _available_isas())
def test_direct_kernel_every_isa_and_schedule(isa, case, schedule):
    kw = dict(DIRECT_CASES[case])
    conf = {k: kw.pop(k, d) for k, d in (("stride", 1), ("padding", 1), ("dilation", 1), ("groups", 1))}
    x, w, m, b = _case(**kw, **conf, seed=hash((case, isa)) % 1000)
    threads, scheduling = SCHEDULES[schedule]
    out, packed = _direct(x, w, m, b, conf["stride"], conf["padding"], conf["dilation"], conf["groups"], isa,
                          threads, scheduling)
    _assert_close(out, _reference(x, w, m, b, conf["stride"], conf["padding"], conf["dilation"], conf["groups"]))
    if conf["groups"] == 1:
        assert packed.isa == isa


def test_direct_kernel_larger_layer_default_schedule():
    # big enough that the default heuristics use several threads, private tiles, several tiles per thread
    x, w, m, b = _case(2, 64, 72, 30, 30, mask="paper6-mix", seed=7)
    for isa in _available_isas():
        out, _ = _direct(x, w, m, b, 1, 1, 1, 1, isa, 2)
        _assert_close(out, _reference(x, w, m, b, 1, 1, 1, 1))


def test_packing_metadata():
    x, w, m, b = _case(1, 8, 30, 6, 6, mask="paper6-mix", seed=3)
    _, packed = _direct(x, w, m, b, 1, 1, 1, 1, "", 1)
    assert packed.kept_taps == int(m.sum())
    non_empty = {tuple(r.flatten().tolist()) for r in m if r.any()}
    assert packed.num_pattern_groups == len(non_empty)
    assert packed.isa == _available_isas()[0]


def test_scratch_reuse_across_sizes_and_threads():
    # the gather scratch is reused across calls: a small call after a large one (and vice versa) must
    # not read stale data
    cases = [_case(2, 16, 24, 20, 20, seed=1), _case(1, 3, 5, 5, 5, seed=2), _case(3, 16, 24, 11, 13, seed=3)]
    for threads in (1, 2):
        for x, w, m, b in cases * 2:
            out, _ = _direct(x, w, m, b, 1, 1, 1, 1, "", threads)
            _assert_close(out, _reference(x, w, m, b, 1, 1, 1, 1))


def test_concurrent_calls_from_python_threads():
    # forward() releases the GIL; concurrent calls must not share scratch buffers
    x, w, m, b = _case(2, 24, 32, 17, 17, mask="paper6-mix", seed=11)
    ref = _reference(x, w, m, b, 1, 1, 1, 1)
    errors = []

    def worker():
        try:
            for _ in range(5):
                out, _ = _direct(x, w, m, b, 1, 1, 1, 1, "", 2)
                _assert_close(out, ref)
        except AssertionError as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_bad_isa_name_is_a_value_error():
    w = torch.randn(4, 2, 3, 3)
    m8 = torch.ones(4, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="isa"):
        _ext.require().PackedPatternConv(w.data_ptr(), m8.data_ptr(), 4, 2, 3, 3, 1, "sse9")


# ------------------------------------------------------------------ gather-free stride-1 path


# stride-1 cases: wide and narrow rows, no padding, dilation, asymmetric padding, groups, empty filters,
# small groups (2-panel micro-kernel) and big ones; batch > 1 so panels cross image boundaries
STRIDE1_CASES = {
    "paper6-mix-wide": dict(n=3, c_in=16, c_out=16, h=32, w=32, mask="paper6-mix"),
    "random-narrow": dict(n=2, c_in=9, c_out=21, h=5, w=3, mask="random"),
    "no-padding": dict(n=2, c_in=7, c_out=12, h=15, w=19, padding=0),
    "dilation2": dict(n=2, c_in=6, c_out=13, h=14, w=16, k=5, padding=(2, 4), dilation=2),
    "groups2": dict(n=2, c_in=12, c_out=10, h=13, w=14, groups=2),
    "one-pattern-big-blocks": dict(n=1, c_in=33, c_out=40, h=12, w=17, mask="full"),
    "1x1": dict(n=2, c_in=5, c_out=9, h=6, w=13, k=1, padding=0),
}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("case", sorted(STRIDE1_CASES))
@pytest.mark.parametrize("isa", _available_isas())
def test_gather_free_path_matches_gather_path_and_reference(isa, case, mode, threads):
    kw = dict(STRIDE1_CASES[case])
    conf = {k: kw.pop(k, d) for k, d in (("padding", 1), ("dilation", 1), ("groups", 1))}
    x, w, m, b = _case(**kw, **conf, seed=hash((case, isa, mode)) % 1000)
    out, packed = _direct(x, w, m, b, 1, conf["padding"], conf["dilation"], conf["groups"], isa, threads,
                          scheduling=(1.0, 1), direct_mode=mode)
    assert packed.uses_direct(out.shape[3], 1, 1) == bool(mode)
    _assert_close(out, _reference(x, w, m, b, 1, conf["padding"], conf["dilation"], conf["groups"]))


def test_direct_path_default_choice():
    x, w, m, b = _case(1, 4, 4, 20, 20, seed=1, mask="full")
    _, packed = _direct(x, w, m, b, 1, 1, 1, 1, "", 1)
    assert packed.uses_direct(32, 1, 1) and not packed.uses_direct(4, 1, 1)
    assert not packed.uses_direct(32, 2, 2), "stride 2 always gathers"
    x, w, m, b = _case(1, 64, 4, 20, 20, seed=1, mask="full")
    _, packed = _direct(x, w, m, b, 1, 1, 1, 1, "", 1)
    assert not packed.uses_direct(32, 1, 1), "many input channels: the gather pays"
    x, w, m, b = _case(1, 32, 4, 20, 20, seed=1, mask="full")  # 9 slots
    assert _direct(x, w, m, b, 1, 1, 1, 1, "", 1)[1].uses_direct(32, 1, 1)
    two = torch.zeros(4, 3, 3, dtype=torch.bool)
    two[:, :, 2] = True  # right column: 3 slots
    x, w, m, b = _case(1, 32, 4, 20, 20, seed=1, mask=two)
    assert not _direct(x, w, m, b, 1, 1, 1, 1, "", 1)[1].uses_direct(32, 1, 1)
    centre = torch.zeros(4, 3, 3, dtype=torch.bool)
    centre[:, 1, 1] = True
    x, w, m, b = _case(1, 4, 4, 20, 20, seed=1, mask=centre)
    _, packed = _direct(x, w, m, b, 1, 1, 1, 1, "", 1)
    assert not packed.uses_direct(32, 1, 1), "one tap slot: nothing to save"


# ------------------------------------------------------------------ fused epilogue (residual, ReLU)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("case", ["stride1-direct", "stride1-gather", "stride2", "depthwise", "empty-filters"])
def test_epilogue_matches_reference(case, with_residual, relu):
    conf = {
        "stride1-direct": (dict(n=2, c_in=16, c_out=20, h=16, w=16, mask="paper6-mix"), 1, 1),
        "stride1-gather": (dict(n=2, c_in=16, c_out=20, h=16, w=16, mask="paper6-mix"), 1, 0),
        "stride2": (dict(n=3, c_in=8, c_out=12, h=15, w=13, stride=2), 2, None),
        "depthwise": (dict(n=2, c_in=6, c_out=6, h=9, w=9, groups=6), 1, None),
        "empty-filters": (dict(n=2, c_in=5, c_out=7, h=14, w=14, mask="empty"), 1, 1),
    }[case]
    kw, stride, mode = conf
    groups = kw.get("groups", 1)
    x, w, m, b = _case(**kw, seed=5)
    ref = _reference(x, w, m, b, stride, 1, 1, groups)
    residual = torch.randn(ref.shape, dtype=torch.float32) if with_residual else None
    if residual is not None:
        ref = ref + residual.double()
    if relu:
        ref = ref.clamp_min(0)
    for threads in (1, 2):
        out, _ = _direct(x, w, m, b, stride, 1, 1, groups, "", threads, scheduling=(1.0, 1), direct_mode=mode,
                         residual=residual, relu=relu)
        _assert_close(out, ref)
    # the public op, CPU kernel and torch reference backend (eager inference and autograd)
    for backend in ("cpu", "torch"):
        got = pattern_conv2d(x, w, m, b, stride, 1, 1, groups, backend, residual=residual,
                             activation="relu" if relu else None)
        _assert_close(got, ref)
    xg = x.clone().requires_grad_()
    got = pattern_conv2d(xg, w, m, b, stride, 1, 1, groups, "cpu", residual=residual, activation="relu" if relu else None)
    _assert_close(got.detach(), ref)
    got.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_epilogue_bad_arguments():
    x, w, m, b = _case(1, 4, 6, 8, 8, seed=2)
    with pytest.raises(ValueError, match="activation"):
        pattern_conv2d(x, w, m, b, 1, 1, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        pattern_conv2d(x, w, m, b, 1, 1, residual=torch.zeros(1, 6, 7, 8))
    with pytest.raises(TypeError, match="residual"):
        pattern_conv2d(x, w, m, b, 1, 1, residual=torch.zeros(1, 6, 8, 8, dtype=torch.float64))
