"""``pattern_conv2d``: convolution where each output filter keeps only some kernel taps.

The public function validates its arguments (clear errors naming the argument), resolves the backend,
and calls the custom op ``torch.ops.autosculpt.pattern_conv2d`` (fake impl + autograd registered,
so ``torch.compile`` and ``torch.export`` see one op). Backends are plain functions in
``CONV_BACKENDS``; GPU backends register themselves there from their own modules.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import _ext
from ..reference import pattern_conv2d_ref, torch_conv_input
from . import weight_cache
from ._pattern_groups import masked_weight  # noqa: F401  (public here: PatternConv2d's dense path)
from .backends import check_backend
from .weight_cache import WeightCache

IntPair = Union[int, Sequence[int]]

# name -> fn(x, weight, tap_mask, bias, stride, padding, dilation, groups, cache_key) -> Tensor
CONV_BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {}
# device type -> callable choosing a backend for "auto": fn(x, weight, tap_mask, stride, padding, dilation, groups)
AUTO_CHOOSERS: Dict[str, Callable[..., str]] = {}

_cache_keys = itertools.count(1)


def new_cache_key() -> int:
    """A fresh key under which the CPU backend caches one layer's packed weights."""
    return next(_cache_keys)


def as_pair(value: IntPair, name: str) -> Tuple[int, int]:
    """``value`` (an int or a pair of ints) as a pair; a clear error naming ``name`` otherwise."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return (value, value)
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}") from None
    if len(out) != 2 or not all(is_int(v) for v in out):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return out  # type: ignore[return-value]


def conv_output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> Tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def validate_conv_args(x, weight, tap_mask, bias, stride, padding, dilation, groups) -> None:
    """Raises a clear ``TypeError``/``ValueError`` naming the bad argument of a ``pattern_conv2d`` call
    (``stride``, ``padding``, ``dilation`` as pairs; ``x`` 4-D). Every path of ``PatternConv2d`` (sparse
    kernel and dense fallback) checks its input with this, so both raise the same errors."""
    for name, t in (("x", x), ("weight", weight), ("tap_mask", tap_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x: expected 4-D (N, C_in, H, W) or unbatched 3-D (C_in, H, W) input, got shape {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"weight: expected 4-D (C_out, C_in/groups, kh, kw), got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} does not match x's {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: on {weight.device} but x is on {x.device}")
    c_out, c_in_pg, kh, kw = weight.shape
    if tap_mask.dtype != torch.bool:
        raise TypeError(f"tap_mask: expected a bool tensor, got {tap_mask.dtype}")
    if tuple(tap_mask.shape) != (c_out, kh, kw):
        raise ValueError(f"tap_mask: expected shape (C_out, kh, kw) = {(c_out, kh, kw)}, got {tuple(tap_mask.shape)}")
    if tap_mask.device != x.device:
        raise ValueError(f"tap_mask: on {tap_mask.device} but x is on {x.device}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    if x.shape[1] % groups or c_out % groups:
        raise ValueError(f"groups: {groups} must divide C_in={x.shape[1]} and C_out={c_out}")
    if x.shape[1] // groups != c_in_pg:
        raise ValueError(
            f"weight: expects C_in/groups = {c_in_pg}, but x has {x.shape[1]} channels and groups={groups}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias: expected {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
    if min(stride) < 1:
        raise ValueError(f"stride: must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding: must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation: must be >= 1, got {dilation}")
    oh, ow = conv_output_size(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"x: spatial size {tuple(x.shape[2:])} is too small for kernel {(kh, kw)} with padding {padding}, dilation {dilation}"
        )


def resolve_backend(backend: str, x: torch.Tensor, weight, tap_mask, stride, padding, dilation, groups) -> str:
    """The concrete backend for a call: checks explicit names; picks one for ``"auto"``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    backend = check_backend(backend, x.device, "pattern_conv2d")
    if backend == "cpu" and x.dtype != torch.float32:
        raise TypeError(f"x: backend 'cpu' computes float32 only, got {x.dtype}")
    if backend != "auto":
        return backend
    if x.device.type == "cuda" and "cuda" not in AUTO_CHOOSERS:
        from . import gpu_choice  # noqa: F401  (registers AUTO_CHOOSERS["cuda"])
    chooser = AUTO_CHOOSERS.get(x.device.type)
    if chooser is not None:
        return chooser(x, weight, tap_mask, stride, padding, dilation, groups)
    if x.device.type == "cpu" and x.dtype == torch.float32 and _ext.extension() is not None:
        return "cpu"
    return "torch"


