"""The name of a device, as it appears in latency cache keys and benchmark headers."""
from __future__ import annotations

import platform

import torch

__all__ = ["device_name"]


def device_name(device: str | torch.device) -> str:
    """A human-readable name of the device (the GPU's or the CPU's model name), part of every cache key."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index or 0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
