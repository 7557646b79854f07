"""CUDA C++ and GPU Triton pattern conv against references, plus build checks that run anywhere.

GPU tests carry ``@pytest.mark.cuda`` and the ``gpu`` fixture, which skips them when no GPU is present.
Nothing here touches CUDA at import: the skip is decided inside the fixture, when a test runs.
Tolerances for fp16/bf16 (and TF32) are tied to cuDNN's own error in the same precision: our error
against an fp64 reference must be at most twice that of ``F.conv2d`` on the same rounded inputs.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import autosculpt as asc
from autosculpt import _ext
from autosculpt.patterns import PAPER6
from autosculpt.reference import pattern_conv2d_ref

REPO = Path(__file__).resolve().parents[2]


def _cuda_built() -> bool:
    ext = _ext.extension()
    return bool(getattr(ext, "cuda_built", False))


@pytest.fixture
def gpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # One pinned Triton config: correctness does not need autotuning, and each candidate compiles.
    monkeypatch.setenv("AUTOSCULPT_TRITON_AUTOTUNE", "0")
    return torch.device("cuda")


def _gpu_backends():
    out = []
    if _cuda_built():
        out.append("cuda")
    try:
        import triton  # noqa: F401

        out.append("triton")
    except ImportError:
        pass
    return out


def _backend_or_skip(backend, dtype=torch.float32):
    if backend == "cuda" and not _cuda_built():
        pytest.skip("CUDA kernels not built (AUTOSCULPT_CUDA=1)")
    if backend == "triton" and "triton" not in _gpu_backends():
        pytest.skip("triton not installed")
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs sm_80+")


def _set_tf32(enabled: bool):
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = enabled


@pytest.fixture
def tf32_off():
    conv = getattr(torch.backends.cudnn, "conv", None)
    saved = getattr(conv, "fp32_precision", None)
    _set_tf32(False)
    yield
    if saved is not None:
        conv.fp32_precision = saved
    else:
        torch.backends.cudnn.allow_tf32 = True


def _problem(n, c_in, h, w, c_out, masks, dtype, device, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g).to(device, dtype)
    wt = (torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in) ** 0.5).to(device, dtype)
    b = torch.randn(c_out, generator=g).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if masks == "paper6":
        m = PAPER6.masks[torch.randint(0, len(PAPER6), (c_out,), generator=g)]
    else:  # random masks with some empty filters
        m = torch.rand(c_out, 3, 3, generator=g) > 0.5
        m[:: max(1, c_out // 5)] = False
    return x, wt, m.to(device), b


def _errors(y, x, w, m, b, stride, padding):
    """(our max error, F.conv2d's max error in the same dtype), both against fp64 on the same inputs."""
    ref = pattern_conv2d_ref(x.double(), w.double(), m, b.double(), (stride,) * 2, (padding,) * 2)
    wm = w * m[:, None].to(w.dtype)
    dense = F.conv2d(x, wm, b, stride, padding)
    return (y.double() - ref).abs().max().item(), (dense.double() - ref).abs().max().item(), ref


CASES = [  # (n, c_in, h, w, c_out, masks, stride, padding)
    (3, 37, 13, 11, 70, "paper6", 1, 1),
    (2, 64, 15, 15, 96, "random", 2, 1),
    (1, 24, 9, 10, 33, "paper6", 2, 0),
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=["awkward", "random-s2", "small-s2p0"])
def test_half_precision_matches_cudnn_error(gpu, backend, dtype, channels_last, case):
    _backend_or_skip(backend, dtype)
    n, c_in, h, w, c_out, masks, stride, padding = case
    x, wt, m, b = _problem(n, c_in, h, w, c_out, masks, dtype, gpu, channels_last)
    y = asc.ops.pattern_conv2d(x, wt, m, b, stride, padding, backend=backend)
    assert y.dtype == dtype and y.shape[1] == c_out
    ours, theirs, ref = _errors(y, x, wt, m, b, stride, padding)
    floor = 1e-6 * ref.abs().max().item()
    assert ours <= 2 * theirs + floor, f"{backend} error {ours:.3g} > 2 x F.conv2d's {theirs:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fp32_exact_without_tf32(gpu, tf32_off, backend, channels_last):
    _backend_or_skip(backend)
    for i, (n, c_in, h, w, c_out, masks, stride, padding) in enumerate(CASES):
        x, wt, m, b = _problem(n, c_in, h, w, c_out, masks, torch.float32, gpu, channels_last, seed=i)
        y = asc.ops.pattern_conv2d(x, wt, m, b, stride, padding, backend=backend)
        ours, _, ref = _errors(y, x, wt, m, b, stride, padding)
        assert ours <= 2e-5 * ref.abs().max().item(), f"case {i}: error {ours}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fp32_with_tf32_matches_cudnn_error(gpu, backend):
    _backend_or_skip(backend)
    conv = getattr(torch.backends.cudnn, "conv", None)
    saved = getattr(conv, "fp32_precision", None)
    _set_tf32(True)
    try:
        n, c_in, h, w, c_out, masks, stride, padding = CASES[0]
        x, wt, m, b = _problem(n, c_in, h, w, c_out, masks, torch.float32, gpu, True)
        y = asc.ops.pattern_conv2d(x, wt, m, b, stride, padding, backend=backend)
        ours, theirs, ref = _errors(y, x, wt, m, b, stride, padding)
        assert ours <= max(2 * theirs, 1e-5 * ref.abs().max().item())
    finally:
        if saved is not None:
            conv.fp32_precision = saved


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last_out", [False, True], ids=["nchw-out", "nhwc-out"])
def test_cuda_kernel_writes_every_output_element(gpu, tf32_off, channels_last_out):
    """Call the CUDA launcher directly on a NaN-poisoned output (every PAPER6 pattern, empty ones too)."""
    _backend_or_skip("cuda")
    from autosculpt.ops import _pattern_groups

    ext = _ext.require()
    x, wt, _, b = _problem(2, 16, 9, 7, 12, "paper6", torch.float32, gpu, False)
    m = PAPER6.masks[torch.arange(12) % len(PAPER6)].to(gpu)
    meta, packed = _pattern_groups.prepared(wt, m, 1, 0)
    out = torch.full((2, 12, 5, 4), float("nan"), device=gpu)
    if channels_last_out:
        out = out.to(memory_format=torch.channels_last)
    row0, nt = meta.tile_table(64)
    tiles = meta.tiles[row0 : row0 + nt]
    ext.pattern_conv2d_cuda(
        x.data_ptr(), packed.data_ptr(), b.data_ptr(), out.data_ptr(), meta.perm.data_ptr(), tiles.data_ptr(),
        meta.taps.data_ptr(), 2, 16, 9, 7, 5, 4, 3, tuple(x.stride()), tuple(out.stride()),
        2, 2, 1, 1, 1, 1, nt, 64, 0, False, gpu.index or 0, torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()
    torch.testing.assert_close(out, pattern_conv2d_ref(x, wt, m, b, (2, 2), (1, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_runs_on_the_callers_stream(gpu, tf32_off, backend):
    _backend_or_skip(backend)
    x, wt, m, b = _problem(4, 32, 28, 28, 64, "paper6", torch.float32, gpu, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = asc.ops.pattern_conv2d(x, wt, m, b, 1, 1, backend=backend)
        y.add_(1.0)  # queued behind the conv on the same stream
    side.synchronize()
    torch.testing.assert_close(y - 1.0, pattern_conv2d_ref(x, wt, m, b, (1, 1), (1, 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_auto_picks_a_measured_backend_once(gpu, monkeypatch):
    from autosculpt.ops import gpu_choice

    monkeypatch.delenv("AUTOSCULPT_TRITON_AUTOTUNE")  # the real path: autotuned Triton among candidates
    gpu_choice.clear()
    x, wt, m, b = _problem(2, 32, 14, 14, 64, "paper6", torch.float16, gpu, True)
    y = asc.ops.pattern_conv2d(x, wt, m, b, 1, 1)
    decisions = gpu_choice.decisions()
    assert len(decisions) == 1
    (choice, timings), = decisions.values()
    assert choice in timings and timings[choice] == min(timings.values())
    assert "torch" in timings
    asc.ops.pattern_conv2d(x, wt, m, b, 1, 1)
    assert len(gpu_choice.decisions()) == 1  # cached, not re-measured
    ours, theirs, _ = _errors(y, x, wt, m, b, 1, 1)
    assert ours <= 2 * theirs + 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_fullgraph(gpu, tf32_off, backend):
    _backend_or_skip(backend)
    x, wt, m, b = _problem(2, 16, 10, 10, 24, "paper6", torch.float32, gpu, False)
    # aot_eager: traces through dynamo + the fake impl like inductor would, without inductor's compile time
    f = torch.compile(lambda x: asc.ops.pattern_conv2d(x, wt, m, b, 1, 1, backend=backend), fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(x), pattern_conv2d_ref(x, wt, m, b, (1, 1), (1, 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fake_impl_strides_match_real_output_on_gpu(gpu, backend, channels_last):
    """torch.compile trusts the fake impl's strides: channels_last in -> channels_last out on CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend != "torch":
        _backend_or_skip(backend)
    x, wt, m, _ = _problem(2, 16, 6, 7, 8, "paper6", torch.float16, gpu, channels_last)
    args = ([1, 1], [1, 1], [1, 1], 1, backend, 0)
    real = torch.ops.autosculpt.pattern_conv2d(x, wt, m, None, *args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.autosculpt.pattern_conv2d(mode.from_tensor(x), mode.from_tensor(wt), mode.from_tensor(m),
                                                   None, *args)
    assert fake.stride() == real.stride()
    assert real.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.cuda
def test_available_backends_on_gpu(gpu):
    usable = asc.runtime.available_backends()
    major = max(torch.cuda.get_device_capability(i)[0] for i in range(torch.cuda.device_count()))
    assert usable["cuda"] == (_cuda_built() and major >= 8)
    assert usable["triton"] == ("triton" in _gpu_backends())


# ----------------------------------------------------------------- checks that need no GPU


def test_build_asked_for_cuda_has_it():
    """A build asked for CUDA (AUTOSCULPT_CUDA=1 then, or now in the test environment, or "auto" with
    nvcc on PATH) must have produced the CUDA kernels; AUTOSCULPT_CUDA=0 must not have."""
    ext = _ext.extension()
    if ext is None:
        pytest.skip(f"extension not built: {_ext.load_error()}")
    requested = getattr(ext, "cuda_requested", None)
    if requested is None:
        pytest.skip("module built without the cuda_requested record")
    asked_now = os.environ.get("AUTOSCULPT_CUDA")
    if asked_now == "1" or requested == "1" or (requested == "auto" and shutil.which("nvcc")):
        assert ext.cuda_built, f"build asked for CUDA (AUTOSCULPT_CUDA={requested}) but the module has none"
        assert ext.cuda_archs and hasattr(ext, "pattern_conv2d_cuda")
        assert asc.runtime.build_info()["cuda_built"]
    elif requested == "0":
        assert not ext.cuda_built and not hasattr(ext, "pattern_conv2d_cuda")


def test_import_initialises_no_cuda_and_cuda_backend_errors_clearly():
    code = (
        "import torch, autosculpt, autosculpt.ops._conv_cuda, autosculpt.ops.gpu_choice\n"
        "autosculpt.runtime.build_info()\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "x = torch.randn(1, 2, 4, 4); w = torch.randn(3, 2, 3, 3); m = torch.ones(3, 3, 3, dtype=torch.bool)\n"
        "try:\n"
        "    autosculpt.ops.pattern_conv2d(x, w, m, backend='cuda')\n"
        "except ValueError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR backend: 'cuda'" in res.stdout


def test_cuda_launch_without_a_gpu_raises_runtime_error():
    if not _cuda_built():
        pytest.skip("CUDA kernels not built")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    ext = _ext.require()
    with pytest.raises(RuntimeError, match="autosculpt CUDA pattern_conv2d: .* failed"):
        ext.pattern_conv2d_cuda(16, 16, 0, 16, 16, 16, 16, 1, 4, 5, 5, 3, 3, 3, (100, 25, 5, 1), (36, 9, 3, 1),
                                1, 1, 0, 0, 1, 1, 1, 64, 1, False, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        ext.pattern_conv2d_cuda(16, 16, 0, 16, 16, 16, 16, 1, 4, 5, 5, 3, 3, 3, (100, 25, 5, 1), (36, 9, 3, 1),
                                1, 1, 0, 0, 1, 1, 1, 64, 9, False, 0, 0)


def test_dense_fallback_weight_cache():
    """The GPU dense fallback reuses a layer's masked weight until the weight changes (device-agnostic)."""
    from autosculpt.ops import _pattern_groups

    w = torch.randn(4, 3, 3, 3)
    m = torch.rand(4, 3, 3) > 0.5
    x_cl = torch.randn(1, 3, 5, 5).to(memory_format=torch.channels_last)
    key = asc.ops.conv.new_cache_key()
    a = _pattern_groups.masked_weight(w, m, key, x_cl)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, w * m[:, None])
    assert _pattern_groups.masked_weight(w, m, key, x_cl) is a
    w.mul_(2)
    b = _pattern_groups.masked_weight(w, m, key, x_cl)
    assert b is not a and torch.equal(b, w * m[:, None])
    asc.ops.conv.release_cache(key)
    assert key not in _pattern_groups._MASKED


@pytest.mark.cuda
def test_torch_backend_with_layer_key_on_gpu(gpu, tf32_off):
    x, wt, m, b = _problem(2, 16, 9, 9, 24, "paper6", torch.float32, gpu, True)
    key = asc.ops.conv.new_cache_key()
    y = asc.ops.pattern_conv2d(x, wt, m, b, 1, 1, backend="torch", _cache_key=key)
    torch.testing.assert_close(y, pattern_conv2d_ref(x, wt, m, b, (1, 1), (1, 1)))
    with torch.no_grad():
        wt.mul_(-1)
    y = asc.ops.pattern_conv2d(x, wt, m, b, 1, 1, backend="torch", _cache_key=key)
    torch.testing.assert_close(y, pattern_conv2d_ref(x, wt, m, b, (1, 1), (1, 1)))
    asc.ops.conv.release_cache(key)


def test_auto_chooser_logic_without_a_gpu(monkeypatch):
    """gpu_choice with its timer and candidates replaced: fastest wins, decisions are cached per mask,
    a failing backend is warned about and excluded, and traced calls reuse eager decisions."""
    from autosculpt.ops import conv as conv_ops
    from autosculpt.ops import gpu_choice

    gpu_choice.clear()
    calls = []

    def fake(name):
        def fn(*args):
            calls.append(name)
            if name == "cuda":
                raise RuntimeError("boom")
            return None
        fn.fake_ms = {"triton": 1.0, "torch": 2.0}.get(name, 0.5)
        return fn

    for name in ("cuda", "triton", "torch"):
        monkeypatch.setitem(conv_ops.CONV_BACKENDS, name, fake(name))
    monkeypatch.setattr(gpu_choice, "candidates", lambda x: [b for b in ("cuda", "triton", "torch")
                                                             if b not in gpu_choice._FAILED])

    def fake_time(run, device, **kw):
        run()
        return run.__defaults__[0].fake_ms

    monkeypatch.setattr(gpu_choice, "time_ms", fake_time)
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    m = torch.rand(4, 3, 3) > 0.5
    args = ((1, 1), (1, 1), (1, 1), 1)
    with pytest.warns(RuntimeWarning, match="backend 'cuda' failed"):
        assert gpu_choice.choose(x, w, m, *args) == "triton"
    n_calls = len(calls)
    assert gpu_choice.choose(x, w, m, *args) == "triton" and len(calls) == n_calls  # cached
    assert gpu_choice.choose(x, w, ~m, *args) == "triton" and "cuda" not in calls[n_calls:]  # new mask, cuda out
    (choice, timings), *_ = gpu_choice.decisions().values()
    assert choice == "triton" and timings == {"triton": 1.0, "torch": 2.0}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert gpu_choice.choose(x, w, m, *args) == "triton"  # tracing: the eager decision for these shapes
    assert gpu_choice.choose(torch.randn(2, 3, 8, 8), w, m, *args) == "torch"  # unseen shape: dense
    gpu_choice.clear()


def test_cuda_tile_width_choice():
    """32-wide CUDA tiles only where they skip clearly more work than 64-wide ones."""
    pytest.importorskip("autosculpt.ops._conv_cuda")
    from autosculpt.ops import _pattern_groups
    from autosculpt.ops._conv_cuda import choose_block_n

    six_way = PAPER6.masks[torch.arange(64) % 6]  # 6 groups of ~11: 64-wide tiles save nothing
    assert choose_block_n(_pattern_groups.group_meta(six_way, 16, 1)) == 32
    two_way = PAPER6.masks[torch.tensor([1, 2] * 64)]  # 2 groups of 64: full 64-wide tiles
    assert choose_block_n(_pattern_groups.group_meta(two_way, 16, 1)) == 64


# ----------------------------------------------------------------- the CUDA kernel, emulated on the CPU


def _cuda_include_dir():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "include", "cuda_fp16.h").is_file():
            return Path(root, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parents[1] / "include"
        if (inc / "cuda_fp16.h").is_file():
            return inc
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """csrc/cuda/pattern_conv.cu compiled for the host with tests/cuda_emu (g++ + CUDA headers)."""
    import ctypes

    inc, gxx = _cuda_include_dir(), shutil.which("g++")
    if inc is None or gxx is None:
        pytest.skip("needs g++ and the CUDA headers to emulate the CUDA kernel")
    lib = tmp_path_factory.mktemp("cuda_emu") / "emu.so"
    cmd = [gxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-w", "-DAUTOSCULPT_CUDA_EMULATE",
           f"-I{REPO / 'csrc'}", f"-I{REPO / 'tests' / 'cuda_emu'}", f"-I{inc}",
           str(REPO / "tests" / "cuda_emu" / "emulate.cpp"), "-o", str(lib), "-lpthread"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def _emu_conv(emu, x, w, m, b, stride, padding, dilation=(1, 1), groups=1, tf32=False, out=None, block_n=64):
    """Runs the emulated CUDA launcher like autosculpt/ops/_conv_cuda.py runs the real one."""
    import ctypes

    from autosculpt.ops import _pattern_groups
    from autosculpt.ops.conv import conv_output_size

    meta, packed = _pattern_groups.prepared(w, m, groups, 0)
    n, _, h, wd = x.shape
    oh, ow = conv_output_size(h, wd, w.shape[2], w.shape[3], stride, padding, dilation)
    if out is None:
        out = torch.full((n, w.shape[0], oh, ow), float("nan"), dtype=x.dtype)
    row0, nt = meta.tile_table(block_n)
    tiles = meta.tiles[row0:row0 + nt].contiguous()
    i64 = ctypes.c_int64
    ptrs = (i64 * 7)(x.data_ptr(), packed.data_ptr(), 0 if b is None else b.data_ptr(), out.data_ptr(),
                     meta.perm.data_ptr(), tiles.data_ptr(), meta.taps.data_ptr())
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
    sizes = (i64 * 17)(n, w.shape[1], h, wd, oh, ow, w.shape[3], stride[0], stride[1], padding[0], padding[1],
                       dilation[0], dilation[1], nt, code, int(tf32), block_n)
    err = ctypes.create_string_buffer(512)
    rc = emu.emu_pattern_conv2d_forward(ptrs, sizes, (i64 * 4)(*x.stride()), (i64 * 4)(*out.stride()), err, 512)
    assert rc == 0, err.value.decode()
    return out


EMU_CASES = [  # (n, c_in, h, w, c_out, kernel, stride, padding, dilation, groups, channels_last)
    (2, 40, 7, 6, 70, 3, (1, 1), (1, 1), (1, 1), 1, False),   # K tail (40 = 32 + 8), 2 filter tiles, NCHW
    (2, 40, 7, 6, 70, 3, (1, 1), (1, 1), (1, 1), 1, True),    # same, channels_last (vector loads)
    (3, 16, 9, 11, 20, 3, (2, 2), (1, 1), (1, 1), 1, True),   # stride 2, > 64 output pixels
    (1, 12, 8, 9, 10, 3, (2, 1), (2, 0), (2, 1), 2, False),   # groups, dilation, asymmetric
    (1, 6, 5, 5, 9, 2, (1, 1), (1, 1), (1, 1), 1, True),      # 2x2 kernel; 6 channels: scalar loads
]


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, False),
                                        (torch.bfloat16, False)], ids=["fp32-simt", "fp32-tf32-wmma", "fp16-wmma",
                                                                       "bf16-wmma"])
@pytest.mark.parametrize("case", EMU_CASES, ids=["nchw-ktail", "nhwc-vec", "nhwc-s2", "groups-dil", "k2-scalar"])
@pytest.mark.parametrize("block_n", [64, 32], ids=["bn64", "bn32"])
def test_cuda_kernel_emulated_on_cpu(emu, dtype, tf32, case, block_n):
    """The CUDA kernel's tiling, gathers, masks and epilogue, run on the CPU through a host emulation of
    the CUDA features it uses; output poisoned with NaN, empty filters and bias included."""
    n, c_in, h, w_, c_out, k, stride, padding, dilation, groups, channels_last = case
    g = torch.Generator().manual_seed(c_in * 31 + c_out)
    x = torch.randn(n, c_in, h, w_, generator=g).to(dtype)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype)
    if k == 3:
        m = PAPER6.masks[torch.randint(0, len(PAPER6), (c_out,), generator=g)]
    else:
        m = torch.rand(c_out, k, k, generator=g) > 0.5
    m[0] = False  # an empty filter: bias only
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = torch.full((n, c_out) + tuple(pattern_conv2d_ref(x[:, :, :1, :1].float().expand(n, c_in, h, w_),
                     w.float(), m, None, stride, padding, dilation, groups).shape[2:]), float("nan"), dtype=dtype)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    y = _emu_conv(emu, x, w, m, b, stride, padding, dilation, groups, tf32, out=out, block_n=block_n)
    ref = pattern_conv2d_ref(x.double(), w.double(), m, b.double(), stride, padding, dilation, groups)
    scale = ref.abs().max().item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * scale
    assert torch.isfinite(y).all(), "unwritten output elements"
    assert (y.double() - ref).abs().max().item() <= tol


def test_cuda_launcher_validates_arguments_emulated(emu):
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(3, 4, 3, 3)
    m = torch.ones(3, 3, 3, dtype=torch.bool)
    with pytest.raises(AssertionError, match="stride/dilation must be positive"):
        _emu_conv(emu, x, w, m, None, (1, 1), (1, 1), dilation=(0, 1))
    with pytest.raises(AssertionError, match="block_n must be 32 or 64"):
        _emu_conv(emu, x, w, m, None, (1, 1), (1, 1), block_n=16)


# ----------------------------------------------------------------- the GPU check script, on CPU


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_dry_run_writes_a_report(tmp_path, monkeypatch):
    """The whole benchmark logic on CPU: interpreted Triton vs dense on a tiny layer, report written."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gc = _gpu_check_module()
    assert gc.main([str(tmp_path), "--dry-run", "--batches", "1", "--max-shapes", "1"]) == 0
    md = (tmp_path / "gpu-cpu-dryrun.md").read_text()
    data = json.loads((tmp_path / "gpu-cpu-dryrun.json").read_text())
    assert "# Pattern conv on cpu-dryrun" in md and "## Summary" in md
    assert len(data["rows"]) == len(gc.MASK_MIXES) and data["skipped"] == 0
    for row in data["rows"]:
        assert row["wrong"] == [] and row["note"] == ""
        assert row["ms"]["triton"] > 0 and row["err"]["triton"] < 1e-5
        assert row["ideal"] == pytest.approx(1 / row["kept"])
        assert f"| {row['shape']} | 1 | fp32 | {row['mask']} |" in md


def test_gpu_check_flags_wrong_outputs(tmp_path, monkeypatch):
    """A provider returning wrong numbers is marked WRONG and kept out of the speedups."""
    gc = _gpu_check_module()
    from autosculpt.ops import conv as conv_ops

    def broken(x, weight, tap_mask, bias, *args):
        return pattern_conv2d_ref(x, weight, tap_mask, bias, *args[:4]) * 1.01

    monkeypatch.setitem(conv_ops.CONV_BACKENDS, "triton", broken)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gc.run(tmp_path, "cpu", True, 60.0, ["triton"], log=lambda *_: None, requested_batches=[1], max_shapes=1)
    data = json.loads((tmp_path / "gpu-cpu-dryrun.json").read_text())
    assert all(r["wrong"] == ["triton"] for r in data["rows"])
    assert all("WRONG: triton" in line for line in (tmp_path / "gpu-cpu-dryrun.md").read_text().splitlines()
               if line.startswith("| tiny"))


def test_gpu_check_summary():
    gc = _gpu_check_module()
    Row = gc.Row
    rows = [
        Row("a", 32, "fp16-cl", "50%", 0.5, 2.0, 1.0, ms={"cuda": 0.8, "triton": 0.6, "auto": 0.6}),
        Row("b", 128, "fp16-cl", "33%", 1 / 3, 3.0, 3.0, ms={"cuda": 1.0, "triton": 2.0, "auto": 1.0}),
        Row("c", 32, "bf16-cl", "11%", 1 / 9, 9.0, 9.0, ms={"cuda": 9.0, "triton": 1.0, "auto": 1.0},
            wrong=["triton"]),
        Row("d", 1, "fp16-cl", "50%", 0.5, 2.0, 1.0, ms={"cuda": 0.1, "triton": 0.1, "auto": 1.05}),  # batch 1
        Row("e", 32, "fp16-cl", "67%", 2 / 3, 1.5, 1.0, ms={"cuda": 0.1, "triton": 0.1, "auto": 1.0}),  # 67%
    ]
    s = gc.summarize(rows)
    # best ÷ ideal over rows a, b, c (batch >= 32, kept <= 50%): (1/0.6)/2, 3/3, (9/9)/9 (triton is wrong)
    assert s["median_ratio_best"] == pytest.approx(sorted([1 / 0.6 / 2, 1.0, 1 / 9])[1])
    assert s["n_triton"] == 2 and s["median_ratio_triton"] == pytest.approx((1 / 0.6 / 2 + 1.5 / 3) / 2)
    assert s["worst_auto_speedup"] == pytest.approx(1 / 1.05) and s["worst_auto_row"].startswith("d b1")
    assert s["wrong"] == ["c b32 bf16-cl 11%: triton"]
    assert gc.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_gpu_check_sh_fails_clearly_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "torch sees no CUDA device" in res.stdout + res.stderr
