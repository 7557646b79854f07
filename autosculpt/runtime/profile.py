"""A latency profile: everything a prediction needs, measured once for a model, an input shape and a
device. Plain data (saved and loaded as JSON); :mod:`autosculpt.runtime.predict` turns it into
latencies, :class:`autosculpt.runtime.LatencyModel` measures it."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from .._atomic import atomic_write_text

__all__ = ["Profile", "PROFILE_FORMAT"]

PROFILE_FORMAT = 1
_TUPLE_FIELDS = ("in_shape", "kernel_size", "stride", "padding", "dilation")


@dataclass
class Profile:
    """The measured costs of one model's prunable layers (ms).

    Attributes:
        layers: prunable conv name -> its shape: ``in_shape``, ``c_in``, ``c_out``, ``kernel_size``,
            ``stride``, ``padding``, ``dilation``, ``groups``, ``bias``.
        dense_ms: each layer's dense conv, timed alone.
        grid: each layer's sparse kernel, timed alone at the grid mixes: ``[(kept fraction, ms)]``
            sorted by fraction (:mod:`autosculpt.runtime.grid`).
        remainder_ms: the rest of the model (everything but the prunable convs), timed in the model.
        epilogue_ms: per layer, the ReLU / shortcut add after it that inference fusion moves into the
            sparse kernel (separate ops after the dense conv).
        in_model_factor: dense layer times inside the model / timed alone.
        sparse_in_model_factor: the same for the sparse kernel.
        meta: where it was measured (device, backend, threads, version...), for people reading it.
    """

    layers: Dict[str, dict]
    dense_ms: Dict[str, float]
    grid: Dict[str, List[Tuple[float, float]]]
    remainder_ms: float = 0.0
    epilogue_ms: Dict[str, float] = field(default_factory=dict)
    in_model_factor: float = 1.0
    sparse_in_model_factor: float = 1.0
    meta: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-able dict (lists for tuples) that :meth:`from_json` reads back exactly."""
        return {
            "format": PROFILE_FORMAT,
            "layers": {n: {k: list(v) if isinstance(v, tuple) else v for k, v in info.items()}
                       for n, info in self.layers.items()},
            "dense_ms": dict(self.dense_ms),
            "grid": {n: [[float(k), float(t)] for k, t in pts] for n, pts in self.grid.items()},
            "remainder_ms": float(self.remainder_ms),
            "epilogue_ms": dict(self.epilogue_ms),
            "in_model_factor": float(self.in_model_factor),
            "sparse_in_model_factor": float(self.sparse_in_model_factor),
            "meta": copy.deepcopy(self.meta),
        }

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        """A profile from :meth:`to_json`'s dict (also the state dicts of earlier versions, without
        ``format``; a missing grid is empty)."""
        if not isinstance(data, dict) or "layers" not in data or "dense_ms" not in data:
            raise ValueError("profile: expected a dict with 'layers' and 'dense_ms'")
        if data.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
            raise ValueError(f"profile: expected format {PROFILE_FORMAT}, got {data.get('format')!r}")
        layers = {n: {k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in info.items()}
                  for n, info in data["layers"].items()}
        return cls(
            layers=layers,
            dense_ms={n: float(v) for n, v in data["dense_ms"].items()},
            grid={n: [(float(k), float(t)) for k, t in pts] for n, pts in (data.get("grid") or {}).items()},
            remainder_ms=float(data.get("remainder_ms", 0.0)),
            epilogue_ms={n: float(v) for n, v in (data.get("epilogue_ms") or {}).items()},
            in_model_factor=float(data.get("in_model_factor", 1.0)),
            sparse_in_model_factor=float(data.get("sparse_in_model_factor", 1.0)),
            meta=copy.deepcopy(data.get("meta") or {}),
        )

    def save(self, path: str) -> None:
        """Writes the profile as JSON (atomically)."""
        atomic_write_text(os.fspath(path), json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str) -> "Profile":
        """Reads a profile written by :meth:`save`."""
        with open(os.fspath(path)) as f:
            return cls.from_json(json.load(f))
