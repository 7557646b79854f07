"""Backend choice and (in :mod:`autosculpt.runtime.latency`) the measured-latency model."""
from .backends import BACKENDS, available_backends, build_info
from .latency import FlopsLatencyModel, LatencyModel

__all__ = ["BACKENDS", "available_backends", "build_info", "LatencyModel", "FlopsLatencyModel"]
