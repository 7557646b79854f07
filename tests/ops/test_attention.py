"""block_sparse_attention: C++ CPU kernel and torch backend vs the dense masked reference."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from autosculpt import _ext
from autosculpt.ops import attention as attn_ops
from autosculpt.ops import block_sparse_attention
from autosculpt.reference import block_sparse_attention_ref

needs_ext = pytest.mark.skipif(_ext.extension() is None, reason="compiled extension not built")

# (B, H, Lq, Lk, D, block_size): the lengths (65, 97, 197, 1025), odd tails, Lq != Lk.
SHAPES = [
    (2, 3, 65, 65, 32, 16),
    (1, 2, 97, 97, 64, 32),
    (1, 3, 197, 197, 64, 64),
    (2, 2, 97, 65, 32, 16),
    (1, 2, 65, 197, 64, 32),
    (1, 2, 1025, 1025, 64, 64),
    (1, 1, 1025, 1025, 32, 32),
    (1, 2, 100, 100, 40, 16),  # head dim not a multiple of 16
    (1, 1, 300, 300, 128, 128),
]


def _inputs(shape, seed, dtype=torch.float32):
    b, h, lq, lk, d, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, lk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, lk, d, generator=g, dtype=dtype)
    return q, k, v


def _mask(shape, kind, seed):
    _, h, lq, lk, _, bs = shape
    nq, nk = math.ceil(lq / bs), math.ceil(lk / bs)
    if kind == "dense":
        return torch.ones(h, nq, nk, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(h, nq, nk, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(h, nq, nk, generator=g) < 0.4
    m[0] = False  # a pruned head
    if h > 1:
        m[-1, nq // 2] = False  # one query block with no kept key block
        m[-1, 0, -1] = True  # the partial tail key block kept
    return m


def _run_kernel(q, k, v, mask, bs, scale, isa):
    """Calls the compiled kernel directly on a NaN-poisoned output, so unwritten elements fail."""
    out = torch.full_like(q, float("nan"))
    m = mask.contiguous().view(torch.uint8)
    b, h, lq, d = q.shape
    _ext.require().block_sparse_attention_fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), m.data_ptr(), out.data_ptr(), b, h, lq, k.shape[2], d, bs,
        scale, 2, isa,
    )
    return out


def _isas():
    # 1: portable kernels (AVX2 build where the CPU has it), 3: portable baseline build, 2: AVX-512
    isas = [1, 3]
    if _ext.extension() is not None and _ext.extension().block_attention_avx512():
        isas.append(2)
    return isas


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["random", "dense", "empty"])
def test_cpu_kernel_matches_reference(shape, kind):
    seed = zlib.crc32(repr((shape, kind)).encode()) % 10_000
    q, k, v = _inputs(shape, seed)
    mask = _mask(shape, kind, seed)
    bs = shape[-1]
    ref = block_sparse_attention_ref(q, k, v, mask, bs)
    for isa in _isas():
        if isa == 2 and bs not in (16, 32, 64, 128):
            continue
        out = _run_kernel(q, k, v, mask, bs, q.shape[-1] ** -0.5, isa)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"isa={isa}: {m}")
    if kind == "empty":
        assert torch.equal(out, torch.zeros_like(out))


@needs_ext
def test_cpu_kernel_block_size_not_multiple_of_16_and_scale():
    shape = (1, 2, 50, 37, 20, 7)
    q, k, v = _inputs(shape, 3)
    mask = _mask(shape, "random", 3)
    ref = block_sparse_attention_ref(q, k, v, mask, 7, scale=0.3)
    torch.testing.assert_close(_run_kernel(q, k, v, mask, 7, 0.3, 0), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(block_sparse_attention(q, k, v, mask, 7, scale=0.3, backend="cpu"), ref,
                               atol=2e-5, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "torch", "auto"])
def test_public_op_matches_reference(backend):
    shape = (2, 3, 97, 97, 32, 32)
    q, k, v = _inputs(shape, 11)
    mask = _mask(shape, "random", 11)
    out = block_sparse_attention(q, k, v, mask, 32, backend=backend)
    torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, mask, 32), atol=2e-5, rtol=1e-4)


@needs_ext
def test_noncontiguous_inputs():
    shape = (1, 2, 65, 65, 32, 16)
    q, k, v = _inputs(shape, 5)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # (B, L, H, D) storage
    assert not qt.is_contiguous()
    mask = _mask(shape, "random", 5)
    out = block_sparse_attention(qt, kt, vt, mask, 16, backend="cpu")
    torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, mask, 16), atol=2e-5, rtol=1e-4)


def test_reference_equals_sdpa_with_expanded_mask():
    # The reference itself: SDPA with the block mask expanded to tokens (no empty rows here).
    shape = (2, 2, 97, 70, 32, 16)
    q, k, v = _inputs(shape, 9)
    mask = torch.rand(2, 7, 5) < 0.5
    mask[:, :, 0] = True
    tok = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :97, :70]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=tok)
    torch.testing.assert_close(block_sparse_attention_ref(q, k, v, mask, 16), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_gradients_match_autograd_through_reference(backend):
    shape = (1, 2, 40, 33, 16, 16)
    q, k, v = _inputs(shape, 21)
    mask = _mask(shape, "random", 21)
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    block_sparse_attention(*leaves, mask, 16, scale=0.7, backend=backend).backward(grad)
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    block_sparse_attention_ref(*refs, mask, 16, scale=0.7).backward(grad)
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4)
    # A pruned head receives exactly zero gradient.
    assert torch.equal(leaves[0].grad[:, 0], torch.zeros_like(leaves[0].grad[:, 0]))


def test_gradcheck_float64_torch_backend():
    shape = (1, 2, 9, 11, 4, 4)
    q, k, v = (t.requires_grad_() for t in _inputs(shape, 4, torch.float64))
    mask = _mask(shape, "random", 4)
    mask[1, 0, 0] = True
    assert torch.autograd.gradcheck(lambda a, b, c: block_sparse_attention(a, b, c, mask, 4, backend="torch"), (q, k, v))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_opcheck(backend):
    shape = (1, 2, 33, 33, 16, 16)
    q, k, v = (t.requires_grad_() for t in _inputs(shape, 8))
    mask = _mask(shape, "random", 8)
    torch.library.opcheck(torch.ops.autosculpt.block_sparse_attention.default, (q, k, v, mask, 16, 0.25, backend))


@needs_ext
def test_torch_compile_sees_one_op():
    shape = (1, 2, 33, 33, 16, 16)
    q, k, v = _inputs(shape, 2)
    mask = _mask(shape, "random", 2)
    fn = torch.compile(lambda a, b, c: block_sparse_attention(a, b, c, mask, 16, backend="cpu") * 2, backend="eager",
                       fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), 2 * block_sparse_attention_ref(q, k, v, mask, 16), atol=4e-5, rtol=1e-4)


def _bad_call(**over):
    q, k, v = _inputs((1, 2, 20, 20, 8, 8), 0)
    args = dict(q=q, k=k, v=v, block_mask=torch.ones(2, 3, 3, dtype=torch.bool), block_size=8, scale=None,
                backend="torch")
    args.update(over)
    return block_sparse_attention(**args)


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(q=torch.randn(2, 20, 8)), ValueError, "q: expected 4-D"),
        (dict(k=torch.randn(1, 2, 20, 4)), ValueError, "k: expected shape"),
        (dict(k=torch.randn(1, 3, 20, 8)), ValueError, "k: expected shape"),
        (dict(v=torch.randn(1, 2, 19, 8)), ValueError, "v: expected the same shape"),
        (dict(q=torch.randint(0, 3, (1, 2, 20, 8))), TypeError, "q: expected a floating-point"),
        (dict(k=torch.randn(1, 2, 20, 8, dtype=torch.float64)), TypeError, "k: dtype"),
        (dict(block_mask=torch.ones(2, 3, 3, dtype=torch.uint8)), TypeError, "block_mask: expected a bool"),
        (dict(block_mask=torch.ones(2, 2, 3, dtype=torch.bool)), ValueError, "block_mask: expected shape"),
        (dict(block_mask=torch.ones(2, 4, 3, dtype=torch.bool)), ValueError, "block_mask: expected shape"),
        (dict(block_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "block_mask: expected shape"),
        (dict(block_size=0), ValueError, "block_size: must be a positive"),
        (dict(block_size=-4), ValueError, "block_size: must be a positive"),
        (dict(block_size=8.0), TypeError, "block_size: expected an int"),
        (dict(scale=float("nan")), ValueError, "scale: must be finite"),
        (dict(scale="x"), TypeError, "scale: expected a float"),
        (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
        (dict(backend="fast"), ValueError, "backend: expected one of"),
        (dict(backend="cuda"), ValueError, "backend: 'cuda'"),
        (dict(backend="triton"), ValueError, "backend: 'triton'"),  # CPU tensors without TRITON_INTERPRET
    ],
)
def test_bad_inputs(over, exc, words, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(exc, match=words):
        _bad_call(**over)


@needs_ext
def test_cpu_backend_rejects_float64():
    with pytest.raises(TypeError, match="float32"):
        _bad_call(q=torch.randn(1, 2, 20, 8, dtype=torch.float64), k=torch.randn(1, 2, 20, 8, dtype=torch.float64),
                  v=torch.randn(1, 2, 20, 8, dtype=torch.float64), backend="cpu")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_backend_half_inputs_match_reference(dtype):
    shape = (1, 2, 65, 65, 32, 16)
    q, k, v = (t.to(dtype) for t in _inputs(shape, 31))
    mask = _mask(shape, "random", 31)
    out = block_sparse_attention(q, k, v, mask, 16, backend="auto")
    assert out.dtype == dtype and attn_ops.resolve_backend("auto", q, 16) == "cpu"
    torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, mask, 16))


def test_auto_backend_choice():
    q = torch.randn(1, 1, 8, 8)
    want = "cpu" if _ext.extension() is not None else "torch"
    assert attn_ops.resolve_backend("auto", q, 8) == want
    assert attn_ops.resolve_backend("auto", q.double(), 8) == "torch"
    assert attn_ops.resolve_backend("auto", q.bfloat16(), 8) == want


@needs_ext
def test_cpu_kernel_random_shapes():
    # Random batch/heads/lengths/head dims (1 .. 300, past the AVX-512 path's 256) and block sizes,
    # every kernel variant, mask density drawn per case.
    import random

    rng = random.Random(1234)
    for case in range(16):
        b, h = rng.randint(1, 2), rng.randint(1, 3)
        lq, lk = rng.randint(1, 200), rng.randint(1, 200)
        d = rng.choice([1, 7, 33, 64, 100, 257, 300])
        bs = rng.choice([16, 32, 64, 128, 5, 24])
        shape = (b, h, lq, lk, d, bs)
        q, k, v = _inputs(shape, case)
        g = torch.Generator().manual_seed(case)
        mask = torch.rand(h, math.ceil(lq / bs), math.ceil(lk / bs), generator=g) < rng.random()
        ref = block_sparse_attention_ref(q, k, v, mask, bs, scale=0.3)
        for isa in [0] + _isas():
            if isa == 2 and (bs not in (16, 32, 64, 128) or d > 256):
                continue
            out = _run_kernel(q, k, v, mask, bs, 0.3, isa)
            torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-4, msg=lambda m: f"{shape} isa={isa}: {m}")