def pattern_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    tap_mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    backend: str = "auto",
    *,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    _cache_key: int = 0,
) -> torch.Tensor:
    """Pattern-sparse conv2d: equals ``F.conv2d(x, weight * tap_mask[:, None], bias, stride, padding,
    dilation, groups)``, computing only the kept taps.

    Args:
        x: input (N, C_in, H, W).
        weight: (C_out, C_in/groups, kh, kw); entries at dropped taps are ignored.
        tap_mask: bool (C_out, kh, kw), the taps each output filter keeps.
        bias: optional (C_out,).
        stride, padding, dilation: int or pair.
        groups: as in ``F.conv2d``.
        backend: "auto", "cpu" (C++ kernel, fp32), "cuda", "triton" or "torch" (reference).
        residual: optional tensor of the output's shape added after the bias (a ResNet shortcut).
        activation: None or "relu", applied last.

    The C++ CPU kernel applies ``residual`` and ``activation`` while each output tile is still in
    cache (one pass over memory instead of three); other backends, and calls that autograd or a
    compiler must see, apply them with ordinary torch ops (same result).
    """
    if isinstance(x, torch.Tensor) and x.ndim == 3:  # unbatched (C_in, H, W), as F.conv2d accepts
        if residual is not None and isinstance(residual, torch.Tensor) and residual.ndim != 3:
            raise ValueError(f"residual: expected 3-D (C_out, H_out, W_out) for an unbatched x, got shape {tuple(residual.shape)}")
        return pattern_conv2d(x[None], weight, tap_mask, bias, stride, padding, dilation, groups, backend,
                              residual=None if residual is None else residual[None], activation=activation,
                              _cache_key=_cache_key)[0]
    stride, padding, dilation = as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation")
    validate_conv_args(x, weight, tap_mask, bias, stride, padding, dilation, groups)
    validate_epilogue(x, weight, residual, activation, stride, padding, dilation)
    chosen = resolve_backend(backend, x, weight, tap_mask, stride, padding, dilation, groups)
    eager = _eager_inference(x, weight, bias) and (residual is None or _eager_inference(residual, weight, None))
    if eager:
        # Same backend function the custom op runs, minus ~20 us of dispatcher overhead per call
        # (as much as a whole small CIFAR layer takes).
        fn = CONV_BACKENDS.get(chosen)
        if fn is None:
            load_backend(chosen)
            fn = CONV_BACKENDS[chosen]
        args = (x, weight, tap_mask, bias, list(stride), list(padding), list(dilation), groups, int(_cache_key))
        if chosen == "cpu":
            return fn(*args, residual=residual, relu=activation == "relu")
        out = fn(*args)
        if chosen in ("cuda", "triton"):
            out = _gpu_nonfinite_taps(out, x, tap_mask, stride, padding, dilation, groups)
        return apply_epilogue(out, residual, activation, inplace=True)
    out = torch.ops.autosculpt.pattern_conv2d(
        x, weight, tap_mask, bias, list(stride), list(padding), list(dilation), groups, chosen, int(_cache_key)
    )
    return apply_epilogue(out, residual, activation, inplace=False)


ACTIVATIONS = (None, "relu")


def apply_epilogue(out: torch.Tensor, residual: Optional[torch.Tensor], activation: Optional[str],
                   inplace: bool) -> torch.Tensor:
    """``activation(out + residual)`` with torch ops (in place on ``out`` when ``inplace``)."""
    if residual is not None:
        out = out.add_(residual) if inplace else out + residual
    if activation == "relu":
        out = out.relu_() if inplace else torch.relu(out)
    return out


