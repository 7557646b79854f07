"""The interface every latency model has: a :class:`Profile` and the predictions from it, plus the
deterministic :class:`FlopsLatencyModel` (latency ∝ multiply-accumulates that run) for tests and
FLOPs-style budgets. The measured model is :class:`autosculpt.runtime.latency.LatencyModel`."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..patterns import PAPER6, PatternSet
from . import predict as prediction
from .hooks import collect_layers
from .predict import layer_flops
from .profile import Profile

__all__ = ["LatencyModelBase", "FlopsLatencyModel"]


class LatencyModelBase:
    """What every latency model shares: the profile (after :meth:`profile` or :meth:`load_state_dict`)
    and the predictions from it (:mod:`autosculpt.runtime.predict`). Subclasses say how a profile and a
    whole model are measured."""

    def __init__(self, pattern_set: PatternSet = PAPER6):
        self.pattern_set = pattern_set
        self.profile_data: Optional[Profile] = None

    def profile(self, model: nn.Module, example_input: torch.Tensor, progress: bool = False):
        """Finds the prunable layers of ``model`` and their input shapes, and measures what the
        predictions need (``profile_data``). Returns self."""
        raise NotImplementedError

    def measure_model(self, model: nn.Module, example_input: torch.Tensor, reps: Optional[int] = None) -> float:
        """End-to-end latency of ``model`` on ``example_input`` in ms."""
        raise NotImplementedError

    def measure_models(self, models, example_input: torch.Tensor, reps: Optional[int] = None) -> List[float]:
        """End-to-end latency of several models (ms each)."""
        return [self.measure_model(m, example_input, reps=reps) for m in models]

    def _collect_layers(self, model: nn.Module, example_input: torch.Tensor) -> Dict[str, dict]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input: expected a torch.Tensor, got {type(example_input).__name__}")
        layers = collect_layers(model, example_input, self.pattern_set)
        if not layers:
            raise ValueError(
                f"model: no prunable conv with kernel {self.pattern_set.kernel_size} found in {type(model).__name__}")
        return layers

    # -- the profile ----------------------------------------------------------------------
    def _profiled(self) -> Profile:
        if self.profile_data is None or not self.profile_data.layers:
            raise RuntimeError("latency model: call profile(model, example_input) first")
        return self.profile_data

    @property
    def layers(self) -> Dict[str, dict]:
        """The profiled prunable layers and their shapes (empty before :meth:`profile`)."""
        return self.profile_data.layers if self.profile_data is not None else {}

    @property
    def remainder_ms(self) -> float:
        return self.profile_data.remainder_ms if self.profile_data is not None else 0.0

    @property
    def in_model_factor(self) -> float:
        return self.profile_data.in_model_factor if self.profile_data is not None else 1.0

    @property
    def sparse_in_model_factor(self) -> float:
        return self.profile_data.sparse_in_model_factor if self.profile_data is not None else 1.0

    def state_dict(self) -> dict:
        """The profile as plain data (:meth:`Profile.to_json`), so a resumed search predicts exactly as before."""
        return (self.profile_data or Profile({}, {}, {})).to_json()

    def load_state_dict(self, state: dict) -> None:
        self.profile_data = Profile.from_json(state)

    # -- predictions ----------------------------------------------------------------------
    def dense_layer_ms(self, name: str) -> float:
        """Measured time of the dense layer ``name`` in ms."""
        return self._profiled().dense_ms[name]

    def epilogue_ms(self, name: str) -> float:
        """Measured time of the ReLU / shortcut add that fusion moves into layer ``name``'s kernel (0 if none)."""
        return self.profile_data.epilogue_ms.get(name, 0.0) if self.profile_data is not None else 0.0

    def layer_ms(self, name: str, tap_mask: Optional[torch.Tensor], path: str = "auto") -> float:
        """Predicted time of layer ``name`` with ``tap_mask`` (None = dense) in ms (:func:`predict.layer_ms`)."""
        return prediction.layer_ms(self._profiled(), name, tap_mask, path)

    def dense_ms(self) -> float:
        """Predicted latency of the dense model (remainder + dense prunable layers) in ms."""
        return prediction.dense_ms(self._profiled())

    def predict(self, plan: Mapping) -> float:
        """Predicted latency of the model sparsified by ``plan`` in ms."""
        return prediction.predict(self._profiled(), plan)

    def latency_shares(self) -> Dict[str, float]:
        """Each prunable layer's share of the dense model's predicted latency."""
        return prediction.latency_shares(self._profiled())

    def flops(self, plan: Optional[Mapping] = None) -> float:
        """Multiply-accumulates of the prunable layers that actually run under ``plan`` (None = dense)."""
        return prediction.flops(self._profiled(), plan)

    def verify(self, model: nn.Module, plan: Mapping, example_input: torch.Tensor, reps: int = 20) -> dict:
        """Sparsifies ``model`` with ``plan``, measures it end to end and compares with the prediction.

        Returns ``{"predicted_ms", "measured_ms", "rel_error", "dense_predicted_ms", "dense_measured_ms",
        "predicted_speedup", "measured_speedup"}``; ``rel_error = |pred - meas| / meas``.
        """
        from ..plan import sparsify

        if not self.layers:
            self.profile(model, example_input)
        sparse_model = sparsify(model, dict(plan), backend=getattr(self, "backend", "auto")).eval()
        measured, dense_measured = self.measure_models([sparse_model, model], example_input, reps=reps)
        predicted = self.predict(plan)
        return {
            "predicted_ms": predicted, "measured_ms": measured, "rel_error": abs(predicted - measured) / measured,
            "dense_predicted_ms": self.dense_ms(), "dense_measured_ms": dense_measured,
            "predicted_speedup": self.dense_ms() / predicted, "measured_speedup": dense_measured / measured,
        }


