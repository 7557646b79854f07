"""The latency model: :class:`LatencyModel` measures a :class:`Profile` of a model on a device
(:mod:`~autosculpt.runtime.latency`), :func:`autosculpt.runtime.predict.predict` turns a profile and a plan into
milliseconds (pure). Helpers: ``device`` (names), ``grid`` (measured mixes and
interpolation), ``hooks`` (layer shapes, stubbed remainder, fusable epilogues), ``cache`` (disk cache),
``profile`` (the dataclass, JSON). The backend facts of :mod:`autosculpt.ops.backends` are re-exported
here (``asc.runtime.available_backends()``)."""
from ..ops.backends import BACKENDS, available_backends, build_info
from .latency import FlopsLatencyModel, LatencyModel
from .profile import Profile

__all__ = ["BACKENDS", "available_backends", "build_info", "LatencyModel", "FlopsLatencyModel", "Profile"]
