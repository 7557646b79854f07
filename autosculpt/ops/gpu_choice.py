"""``backend="auto"`` for CUDA tensors: the fastest of cuda / triton / torch (dense cuDNN), measured once.

Imported lazily by :mod:`autosculpt.ops.conv` the first time a CUDA tensor asks for ``"auto"``; importing it
registers :func:`choose` in ``ops.conv.AUTO_CHOOSERS["cuda"]``. Each (input shape, dtype, memory
format, weight shape, mask contents, conv parameters, TF32 setting, device) key is timed once with CUDA
events (median of a few runs after warm-up, which also absorbs Triton's autotuning) and the winner is
cached in memory for the process. Including the dense path makes this the per-layer dense fallback.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import timing
from . import conv as conv_ops
from ._pattern_groups import fp32_conv_precision
from .backends import build_info

_DECISIONS: Dict[tuple, str] = {}
_LAST_BY_SHAPE: Dict[tuple, str] = {}  # same key without the mask: used while torch.compile traces
_TIMINGS: Dict[tuple, Dict[str, float]] = {}
_MASK_DIGESTS: Dict[tuple, str] = {}
_FAILED: Dict[str, str] = {}  # backend -> first error: warned once, then not tried again


def candidates(x: torch.Tensor) -> List[str]:
    """Backends that may run this CUDA tensor: built kernels first, the dense reference always."""
    info = build_info()
    out = []
    major, _ = torch.cuda.get_device_capability(x.device)
    if info["cuda_built"] and (major >= 8 or x.dtype == torch.float32):
        out.append("cuda")
    if info["triton_available"]:
        out.append("triton")
    out.append("torch")
    return [b for b in out if b not in _FAILED]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` on the current stream, timed with CUDA events."""
    return timing.time_fn(fn, reps, warmup, device=device, cuda_events=True).median_ms


def _mask_digest(tap_mask: torch.Tensor) -> str:
    # The digest needs the mask on the host (one small copy); remembered per tensor version.
    ptr_key = (tap_mask.data_ptr(), tap_mask._version, tuple(tap_mask.shape), str(tap_mask.device))
    digest = _MASK_DIGESTS.get(ptr_key)
    if digest is None:
        data = tap_mask.detach().to("cpu", torch.bool).contiguous().numpy().tobytes()
        digest = hashlib.sha1(data).hexdigest()
        if len(_MASK_DIGESTS) > 4096:
            _MASK_DIGESTS.clear()
        _MASK_DIGESTS[ptr_key] = digest
    return digest


def _shape_key(x, weight, stride, padding, dilation, groups) -> tuple:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    tf32 = fp32_conv_precision() if x.dtype == torch.float32 else ""
    return (tuple(x.shape), x.dtype, channels_last, str(x.device), tuple(weight.shape), tuple(stride),
            tuple(padding), tuple(dilation), groups, tf32)


def measure(x, weight, tap_mask, stride, padding, dilation, groups, backends: Optional[List[str]] = None) -> Dict[str, float]:
    """Milliseconds of each backend for this call (no bias; the bias costs all backends the same).

    A backend that raises is reported with a warning and left out (and not tried again), so a broken
    kernel is visible instead of silently ignored.
    """
    timings: Dict[str, float] = {}
    # A cache key for the measurement: kernels time as in a layer (packed weights reused), without the
    # per-call mask read and packing of uncached functional calls.
    key = conv_ops.new_cache_key()
    with torch.no_grad():
        for name in backends or candidates(x):
            try:
                # The backend function itself, as eager inference calls it (no dispatcher overhead).
                if name not in conv_ops.CONV_BACKENDS:
                    conv_ops.load_backend(name)
                fn = conv_ops.CONV_BACKENDS[name]

                def run(fn=fn):
                    return fn(x, weight, tap_mask, None, list(stride), list(padding), list(dilation), groups, key)

                timings[name] = time_ms(run, x.device)
            except Exception as exc:  # noqa: BLE001 - reported, then excluded
                _FAILED[name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"autosculpt: backend {name!r} failed while choosing a GPU backend and is "
                              f"disabled for 'auto' in this process: {_FAILED[name]}", RuntimeWarning)
    conv_ops.release_cache(key)
    return timings


def choose(x, weight, tap_mask, stride, padding, dilation, groups) -> str:
    """The backend ``"auto"`` uses for this CUDA call: measured on first sight of its key, then cached.

    While ``torch.compile`` traces (fake tensors, nothing can be timed) it reuses the decision made
    eagerly for the same shapes, or the dense ``"torch"`` path if there is none.
    """
    shape_key = _shape_key(x, weight, stride, padding, dilation, groups)
    if torch.compiler.is_compiling():
        return _LAST_BY_SHAPE.get(shape_key, "torch")
    key = shape_key + (_mask_digest(tap_mask),)
    hit = _DECISIONS.get(key)
    if hit is not None:
        return hit
    timings = measure(x, weight, tap_mask, stride, padding, dilation, groups)
    best = min(timings, key=timings.get) if timings else "torch"
    _DECISIONS[key] = best
    _LAST_BY_SHAPE[shape_key] = best
    _TIMINGS[key] = timings
    return best


def decisions() -> Dict[tuple, Tuple[str, Dict[str, float]]]:
    """Cached decisions with their timings (ms), for reports and debugging."""
    return {k: (v, dict(_TIMINGS.get(k, {}))) for k, v in _DECISIONS.items()}


def clear() -> None:
    """Forgets all cached decisions (e.g. after changing TF32 settings or rebuilding kernels)."""
    _DECISIONS.clear()
    _LAST_BY_SHAPE.clear()
    _TIMINGS.clear()
    _MASK_DIGESTS.clear()
    _FAILED.clear()


conv_ops.AUTO_CHOOSERS["cuda"] = choose
