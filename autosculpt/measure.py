"""Counting and timing whole models: parameters, FLOPs that actually run, measured latency.

Used by the CLI summary, ``autosculpt bench`` and the report. FLOPs are multiply-accumulates of
convolutions and linear layers for one sample; a pattern conv counts only its kept taps. Latency is
the median (and IQR) of interleaved repeats (dense and pruned alternate, so machine noise hits both
alike), each model in its deployed form (:func:`autosculpt.optimize_for_inference`) unless told otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .timing import load_average, time_interleaved

__all__ = ["count_params", "count_flops", "LatencyStat", "measure_latency", "measure_latency_stats", "layer_latency"]


def _pattern_conv_cls():
    from .nn.conv import PatternConv2d

    return PatternConv2d


def count_params(model: nn.Module) -> int:
    """Parameters that are not pruned: a pattern conv's weight counts only its kept taps."""
    pc = _pattern_conv_cls()
    total = 0
    pruned_weights = set()
    for m in model.modules():
        if isinstance(m, pc):
            per_filter = m.weight.shape[1]
            total += int(m.tap_mask.sum()) * per_filter
            pruned_weights.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in pruned_weights:
            total += p.numel()
    return total


@torch.no_grad()
def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of conv, linear and attention layers for ONE sample of ``example_input``'s
    shape (:func:`autosculpt.flops.count_macs` on the first sample)."""
    from .flops import count_macs

    return int(count_macs(model, example_input[:1])["total"])


@dataclass(frozen=True)
class LatencyStat:
    """One model's end-to-end latency: median and IQR (ms) of interleaved repeats, the form it ran in
    (a route of :mod:`autosculpt.deploy`, or "fused" / "eager") and the 1-minute load average when the
    timing ended."""

    median_ms: float
    iqr_ms: float
    route: str
    load_average: float

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "route": self.route,
                "load_average": self.load_average}




@torch.no_grad()
def measure_latency_stats(models: Dict[str, nn.Module], example_input: torch.Tensor, *, reps: int = 30,
                          warmup: int = 3, min_seconds: float = 0.0, progress: bool = False, desc: str = "latency",
                          form: str = "deployed", routes: Optional[Sequence[str]] = None) -> Dict[str, LatencyStat]:
    """Each model's end-to-end latency on ``example_input`` as a :class:`LatencyStat`, interleaved.

    Args:
        models: name -> model (eval mode is used and restored).
        example_input: the batch to time (its batch size is the one measured).
        reps: timed repeats per model (at least; more if ``min_seconds`` is not reached).
        warmup: untimed calls first (pattern layers pick their path, packing, allocator).
        form: ``"deployed"`` (default): each model in its fastest deployed form
            (:func:`autosculpt.optimize_for_inference` over ``routes``), as a user deploys it;
            ``"fused"``: :func:`autosculpt.fuse.for_inference`; ``"eager"``: as given.
        routes: the deployment routes to race (default :data:`autosculpt.deploy.QUICK_ROUTES`;
            :data:`autosculpt.deploy.ROUTES` adds the inductor routes, which compile for tens of seconds).
    """
    from .deploy import FORMS, QUICK_ROUTES, timed_form

    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    bar, last = None, list(models)[-1] if models else None
    try:
        timed = {k: timed_form(m, example_input, form, routes or QUICK_ROUTES) for k, m in models.items()}
        if progress:
            from ._optional import tqdm

            bar = tqdm(total=reps, desc=desc, unit="rep", leave=False, dynamic_ncols=True)

        def on_burst(r: int, name: str) -> None:  # one tick per round over all models
            if bar is not None and name == last and r < reps:
                bar.update(1)

        timings = time_interleaved({k: (lambda f=f: f(example_input)) for k, (f, _r) in timed.items()}, reps, warmup,
                                   min_total_s=min_seconds, device=example_input.device, on_burst=on_burst)
    finally:
        if bar is not None:
            bar.close()
        for k, m in models.items():
            m.train(modes[k])
    load = load_average()
    return {k: LatencyStat(t.median_ms, t.iqr_ms, timed[k][1], load) for k, t in timings.items()}


@torch.no_grad()
def measure_latency(models: Dict[str, nn.Module], example_input: torch.Tensor, *, reps: int = 30, warmup: int = 3,
                    min_seconds: float = 0.0, progress: bool = False, desc: str = "latency",
                    form: str = "deployed", routes: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Median forward latency in milliseconds of each model on ``example_input``, interleaved, in
    ``form`` (:func:`measure_latency_stats`, whose arguments these are)."""
    stats = measure_latency_stats(models, example_input, reps=reps, warmup=warmup, min_seconds=min_seconds,
                                  progress=progress, desc=desc, form=form, routes=routes)
    return {k: s.median_ms for k, s in stats.items()}


@torch.no_grad()
def layer_latency(dense: nn.Module, pruned: nn.Module, example_input: torch.Tensor, *, reps: int = 20,
                  progress: bool = False) -> List[dict]:
    """Per pruned layer: median ms of the dense layer and of its pattern-sparse replacement on the
    layer's real input, plus the path the replacement runs ("sparse" kernel or "dense" fallback)."""
    pc = _pattern_conv_cls()
    dense_mods = dict(dense.named_modules())
    targets = [(n, m) for n, m in pruned.named_modules() if isinstance(m, pc) and n in dense_mods]
    inputs: Dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].detach()))
               for n, m in targets]
    was = pruned.training
    pruned.eval()
    try:
        pruned(example_input)
    finally:
        for h in handles:
            h.remove()
        pruned.train(was)
    rows = []
    it = targets
    if progress:
        from ._optional import tqdm

        it = tqdm(targets, desc="layer latency", unit="layer", leave=False, dynamic_ncols=True)
    for name, m in it:
        x = inputs[name]
        t = measure_latency({"dense": dense_mods[name], "pruned": m}, x, reps=reps, warmup=2, form="eager")
        rows.append({"layer": name, "dense_ms": t["dense"], "pruned_ms": t["pruned"], "path": m.active_path(x),
                     "kept": m.kept_fraction(), "input_shape": list(x.shape)})
    return rows


def effective_summary(model: nn.Module, example_input: torch.Tensor) -> Dict[str, Optional[float]]:
    """``{"params": ..., "flops": ...}`` of a model (pruned taps excluded)."""
    return {"params": count_params(model), "flops": count_flops(model, example_input)}
