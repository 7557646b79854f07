"""The deployed form of a model: :func:`optimize_for_inference` builds the candidate inference forms of
a model (pruned or dense) on the example's device, measures them side by side and returns the fastest.

Candidates ("routes"):

* ``"autosculpt"``: :func:`autosculpt.fuse_for_inference` with ``dense_convs=True`` — BatchNorm folded,
  shortcut adds and ReLUs in the kernels' epilogues, AutoSculpt's max-pool, weights packed once
  (frozen layers), dense convs as all-taps pattern layers; each ``PatternConv2d`` with
  ``path="auto"`` then measures, in its place in this form and at the example's shape, whether
  AutoSculpt's kernel or torch's conv is faster (the per-layer dense fallback).
* ``"autosculpt_channels_last"``: the same fused form with weights and activations in channels_last
  (NHWC) from layer to layer: dense convs run in oneDNN's native layout without a reorder per call,
  pattern convs in AutoSculpt's NHWC kernel (path decisions measured again in this layout).
* ``"autosculpt_graph"``: the channels_last fused form run as one C++ call per forward
  (:class:`autosculpt.executor.GraphExecutorModel`): every conv and linear layer through AutoSculpt's
  NHWC kernel, pooling, adds and ReLUs in C++, activation buffers allocated once; no Python between
  layers. Models with an operation it does not cover (grouped convs, other activations...) skip it,
  with the reason in the report.
* ``"inductor"``: the NCHW fused form compiled by ``torch.compile`` (inductor, ``freezing=True``);
  the pattern layers stay one custom-op call each (no graph break).
* ``"inductor_channels_last"`` (models without pattern layers only): inductor with freezing on the
  model and input in channels_last, as one deploys a dense model with inductor.

All candidates are checked against the eager model's output on ``example_input`` before timing; one
that fails to build or disagrees is reported and skipped, never returned. Timing: warm-up, then
interleaved rounds (every candidate once per round, the order rotating), the median decides.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .timing import time_interleaved

__all__ = ["ROUTES", "QUICK_ROUTES", "CHANNELS_LAST_ROUTES", "FORMS", "DeploymentReport", "DeployedModel", "deployed_form",
           "optimize_for_inference", "timed_form"]

#: how AutoSculpt's measurements run a model: deployed (a route above), fused (NCHW ``for_inference``), eager
FORMS = ("deployed", "fused", "eager")

ROUTES = ("autosculpt", "autosculpt_channels_last", "autosculpt_graph", "inductor", "inductor_channels_last")
#: the routes that build in well under a second (no compilation): what the search's latency model races
QUICK_ROUTES = ("autosculpt", "autosculpt_channels_last", "autosculpt_graph")
#: the routes whose layers run on channels_last (NHWC) activations
CHANNELS_LAST_ROUTES = ("autosculpt_channels_last", "autosculpt_graph", "inductor_channels_last")


@dataclass
class DeploymentReport:
    """What :func:`optimize_for_inference` measured: the chosen route, each candidate's median and IQR
    (ms) at the example's shape and the thread count, and why a candidate was skipped."""

    route: str
    median_ms: Dict[str, float]
    iqr_ms: Dict[str, float]
    threads: int
    input_shape: tuple
    skipped: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{r}: {self.median_ms[r]:.3f} ms (IQR {self.iqr_ms[r]:.3f})" for r in self.median_ms]
        text = f"deployed route {self.route!r} at {self.threads} thread(s), input {self.input_shape}; " + "; ".join(parts)
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{r} ({why})" for r, why in self.skipped.items())
        return text


class DeployedModel(nn.Module):
    """The chosen inference form (``.inner``), its route and :class:`DeploymentReport`. Calling it runs
    ``inner`` under ``torch.no_grad()`` (converting the input to channels_last where the route needs it)."""

    def __init__(self, inner: Callable, route: str, report: Optional[DeploymentReport], channels_last: bool,
                 source: nn.Module):
        super().__init__()
        self.inner = inner if isinstance(inner, nn.Module) else None
        self._call = inner
        self.route = route
        self.report = report
        self.channels_last = channels_last
        self.source = source  # the fused (or channels_last) module the route runs: parameters, export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self._call(x)

    def extra_repr(self) -> str:
        return f"route={self.route!r}"


