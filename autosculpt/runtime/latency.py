"""Latency models: how long a (sparsified) model takes, per layer and for a whole plan.

The RL search learns about speed only through these classes. Both measure a :class:`Profile` once
per model (:meth:`profile`) and predict from it with the pure functions of
:mod:`autosculpt.runtime.predict`.

``LatencyModel`` MEASURES: for every prunable conv of a model it times, at the layer's real input
shape, the dense layer and our pattern-sparse kernel (``PatternConv2d`` with the path forced to
"sparse") at a small grid of pattern mixes (:mod:`autosculpt.runtime.grid`). Measuring every possible
mix is too costly, and the kernel's cost is close to linear in the number of kept taps (one GEMM per
pattern group, K = C_in·|taps|), so a layer's sparse time at any mix is interpolated between the grid
points. A layer's predicted time is ``min(sparse, dense)``, because ``PatternConv2d`` falls back to the
dense conv where the kernel would lose. Layers that are not prunable, BN, activations, pooling... are
one measured remainder: the model timed end to end with every prunable conv replaced by a stub that
returns a ready output tensor (:func:`autosculpt.runtime.hooks.stub_layers`), so the remainder is
measured in the model with its real call overheads. Layers run a little slower inside the model than
timed alone, and not by the same amount for oneDNN's dense conv and our kernel: ``in_model_factor`` =
(whole dense model - remainder) / sum of the dense layers timed alone scales dense layer times (so the
dense prediction matches the measured dense model), and ``sparse_in_model_factor`` does the same for
the sparse kernel, from one end-to-end timing of the model at a reference plan (the uniform half-kept
mix, every layer forced onto the sparse kernel). ``verify`` runs the sparsified model end to end and
reports how far the prediction is off.

Whole models are timed in their inference form (``autosculpt.fuse``): BatchNorm folded, and a pattern
conv's following ReLU / shortcut add fused into its kernel. The dense model still runs those ops
separately, so their time is part of the remainder; for each prunable layer whose epilogue fusion
absorbs them, that time is measured too (``epilogue_ms``), taken out of the remainder and charged to the
layer only when it runs the dense conv (a layer on the sparse kernel gets it for free).

Layer timings are cached on disk (:mod:`autosculpt.runtime.cache`), keyed by device name, backend,
thread count, statistic, library version, build, layer shape and mix.

``FlopsLatencyModel`` (:mod:`autosculpt.runtime.base`, re-exported here) has the same interface and is
deterministic (latency ∝ multiply-accumulates that actually run + a fixed per-layer overhead): for tests
and for FLOPs-style budgets.
"""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import timing
from .._version import __version__
from ..patterns import PAPER6, PatternSet, keep_level_grid
from . import predict as prediction
from .base import FlopsLatencyModel, LatencyModelBase
from .cache import LatencyCache
from .device import device_name
from .grid import grid_mask, mask_kept_fraction, mix_signature
from .hooks import fusable_epilogues, stub_layers
from .predict import layer_out_shape, plan_tap_masks
from .profile import Profile

__all__ = ["LatencyModel", "FlopsLatencyModel", "Profile", "plan_tap_masks", "keep_level_grid", "device_name"]


def _clamped_factor(measured: float, predicted: float) -> float:
    # a factor outside [0.7, 1.5] means a timing went wrong, not that the model is that different
    return min(1.5, max(0.7, measured / predicted))