def validate_epilogue(x, weight, residual, activation, stride, padding, dilation) -> None:
    """Checks ``activation`` and that ``residual`` (optional) has the conv output's shape, dtype, device."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
    oh, ow = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    want = (x.shape[0], weight.shape[0], oh, ow)
    if tuple(residual.shape) != want:
        raise ValueError(f"residual: expected the output's shape {want}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise TypeError(f"residual: expected {x.dtype} on {x.device}, got {residual.dtype} on {residual.device}")


def _eager_inference(x, weight, bias) -> bool:
    """True for a plain eager call that autograd, tracing and compilation need not see."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in (x, weight, bias) if t is not None):
        return False  # FakeTensor, functional or other subclasses go through the op
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias) if t is not None))


# --------------------------------------------------------------------------- custom op


# needs_exact_strides: inductor passes the inputs with the strides the fake impl saw (the output layout
# follows the input layout: a re-laid-out input would make the real output disagree with the fake).
@torch.library.custom_op("autosculpt::pattern_conv2d", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _pattern_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    tap_mask: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    backend: str,
    cache_key: int,
) -> torch.Tensor:
    if backend == "auto":  # a graph traced from a layer (fx, dynamo): resolved on the real tensors
        backend = resolve_backend("auto", x, weight, tap_mask, stride, padding, dilation, groups)
    fn = CONV_BACKENDS.get(backend)
    if fn is None:
        load_backend(backend)
        fn = CONV_BACKENDS[backend]
    if x.shape[0] == 0:
        oh, ow = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
        return torch.empty((0, weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                           memory_format=output_memory_format(x))
    out = fn(x, weight, tap_mask, bias, stride, padding, dilation, groups, cache_key)
    if backend in ("cuda", "triton"):
        out = _gpu_nonfinite_taps(out, x, tap_mask, stride, padding, dilation, groups)
    # Inductor trusts the fake's strides: every backend's output must have exactly those.
    fmt = output_memory_format(x)
    if out.stride() != torch.empty(out.shape, device="meta", memory_format=fmt).stride():
        out = torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=fmt).copy_(out)
    return out