def _has_pattern_layers(model: nn.Module) -> bool:
    from .nn import PatternConv2d

    return any(isinstance(m, PatternConv2d) for m in model.modules())


def _interleaved_medians(fns: Dict[str, Callable[[], object]], rounds: int, min_time: float = 0.01):
    """(median ms, IQR ms) per candidate, rounds interleaved with a rotating order; each timing repeats
    the call until ``min_time`` seconds passed (short models), reported per call."""
    timings = time_interleaved(fns, rounds, warmup=1, rotate=True, min_time_s=min_time)
    return {name: (t.median_ms, t.iqr_ms) for name, t in timings.items()}


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    if out.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(out.float(), ref.float(), atol=1e-4 * max(1.0, scale), rtol=1e-3, equal_nan=True))


def optimize_for_inference(model: nn.Module, example_input: torch.Tensor, *,
                           routes: Optional[Sequence[str]] = None, rounds: int = 9,
                           log: Optional[Callable[[str], None]] = None) -> DeployedModel:
    """The fastest deployed form of ``model`` (pruned or dense) at ``example_input``'s shape, device and
    the current thread count (``torch.get_num_threads()``), as a :class:`DeployedModel`. Empty filters
    (pattern 0) are removed as channels first where that is exact (:func:`fold_empty_filters_exactly`).

    Args:
        model: an eval-mode model (``asc.sparsify`` output or any dense model torch.fx can trace).
        example_input: a batch of the model's input; its shape is the one measured.
        routes: candidates to try (default: every route in :data:`ROUTES` that applies).
        rounds: interleaved timing rounds.
        log: called with progress lines (building a compiled route takes tens of seconds).
    """
    _check_model_and_input(model, example_input)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds: expected a positive int, got {rounds!r}")
    pattern = _has_pattern_layers(model)
    wanted = list(routes) if routes is not None else [r for r in ROUTES if pattern is False or r != "inductor_channels_last"]
    for r in wanted:
        if r not in ROUTES:
            raise ValueError(f"routes: unknown route {r!r} (known: {', '.join(ROUTES)})")
    if pattern and "inductor_channels_last" in wanted:
        raise ValueError("routes: 'inductor_channels_last' is for models without pattern layers (their kernels take NCHW)")
    say = log or (lambda _msg: None)
    x = example_input.detach()
    candidates, skipped = _build_checked(model, x, wanted, say)
    if not candidates:
        raise RuntimeError(f"optimize_for_inference: no route could be built: {skipped}")
    xcl = x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    fns = {r: (lambda f=f, cl=cl: f(xcl if cl else x)) for r, (f, _s, cl) in candidates.items()}
    with torch.no_grad():
        stats = _interleaved_medians(fns, rounds)
    best = min(stats, key=lambda r: stats[r][0])
    report = DeploymentReport(best, {r: s[0] for r, s in stats.items()}, {r: s[1] for r, s in stats.items()},
                              torch.get_num_threads(), tuple(x.shape), skipped)
    say(report.summary())
    fn, source, cl = candidates[best]
    return DeployedModel(fn, best, report, cl, source)


def _check_model_and_input(model, example_input) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a torch.Tensor, got {type(example_input).__name__}")
    if model.training:
        raise ValueError("model: the deployed form needs an eval-mode model; call model.eval() first")


def fold_empty_filters_exactly(model: nn.Module, x: torch.Tensor,
                               say: Callable[[str], None] = lambda _m: None) -> nn.Module:
    """``model`` with its empty filters (pattern 0, all-zero rows) removed as channels where that is exact
    (:func:`autosculpt.channels.fold_empty_filters`: the constant folded into the consumers' biases, their
    input channels dropped), else ``model`` itself. Every route is built from the result and checked
    against the original model's output."""
    from .channels import ChannelTraceError, empty_filters, fold_empty_filters

    if not any(empty_filters(model).values()):
        return model
    try:
        result = fold_empty_filters(model, x)
    except ChannelTraceError as exc:  # the channels cannot be analysed: the filters stay (their bias only)
        warnings.warn(f"deploy: empty filters kept as channels: {exc}"[:400], RuntimeWarning, stacklevel=4)
        return model
    if result.folded:
        say(f"deploy: {len(result.folded)} empty filters removed as channels ({len(result.kept)} kept)")
        return result.model.eval()
    return model


