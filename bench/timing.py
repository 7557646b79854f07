"""Shared helpers for the CPU benchmarks' reports (machine name, header). The timing itself is
:mod:`autosculpt.timing` (warm-up, interleaved repeats, medians, fixed threads)."""
from __future__ import annotations

import time

import torch


def cpu_name() -> str:
    """The CPU's model name (the same name the latency cache is keyed by)."""
    from autosculpt.runtime.device import device_name

    return device_name("cpu")


def header(title: str) -> str:
    return (
        f"# {title}\n\nMachine: {cpu_name()}, {torch.get_num_threads()} threads "
        f"(torch {torch.__version__}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
    )