def _gpu_nonfinite_taps(out, x, tap_mask, stride, padding, dilation, groups):
    """:func:`propagate_nonfinite_taps` for the GPU kernels. A CPU tensor (the Triton interpreter) is
    screened first; on a GPU the mask is computed on every call (a screen would synchronise)."""
    if x.device.type == "cpu" and bool(torch.isfinite(x).all()):
        return out
    return propagate_nonfinite_taps(out, x, tap_mask, stride, padding, dilation, groups)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The op's output layout: channels_last for a channels_last input (as cuDNN and oneDNN do; the
    CPU backend has a channels-last kernel), otherwise contiguous. The fake impl and all backends
    follow it, so torch.compile sees the real strides."""
    channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


@_pattern_conv2d_op.register_fake
def _(x, weight, tap_mask, bias, stride, padding, dilation, groups, backend, cache_key):
    oh, ow = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], oh, ow)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, weight, tap_mask, bias, stride, padding, dilation, groups, _backend, _key = inputs
    ctx.save_for_backward(x, weight, tap_mask)
    ctx.has_bias = bias is not None
    ctx.conf = (stride, padding, dilation, groups)


def _backward(ctx, grad):
    # Gradients through the masked dense reference: dropped taps get exactly zero gradient.
    x, weight, tap_mask = ctx.saved_tensors
    x, grad = torch_conv_input(x), torch_conv_input(grad)
    stride, padding, dilation, groups = ctx.conf
    mask = tap_mask[:, None].to(weight.dtype)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight * mask, grad, stride, padding, dilation, groups)
    if ctx.needs_input_grad[1]:
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, dilation, groups) * mask
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad.sum((0, 2, 3))
    return grad_x, grad_w, None, grad_b, None, None, None, None, None, None


_pattern_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- backends


def _torch_backend(x, weight, tap_mask, bias, stride, padding, dilation, groups, cache_key):
    if cache_key and x.is_cuda:  # a GPU layer's dense fallback: reuse its masked weight (cuDNN only)

        w = masked_weight(weight, tap_mask, cache_key, x)
        return torch.nn.functional.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return pattern_conv2d_ref(x, weight, tap_mask, bias, stride, padding, dilation, groups)


_PACKED = WeightCache()


def _packed_weights(ext, weight: torch.Tensor, tap_mask: torch.Tensor, groups: int, cache_key: int):
    """Packed weights for the C++ kernel, cached per layer key (see :mod:`.weight_cache`)."""

    def build():
        w = weight.detach().contiguous()
        m = tap_mask.detach().contiguous().to(torch.uint8)
        c_out, c_in_pg, kh, kw = w.shape
        return ext.PackedPatternConv(w.data_ptr(), m.data_ptr(), c_out, c_in_pg, kh, kw, groups)

    return _PACKED.get_or_build(cache_key, weight, tap_mask, (groups,), build)


def release_cache(cache_key: int) -> None:
    """Drops the packed and masked weights cached under ``cache_key`` (a layer being deleted or replaced)."""
    weight_cache.release(cache_key)


def _new_output(shape, like: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Allocates a kernel's output (uninitialised; tests replace this to poison outputs)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def run_cpu_kernel(x, weight, tap_mask, bias, stride, padding, dilation, groups, cache_key, residual=None, relu=False):
    """The C++ CPU kernel on already validated arguments (``validate_conv_args``): the op's ``"cpu"``
    backend, and ``PatternConv2d``'s eager shortcut once a shape was validated."""
    ext = _ext.require()
    n, _, h, w = x.shape
    oh, ow = conv_output_size(h, w, weight.shape[2], weight.shape[3], stride, padding, dilation)
    if n == 0:  # an empty batch, as nn.Conv2d returns it
        return torch.empty((0, weight.shape[0], oh, ow), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if uses_nhwc_kernel(x, weight, groups):
        return _run_nhwc_kernel(ext, x, weight, tap_mask, bias, stride, padding, dilation, cache_key, residual, relu,
                                (n, weight.shape[0], oh, ow))
    x = x.contiguous()
    packed = _packed_weights(ext, weight, tap_mask, groups, cache_key)
    out = _new_output((n, weight.shape[0], oh, ow), x)
    # (only their data pointers are read: no detach, contiguous() returns the tensor itself when it is)
    b = bias.contiguous() if bias is not None else None
    r = residual.contiguous() if residual is not None else None
    packed.forward(
        x.data_ptr(), b.data_ptr() if b is not None else 0, out.data_ptr(), n, h, w,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], torch.get_num_threads(),
        r.data_ptr() if r is not None else 0, bool(relu),
    )
    if not ext.all_finite(x.data_ptr(), x.numel(), torch.get_num_threads()):
        propagate_nonfinite_taps(out, x, tap_mask, stride, padding, dilation, groups)
    return out


