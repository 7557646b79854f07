"""Backend choice and (in :mod:`autosculpt.runtime.latency`) the measured-latency model."""
from .backends import BACKENDS, available_backends, build_info

__all__ = ["BACKENDS", "available_backends", "build_info"]
