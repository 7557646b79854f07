"""The latency model (:mod:`autosculpt.runtime.latency`); the backend facts of :mod:`autosculpt.ops.backends`
are re-exported here (``asc.runtime.available_backends()``)."""
from ..ops.backends import BACKENDS, available_backends, build_info
from .latency import FlopsLatencyModel, LatencyModel

__all__ = ["BACKENDS", "available_backends", "build_info", "LatencyModel", "FlopsLatencyModel"]
