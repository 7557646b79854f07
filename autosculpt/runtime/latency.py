"""Latency models: how long a (sparsified) model takes, per layer and for a whole plan.

The RL search learns about speed only through these classes.

``LatencyModel`` MEASURES: for every prunable conv of a model it times, at the layer's real input
shape, the dense layer and our pattern-sparse kernel (``PatternConv2d`` with the path forced to
"sparse") at a small grid of pattern mixes. Measuring every possible mix is too costly (a layer with
C filters and P patterns has C^P-ish mixes), and the kernel's cost is close to linear in the number of
kept taps (it runs one GEMM per pattern group, K = C_in·|taps|), so a layer's sparse time at any mix is
predicted by piecewise-linear interpolation in the kept-tap fraction between the measured grid points.
The grid points are the pattern set's "keep levels" (distinct kept-tap counts: 9, 6, 3, 0 for PAPER6)
and half/half mixes of adjacent levels, with the filters of each level spread over all patterns of that
level (the worst case for the number of groups). A layer's predicted time is ``min(sparse, dense)``,
because ``PatternConv2d`` falls back to the dense conv where the kernel would lose. Layers that are not
prunable, BN, activations, pooling... are one measured remainder: the model timed end to end with every
prunable conv replaced by a stub that returns a ready output tensor (so the remainder is measured in the
model, with its real call overheads, rather than as a difference of two larger times). Layers run a
little slower inside the model than when timed alone (their input was just written by another layer,
their weights were evicted by other layers'), and not by the same amount for oneDNN's dense conv and
our kernel: ``in_model_factor`` = (whole dense model - remainder) / sum of the dense layers timed alone
scales dense layer times (so the dense prediction matches the measured dense model), and
``sparse_in_model_factor`` does the same for the sparse kernel, from one end-to-end timing of the model
at a reference plan (the uniform half-kept mix, every layer forced onto the sparse kernel). ``verify`` runs the sparsified model end to end and reports how far
the prediction is off.

Whole models are timed in their inference form (``autosculpt.fuse``): BatchNorm folded, and a pattern
conv's following ReLU / shortcut add fused into its kernel. The dense model still runs those ops
separately, so their time is part of the remainder; for each prunable layer whose epilogue fusion
absorbs them, that time is measured too (``epilogue_ms``), taken out of the remainder and charged to the
layer only when it runs the dense conv (a layer on the sparse kernel gets it for free).

Results are cached on disk (JSON, written atomically through a temp file + ``os.replace``), keyed by
device name, backend, thread count, library version, layer shape and mix. A corrupt cache file is
reported with a warning and rebuilt; invalid entries (NaN, Inf, negative) are dropped and measured
again. ``save_cache`` merges into the file under an exclusive lock (``<cache>.lock``), so runs that
share the cache keep each other's entries.

``FlopsLatencyModel`` has the same interface and is deterministic (latency ∝ multiply-accumulates that
actually run + a fixed per-layer overhead): for tests and for FLOPs-style budgets.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .._version import __version__
from .._atomic import atomic_write_text
from ..patterns import PAPER6, PatternSet, keep_level_grid, masks_from_ids

__all__ = ["LatencyModel", "FlopsLatencyModel", "plan_tap_masks", "keep_level_grid", "device_name"]

CACHE_FORMAT = 1


def device_name(device: str | torch.device) -> str:
    """A human-readable name of the device, part of every cache key."""
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


def plan_tap_masks(plan: Mapping) -> Dict[str, torch.Tensor]:
    """The (C_out, kh, kw) tap mask of each conv layer of a plan."""
    out = {}
    for name, layer in plan.get("layers", {}).items():
        if layer.get("kind") == "conv":
            ps = PatternSet.from_json(layer["pattern_set"])
            out[name] = masks_from_ids(ps, layer["pattern_ids"])
    return out


def grid_mask(pattern_set: PatternSet, level_fractions: Mapping[int, float], c_out: int, seed: int = 0) -> torch.Tensor:
    """A representative tap mask for a grid point: each level's filters cycle through all patterns of
    that level; filter order is a fixed random permutation (as after importance assignment)."""
    taps = pattern_set.kept_taps()
    ids: List[int] = []
    items = sorted(level_fractions.items(), reverse=True)
    for j, (lv, frac) in enumerate(items):
        n = c_out - len(ids) if j == len(items) - 1 else int(round(frac * c_out))
        members = [p for p in range(len(pattern_set)) if int(taps[p]) == lv]
        ids += [members[k % len(members)] for k in range(n)]
    perm = torch.randperm(c_out, generator=torch.Generator().manual_seed(seed))
    return pattern_set.masks[torch.tensor(ids)[perm]]


def _mix_signature(mask: torch.Tensor) -> str:
    """Order-free signature of a tap mask: each distinct pattern (as bits) with its filter count."""
    flat = mask.flatten(1).to(torch.uint8)
    uniq, counts = torch.unique(flat, dim=0, return_counts=True)
    parts = ["".join(str(int(b)) for b in row) + f"x{int(c)}" for row, c in zip(uniq, counts)]
    return ";".join(sorted(parts))


def _run_once(model: nn.Module, example_input: torch.Tensor, hooks: list) -> None:
    """One eval-mode, no-grad forward pass (for ``hooks`` to record what they need); then removes the
    hooks and restores the training mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _collect_layers(model: nn.Module, example_input: torch.Tensor, pattern_set: PatternSet) -> Dict[str, dict]:
    """Prunable convs (kernel matching the pattern set, zero padding) and their real input shapes."""
    from ..graph.build import is_prunable_conv

    shapes: Dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if is_prunable_conv(m, pattern_set):
            def record(mod, args, name=name):
                shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is unchanged

            hooks.append(m.register_forward_pre_hook(record))
    _run_once(model, example_input, hooks)
    modules = dict(model.named_modules())
    layers = {}
    for name, shape in shapes.items():
        m = modules[name]
        layers[name] = {
            "in_shape": shape, "c_in": m.in_channels, "c_out": m.out_channels, "kernel_size": tuple(m.kernel_size),
            "stride": tuple(m.stride), "padding": tuple(m.padding), "dilation": tuple(m.dilation), "groups": m.groups,
            "bias": m.bias is not None,
        }
    return layers


