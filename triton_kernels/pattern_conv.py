"""Pattern-sparse 2-D convolution in Triton: an implicit GEMM over the kept taps of each pattern group.

One program computes a ``BLOCK_M`` (output pixels) x ``BLOCK_N`` (filters of one pattern group) tile.
Its K loop runs over (kept tap, input-channel block): for each kept tap the input pixels it reads are
gathered straight from ``x`` (any strides: NCHW or channels_last), so only kept taps cost loads and
MACs. Accumulation is fp32; inputs fp16/bf16/fp32. Tile metadata (which filters, which taps) comes from
small int32 tables built on the host once per mask (``autosculpt.ops._pattern_groups``).

The same Python body is compiled by ``triton.jit`` for CUDA tensors and run by Triton's interpreter
for CPU tensors, whatever ``TRITON_INTERPRET`` was when this module was imported, so CPU tests and GPU
runs can share one process. The interpreter has no bf16 arithmetic: CPU inputs must be fp32.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["pattern_conv2d_triton", "GPU_CONFIGS", "INTERPRETER_CONFIG"]

TILE_FIELDS = 8  # must match autosculpt.ops._pattern_groups.TILE_FIELDS


def _pattern_conv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, perm_ptr, tiles_ptr, taps_ptr,
    P, P_BUCKET, C_in_pg, H, W, OH, OW, KW,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    tile_row16, tile_row32, tile_row64, tile_row128,
    n_ftiles16, n_ftiles32, n_ftiles64, n_ftiles128,
    has_bias, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The tile table has one section per BLOCK_N so autotuned configs can use different N tiles.
    if BLOCK_N == 16:
        tile_row0 = tile_row16
        n_ftiles = n_ftiles16
    elif BLOCK_N == 32:
        tile_row0 = tile_row32
        n_ftiles = n_ftiles32
    elif BLOCK_N == 64:
        tile_row0 = tile_row64
        n_ftiles = n_ftiles64
    else:
        tile_row0 = tile_row128
        n_ftiles = n_ftiles128
    pid = tl.program_id(0)
    # Filter tiles vary fastest: the programs in flight together read the same input pixels (L2 hits).
    pid_n = pid % n_ftiles
    pid_m = pid // n_ftiles

    tile = tiles_ptr + (tile_row0 + pid_n) * 8
    row0 = tl.load(tile + 0)
    ncols = tl.load(tile + 1)
    # Offsets are stored / 16: multiplying back tells the compiler they are 16-aligned (vector loads).
    wbase = tl.load(tile + 2) * 16
    ldw = tl.load(tile + 3) * 16
    tap0 = tl.load(tile + 4)
    ntaps = tl.load(tile + 5)
    cin_base = tl.load(tile + 6) * C_in_pg
    ncols_padded = tl.load(tile + 7) * 16  # weight columns past ncols are zero padding: safe to load

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    nb = t // OH
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < ncols
    n_load_ok = offs_n < ncols_padded  # a mask constant over 16 columns keeps weight loads vectorized
    offs_k = tl.arange(0, BLOCK_K)

    x_row = nb.to(tl.int64) * sxn + cin_base.to(tl.int64) * sxc
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # tl.full, not tl.zeros: builtins work both compiled and interpreted whatever TRITON_INTERPRET was
    # when triton was imported (tl.zeros is a @triton.jit helper fixed to one mode at import).
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for ti in range(0, ntaps):
        tap = tl.load(taps_ptr + tap0 + ti)
        ih = ih0 + (tap // KW) * dil_h
        iw = iw0 + (tap % KW) * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_row = x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        w_tap = w_ptr + wbase + ti * C_in_pg * ldw  # packed size < 2**31 (checked on the host)
        for c0 in range(0, C_in_pg, BLOCK_K):
            cc = c0 + offs_k
            c_ok = cc < C_in_pg
            a = tl.load(x_ptr + a_row[:, None] + cc[None, :].to(tl.int64) * sxc,
                        mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_tap + cc[:, None].to(tl.int64) * ldw + offs_n[None, :],
                        mask=c_ok[:, None] & n_load_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    co = tl.load(perm_ptr + row0 + offs_n, mask=n_ok, other=0)
    if has_bias != 0:  # a run-time flag: one compiled kernel serves layers with and without bias
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptr = (out_ptr + nb.to(tl.int64)[:, None] * son + co.to(tl.int64)[None, :] * soc
             + oh.to(tl.int64)[:, None] * soh + ow.to(tl.int64)[:, None] * sow)
    tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Block shapes tried by the autotuner on a GPU (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Kept small:
# every config is one compilation per dtype, and every new key is timed with every config.
# BLOCK_N spans 32..128 because pattern groups are often small (a PAPER6 mix splits C_out in six).
GPU_CONFIGS = [
    (128, 64, 32, 4, 4),
    (128, 128, 32, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 32, 64, 4, 3),
]
# Under the interpreter every config would run: one small fixed config keeps CPU tests fast.
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)

# Keyed on channels and the pixel count rounded up to a power of two (plus the dtypes, which Triton
# adds itself), not on the mask: masks of one layer shape share a config, so a sweep over masks and
# layers does not re-tune every call.
_AUTOTUNE_KEY = ["C_in_pg", "P_BUCKET", "stride_h"]


def _quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _autotune(**kwargs):
    """``triton.autotune`` with short timing runs where this Triton version lets us say so."""
    for extra in ({"do_bench": _quick_bench}, {"warmup": 5, "rep": 25}, {}):
        try:
            return triton.autotune(**kwargs, **extra)
        except TypeError:
            continue
    raise RuntimeError("unreachable")


# Integer arguments are specialised by Triton (== 1, divisible by 16), one compilation per variant. Only
# the strides and channel count gain from it (vector loads); sizes, conv parameters and table offsets
# would multiply compilations for nothing, so they are not specialised.
_NOT_SPECIALISED = [
    "P", "P_BUCKET", "H", "W", "OH", "OW", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
    "tile_row16", "tile_row32", "tile_row64", "tile_row128", "n_ftiles16", "n_ftiles32", "n_ftiles64",
    "n_ftiles128", "has_bias",
]


def _jit(fn, **kwargs):
    # The compiled (GPU) kernel, even when TRITON_INTERPRET=1 is set at import — triton.jit would then
    # return an interpreted function; CPU tensors get the interpreter through _interpreter_kernel().
    try:
        from triton.runtime.jit import JITFunction

        return JITFunction(fn, **kwargs)
    except (ImportError, TypeError):
        return triton.jit(fn, **kwargs)


_compiled = _jit(_pattern_conv_kernel, do_not_specialize=_NOT_SPECIALISED)
_tuned = _autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in GPU_CONFIGS
    ],
    key=_AUTOTUNE_KEY,
)(_compiled)
_interpreted = None


def _interpreter_kernel():
    global _interpreted
    if _interpreted is None:
        from triton.runtime.interpreter import InterpretedFunction

        _interpreted = InterpretedFunction(_pattern_conv_kernel)
    return _interpreted


def _out_size(h, k, s, p, d):
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def pattern_conv2d_triton(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    bias,
    perm: torch.Tensor,
    tiles: torch.Tensor,
    taps: torch.Tensor,
    tile_offsets: Dict[int, Tuple[int, int]],
    kernel_size: Tuple[int, int],
    c_out: int,
    c_in_pg: int,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    input_precision: str = "ieee",
    config: Dict[str, int] = None,
    out: torch.Tensor = None,
) -> torch.Tensor:
    """Launches the kernel and returns the output (N, C_out, OH, OW) in x's dtype and memory format.

    ``packed_weight``/``perm``/``tiles``/``taps``/``tile_offsets`` come from
    ``autosculpt.ops._pattern_groups``. ``input_precision`` ("ieee" or "tf32") only matters for fp32
    on a GPU. ``config`` pins block sizes (BLOCK_M/N/K, optional num_warps/num_stages) instead of
    autotuning (so does ``AUTOSCULPT_TRITON_AUTOTUNE=0``: the first of :data:`GPU_CONFIGS`); CPU
    tensors always use the interpreter and :data:`INTERPRETER_CONFIG` by default.
    ``out`` (optional) is written in place, every element of it (any strides).
    """
    n, _, h, w = x.shape
    kh, kw = kernel_size
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    if out is None:
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    elif tuple(out.shape) != (n, c_out, oh, ow) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out: expected {(n, c_out, oh, ow)} {x.dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    p = n * oh * ow
    if p == 0 or c_out == 0:
        return out
    rows = {bn: tile_offsets[bn] for bn in (16, 32, 64, 128)}
    args = (
        x, packed_weight, bias if bias is not None else out, out, perm, tiles, taps,
        p, triton.next_power_of_2(p), c_in_pg, h, w, oh, ow, kw,
        *x.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        rows[16][0], rows[32][0], rows[64][0], rows[128][0],
        rows[16][1], rows[32][1], rows[64][1], rows[128][1],
    )
    args = args + (int(bias is not None),)
    flags = dict(INPUT_PRECISION=input_precision)

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_M"]) * rows[meta["BLOCK_N"]][1],)

    if x.device.type == "cpu":
        if x.dtype != torch.float32:
            raise TypeError(f"x: the Triton interpreter (CPU tensors) supports float32 only, got {x.dtype}")
        cfg = dict(INTERPRETER_CONFIG if config is None else config)
        cfg.pop("num_warps", None)
        cfg.pop("num_stages", None)
        _interpreter_kernel()[grid(cfg)](*args, **flags, **cfg)
    elif config is not None or os.environ.get("AUTOSCULPT_TRITON_AUTOTUNE", "1") == "0":
        # A pinned config: one compilation per dtype/layout instead of one per autotune candidate
        # (tests set AUTOSCULPT_TRITON_AUTOTUNE=0 to keep their compile time small).
        if config is None:
            m, n, k, w, st = GPU_CONFIGS[0]
            config = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
        _compiled[grid(config)](*args, **flags, **config)
    else:
        _tuned[grid](*args, **flags)
    return out


def compile_ahead(dtype: str = "fp16", channels_last: bool = True, arch: int = 90,
                  config=(128, 64, 32, 4, 4), input_precision: str = "ieee"):
    """Compiles the kernel for a CUDA architecture without a GPU (ptxas ships with Triton).

    Returns the compiled kernel (``.asm["ptx"]``, ``.metadata.shared``) so CI can check that the GPU
    path compiles and uses tensor cores. Integer arguments get the specialisations a real launch gives
    16-aligned tensors: unit channel (channels_last) or width (NCHW) stride, other strides, channel
    count and pointers divisible by 16.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n, block_k, warps, stages = config
    names = _compiled.arg_names
    consts = {"INPUT_PRECISION": input_precision, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    unit = ("sxc", "soc") if channels_last else ("sxw", "sow")
    consts.update({name: 1 for name in unit})
    aligned = {"x_ptr", "w_ptr", "bias_ptr", "out_ptr", "perm_ptr", "tiles_ptr", "taps_ptr", "C_in_pg",
               "sxn", "son", "sxc", "soc", "sxh", "soh", "sxw", "sow"} - set(unit)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name in ("x_ptr", "w_ptr", "bias_ptr", "out_ptr"):
            signature[name] = "*" + dtype
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "i32"
        if name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=_compiled, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