class LatencyModel(LatencyModelBase):
    """Measured latency of our kernels and the dense layers on a device (see the module docstring).

    Args:
        device: "cpu" or a CUDA device; the layers run there.
        cache_path: JSON file for measured times (None: in memory only). Shared between runs and
            models: an identical layer shape and mix is never measured twice on the same device,
            backend, thread count and library version.
        backend: kernel backend for the sparse layers ("auto" resolves to the fastest built one).
        pattern_set: the patterns of the plans to predict (defines the grid).
        reps, warmup: timing repeats and warm-up calls per measurement.
        stat: "min" (default, robust to one-sided noise on shared machines) or "median" of the repeats.
        rounds: ``profile`` spreads each measurement's repeats over this many passes over all layers
            (the best round's statistic is kept): robust to load that comes and goes, and the model and
            its layers are timed under the same conditions.
        threads: CPU threads during measurement (default: ``torch.get_num_threads()`` now).
        fuse: whole models are timed in their inference form (:func:`autosculpt.fuse.for_inference`:
            BatchNorm folded, shortcut adds and ReLUs fused into pattern convs). The remainder is then
            the folded dense model minus its convs, which still counts the ReLUs and adds a pruned
            model fuses away, so predictions of pruned plans lean slow (on the safe side of a budget).
    """

    def __init__(self, device: str | torch.device = "cpu", cache_path: Optional[str] = None, backend: str = "auto",
                 pattern_set: PatternSet = PAPER6, reps: int = 15, warmup: int = 3, threads: Optional[int] = None,
                 stat: str = "min", rounds: int = 3, fuse: bool = True):
        super().__init__(pattern_set)
        self.fuse = bool(fuse)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: expected a torch device like 'cpu' or 'cuda:0', got {device!r}") from exc
        if not isinstance(reps, int) or reps < 1:
            raise ValueError(f"reps: expected a positive int, got {reps!r}")
        self.backend = self._resolve_backend(backend)
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds: expected a positive int, got {rounds!r}")
        self.rounds = rounds
        if stat not in ("min", "median"):
            raise ValueError(f"stat: expected 'min' or 'median', got {stat!r}")
        self.reps, self.warmup, self.stat = reps, warmup, stat
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        self.device_name = device_name(self.device)
        self.cache = LatencyCache(cache_path)
        self.measurements = 0  # timings actually run (cache misses)

    @property
    def cache_path(self) -> Optional[str]:
        return self.cache.path

    def save_cache(self) -> None:
        """Merges this model's measurements into the cache file (:meth:`LatencyCache.save`)."""
        self.cache.save()

    def _resolve_backend(self, backend: str) -> str:
        from ..ops.backends import BACKENDS, available_backends

        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
        avail = available_backends()
        if backend == "auto":
            order = ("cpu", "torch") if self.device.type == "cpu" else ("cuda", "triton", "torch")
            return next(b for b in order if avail.get(b))
        if not avail.get(backend):
            raise ValueError(f"backend: {backend!r} is not usable here (available: {[b for b, ok in avail.items() if ok]})")
        return backend

    def _key(self, *parts) -> str:
        from .._ext import build_signature

        # the build's hash: a rebuilt (e.g. faster) kernel never reuses the old build's timings
        return "|".join([self.device_name, self.backend, f"t{self.threads}", self.stat, __version__,
                         f"build-{build_signature()}", *map(str, parts)])

    # -- timing one layer -----------------------------------------------------------------
    def _timed(self, fn: Callable[[], object], reps: Optional[int] = None) -> float:
        with timing.threads(self.threads), torch.no_grad():
            return timing.time_fn(fn, reps or self.reps, self.warmup, device=self.device).stat(self.stat)

    def _cached(self, key: str, make_fn: Callable[[], Callable[[], object]]) -> float:
        if key not in self.cache:
            self.cache[key] = self._timed(make_fn())
            self.measurements += 1
        return self.cache[key]

    def _layer_signature(self, info: dict) -> str:
        return "conv{}".format(json.dumps([list(info["in_shape"]), info["c_out"], list(info["kernel_size"]),
                                           list(info["stride"]), list(info["padding"]), list(info["dilation"]),
                                           info["groups"], info["bias"]], separators=(",", ":")))

    def _make_conv(self, info: dict) -> Tuple[nn.Conv2d, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        conv = nn.Conv2d(info["c_in"], info["c_out"], info["kernel_size"], info["stride"], info["padding"],
                         info["dilation"], info["groups"], info["bias"])
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        x = torch.randn(info["in_shape"], generator=gen)
        return conv.to(self.device).eval(), x.to(self.device)

    def _sparse_layer(self, conv: nn.Conv2d, mask: torch.Tensor) -> nn.Module:
        from ..nn.conv import PatternConv2d

        return PatternConv2d.from_dense(conv, mask.to(self.device), backend=self.backend, path="sparse").eval()

    def _grid_masks(self, info: dict) -> Dict[str, torch.Tensor]:
        """Cache key -> tap mask of the layer's grid points."""
        sig = self._layer_signature(info)
        masks = (grid_mask(self.pattern_set, g, info["c_out"]) for g in keep_level_grid(self.pattern_set))
        return {self._key(sig, "sparse", mix_signature(m)): m for m in masks}

    def measure_dense(self, info: dict) -> float:
        """Times the dense conv of one layer shape (ms); cached."""
        def make():
            conv, x = self._make_conv(info)
            return lambda: conv(x)
        return self._cached(self._key(self._layer_signature(info), "dense"), make)

    def measure_sparse(self, info: dict, mask: torch.Tensor) -> float:
        """Times our kernel (path forced to "sparse") for one layer shape and tap mask (ms); cached by mix."""
        def make():
            conv, x = self._make_conv(info)
            layer = self._sparse_layer(conv, mask)
            return lambda: layer(x)
        return self._cached(self._key(self._layer_signature(info), "sparse", mix_signature(mask)), make)

    def measure_epilogue(self, info: dict, relu: bool, residual: bool) -> float:
        """Times the ReLU / shortcut add that runs after a layer when they are separate ops (ms); cached."""
        if not (relu or residual):
            return 0.0
        shape = layer_out_shape(info)

        def make():
            y = torch.randn(shape, device=self.device)
            r = torch.randn(shape, device=self.device)

            def ops():  # what the unfused model runs after the conv
                z = y + r if residual else y
                return torch.relu_(z) if relu else z
            return ops
        return self._cached(self._key("epilogue", json.dumps(shape), f"relu{int(relu)}", f"res{int(residual)}"), make)

    # -- timing whole models --------------------------------------------------------------
    def _inference_form(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        if not self.fuse:
            return model
        from ..fuse import for_inference

        with torch.no_grad():
            return for_inference(model, x)

    def measure_models(self, models, example_input: torch.Tensor, reps: Optional[int] = None) -> List[float]:
        """End-to-end latency of several models in ms, timed INTERLEAVED (one call of each per round), so
        that load changes on a shared machine hit all of them alike and their ratios stay meaningful.
        Each model's MEDIAN over the rounds is returned (whatever ``stat`` says for layer timings): the
        statistic of the final measurements a user sees, so a plan verified here meets the budget there."""
        x = example_input.to(self.device)
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        timed = [self._inference_form(m, x) for m in models]
        try:
            with timing.threads(self.threads), torch.no_grad():
                # the warm-up also lets sparse layers decide their path
                out = timing.time_interleaved({i: (lambda m=m: m(x)) for i, m in enumerate(timed)},
                                              reps or self.reps, max(1, self.warmup), device=self.device)
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)
        return [out[i].median_ms for i in range(len(models))]

    def measure_model(self, model: nn.Module, example_input: torch.Tensor, reps: Optional[int] = None) -> float:
        """End-to-end latency of ``model`` (eval mode, no grad) on ``example_input`` in ms.
        Sparse layers pick their path (sparse kernel or dense fallback) during the warm-up."""
        was_training = model.training
        model.eval()
        try:
            x = example_input.to(self.device)
            timed = self._inference_form(model, x)
            return self._timed(lambda: timed(x), reps)
        finally:
            model.train(was_training)

    # -- the profile ----------------------------------------------------------------------
    def _uncached_layer_jobs(self, layers: Dict[str, dict]) -> Dict[str, Callable[[], object]]:
        """Cache key -> zero-argument call, for every (layer shape, dense | grid mix) not cached yet."""
        jobs: Dict[str, Callable[[], object]] = {}
        for info in layers.values():
            dense_key = self._key(self._layer_signature(info), "dense")
            masks = self._grid_masks(info)
            missing = [k for k in (dense_key, *masks) if k not in self.cache and k not in jobs]
            if not missing:
                continue
            conv, x = self._make_conv(info)
            for key in missing:
                layer = conv if key == dense_key else self._sparse_layer(conv, masks[key])
                jobs[key] = (lambda c, t: lambda: c(t))(layer, x)
        return jobs

    def _time_in_rounds(self, jobs: Dict[str, Callable[[], object]], progress: bool) -> Dict[str, float]:
        """Each job's best round: ``rounds`` passes over all jobs, each timing a burst of
        ``ceil(reps / rounds)`` calls of one job (its statistic per burst, the minimum over rounds kept).
        Spreading a measurement's repeats over the whole profiling time (instead of one burst) makes the
        result robust to load that comes and goes on a shared machine."""
        bar = None
        if progress:
            from .._optional import tqdm

            bar = tqdm(total=self.rounds * len(jobs), desc="latency profile", unit="timing")
        burst = max(1, -(-self.reps // self.rounds))
        try:
            with timing.threads(self.threads), torch.no_grad():
                out = timing.time_interleaved(jobs, self.reps, self.warmup, rounds=self.rounds, rewarm=1,
                                              device=self.device, on_burst=(lambda r, n: bar.update(1)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        return {key: min(timing.Timing(t.samples_ms[r * burst:(r + 1) * burst]).stat(self.stat) for r in range(self.rounds))
                for key, t in out.items()}

    def profile(self, model, example_input, progress: bool = False):
        """Measures (or loads from the cache) every prunable layer's dense time and its sparse grid, the
        dense model's remainder and the in-model factors; saves the cache. Returns self."""
        from ..nn.conv import PatternConv2d
        from ..plan import sparsify, uniform_plan

        layers = self._collect_layers(model, example_input)
        names = list(layers)
        reference_plan = uniform_plan(model, self.pattern_set, 0.5, layers=names)
        was_training = model.training
        model.eval()
        try:
            xm = example_input.to(self.device)
            full = self._inference_form(model, xm)
            stubbed = stub_layers(full, xm, names)  # everything but the prunable convs
            ref = sparsify(model, reference_plan, backend=self.backend).eval()
            for m in ref.modules():
                if isinstance(m, PatternConv2d):
                    m.path = "sparse"
            ref = self._inference_form(ref, xm)
            whole = {"remainder": lambda: stubbed(xm), "dense": lambda: full(xm), "sparse_reference": lambda: ref(xm)}
            jobs = self._uncached_layer_jobs(layers)
            best = self._time_in_rounds({**jobs, **{f"__{k}__": fn for k, fn in whole.items()}}, progress)
        finally:
            model.train(was_training)
        model_ms = {k: best.pop(f"__{k}__") for k in whole}
        self.cache.entries.update(best)
        self.measurements += len(best)

        fused = fusable_epilogues(model, example_input, self.pattern_set, names)
        profile = Profile(
            layers=layers,
            dense_ms={n: self.measure_dense(info) for n, info in layers.items()},  # cached above
            grid={n: sorted((mask_kept_fraction(m), self.measure_sparse(info, m)) for m in self._grid_masks(info).values())
                  for n, info in layers.items()},
            remainder_ms=model_ms["remainder"],
            epilogue_ms={n: self.measure_epilogue(layers[n], *fused[n]) for n in names if n in fused},
            meta={"device": self.device_name, "backend": self.backend, "threads": self.threads, "stat": self.stat,
                  "version": __version__, "input_shape": list(example_input.shape)},
        )
        dense_layers = sum(profile.dense_ms.values())
        if dense_layers > 0:
            profile.in_model_factor = _clamped_factor(model_ms["dense"] - profile.remainder_ms, dense_layers)
        masks = plan_tap_masks(reference_plan)
        sparse = sum(prediction.sparse_layer_ms(profile, n, masks[n]) for n in names if n in masks)
        if sparse > 0:
            fused_remainder = prediction.unfusable_remainder_ms(profile)
            profile.sparse_in_model_factor = _clamped_factor(model_ms["sparse_reference"] - fused_remainder, sparse)
        self.profile_data = profile
        self.save_cache()
        return self