class _ConvStub(nn.Module):
    """Stands in for a conv: returns its output tensor (zeros, recorded once) at no compute cost."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, residual=None):
        return self.out if residual is None else self.out + residual


def stub_layers(model: nn.Module, example_input: torch.Tensor, names: List[str]) -> nn.Module:
    """A copy of ``model`` whose modules ``names`` return a fixed zero tensor of their output's shape."""
    from ..plan import set_submodule

    model = copy.deepcopy(model).eval()
    outs: Dict[str, torch.Tensor] = {}
    _run_once(model, example_input, [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: outs.__setitem__(n, torch.zeros_like(out))) for n in names])
    for n in names:
        set_submodule(model, n, _ConvStub(outs[n]))
    return model


def fusable_epilogues(model: nn.Module, example_input: torch.Tensor, pattern_set: PatternSet,
                      names: List[str]) -> Dict[str, Tuple[bool, bool]]:
    """For each prunable layer in ``names``: (ReLU fused, shortcut add fused) when it becomes a pattern
    conv and the model is fused for inference. Empty when the model cannot be fused (fx)."""
    from ..fuse import fuse_for_inference
    from ..plan import dense_plan, sparsify

    plan = dense_plan(model, pattern_set)
    plan["layers"] = {n: layer for n, layer in plan["layers"].items() if n in names}
    was_training = model.training
    try:
        with torch.no_grad():
            gm = fuse_for_inference(sparsify(model.eval(), plan, backend="torch").eval(), example_input)
    except ValueError:
        return {}
    finally:
        model.train(was_training)
    out: Dict[str, Tuple[bool, bool]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in plan["layers"]:
            out[node.target] = (getattr(gm.get_submodule(node.target), "activation", None) == "relu",
                                "residual" in node.kwargs)
    return out


def _out_shape(info: dict) -> List[int]:
    """Output shape (N, C_out, OH, OW) of a profiled layer."""
    from ..ops.conv import conv_output_size

    n, _, h, w = info["in_shape"]
    oh, ow = conv_output_size(h, w, *info["kernel_size"], info["stride"], info["padding"], info["dilation"])
    return [n, info["c_out"], oh, ow]


def _layer_flops(info: dict, mask: Optional[torch.Tensor] = None) -> float:
    n, _, oh, ow = _out_shape(info)
    kh, kw = info["kernel_size"]
    taps = float(mask.sum()) if mask is not None else float(info["c_out"] * kh * kw)
    return taps * (info["c_in"] // info["groups"]) * oh * ow * n


def _valid_ms(v) -> bool:
    """A usable cached time: a finite number of ms >= 0 (not NaN, Inf, negative, bool or text)."""
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


class _file_lock:
    """An exclusive ``fcntl.flock`` on ``path`` (created if needed) for a read-merge-write; where
    ``fcntl`` does not exist (Windows) no lock is taken."""

    def __init__(self, path: str):
        self.path, self._fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        return False


class _BaseLatencyModel:
    """Shared logic: profile a model's prunable layers, then predict plan latencies from per-layer
    costs. Subclasses say how a layer (dense or at a mix) and the remainder cost."""

    def __init__(self, pattern_set: PatternSet = PAPER6):
        self.pattern_set = pattern_set
        self.layers: Dict[str, dict] = {}
        self.remainder_ms = 0.0
        self._dense_ms: Dict[str, float] = {}
        self._epi_ms: Dict[str, float] = {}  # per layer: its ReLU / shortcut add, which fusion absorbs
        self.in_model_factor = 1.0  # dense layer times inside the model / timed alone (see the module docstring)
        self.sparse_in_model_factor = 1.0  # the same for the sparse kernel
        self._profiled_for: Optional[int] = None

    # -- to implement -----------------------------------------------------------------
    def _measure_dense_layer(self, name: str, info: dict) -> float:
        raise NotImplementedError

    def _sparse_layer_ms(self, name: str, info: dict, mask: torch.Tensor) -> float:
        raise NotImplementedError

    def _measure_remainder(self, model: nn.Module, example_input: torch.Tensor) -> float:
        raise NotImplementedError

    def _measure_epilogue(self, name: str, info: dict, relu: bool, residual: bool) -> float:
        """Time of the ReLU / residual add after layer ``name`` when they run as separate ops."""
        return 0.0

    def measure_model(self, model: nn.Module, example_input: torch.Tensor) -> float:
        """End-to-end latency of ``model`` on ``example_input`` in ms."""
        raise NotImplementedError

    def measure_models(self, models, example_input: torch.Tensor, reps: Optional[int] = None) -> List[float]:
        """End-to-end latency of several models (ms each)."""
        return [self.measure_model(m, example_input, reps=reps) for m in models]

    # -- public -----------------------------------------------------------------------
    def profile(self, model: nn.Module, example_input: torch.Tensor, progress: bool = False) -> "_BaseLatencyModel":
        """Finds the prunable layers of ``model`` and their input shapes, and measures what the
        predictions need. Returns self."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input: expected a torch.Tensor, got {type(example_input).__name__}")
        self.layers = _collect_layers(model, example_input, self.pattern_set)
        if not self.layers:
            raise ValueError(
                f"model: no prunable conv with kernel {self.pattern_set.kernel_size} found in {type(model).__name__}"
            )
        names = list(self.layers)
        it = names
        if progress:
            from .._optional import tqdm

            it = tqdm(names, desc="latency profile", unit="layer")
        self._dense_ms = {}
        for name in it:
            self._dense_ms[name] = self._measure_dense_layer(name, self.layers[name])
            self._prepare_layer(name, self.layers[name])
        self.remainder_ms = self._measure_remainder(model, example_input)
        self._epi_ms = {}
        if type(self)._measure_epilogue is not _BaseLatencyModel._measure_epilogue:
            fused = fusable_epilogues(model, example_input, self.pattern_set, list(self.layers))
            self._epi_ms = {n: self._measure_epilogue(n, self.layers[n], *fused[n]) for n in self.layers if n in fused}
        self._profiled_for = id(model)
        return self

    def _prepare_layer(self, name: str, info: dict) -> None:
        """Hook for measuring a layer's grid up front (LatencyModel)."""

    def state_dict(self) -> dict:
        """The profile (layers and their costs), so a resumed search predicts exactly as before."""
        return copy.deepcopy({"layers": self.layers, "dense_ms": self._dense_ms, "remainder_ms": self.remainder_ms,
                              "epilogue_ms": self._epi_ms, "in_model_factor": self.in_model_factor,
                              "sparse_in_model_factor": self.sparse_in_model_factor,
                              "grid": getattr(self, "_grid", None)})

    def load_state_dict(self, state: dict) -> None:
        self.layers = copy.deepcopy(state["layers"])
        self._dense_ms = dict(state["dense_ms"])
        self.remainder_ms = float(state["remainder_ms"])
        self._epi_ms = {k: float(v) for k, v in state.get("epilogue_ms", {}).items()}
        self.in_model_factor = float(state.get("in_model_factor", 1.0))
        self.sparse_in_model_factor = float(state.get("sparse_in_model_factor", 1.0))
        if state.get("grid") is not None:
            self._grid = copy.deepcopy(state["grid"])
        self._profiled_for = None

    def _require_profile(self):
        if not self.layers:
            raise RuntimeError("latency model: call profile(model, example_input) first")

    def dense_layer_ms(self, name: str) -> float:
        """Measured time of the dense layer ``name`` in ms."""
        self._require_profile()
        return self._dense_ms[name]

    def epilogue_ms(self, name: str) -> float:
        """Measured time of the ReLU / shortcut add that fusion moves into layer ``name``'s kernel (0 if none)."""
        return self._epi_ms.get(name, 0.0)

    def layer_ms(self, name: str, tap_mask: Optional[torch.Tensor], path: str = "auto") -> float:
        """Predicted time of layer ``name`` with ``tap_mask`` (None = dense) in ms, with its fusable
        epilogue (:meth:`epilogue_ms`): separate ops after the dense conv, free in the sparse kernel.
        ``path`` "auto" takes the faster of sparse kernel and dense conv (as ``PatternConv2d`` does)."""
        self._require_profile()
        if name not in self.layers:
            raise KeyError(f"layer {name!r} is not a profiled prunable layer (known: {list(self.layers)[:5]}...)")
        dense = self.in_model_factor * self._dense_ms[name] + self.epilogue_ms(name)
        if tap_mask is None or path == "dense":
            return dense
        sparse = self.sparse_in_model_factor * self._sparse_layer_ms(name, self.layers[name], tap_mask)
        return sparse if path == "sparse" else min(sparse, dense)

    def _unfusable_remainder_ms(self) -> float:
        return max(0.0, self.remainder_ms - sum(self._epi_ms.values()))

    def dense_ms(self) -> float:
        """Predicted latency of the dense model (remainder + dense prunable layers) in ms."""
        self._require_profile()
        return self._unfusable_remainder_ms() + sum(self.layer_ms(n, None) for n in self.layers)

    def predict(self, plan: Mapping) -> float:
        """Predicted latency of the model sparsified by ``plan`` in ms."""
        self._require_profile()
        masks = plan_tap_masks(plan)
        paths = {n: l.get("path", "auto") for n, l in plan.get("layers", {}).items()}
        unknown = [n for n in masks if n not in self.layers]
        if unknown:
            raise KeyError(f"plan: layers {unknown[:3]} are not prunable layers of the profiled model")
        total = self._unfusable_remainder_ms()
        for name in self.layers:
            total += self.layer_ms(name, masks.get(name), paths.get(name, "auto"))
        return total

    def latency_shares(self) -> Dict[str, float]:
        """Each prunable layer's share of the dense model's predicted latency."""
        total = self.dense_ms()
        return {n: self.layer_ms(n, None) / total for n in self.layers}

    def flops(self, plan: Optional[Mapping] = None) -> float:
        """Multiply-accumulates of the prunable layers that actually run under ``plan`` (None = dense)."""
        self._require_profile()
        masks = plan_tap_masks(plan) if plan is not None else {}
        return sum(_layer_flops(info, masks.get(n)) for n, info in self.layers.items())

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


class FlopsLatencyModel(_BaseLatencyModel):
    """Deterministic stand-in: a layer costs ``overhead_ms + ms_per_mflop × MMACs that run``; the
    remainder is ``remainder_ms``. Same interface as :class:`LatencyModel`; for tests and FLOPs budgets."""

    def __init__(self, pattern_set: PatternSet = PAPER6, ms_per_mflop: float = 0.01, overhead_ms: float = 0.01,
                 remainder_ms: float = 0.05):
        super().__init__(pattern_set)
        self.ms_per_mflop, self.overhead_ms, self._remainder = ms_per_mflop, overhead_ms, remainder_ms
        self.backend = "torch"

    def _measure_dense_layer(self, name, info):
        return self.overhead_ms + self.ms_per_mflop * _layer_flops(info) / 1e6

    def _sparse_layer_ms(self, name, info, mask):
        return self.overhead_ms + self.ms_per_mflop * _layer_flops(info, mask) / 1e6

    def _measure_remainder(self, model, example_input):
        return self._remainder

    def measure_model(self, model, example_input, reps: int = 1):
        """'Measures' a model with the same formula (deterministic): sparse layers count their kept taps."""
        layers = _collect_layers(model, example_input, self.pattern_set)
        modules = dict(model.named_modules())
        total = self._remainder
        for name, info in layers.items():
            mask = getattr(modules[name], "tap_mask", None)
            total += self.overhead_ms + self.ms_per_mflop * _layer_flops(info, mask) / 1e6
        return total


def _time_ms(fn: Callable[[], object], reps: int, warmup: int, sync: Callable[[], None], stat: str = "min") -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    # "min" is the default: on a shared machine the noise is one-sided (preemption only adds time), so
    # the fastest repeat estimates the undisturbed cost best; "median" is available for quiet machines.
    return (times[0] if stat == "min" else times[len(times) // 2]) * 1e3


class LatencyModel(_BaseLatencyModel):
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
            (minimum kept), see :meth:`_measure_in_rounds`.
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
        self.cache_path = os.fspath(cache_path) if cache_path is not None else None
        self.device_name = device_name(self.device)
        self._cache: Dict[str, float] = {}
        self._grid: Dict[str, List[Tuple[float, float]]] = {}
        self.measurements = 0  # timings actually run (cache misses)
        self._model_ms: Optional[float] = None  # the stubbed model's time from the profiling rounds
        if self.cache_path is not None:
            self._cache = self._load_cache()

    # -- backend / cache ------------------------------------------------------------------
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

    def _read_cache_file(self, warn: bool = True) -> Dict[str, float]:
        """The valid entries of the cache file (none if it is missing or corrupt). Entries that are not
        a finite, non-negative number of ms (NaN, Inf, negative, not a number) are dropped with a
        warning, so they are measured again."""
        if not os.path.exists(self.cache_path):
            return {}
        try:
            with open(self.cache_path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError("unexpected structure")
        except (OSError, ValueError, TypeError) as exc:
            if warn:
                warnings.warn(f"latency cache {self.cache_path} is corrupt ({exc}); it will be rebuilt", RuntimeWarning)
            return {}
        entries, bad = {}, []
        for k, v in data["entries"].items():
            if _valid_ms(v):
                entries[str(k)] = float(v)
            else:
                bad.append(f"{k}={v!r}")
        if bad and warn:
            warnings.warn(f"latency cache {self.cache_path}: {len(bad)} invalid entries (not a finite number of "
                          f"ms >= 0, e.g. {bad[0]}) are ignored and measured again", RuntimeWarning)
        return entries

    def _load_cache(self) -> Dict[str, float]:
        return self._read_cache_file()

    def save_cache(self) -> None:
        """Merges this model's measurements into the cache file: under an exclusive lock on
        ``<cache>.lock`` the file is read, merged (entries measured here win) and written atomically
        (temp file in the same folder, then ``os.replace``), so runs sharing the cache keep each
        other's entries."""
        if self.cache_path is None:
            return
        folder = os.path.dirname(os.path.abspath(self.cache_path))
        os.makedirs(folder, exist_ok=True)
        with _file_lock(self.cache_path + ".lock"):
            merged = self._read_cache_file(warn=False)  # reported when this model read it
            merged.update({k: v for k, v in self._cache.items() if _valid_ms(v)})
            atomic_write_text(self.cache_path, json.dumps({"format": CACHE_FORMAT, "entries": merged}, indent=0, sort_keys=True))
        for k, v in merged.items():  # what other runs measured meanwhile is reused here too
            self._cache.setdefault(k, v)

    # -- timing ---------------------------------------------------------------------------
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn: Callable[[], object]) -> float:
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                return _time_ms(fn, self.reps, self.warmup, self._sync, self.stat)
        finally:
            torch.set_num_threads(old)

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

    def _measure_dense_layer(self, name, info):
        key = self._key(self._layer_signature(info), "dense")
        if key not in self._cache:
            conv, x = self._make_conv(info)
            self._cache[key] = self._timed(lambda: conv(x))
            self.measurements += 1
        return self._cache[key]

    def _measure_epilogue(self, name, info, relu, residual):
        if not (relu or residual):
            return 0.0
        shape = _out_shape(info)
        key = self._key("epilogue", json.dumps(shape), f"relu{int(relu)}", f"res{int(residual)}")
        if key not in self._cache:
            y = torch.randn(shape, device=self.device)
            r = torch.randn(shape, device=self.device)

            def ops():  # what the unfused model runs after the conv
                z = y + r if residual else y
                return torch.relu_(z) if relu else z

            self._cache[key] = self._timed(ops)
            self.measurements += 1
        return self._cache[key]

    def measure_sparse(self, info: dict, mask: torch.Tensor) -> float:
        """Times our kernel (path forced to "sparse") for one layer shape and tap mask; cached by mix."""
        from ..nn.conv import PatternConv2d

        key = self._key(self._layer_signature(info), "sparse", _mix_signature(mask))
        if key not in self._cache:
            conv, x = self._make_conv(info)
            layer = PatternConv2d.from_dense(conv, mask.to(self.device), backend=self.backend, path="sparse").eval()
            self._cache[key] = self._timed(lambda: layer(x))
            self.measurements += 1
        return self._cache[key]

    def _prepare_layer(self, name, info):
        points = []
        kh, kw = info["kernel_size"]
        for g in keep_level_grid(self.pattern_set):
            mask = grid_mask(self.pattern_set, g, info["c_out"])
            points.append((float(mask.float().mean()), self.measure_sparse(info, mask)))
        points.sort()
        self._grid[name] = points

    def _sparse_layer_ms(self, name, info, mask):
        k = float(mask.float().mean())
        pts = self._grid[name]
        if k <= pts[0][0]:
            return pts[0][1]
        for (k0, t0), (k1, t1) in zip(pts, pts[1:]):
            if k == k1:
                return t1  # a measured point exactly (no rounding through the interpolation formula)
            if k < k1:
                return t0 + (t1 - t0) * (k - k0) / max(k1 - k0, 1e-12)
        return pts[-1][1]

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
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                for _ in range(max(1, self.warmup)):  # also lets sparse layers decide their path
                    for m in timed:
                        m(x)
                self._sync()
                times: List[List[float]] = [[] for _ in models]
                for _ in range(reps or self.reps):
                    for i, m in enumerate(timed):
                        t0 = time.perf_counter()
                        m(x)
                        self._sync()
                        times[i].append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(old)
            for m, mode in zip(models, modes):
                m.train(mode)
        out = []
        for ts in times:
            ts.sort()
            out.append(ts[len(ts) // 2] * 1e3)
        return out

    def measure_model(self, model: nn.Module, example_input: torch.Tensor, reps: Optional[int] = None) -> float:
        """End-to-end latency of ``model`` (eval mode, no grad) on ``example_input`` in ms.
        Sparse layers pick their path (sparse kernel or dense fallback) during the warm-up."""
        was_training = model.training
        model.eval()
        x = example_input.to(self.device)
        timed = self._inference_form(model, x)
        old = self.reps
        if reps is not None:
            self.reps = reps
        try:
            return self._timed(lambda: timed(x))
        finally:
            self.reps = old
            model.train(was_training)

    def _inference_form(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        if not self.fuse:
            return model
        from ..fuse import for_inference

        with torch.no_grad():
            return for_inference(model, x)

    def _reference_sparse_model(self, model: nn.Module, names: List[str]) -> nn.Module:
        """``model`` at the uniform half-kept plan of its prunable layers ``names``, every pattern conv on
        the sparse kernel."""
        from ..nn.conv import PatternConv2d
        from ..plan import sparsify, uniform_plan

        self._reference_plan = uniform_plan(model, self.pattern_set, 0.5, layers=names)
        ref = sparsify(model, self._reference_plan, backend=self.backend).eval()
        for m in ref.modules():
            if isinstance(m, PatternConv2d):
                m.path = "sparse"
        return ref

    def _measure_remainder(self, model, example_input):
        return self._model_ms  # the stubbed model, timed in the profiling rounds

    def _measure_in_rounds(self, model: nn.Module, example_input: torch.Tensor, progress: bool) -> None:
        """Fills the cache for every uncached (layer shape, dense | grid mix) and times the whole dense
        model, in ``rounds`` passes over all of them, keeping each one's minimum. Spreading a
        measurement's repeats over the whole profiling time (instead of one burst) makes the minimum
        robust to load that comes and goes on a shared machine, and times the model and its layers
        under the same conditions (their difference is the remainder)."""
        from ..nn.conv import PatternConv2d

        jobs: Dict[str, Callable[[], object]] = {}
        layers = _collect_layers(model, example_input, self.pattern_set)
        for info in layers.values():
            sig = self._layer_signature(info)
            conv, x = self._make_conv(info)
            dense_key = self._key(sig, "dense")
            if dense_key not in self._cache and dense_key not in jobs:
                jobs[dense_key] = (lambda c, t: lambda: c(t))(conv, x)
            for g in keep_level_grid(self.pattern_set):
                mask = grid_mask(self.pattern_set, g, info["c_out"])
                key = self._key(sig, "sparse", _mix_signature(mask))
                if key not in self._cache and key not in jobs:
                    layer = PatternConv2d.from_dense(conv, mask.to(self.device), backend=self.backend, path="sparse").eval()
                    jobs[key] = (lambda c, t: lambda: c(t))(layer, x)
        was_training = model.training
        model.eval()
        xm = example_input.to(self.device)
        full = self._inference_form(model, xm)
        stubbed = stub_layers(full, xm, list(layers))  # everything but the prunable convs
        ref = self._inference_form(self._reference_sparse_model(model, list(layers)), xm)
        jobs["__model__"] = lambda: stubbed(xm)
        jobs["__full__"] = lambda: full(xm)
        jobs["__sparse_ref__"] = lambda: ref(xm)
        best: Dict[str, float] = {}
        per_round = max(1, -(-self.reps // self.rounds))
        bar = None
        if progress:
            from .._optional import tqdm

            bar = tqdm(total=self.rounds * len(jobs), desc="latency profile", unit="timing")
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                for r in range(self.rounds):
                    for key, fn in jobs.items():
                        t = _time_ms(fn, per_round, self.warmup if r == 0 else 1, self._sync, self.stat)
                        best[key] = min(best.get(key, float("inf")), t)
                        if bar is not None:
                            bar.update(1)
        finally:
            torch.set_num_threads(old)
            model.train(was_training)
            if bar is not None:
                bar.close()
        self._model_ms = best.pop("__model__")
        self._full_ms = best.pop("__full__")
        self._sparse_ref_ms = best.pop("__sparse_ref__")
        self.measurements += len(best)
        self._cache.update(best)

    def profile(self, model, example_input, progress: bool = False):
        """Measures (or loads from the cache) every prunable layer's dense time and its sparse grid,
        and the dense model's remainder; saves the cache. Returns self."""
        if not isinstance(model, nn.Module) or not isinstance(example_input, torch.Tensor):
            return super().profile(model, example_input, progress)  # raises the argument errors
        self._model_ms = None
        self._measure_in_rounds(model, example_input, progress)
        super().profile(model, example_input, progress=False)
        layers = sum(self._dense_ms.values())
        if layers > 0:
            self.in_model_factor = min(1.5, max(0.7, (self._full_ms - self.remainder_ms) / layers))
        masks = plan_tap_masks(self._reference_plan)
        sparse = sum(self._sparse_layer_ms(n, self.layers[n], masks[n]) for n in self.layers if n in masks)
        fused_remainder = self._unfusable_remainder_ms()
        if sparse > 0:
            self.sparse_in_model_factor = min(1.5, max(0.7, (self._sparse_ref_ms - fused_remainder) / sparse))
        self._model_ms = None
        self.save_cache()
        return self
