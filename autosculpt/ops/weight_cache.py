"""Per-layer caches of prepared weights (packed for a kernel, masked for the dense fallback), and the
rule that keeps every one of them from serving weights that have since changed.

A tensor's ``_version`` counter misses some in-place writes: fused optimizers (``Adam(fused=True)``)
and writes through ``.data`` do not bump it. So a cache entry is trusted only when it can be checked:

* **Live layers** (the default: a trainable ``PatternConv2d``) keep a copy of the weight and mask the
  entry was built from and compare it on every use (one ``memcmp`` of the weights' bytes). On CUDA, where that comparison would synchronise the stream, nothing is cached: the
  packing is re-done per call (one scatter kernel).
* **Frozen layers** (:func:`freeze`, used by the inference forms ``fuse_for_inference`` builds) are a
  snapshot by contract, as with inductor's ``freezing``: weights are prepared once. Their entries are
  still rebuilt when the tensor is replaced, its version counter moves, or *any* optimizer step runs
  in the process (a global optimizer hook), which covers every path except a deliberate ``.data`` write
  to a frozen model.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import _ext

__all__ = ["WeightCache", "freeze", "is_frozen", "release"]

_OPTIMIZER_STEPS = [0]
_FROZEN: Set[int] = set()
_CACHES: "list[WeightCache]" = []


def _count_step(*_args, **_kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def freeze(cache_key: int) -> None:
    """Marks a layer key as frozen: its prepared weights are built once (see the module docstring)."""
    if cache_key:
        _FROZEN.add(int(cache_key))


def is_frozen(cache_key: int) -> bool:
    """Whether entries under ``cache_key`` are trusted without comparing the weights."""
    return int(cache_key) in _FROZEN


def release(cache_key: int) -> None:
    """Forgets everything cached under a layer key (a layer being deleted or given new tensors)."""
    _FROZEN.discard(int(cache_key))
    for cache in _CACHES:
        cache.pop(cache_key)


def _same_bytes(copy: torch.Tensor, live: torch.Tensor) -> bool:
    """Whether ``live`` still holds exactly the bytes of ``copy`` (its contiguous snapshot): one memcmp
    on the CPU (bitwise, so an unchanged NaN counts as unchanged), ``torch.equal`` elsewhere."""
    if live.device.type == "cpu" and live.is_contiguous() and copy.is_contiguous() and live.dtype == copy.dtype:
        ext = _ext.extension()
        if ext is not None and hasattr(ext, "bytes_equal"):
            return bool(ext.bytes_equal(copy.data_ptr(), live.data_ptr(), live.numel() * live.element_size()))
    return torch.equal(copy, live)


def _fingerprint(weight: torch.Tensor, tap_mask: torch.Tensor, extra: tuple) -> tuple:
    return (
        weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()), weight.dtype,
        weight.device, tap_mask.data_ptr(), tap_mask._version, tuple(tap_mask.shape), _OPTIMIZER_STEPS[0], extra,
    )


class WeightCache:
    """``cache_key -> value`` prepared from (weight, tap_mask), never returned once they changed."""

    def __init__(self) -> None:
        self._entries: Dict[int, Tuple[tuple, Optional[torch.Tensor], Optional[torch.Tensor], Any]] = {}
        _CACHES.append(self)

    def get_or_build(self, cache_key: int, weight: torch.Tensor, tap_mask: torch.Tensor, extra: tuple,
                     build: Callable[[], Any]) -> Any:
        """The cached value for this layer, or ``build()`` (then cached) when the weights changed.
        A zero ``cache_key`` (a bare op call) never caches."""
        if not cache_key:
            return build()
        frozen = cache_key in _FROZEN
        if not frozen and weight.device.type != "cpu":
            return build()
        fingerprint = _fingerprint(weight, tap_mask, extra)
        hit = self._entries.get(cache_key)
        if hit is not None and hit[0] == fingerprint and (
                frozen or (_same_bytes(hit[1], weight) and _same_bytes(hit[2], tap_mask))):
            return hit[3]
        value = build()
        copies = (None, None) if frozen else (weight.detach().clone(), tap_mask.detach().clone())
        self._entries[cache_key] = (fingerprint, *copies, value)
        return value

    def pop(self, cache_key: int) -> None:
        self._entries.pop(cache_key, None)

    def __contains__(self, cache_key: int) -> bool:
        return cache_key in self._entries
