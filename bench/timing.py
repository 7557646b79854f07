"""Shared timing helpers for the CPU benchmarks: fixed threads, warm-up, interleaved medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def cpu_name() -> str:
    """The CPU's model name (the same name the latency cache is keyed by)."""
    from autosculpt.runtime.latency import device_name

    return device_name("cpu")


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        min_time: float = 0.0) -> Dict[str, float]:
    """Median seconds per call of each function, measured round-robin so that machine noise hits all
    providers alike. Each sample repeats a function until ``min_time`` passed (for tiny kernels)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {}
    for name, fn in fns.items():
        t0, n = time.perf_counter(), 0
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_time:
                break
        inner[name] = n
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def header(title: str) -> str:
    return (
        f"# {title}\n\nMachine: {cpu_name()}, {torch.get_num_threads()} threads "
        f"(torch {torch.__version__}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
    )
