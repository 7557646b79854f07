"""``block_sparse_attention``: scaled dot-product attention restricted to kept (query, key) blocks.

The public function validates its arguments (clear errors naming the argument), resolves the backend,
and calls the custom op ``torch.ops.autosculpt.block_sparse_attention`` (fake impl + autograd
registered, so ``torch.compile`` and ``torch.export`` see one op). Backends are plain functions in
``ATTENTION_BACKENDS``:

- ``"cpu"``: the C++ kernel (computes in fp32; fp16/bf16 inputs are converted): flash-style online
  softmax over only the kept key blocks.
- ``"triton"``: the Triton kernel (GPU fp16/bf16/fp32; CPU tensors under ``TRITON_INTERPRET=1``).
- ``"torch"``: the dense masked reference (any device and dtype).
- ``"cuda"``: no CUDA C++ attention kernel exists yet; asking for it raises a clear error.

The backward pass is the reference's gradient in closed form (``block_sparse_attention_backward``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import _ext
from ..reference import block_sparse_attention_ref, expand_block_mask
from .backends import check_backend

__all__ = ["block_sparse_attention", "block_sparse_attention_backward", "ATTENTION_BACKENDS", "num_blocks"]

# dtypes the C++ kernel takes (half types are computed in float32)
_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest block size accepted (any size >= the sequence length already means one block).
MAX_BLOCK_SIZE = 2**31 - 1
# Blocks above this many tokens are re-tiled into smaller ones before a kernel runs (same mask at a
# finer grain): kernel scratch grows with the block size squared.
RETILE_ABOVE = 128
# name -> fn(q, k, v, block_mask, block_size, scale) -> Tensor
ATTENTION_BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {}


def num_blocks(length: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` tokens covering ``length`` tokens (the last may be partial)."""
    return -(-int(length) // int(block_size))


def _validate(q, k, v, block_mask, block_size, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("block_mask", block_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name}: expected 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q: expected a floating-point tensor, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device} but q is on {q.device}")
    b, h, lq, d = q.shape
    if min(h, lq, d) < 1:
        raise ValueError(f"q: H, L and D must be >= 1 (B may be 0), got shape {tuple(q.shape)}")
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k: expected shape ({b}, {h}, Lk, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[2] < 1:
        raise ValueError(f"k: sequence length must be >= 1, got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size: must be a positive int, got {block_size}")
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size: must be <= {MAX_BLOCK_SIZE} (a block larger than the sequence is one "
                         f"block: any size >= the sequence length works), got {block_size}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask: expected a bool tensor, got {block_mask.dtype}")
    want = (h, num_blocks(lq, block_size), num_blocks(k.shape[2], block_size))
    if tuple(block_mask.shape) != want:
        raise ValueError(
            f"block_mask: expected shape (H, ceil(Lq/bs), ceil(Lk/bs)) = {want} for Lq={lq}, "
            f"Lk={k.shape[2]}, block_size={block_size}; got {tuple(block_mask.shape)}"
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask: on {block_mask.device} but q is on {q.device}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: must be finite, got {scale}")


def resolve_backend(backend: str, q: torch.Tensor, block_size: int) -> str:
    """The concrete backend for a call: checks explicit names; picks one for ``"auto"``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    backend = check_backend(backend, q.device, "block_sparse_attention")
    if backend == "cpu" and q.dtype not in _CPU_DTYPES:
        raise TypeError(f"q: backend 'cpu' takes float32, float16 or bfloat16 (computes in float32), got {q.dtype}")
    if backend == "cuda":
        raise ValueError(
            "backend: 'cuda' has no block_sparse_attention kernel in this build; use 'triton' on GPUs or 'torch'"
        )
    if backend == "triton":
        _check_triton_shape(q, block_size)
    if backend != "auto":
        return backend
    if q.device.type == "cpu":
        return "cpu" if q.dtype in _CPU_DTYPES and _ext.extension() is not None else "torch"
    if q.device.type == "cuda" and _triton_usable(q, block_size):
        return "triton"
    return "torch"


def _check_triton_shape(q: torch.Tensor, block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1) or block_size > 128:
        raise ValueError(f"block_size: backend 'triton' needs a power of two in [16, 128], got {block_size}")
    if q.shape[-1] > 256:
        raise ValueError(f"q: backend 'triton' supports head dims up to 256, got {q.shape[-1]}")
    if q.device.type == "cpu" and q.dtype != torch.float32:
        raise TypeError(f"q: the Triton interpreter (CPU tensors) runs float32 only, got {q.dtype}")


def _triton_usable(q: torch.Tensor, block_size: int) -> bool:
    try:
        check_backend("triton", q.device, "block_sparse_attention")
        _check_triton_shape(q, block_size)
    except (ValueError, TypeError):
        return False
    return True


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over kept blocks only: equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=M,
    scale=scale)`` where ``M`` is ``block_mask`` expanded to tokens; query rows whose mask keeps no key
    output zeros (a pruned head, or a query block with no kept key block).

    Args:
        q: (B, H, Lq, D). k, v: (B, H, Lk, D), same dtype and device. Unbatched (H, L, D) and single-head
            (L, D) inputs work too (the mask then (H, ., .) or (., .)).
        block_mask: bool (H, ceil(Lq/block_size), ceil(Lk/block_size)); True = the query block attends to
            the key block. The last block of each axis may be partial (masked tails).
        block_size: tokens per block, 1 .. 2**31-1 (the CPU kernel is vectorised for 16, 32, 64, 128;
            any size works: one >= the sequence length is one block; blocks above 128 tokens are
            re-tiled into smaller ones, the same mask, so kernel scratch stays small).

    NaN/Inf: a non-finite value in ``q``, or in ``k``/``v`` rows of a key block the query block keeps,
    propagates exactly as in SDPA over the kept keys; values in dropped key blocks are never read
    (they cannot reach the output).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: "auto", "cpu" (C++, computes in fp32), "triton", "torch" (reference); "cuda" is not built.
    """
    if all(isinstance(t, torch.Tensor) for t in (q, k, v)) and q.ndim == k.ndim == v.ndim and q.ndim in (2, 3):
        # unbatched (H, L, D), or a single head (L, D), as scaled_dot_product_attention accepts them
        if q.ndim == 2 and isinstance(block_mask, torch.Tensor) and block_mask.ndim == 2:
            block_mask = block_mask[None]
        lead = (None,) * (4 - q.ndim)
        out = block_sparse_attention(q[lead], k[lead], v[lead], block_mask, block_size, scale, backend)
        return out[(0,) * (4 - q.ndim)]
    _validate(q, k, v, block_mask, block_size, scale)
    block_mask, block_size = retile(block_mask, block_size, q.shape[-2], k.shape[-2])
    chosen = resolve_backend(backend, q, block_size)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.ops.autosculpt.block_sparse_attention(q, k, v, block_mask, block_size, scale, chosen)


def retile(block_mask: torch.Tensor, block_size: int, lq: int, lk: int) -> Tuple[torch.Tensor, int]:
    """The same token mask at a block size of at most :data:`RETILE_ABOVE` tokens: a block size that
    covers both sequences becomes one block of 64-token tiles; a larger one is cut into its largest
    divisor among 64, 128, 32, 16 (the sizes the fast kernels take), else its largest divisor <= 128."""
    if block_size <= RETILE_ABOVE:
        return block_mask, block_size
    if block_size >= max(lq, lk):  # one block per axis
        fine = 64
        return block_mask.expand(block_mask.shape[0], num_blocks(lq, fine), num_blocks(lk, fine)), fine
    fine = next((g for g in (64, 128, 32, 16) if block_size % g == 0), None)
    if fine is None:
        fine = next(g for g in range(RETILE_ABOVE, 0, -1) if block_size % g == 0)
    r = block_size // fine
    fine_mask = block_mask.repeat_interleave(r, 1)[:, :num_blocks(lq, fine)]
    return fine_mask.repeat_interleave(r, 2)[:, :, :num_blocks(lk, fine)], fine


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("autosculpt::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    fn = ATTENTION_BACKENDS.get(backend)
    if fn is None:
        _load_backend(backend)
        fn = ATTENTION_BACKENDS[backend]
    if q.shape[0] == 0:  # an empty batch, as scaled_dot_product_attention returns it
        return q.new_empty(q.shape)
    return fn(q, k, v, block_mask, block_size, scale)


@_block_sparse_attention_op.register_fake
def _(q, k, v, block_mask, block_size, scale, backend):
    return q.new_empty(q.shape)


def _expanded_mask(block_mask: torch.Tensor, block_size: int, lq: int, lk: int) -> torch.Tensor:
    return expand_block_mask(block_mask, block_size, lq, lk)


def block_sparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`block_sparse_attention` in closed form (dense, masked):
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q. Rows that keep
    no key have P = 0 and get zero gradient."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, go = q.to(compute), k.to(compute), v.to(compute), grad_out.to(compute)
    tok = _expanded_mask(block_mask, block_size, q.shape[-2], k.shape[-2])
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~tok, float("-inf"))
    empty = ~tok.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    dv = probs.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, block_mask, block_size, scale, _backend = inputs
    ctx.save_for_backward(q, k, v, block_mask)
    ctx.conf = (block_size, scale)


def _backward(ctx, grad):
    q, k, v, block_mask = ctx.saved_tensors
    block_size, scale = ctx.conf
    dq, dk, dv = block_sparse_attention_backward(grad, q, k, v, block_mask, block_size, scale)
    return dq, dk, dv, None, None, None, None


_block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- backends


def _torch_backend(q, k, v, block_mask, block_size, scale):
    return block_sparse_attention_ref(q, k, v, block_mask, block_size, scale)


def _cpu_backend(q, k, v, block_mask, block_size, scale, isa: int = 0):
    ext = _ext.require()
    if q.dtype not in _CPU_DTYPES:
        raise TypeError(f"q: backend 'cpu' takes float32, float16 or bfloat16, got {q.dtype}")
    # Half inputs are computed in float32, like the reference (which promotes them the same way).
    dtype = q.dtype
    q, k, v = (t.detach().to(torch.float32).contiguous() for t in (q, k, v))
    mask = block_mask.detach().contiguous().view(torch.uint8)
    b, h, lq, d = q.shape
    out = torch.empty_like(q)
    ext.block_sparse_attention_fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
        b, h, lq, k.shape[2], d, block_size, scale, torch.get_num_threads(), isa,
    )
    return out if dtype == torch.float32 else out.to(dtype)


ATTENTION_BACKENDS["torch"] = _torch_backend
ATTENTION_BACKENDS["cpu"] = _cpu_backend


def _triton_module():
    """The Triton kernel module, imported on first use only (``import autosculpt`` never imports triton)."""
    from .._triton import kernels

    return kernels("block_attention")


def _triton_backend(q, k, v, block_mask, block_size, scale):
    return _triton_module().block_sparse_attention_triton(q, k, v, block_mask, block_size, scale)


ATTENTION_BACKENDS["triton"] = _triton_backend


def _load_backend(name: str) -> None:
    if name == "cuda":
        raise ValueError("backend: 'cuda' has no block_sparse_attention kernel in this build; use 'triton' or 'torch'")
    raise ValueError(f"backend: unknown backend {name!r}")