def cpu_kernel_runner(x: torch.Tensor, weight: torch.Tensor, tap_mask: torch.Tensor, bias, stride, padding, dilation,
                      groups: int, cache_key: int, relu: bool):
    """``run(x, residual) -> out``: :func:`run_cpu_kernel` specialised for inputs of ``x``'s shape and
    strides (validated by the caller): everything that does not change between calls (layout, output
    shape, the weight cache to use, the kernel's size arguments) is worked out once, so a call costs
    the packed-weights lookup, the output allocation and the kernel. The weights, mask and bias are
    read from the given tensors on every call (their current data, through the weight cache's rules)."""
    ext = _ext.require()
    n, _, h, w = x.shape
    oh, ow = conv_output_size(h, w, weight.shape[2], weight.shape[3], stride, padding, dilation)
    out_shape = (n, weight.shape[0], oh, ow)
    nhwc = uses_nhwc_kernel(x, weight, groups)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    sizes = (n, h, w, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    cache, extra = (_PACKED_NHWC, ("nhwc",)) if nhwc else (_PACKED, (groups,))

    def build():
        wc = weight.detach().contiguous()
        m = tap_mask.detach().contiguous().to(torch.uint8)
        if nhwc:
            return ext.PackedPatternConvNhwc(wc.data_ptr(), m.data_ptr(), *wc.shape)
        return ext.PackedPatternConv(wc.data_ptr(), m.data_ptr(), *wc.shape, groups)

    tail = (False,) if nhwc else ()
    numel = x.numel()
    copy_input = not nhwc and not x.is_contiguous()
    if n == 0:
        return lambda x, residual=None: torch.empty(out_shape, dtype=x.dtype, memory_format=fmt)

    def run(x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if copy_input:
            x = x.contiguous()
        packed = cache.get_or_build(cache_key, weight, tap_mask, extra, build)
        out = _new_output(out_shape, x, memory_format=fmt)
        r = residual.contiguous(memory_format=fmt) if residual is not None else None
        threads = torch.get_num_threads()
        packed.forward(x.data_ptr(), bias.data_ptr() if bias is not None else 0, out.data_ptr(), *sizes, threads,
                       r.data_ptr() if r is not None else 0, relu, *tail)
        if not ext.all_finite(x.data_ptr(), numel, threads):
            propagate_nonfinite_taps(out, x, tap_mask, stride, padding, dilation, groups)
        return out

    return run


def uses_nhwc_kernel(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether the CPU backend runs its channels-last kernel for ``x``: a channels_last (NHWC) input,
    an ungrouped conv, at most 64 taps. Its output is then channels_last too."""
    return (groups == 1 and weight.shape[2] * weight.shape[3] <= 64 and x.shape[1] > 1
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


_PACKED_NHWC = WeightCache()


def _run_nhwc_kernel(ext, x, weight, tap_mask, bias, stride, padding, dilation, cache_key, residual, relu, shape):
    def build():
        w = weight.detach().contiguous()
        m = tap_mask.detach().contiguous().to(torch.uint8)
        return ext.PackedPatternConvNhwc(w.data_ptr(), m.data_ptr(), *w.shape)

    packed = _PACKED_NHWC.get_or_build(cache_key, weight, tap_mask, ("nhwc",), build)
    out = _new_output(shape, x, memory_format=torch.channels_last)
    b = bias.contiguous() if bias is not None else None
    r = residual.contiguous(memory_format=torch.channels_last) if residual is not None else None
    n, _, h, w = x.shape
    packed.forward(x.data_ptr(), b.data_ptr() if b is not None else 0, out.data_ptr(), n, h, w, stride[0], stride[1],
                   padding[0], padding[1], dilation[0], dilation[1], torch.get_num_threads(),
                   r.data_ptr() if r is not None else 0, bool(relu), False)
    if not ext.all_finite(x.data_ptr(), x.numel(), torch.get_num_threads()):
        propagate_nonfinite_taps(out, x, tap_mask, stride, padding, dilation, 1)
    return out


def propagate_nonfinite_taps(out: torch.Tensor, x: torch.Tensor, tap_mask: torch.Tensor, stride, padding,
                             dilation, groups: int) -> torch.Tensor:
    """Sets to NaN (in place) every output whose window reads a NaN/±inf input through a *dropped* tap.

    The semantics of ``pattern_conv2d`` is that of ``F.conv2d`` with zero weights at dropped taps, and
    0·NaN = 0·inf = NaN. The sparse kernels never read dropped taps (that is their speed-up), so they
    call this when their input holds a non-finite value (screened by one cheap pass): the outputs
    reached through kept taps are already NaN/inf by arithmetic; this adds the dropped ones."""
    dropped = (~tap_mask).to(x.dtype)[:, None]  # (C_out, 1, kh, kw): one input plane per conv group
    n, c = x.shape[:2]
    bad = (~torch.isfinite(x)).reshape(n, groups, c // groups, *x.shape[2:]).any(2).to(x.dtype)
    hit = torch.nn.functional.conv2d(bad, dropped, None, tuple(stride), tuple(padding), tuple(dilation), groups) > 0
    return out.masked_fill_(hit, float("nan"))


CONV_BACKENDS["torch"] = _torch_backend
CONV_BACKENDS["cpu"] = run_cpu_kernel


def load_backend(name: str) -> None:
    """Imports the module that registers a GPU backend ("cuda", "triton") in ``CONV_BACKENDS`` on first
    use (keeps ``import autosculpt`` lean)."""
    import importlib

    modules = {"cuda": "autosculpt.ops._conv_cuda", "triton": "autosculpt.ops._conv_triton"}
    if name not in modules:
        raise ValueError(f"backend: unknown backend {name!r}")
    importlib.import_module(modules[name])
    if name not in CONV_BACKENDS:
        raise RuntimeError(f"backend {name!r} did not register a pattern_conv2d implementation")
