"""Block-sparse attention in Triton (GPU fp16/bf16/fp32; CPU fp32 under ``TRITON_INTERPRET=1``).

One program handles ``BLOCK_M`` query rows of one (batch, head) and loops over only the kept key blocks
of its query block, read from a CSR list (``offsets``, ``indices``) built from the block mask. The
softmax is the flash-style online softmax in the exp2 domain (the scale is folded with log2(e)).
Rows whose query block keeps no key block output zeros. This module imports triton: load it lazily.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _block_sparse_attention_fwd(
    Q, K, V, O, offsets, indices,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, LQ, LK, D, NQB,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qb = (tile * BLOCK_M) // BLOCK_SIZE

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    d_ok = cols_d < D
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + cols_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    start = tl.load(offsets + h * NQB + qb)
    end = tl.load(offsets + h * NQB + qb + 1)
    offs_n = tl.arange(0, BLOCK_SIZE)
    for i in range(start, end):
        kb = tl.load(indices + i)
        cols = kb * BLOCK_SIZE + offs_n
        col_ok = cols < LK
        k_ptrs = K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + cols_d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + cols_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While every score so far is -inf (masked tails, or -inf data), subtract 0 instead: -inf - -inf
        # would be NaN; this way p = alpha = 0. A NaN score still gives NaN, as in SDPA.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # No kept block: acc = 0 and the rows output zeros. Kept blocks whose scores are all -inf: 0 / 0 =
    # NaN, as SDPA gives.
    denom = tl.where(end > start, l_i, 1.0)
    out = acc / denom[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + cols_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def kept_block_lists(block_mask: torch.Tensor):
    """CSR of kept key blocks per (head, query block): ``offsets`` (H*nqb + 1,) and ``indices``, int32,
    on the mask's device, key blocks ascending within each row."""
    h, nqb, nkb = block_mask.shape
    flat = block_mask.reshape(h * nqb, nkb)
    counts = flat.sum(1, dtype=torch.int32)
    offsets = torch.zeros(h * nqb + 1, dtype=torch.int32, device=block_mask.device)
    offsets[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    indices = flat.nonzero()[:, 1].to(torch.int32)  # row-major order: grouped by row, ascending
    if indices.numel() == 0:
        indices = torch.zeros(1, dtype=torch.int32, device=block_mask.device)
    return offsets, indices


_LISTS_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_LISTS_CACHE_SIZE = 64


def cached_block_lists(block_mask: torch.Tensor):
    """``kept_block_lists`` memoised per mask tensor (identity + version), so repeated calls with the same
    mask (a layer's cached mask, a benchmark loop) skip the ``nonzero`` launch and its device sync. The
    cache holds a reference to the mask, so its memory cannot be reused by another tensor meanwhile;
    in-place edits bump the version (shared by views), which misses the cache."""
    key = (block_mask.data_ptr(), block_mask._version, tuple(block_mask.shape), tuple(block_mask.stride()),
           str(block_mask.device))
    hit = _LISTS_CACHE.get(key)
    if hit is not None:
        _LISTS_CACHE.move_to_end(key)
        return hit[1]
    lists = kept_block_lists(block_mask)
    _LISTS_CACHE[key] = (block_mask, lists)
    if len(_LISTS_CACHE) > _LISTS_CACHE_SIZE:
        _LISTS_CACHE.popitem(last=False)
    return lists


def block_sparse_attention_triton(q, k, v, block_mask, block_size: int, scale: float, block_lists=None):
    """Forward of block-sparse attention with the Triton kernel; see ``autosculpt.ops.block_sparse_attention``.

    ``block_lists``: optional precomputed ``kept_block_lists(block_mask)`` (saves a small launch per call).
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    offsets, indices = block_lists if block_lists is not None else cached_block_lists(block_mask)
    block_m = min(block_size, 64)
    block_d = max(16, triton.next_power_of_2(d))
    nqb = block_mask.shape[1]
    grid = (triton.cdiv(lq, block_m), b * h)
    num_warps = 4 if block_size * block_d <= 64 * 64 else 8
    _block_sparse_attention_fwd[grid](
        q, k, v, out, offsets, indices,
        float(scale) * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, lq, lk, d, nqb,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_D=block_d,
        # fp32 keeps full fp32 products (no TF32) so results match the fp32 reference; fp16/bf16 use the
        # tensor cores at their native precision.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out
