"""How AutoSculpt times code, everywhere: warm-up, interleaved repeats, CUDA sync, median and IQR,
and pinned thread counts.

:func:`time_interleaved` first warms every function up, then makes passes ("rounds") over all of
them, each pass running a burst of timed calls of each function in turn. Interleaving makes load that
comes and goes on a shared machine hit all functions alike, so their ratios stay meaningful. CUDA work
is synchronised around each timed call (or timed with CUDA events on the current stream). The result
per function is a :class:`Timing`: its samples in ms, median, quartiles and IQR, minimum.

:func:`threads` pins ``torch``'s intra-op thread count for a block and restores it afterwards;
:func:`set_threads` is the process-wide setting (a CLI flag, a benchmark's ``main``).

This module imports only torch and the standard library, so every layer of the package may use it.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

__all__ = ["Timing", "time_interleaved", "time_fn", "threads", "set_threads", "load_average"]

Device = Union[str, torch.device, None]


@dataclass(frozen=True)
class Timing:
    """The timed calls of one function: ``samples_ms`` in the order they ran, each the mean over
    ``inner`` back-to-back calls (``inner`` > 1 only for very short functions, see ``min_time_s``)."""

    samples_ms: Tuple[float, ...]
    inner: int = 1

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        """The fastest sample: on a shared machine noise only adds time, so this is the stable estimate."""
        return min(self.samples_ms)

    @property
    def q1_ms(self) -> float:
        return self._quartiles()[0]

    @property
    def q3_ms(self) -> float:
        return self._quartiles()[2]

    @property
    def iqr_ms(self) -> float:
        """Interquartile range (q3 - q1): the spread of the middle half of the samples."""
        q1, _, q3 = self._quartiles()
        return q3 - q1

    def stat(self, name: str) -> float:
        """The statistic ``"min"`` or ``"median"`` in ms."""
        if name == "min":
            return self.min_ms
        if name == "median":
            return self.median_ms
        raise ValueError(f"stat: expected 'min' or 'median', got {name!r}")

    def _quartiles(self) -> Tuple[float, float, float]:
        if len(self.samples_ms) < 2:
            v = self.samples_ms[0]
            return v, v, v
        q1, q2, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q1, q2, q3


def _sync_for(device: Device) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    reps: int = 10,
    warmup: int = 2,
    *,
    rounds: Optional[int] = None,
    rewarm: int = 0,
    rotate: bool = False,
    min_time_s: float = 0.0,
    min_total_s: float = 0.0,
    device: Device = None,
    cuda_events: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    on_burst: Optional[Callable[[int, str], None]] = None,
) -> Dict[str, Timing]:
    """Times each function of ``fns`` (name -> zero-argument callable), interleaved; returns name -> Timing.

    Args:
        reps: timed samples per function, at least (``rounds`` × the burst size ``ceil(reps / rounds)``).
        warmup: passes over all functions, one untimed call each, before anything is timed (packing,
            allocator, oneDNN primitives, a layer's path decision, Triton autotuning).
        rounds: passes over the functions; each pass times a burst of ``ceil(reps / rounds)`` calls of
            one function, then of the next. Default ``reps``: one call per function per pass (fully
            interleaved). Fewer rounds time each function in bursts (warm caches, as in a layer that
            runs alone) while still spreading its samples over the whole measurement.
        rewarm: untimed calls right before every burst (re-warms caches the other functions evicted).
        rotate: pass ``r`` starts with function ``r % len(fns)`` (no function always runs first).
        min_time_s: one sample lasts at least this long: short functions are called ``inner`` times
            back to back per sample (``inner`` calibrated once per function after the warm-up).
        min_total_s: after ``rounds`` passes, passes continue until this much wall time was spent timing.
        device: a CUDA device is synchronised before each burst and after every timed call (CPU: nothing).
        cuda_events: time with CUDA events on ``device``'s current stream (no host sync per call; one
            at the end) instead of ``clock``.
        clock: seconds, ``time.perf_counter`` by default (``time.thread_time`` / ``time.process_time``
            for CPU time, immune to time slices lost to other processes).
        on_burst: called as ``on_burst(round, name)`` after each burst (progress bars).
    """
    if not fns:
        return {}
    reps = _positive_int(reps, "reps")
    rounds = reps if rounds is None else _positive_int(rounds, "rounds")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    if cuda_events and (device is None or torch.device(device).type != "cuda"):
        raise ValueError("cuda_events: needs a CUDA device")
    burst = max(1, math.ceil(reps / rounds))
    names = list(fns)
    sync = _sync_for(device)

    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    inner = {name: 1 for name in names}
    if min_time_s > 0:
        for name in names:
            t0, n = time.perf_counter(), 0
            while True:
                fns[name]()
                n += 1
                sync()
                if time.perf_counter() - t0 >= min_time_s:
                    break
            inner[name] = n

    samples: Dict[str, list] = {name: [] for name in names}
    stream = torch.cuda.current_stream(torch.device(device)) if cuda_events else None
    start = time.perf_counter()
    r = 0
    while r < rounds or time.perf_counter() - start < min_total_s:
        order = names[r % len(names):] + names[: r % len(names)] if rotate else names
        for name in order:
            fn, n = fns[name], inner[name]
            for _ in range(rewarm):
                fn()
            sync()
            for _ in range(burst):
                if stream is not None:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record(stream)
                    for _ in range(n):
                        fn()
                    end.record(stream)
                    samples[name].append((begin, end))
                else:
                    t0 = clock()
                    for _ in range(n):
                        fn()
                    sync()
                    samples[name].append((clock() - t0) * 1e3 / n)
            if on_burst is not None:
                on_burst(r, name)
        r += 1
    if stream is not None:
        torch.cuda.synchronize(torch.device(device))
        samples = {name: [b.elapsed_time(e) / inner[name] for b, e in s] for name, s in samples.items()}
    return {name: Timing(tuple(samples[name]), inner[name]) for name in names}


def time_fn(fn: Callable[[], object], reps: int = 10, warmup: int = 2, **kwargs) -> Timing:
    """:func:`time_interleaved` for one function: ``warmup`` untimed calls, then ``reps`` timed ones."""
    return time_interleaved({"fn": fn}, reps, warmup, **kwargs)["fn"]


@contextlib.contextmanager
def threads(n: Optional[int]) -> Iterator[int]:
    """Runs the block with ``torch.set_num_threads(n)`` and restores the previous count afterwards
    (also on an exception). ``None`` leaves the count as it is. Yields the count in effect."""
    if n is None:
        yield torch.get_num_threads()
        return
    n = _positive_int(n, "threads")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


def set_threads(n: int) -> int:
    """Sets torch's intra-op thread count for the rest of the process (a ``--threads`` flag); returns
    the previous count. Inside a library function use :func:`threads`, which restores it."""
    n = _positive_int(n, "threads")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def load_average() -> float:
    """The machine's 1-minute load average (0.0 where the OS has none): printed beside every timing a
    user sees, and what tells a disturbed measurement from a quiet one."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        return 0.0