class FlopsLatencyModel(LatencyModelBase):
    """Deterministic stand-in: a layer costs ``overhead_ms + ms_per_mflop × MMACs that run``; the
    remainder is ``remainder_ms``. Same interface as :class:`LatencyModel`; for tests and FLOPs budgets.
    (The cost is linear in the kept fraction, so the profile's two-point grid predicts it exactly.)"""

    def __init__(self, pattern_set: PatternSet = PAPER6, ms_per_mflop: float = 0.01, overhead_ms: float = 0.01,
                 remainder_ms: float = 0.05):
        super().__init__(pattern_set)
        self.ms_per_mflop, self.overhead_ms, self.fixed_remainder_ms = ms_per_mflop, overhead_ms, remainder_ms
        self.backend = "torch"

    def _cost(self, info: dict, mask: Optional[torch.Tensor] = None) -> float:
        return self.overhead_ms + self.ms_per_mflop * layer_flops(info, mask) / 1e6

    def _grid(self, info: dict) -> List[Tuple[float, float]]:
        return [(0.0, self.overhead_ms), (1.0, self._cost(info))]

    def profile(self, model, example_input, progress: bool = False):
        layers = self._collect_layers(model, example_input)
        self.profile_data = Profile(layers, {n: self._cost(info) for n, info in layers.items()},
                                    {n: self._grid(info) for n, info in layers.items()},
                                    remainder_ms=self.fixed_remainder_ms, meta={"model": "flops"})
        return self

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name, info in self.profile_data.layers.items():  # states saved before profiles carried a grid
            self.profile_data.grid.setdefault(name, self._grid(info))

    def measure_model(self, model, example_input, reps: int = 1):
        """'Measures' a model with the same formula (deterministic): sparse layers count their kept taps."""
        layers = collect_layers(model, example_input, self.pattern_set)
        modules = dict(model.named_modules())
        return self.fixed_remainder_ms + sum(self._cost(info, getattr(modules[n], "tap_mask", None))
                                             for n, info in layers.items())
