"""Which kernel backends are built and usable here, and how ``backend="auto"`` resolves.

Never initialises CUDA or imports triton at import time; the functions below do so only when asked.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from .. import _ext
from .._version import __version__

BACKENDS = ("cpu", "cuda", "triton", "torch")


def triton_interpret() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``): Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def cuda_usable() -> bool:
    """A CUDA device is present (initialises CUDA lazily; call only when a GPU answer is needed)."""
    return torch.cuda.is_available()


def build_info() -> Dict[str, object]:
    """What was compiled and what this machine offers: version, cpu_built, cuda_built, cuda_archs,
    triton_available, simd, threads, extension_error."""
    ext = _ext.extension()
    return {
        "version": __version__,
        "cpu_built": ext is not None,
        "cuda_built": bool(getattr(ext, "cuda_built", False)),
        "cuda_archs": str(getattr(ext, "cuda_archs", "")),
        "triton_available": triton_importable(),
        "simd": ext.simd_level() if ext is not None else "unavailable",
        "threads": torch.get_num_threads(),
        "extension_error": _ext.load_error(),
    }


def _best_capability() -> tuple:
    """Highest compute capability among the visible GPUs, (0, 0) without one."""
    if not cuda_usable():
        return (0, 0)
    return max(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def available_backends() -> Dict[str, bool]:
    """Backends that can run on this machine now: {"cpu", "cuda", "triton", "torch"} -> bool.

    "cuda" needs the CUDA kernels built and a GPU of compute capability >= 8.0 (their fp16/bf16
    tensor-core paths; the default build targets sm_80 and sm_90). "triton" needs triton and a GPU of
    capability >= 7.0 (Triton's minimum), or ``TRITON_INTERPRET=1`` for CPU tensors.
    """
    info = build_info()
    capability = _best_capability()
    return {
        "cpu": bool(info["cpu_built"]),
        "cuda": bool(info["cuda_built"]) and capability >= (8, 0),
        "triton": bool(info["triton_available"]) and (capability >= (7, 0) or triton_interpret()),
        "torch": True,
    }


def check_backend(backend: str, device: torch.device, op: str) -> str:
    """Validates an explicit backend name for a tensor's device and returns it (``"auto"`` passes through)."""
    if backend == "auto":
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    dev = device.type
    if backend == "cpu":
        if dev != "cpu":
            raise ValueError(f"backend: 'cpu' runs on CPU tensors, got a tensor on {device} for {op}")
        _ext.require()
    elif backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"backend: 'cuda' runs on CUDA tensors, got a tensor on {device} for {op}")
        ext = _ext.require()
        if not getattr(ext, "cuda_built", False):
            raise ValueError("backend: 'cuda' was not built into this installation (rebuild with nvcc, AUTOSCULPT_CUDA=1)")
    elif backend == "triton":
        if not triton_importable():
            raise ValueError("backend: 'triton' needs the triton package (pip install triton)")
        if dev == "cpu" and not triton_interpret():
            raise ValueError("backend: 'triton' runs on CPU tensors only with TRITON_INTERPRET=1 set")
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"backend: 'triton' does not run on {device}")
    return backend
