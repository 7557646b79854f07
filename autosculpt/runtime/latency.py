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

Whole models are timed in their DEPLOYED form (:func:`autosculpt.deploy.deployed_form`): the route the
user's model will run in (NCHW or channels_last AutoSculpt form, raced once on the model's reference
plan and cached), with BatchNorm folded, weights packed once and a pattern conv's following ReLU /
shortcut add fused into its kernel; layers are timed alone in that route's layout. The dense model still runs those ops
separately, so their time is part of the remainder; for each prunable layer whose epilogue fusion
absorbs them, that time is measured too (``epilogue_ms``), taken out of the remainder and charged to the
layer only when it runs the dense conv (a layer on the sparse kernel gets it for free).

Every timing is cached on disk (:mod:`autosculpt.runtime.cache`), keyed by device name, backend,
thread count, statistic, library version, build, layout and layer shape and mix, or (whole models:
route race, remainder, dense model, reference plan, and each verified plan) the model's architecture
and route. Same machine, build and cache → the same profile, predictions and verifications, so a
seeded search repeats exactly. ``verify`` retakes a measurement taken while the machine is visibly
loaded (its dense model slower than the profiled dense timing by more than twice the IQR, at least 10%).

``FlopsLatencyModel`` (:mod:`autosculpt.runtime.base`, re-exported here) has the same interface and is
deterministic (latency ∝ multiply-accumulates that actually run + a fixed per-layer overhead): for tests
and for FLOPs-style budgets.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import timing
from .._version import __version__
from ..deploy import FORMS  # how LatencyModel times whole models (its ``form`` argument)
from ..patterns import PAPER6, PatternSet, keep_level_grid
from . import predict as prediction
from .base import FlopsLatencyModel, LatencyModelBase
from .cache import LatencyCache
from .device import device_name
from .grid import grid_mask, mask_kept_fraction, mix_signature
from .hooks import fusable_epilogues, stub_layers
from .predict import layer_out_shape, plan_tap_masks
from .profile import Profile