def _build_checked(model: nn.Module, x: torch.Tensor, routes: Sequence[str], say: Callable[[str], None]):
    """({route: (callable, source, channels_last)}, {route: why skipped}) for the routes that build and
    agree with the eager model's output on ``x``."""
    from .fuse import fuse_for_inference

    with torch.no_grad():
        ref = model(x)
    model = fold_empty_filters_exactly(model, x, say)
    fused = fuse_for_inference(model, x, dense_convs=True)
    candidates: Dict[str, tuple] = {}
    skipped: Dict[str, str] = {}
    with torch.no_grad():
        fused(x)  # per-layer path decisions (dense fallback) measured in this form
    for route in routes:
        try:
            say(f"deploy: building route {route!r}")
            fn, source, cl = _build_route(route, model, fused, x)
            with torch.no_grad():
                out = fn(x.contiguous(memory_format=torch.channels_last) if cl else x)
            if not _close(out, ref):
                skipped[route] = "output differs from the eager model"
                continue
            candidates[route] = (fn, source, cl)
        except Exception as exc:  # noqa: BLE001 - a route that cannot be built here is reported, not fatal
            skipped[route] = f"{type(exc).__name__}: {exc}"[:300]
    return candidates, skipped


def deployed_form(model: nn.Module, example_input: torch.Tensor, route: str) -> DeployedModel:
    """``model`` in one given deployment route (no race between routes: the form a latency model times
    again and again once :func:`optimize_for_inference` or a profile has chosen the route). The form is
    checked against the eager model's output on ``example_input``; a route that cannot be built or
    disagrees raises ``RuntimeError`` saying why (never a silent fallback to another form)."""
    _check_model_and_input(model, example_input)
    if route not in ROUTES:
        raise ValueError(f"route: unknown route {route!r} (known: {', '.join(ROUTES)})")
    if route == "inductor_channels_last" and _has_pattern_layers(model):
        raise ValueError("route: 'inductor_channels_last' is for models without pattern layers")
    candidates, skipped = _build_checked(model, example_input.detach(), [route], lambda _m: None)
    if route not in candidates:
        raise RuntimeError(f"deployed_form: route {route!r} could not be used: {skipped.get(route)}")
    fn, source, cl = candidates[route]
    return DeployedModel(fn, route, None, cl, source)


def timed_form(model: nn.Module, example_input: torch.Tensor, form: str, routes: Sequence[str] = QUICK_ROUTES):
    """``(callable, route name)``: ``model`` as a measurement runs it. ``form`` is one of :data:`FORMS`;
    for ``"deployed"``, one route is built as it is (:func:`deployed_form`) and several are raced
    (:func:`optimize_for_inference`). A model torch.fx cannot trace is run as given, with a
    ``RuntimeWarning`` saying so (its timing is still correct, only of the eager model)."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    if form == "eager":
        return model, "eager"
    if form == "fused":
        from .fuse import for_inference

        with torch.no_grad():
            return for_inference(model, example_input), "fused"
    routes = tuple(routes)
    try:
        if len(routes) == 1:
            return deployed_form(model, example_input, routes[0]), routes[0]
        deployed = optimize_for_inference(model, example_input, routes=routes, rounds=5)
    except ValueError as exc:  # not traceable by torch.fx
        warnings.warn(f"{type(model).__name__} cannot be deployed ({exc}); timing it unfused", RuntimeWarning,
                      stacklevel=3)
        return model, "eager"
    return deployed, deployed.route


def _build_route(route: str, model: nn.Module, fused: nn.Module, x: torch.Tensor):
    """(callable, module it runs, channels_last input) for one route."""
    if route == "autosculpt":
        return fused, fused, False
    if route in ("autosculpt_channels_last", "autosculpt_graph"):
        import copy

        cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            cl(xcl)  # per-layer path decisions in this layout
        if route == "autosculpt_graph":
            from .executor import GraphExecutorModel

            return GraphExecutorModel(cl, xcl), cl, True
        return cl, cl, True
    from torch._inductor import config as inductor_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if route == "inductor":
            with inductor_config.patch(freezing=True):
                compiled = torch.compile(fused)
                with torch.no_grad():
                    compiled(x)  # compile now, with freezing on
            return compiled, fused, False
        import copy

        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(cl_model)
            with torch.no_grad():
                compiled(x.contiguous(memory_format=torch.channels_last))
        return compiled, cl_model, True