__all__ = ["FORMS", "LatencyModel", "FlopsLatencyModel", "Profile", "plan_tap_masks", "keep_level_grid",
           "device_name"]





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
        form: how whole models are timed: ``"deployed"`` (default): in a deployment route of
            :mod:`autosculpt.deploy` (what the user runs), layers timed in that route's layout;
            ``"fused"``: :func:`autosculpt.fuse.for_inference` (NCHW, BatchNorm folded, epilogues fused);
            ``"eager"``: as given. The remainder is the dense model in that form minus its prunable convs,
            which still counts the ReLUs and adds a pruned model fuses away, so predictions of pruned
            plans lean slow (on the safe side of a budget).
        route: with ``form="deployed"``, the route to time in; None (default): the faster of
            :data:`autosculpt.deploy.QUICK_ROUTES` for the model's reference plan, raced once at
            :meth:`profile` and cached (no compiled route: building one per candidate plan would cost
            tens of seconds each).
        retakes: an end-to-end measurement whose dense model runs slower than the cached dense timing
            beyond its spread (the machine is visibly loaded) is taken again up to this many times.
    """

    def __init__(self, device: str | torch.device = "cpu", cache_path: Optional[str] = None, backend: str = "auto",
                 pattern_set: PatternSet = PAPER6, reps: int = 15, warmup: int = 3, threads: Optional[int] = None,
                 stat: str = "min", rounds: int = 3, form: str = "deployed", route: Optional[str] = None,
                 retakes: int = 2):
        super().__init__(pattern_set)
        from ..deploy import QUICK_ROUTES, ROUTES

        if form not in FORMS:
            raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
        if route is not None and (form != "deployed" or route not in QUICK_ROUTES):
            raise ValueError(f"route: expected None or (with form='deployed') one of {', '.join(QUICK_ROUTES)}, "
                             f"got {route!r} (compiled routes of {', '.join(ROUTES)} are raced by "
                             "optimize_for_inference, not timed per plan)")
        if not isinstance(retakes, int) or isinstance(retakes, bool) or retakes < 0:
            raise ValueError(f"retakes: expected an int >= 0, got {retakes!r}")
        self.form, self.retakes = form, retakes
        self.fixed_route = route
        self.route: Optional[str] = route if form == "deployed" else None
        self.candidate_routes = QUICK_ROUTES
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
        return "|".join(["lm2", self.device_name, self.backend, f"t{self.threads}", self.stat, __version__,
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

    @property
    def channels_last(self) -> bool:
        """Whether layers are timed with channels_last (NHWC) inputs and weights: the deployed route's layout."""
        from ..deploy import CHANNELS_LAST_ROUTES

        return self.route in CHANNELS_LAST_ROUTES

    def _layer_signature(self, info: dict) -> str:
        prefix = "graph-" if self.route == "autosculpt_graph" else ("nhwc-" if self.channels_last else "")
        return prefix + "conv{}".format(json.dumps([list(info["in_shape"]), info["c_out"], list(info["kernel_size"]),
                                           list(info["stride"]), list(info["padding"]), list(info["dilation"]),
                                           info["groups"], info["bias"]], separators=(",", ":")))

    def load_state_dict(self, state: dict) -> None:
        """Restores a profile (:meth:`LatencyModelBase.load_state_dict`) and the route it was measured in."""
        super().load_state_dict(state)
        if self.form == "deployed" and self.fixed_route is None:
            self.route = self.profile_data.meta.get("route") or None

    def _make_conv(self, info: dict) -> Tuple[nn.Conv2d, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        conv = nn.Conv2d(info["c_in"], info["c_out"], info["kernel_size"], info["stride"], info["padding"],
                         info["dilation"], info["groups"], info["bias"])
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        x = torch.randn(info["in_shape"], generator=gen)
        conv, x = conv.to(self.device).eval(), x.to(self.device)
        if self.channels_last:
            conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        return conv, x

    def _sparse_layer(self, conv: nn.Conv2d, mask: torch.Tensor) -> nn.Module:
        from ..nn.conv import PatternConv2d

        layer = PatternConv2d.from_dense(conv, mask.to(self.device), backend=self.backend, path="sparse").eval()
        return layer.freeze()  # weights packed once, as in the deployed form

    def _grid_masks(self, info: dict) -> Dict[str, torch.Tensor]:
        """Cache key -> tap mask of the layer's grid points."""
        sig = self._layer_signature(info)
        masks = (grid_mask(self.pattern_set, g, info["c_out"]) for g in keep_level_grid(self.pattern_set))
        return {self._key(sig, "sparse", mix_signature(m)): m for m in masks}

    def _layer_call(self, layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        """A zero-argument call of one layer as the deployed route runs it: for ``"autosculpt_graph"`` the
        executor's C++ call alone (one step, no Python around it, as inside the whole model), else the
        module itself."""
        if self.route == "autosculpt_graph":
            from ..executor import GraphExecutorModel

            return GraphExecutorModel(nn.Sequential(layer).eval(), x).bound_call(x)
        return lambda: layer(x)

    def measure_dense(self, info: dict) -> float:
        """Times the dense conv of one layer shape (ms); cached."""
        def make():
            conv, x = self._make_conv(info)
            return self._layer_call(conv, x)
        return self._cached(self._key(self._layer_signature(info), "dense"), make)

    def measure_sparse(self, info: dict, mask: torch.Tensor) -> float:
        """Times our kernel (path forced to "sparse") for one layer shape and tap mask (ms); cached by mix."""
        def make():
            conv, x = self._make_conv(info)
            return self._layer_call(self._sparse_layer(conv, mask), x)
        return self._cached(self._key(self._layer_signature(info), "sparse", mix_signature(mask)), make)

    def measure_epilogue(self, info: dict, relu: bool, residual: bool) -> float:
        """Times the ReLU / shortcut add that runs after a layer when they are separate ops (ms); cached."""
        if not (relu or residual):
            return 0.0
        shape = layer_out_shape(info)

        def make():
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            y = torch.randn(shape, device=self.device).contiguous(memory_format=fmt)
            r = torch.randn(shape, device=self.device).contiguous(memory_format=fmt)

            def ops():  # what the unfused model runs after the conv
                z = y + r if residual else y
                return torch.relu_(z) if relu else z
            return ops
        return self._cached(self._key("epilogue", "nhwc" if self.channels_last else "nchw", json.dumps(shape), f"relu{int(relu)}", f"res{int(residual)}"), make)

    # -- timing whole models --------------------------------------------------------------
    def _inference_form(self, model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``model`` as this latency model times it (see ``form``); before :meth:`profile` has chosen
        the deployed route, the first of the candidate routes."""
        from ..deploy import timed_form

        return timed_form(model, x, self.form, (self.route or self.candidate_routes[0],))[0]

    def _model_signature(self, model: nn.Module, x: torch.Tensor) -> str:
        """Names a model's architecture at an input shape (its repr: module types, shapes, patterns),
        for the cached whole-model timings; weights do not change a timing and are not part of it."""
        text = "\n".join([repr(model), str(tuple(x.shape)), str(x.dtype)])
        return "model-" + hashlib.sha256(text.encode()).hexdigest()[:20]

    def _form_tag(self) -> str:
        return self.route or self.form

    def measure_models(self, models, example_input: torch.Tensor, reps: Optional[int] = None) -> List[float]:
        """End-to-end latency of several models in ms, timed INTERLEAVED (one call of each per round), so
        that load changes on a shared machine hit all of them alike and their ratios stay meaningful.
        Each model's MEDIAN over the rounds is returned (whatever ``stat`` says for layer timings): the
        statistic of the final measurements a user sees, so a plan verified here meets the budget there."""
        return [t.median_ms for t in self._time_models(models, example_input, reps)]

    def _time_models(self, models, example_input: torch.Tensor, reps: Optional[int] = None) -> List[timing.Timing]:
        x = example_input.to(self.device)
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            timed = [self._inference_form(m, x) for m in models]
            with timing.threads(self.threads), torch.no_grad():
                # the warm-up also lets sparse layers decide their path
                out = timing.time_interleaved({i: (lambda m=m: m(x)) for i, m in enumerate(timed)},
                                              reps or self.reps, max(1, self.warmup), device=self.device)
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)
        return [out[i] for i in range(len(models))]

    def measure_model(self, model: nn.Module, example_input: torch.Tensor, reps: Optional[int] = None) -> float:
        """End-to-end latency of ``model`` (eval mode, no grad) on ``example_input`` in ms, in this
        latency model's form. Sparse layers pick their path (sparse kernel or dense fallback) during the warm-up."""
        was_training = model.training
        model.eval()
        try:
            x = example_input.to(self.device)
            timed = self._inference_form(model, x)
            return self._timed(lambda: timed(x), reps)
        finally:
            model.train(was_training)

    def verify(self, model: nn.Module, plan, example_input: torch.Tensor, reps: int = 20) -> dict:
        """Sparsifies ``model`` with ``plan``, measures it and the dense model end to end, interleaved,
        in the deployed form, and compares with the prediction (keys of
        :meth:`LatencyModelBase.verify`, plus ``load_average``, ``takes`` and ``from_cache``).

        Reproducible: a plan measured before on this machine, build, threads and form is read back
        from the cache. A measurement whose dense model is slower than the profile's dense timing by
        more than twice its IQR (at least 10%) was taken on a visibly loaded machine: it is taken again
        (``retakes`` times); if it never agrees, the last one is used, not cached, with a warning."""
        from ..plan import sparsify

        if not self.layers:
            self.profile(model, example_input)
        x = example_input.to(self.device)
        sig = self._model_signature(model, x)
        plan_hash = hashlib.sha256(json.dumps(dict(plan), sort_keys=True, default=str).encode()).hexdigest()[:20]
        keys = [self._key(sig, self._form_tag(), "verify", plan_hash, part) for part in ("pruned", "dense")]
        ref_key = self._key(sig, self._form_tag(), "dense-median")
        ref = (self.cache.entries.get(ref_key), self.cache.entries.get(self._key(sig, self._form_tag(), "dense-iqr")))
        takes, agreed, from_cache = 0, True, all(k in self.cache for k in keys)
        if from_cache:
            measured, dense_measured = (self.cache[k] for k in keys)
        else:
            sparse_model = sparsify(model, dict(plan), backend=getattr(self, "backend", "auto")).eval()
            while True:
                takes += 1
                measured, dense_measured = self.measure_models([sparse_model, model], x, reps=reps)
                # load only slows a measurement down: a dense model no slower than profiled is undisturbed
                agreed = ref[0] is None or dense_measured - ref[0] <= max(2 * (ref[1] or 0.0), 0.1 * ref[0])
                if agreed or takes > self.retakes:
                    break
            if agreed:
                self.cache[keys[0]], self.cache[keys[1]] = measured, dense_measured
                self.save_cache()
            else:
                warnings.warn(
                    f"latency: the machine looks loaded (load average {timing.load_average():.1f}): the dense model "
                    f"measured {dense_measured:.3f} ms against {ref[0]:.3f} ms (IQR {ref[1] or 0:.3f}) when "
                    f"profiled, in all {takes} takes; using the last one, not cached", RuntimeWarning, stacklevel=2)
        predicted = self.predict(plan)
        return {
            "predicted_ms": predicted, "measured_ms": measured, "rel_error": abs(predicted - measured) / measured,
            "dense_predicted_ms": self.dense_ms(), "dense_measured_ms": dense_measured,
            "predicted_speedup": self.dense_ms() / predicted, "measured_speedup": dense_measured / measured,
            "load_average": timing.load_average(), "takes": takes, "from_cache": from_cache, "loaded": not agreed,
        }

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
                jobs[key] = self._layer_call(layer, x)
        return jobs

    def _time_in_rounds(self, jobs: Dict[str, Callable[[], object]], progress: bool) -> Dict[str, timing.Timing]:
        """Each job's burst statistics: ``rounds`` passes over all jobs, each timing a burst of
        ``ceil(reps / rounds)`` calls of one job; returns one :class:`Timing` per job whose samples are
        the per-burst statistics (``stat``), so its minimum is the best round and its median/IQR the
        spread over rounds. Spreading a measurement's repeats over the whole profiling time (instead of
        one burst) makes the result robust to load that comes and goes on a shared machine."""
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
        return {key: timing.Timing(tuple(timing.Timing(t.samples_ms[r * burst:(r + 1) * burst]).stat(self.stat)
                                         for r in range(self.rounds)))
                for key, t in out.items()}

    def _reference_model(self, model: nn.Module, plan) -> nn.Module:
        """``model`` sparsified by ``plan`` with every pattern layer forced onto the sparse kernel."""
        from ..nn.conv import PatternConv2d
        from ..plan import sparsify

        ref = sparsify(model, plan, backend=self.backend).eval()
        for m in ref.modules():
            if isinstance(m, PatternConv2d):
                m.path = "sparse"
        return ref

    def _choose_route(self, sig: str, ref: nn.Module, x: torch.Tensor) -> str:
        """The faster candidate route for the reference plan (``ref``), raced once and cached."""
        keys = {r: self._key(sig, "route-race", r) for r in self.candidate_routes}
        if not all(k in self.cache for k in keys.values()):
            from ..deploy import deployed_form

            forms = {}
            for r in self.candidate_routes:
                try:
                    forms[r] = deployed_form(ref, x, r)
                except (RuntimeError, ValueError) as exc:
                    warnings.warn(f"latency: route {r!r} is not usable for this model ({exc})", RuntimeWarning,
                                  stacklevel=3)
            if not forms:
                raise RuntimeError("latency: no deployment route could be built for the model")
            with timing.threads(self.threads), torch.no_grad():
                out = timing.time_interleaved({r: (lambda f=f: f(x)) for r, f in forms.items()}, self.reps,
                                              max(1, self.warmup), rotate=True, device=self.device)
            for r, k in keys.items():
                if k not in self.cache:  # (only missing entries are written: a cached one stays as it was)
                    self.cache[k] = out[r].median_ms if r in out else float(1e300)
                    self.measurements += 1
        return min(keys, key=lambda r: self.cache[keys[r]])

    def _deployed_parts(self, model: nn.Module, ref: nn.Module, x: torch.Tensor, names: List[str]):
        """Zero-argument calls of the dense model, its remainder (prunable convs stubbed) and the reference
        plan's model, each in this latency model's form."""
        full = self._inference_form(model, x)
        source = getattr(full, "source", full)  # a DeployedModel runs its source module
        xin = x.contiguous(memory_format=torch.channels_last) if getattr(full, "channels_last", False) and x.ndim == 4 else x
        stubbed = stub_layers(source, xin, names)  # everything but the prunable convs
        ref_form = self._inference_form(ref, x)
        return {"remainder": lambda: stubbed(xin), "dense": lambda: full(x), "sparse_reference": lambda: ref_form(x)}

    def profile(self, model, example_input, progress: bool = False):
        """Measures (or loads from the cache) every prunable layer's dense time and its sparse grid, the
        dense model's remainder and the in-model factors, and (``form="deployed"``) which deployment
        route the model runs in; saves the cache. Every timing is cached by machine, build, threads,
        form and architecture, so a second profile of the same model reads them all back. Returns self."""
        from ..plan import uniform_plan

        layers = self._collect_layers(model, example_input)
        names = list(layers)
        reference_plan = uniform_plan(model, self.pattern_set, 0.5, layers=names)
        was_training = model.training
        model.eval()
        try:
            xm = example_input.to(self.device)
            sig = self._model_signature(model, xm)
            ref = self._reference_model(model, reference_plan)
            if self.form == "deployed" and self.fixed_route is None:
                self.route = self._choose_route(sig, ref, xm)
            whole_keys = {k: self._key(sig, self._form_tag(), k) for k in ("remainder", "dense", "sparse_reference")}
            whole = {}
            if not all(k in self.cache for k in whole_keys.values()):
                whole = self._deployed_parts(model, ref, xm, names)
            jobs = self._uncached_layer_jobs(layers)
            timed = self._time_in_rounds({**jobs, **{f"__{k}__": fn for k, fn in whole.items()}}, progress)
        finally:
            model.train(was_training)
        ref_keys = {"dense-median": self._key(sig, self._form_tag(), "dense-median"),
                    "dense-iqr": self._key(sig, self._form_tag(), "dense-iqr")}
        new: Dict[str, float] = {}
        if not all(k in self.cache for k in ref_keys.values()):
            # the dense model's reference for verify's load check, timed as verify times it
            _, dense_t = self._time_models([ref, model], xm, reps=max(20, self.reps))
            new.update({ref_keys["dense-median"]: dense_t.median_ms, ref_keys["dense-iqr"]: dense_t.iqr_ms})
        new.update({whole_keys[k]: timed.pop(f"__{k}__").min_ms for k in whole})
        new.update({k: t.min_ms for k, t in timed.items()})
        new = {k: v for k, v in new.items() if k not in self.cache}  # cached entries stay as they were
        self.cache.entries.update(new)
        self.measurements += len(new)
        model_ms = {k: self.cache[key] for k, key in whole_keys.items()}

        fused = fusable_epilogues(model, example_input, self.pattern_set, names)
        profile = Profile(
            layers=layers,
            dense_ms={n: self.measure_dense(info) for n, info in layers.items()},  # cached above
            grid={n: sorted((mask_kept_fraction(m), self.measure_sparse(info, m)) for m in self._grid_masks(info).values())
                  for n, info in layers.items()},
            remainder_ms=model_ms["remainder"],
            epilogue_ms={n: self.measure_epilogue(layers[n], *fused[n]) for n in names if n in fused},
            meta={"device": self.device_name, "backend": self.backend, "threads": self.threads, "stat": self.stat,
                  "version": __version__, "input_shape": list(example_input.shape), "form": self.form,
                  "route": self.route},
        )
        dense_layers = sum(profile.dense_ms.values())
        if self.route == "autosculpt_graph":
            # One C++ call runs every layer, so the layers timed alone (one executor step each) ARE what
            # the model spends in them; the remainder is the rest of the whole dense model's time (the
            # module-stubbed remainder would count Python calls this route does not make), and the
            # epilogues are fused alike in the dense and the pruned model.
            profile.remainder_ms = max(0.0, model_ms["dense"] - dense_layers)
            profile.epilogue_ms = {}
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
