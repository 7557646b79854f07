"""Pattern 0 as real channel removal: fold the constant output of an empty filter into its consumers.

A filter whose weights are all zero (a ``PatternConv2d`` filter with pattern 0, or a plain conv / linear
row zeroed by hand) still produces an output channel: its bias, then whatever per-channel ops follow
(BatchNorm in eval mode, ReLU...), the same value at every position. :func:`fold_empty_filters` adds that
constant's contribution to each consumer's bias and removes the channel from the producer, the norms and
the consumers (its whole channel-group channel), so the model computes the same function with fewer
channels.

Folding is exact when the constant reaches every consumer unchanged at every position, so a channel is
folded only when:

- its channel-group channel holds no other producer (a residual add would add a non-constant) and no
  parameter, and is prunable at all (see :func:`autosculpt.channels.channel_groups`);
- between the filter and each consumer there are only per-channel ops: BatchNorm / InstanceNorm / PReLU,
  activations and dropout, pooling, reshapes and concatenations, depthwise convs without padding, and
  elementwise ops with scalars (no LayerNorm / GroupNorm statistics, no product with another tensor);
- every consumer is a linear layer or a groups=1 conv **without padding** (a padded conv would see the
  constant only inside the image, so its border outputs differ), called once;
- the value is constant over every position of the example input (checked numerically: this catches
  e.g. average pooling with padding).

Anything else keeps the channel, and :class:`FoldResult.kept` says why. The constants are those of eval
mode (BatchNorm running statistics).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ._analysis import ChannelInfo, TupleInfo, _is_conv
from .groups import ChannelAnalysis, analyze_channels
from .shrink import remove_channels

__all__ = ["FoldResult", "fold_empty_filters", "empty_filters"]


@dataclass
class FoldResult:
    """What :func:`fold_empty_filters` did.

    Attributes:
        model: the new model (the input model is not changed).
        folded: ``(module, filter index)`` of each empty filter removed, its constant folded.
        kept: ``(module, filter index, reason)`` of each empty filter kept.
    """

    model: nn.Module
    folded: List[Tuple[str, int]] = field(default_factory=list)
    kept: List[Tuple[str, int, str]] = field(default_factory=list)


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    if hasattr(m, "tap_mask"):
        w = w * m.tap_mask[:, None].to(w.dtype)
    return w


def empty_filters(model: nn.Module) -> Dict[str, List[int]]:
    """``{module name: [output channels whose weights are all zero]}`` over the convs (plain and
    ``PatternConv2d``: taps outside the mask count as zero) and linears of ``model``."""
    out = {}
    for name, m in model.named_modules():
        if not (_is_conv(m) or isinstance(m, nn.Linear)):
            continue
        w = _weight(m)
        empty = (w.reshape(w.shape[0], -1) == 0).all(dim=1).nonzero().flatten().tolist()
        if empty:
            out[name] = empty
    return out


def _carries(analysis: ChannelAnalysis, info, root: int) -> bool:
    uf = analysis.analysis.uf
    if isinstance(info, ChannelInfo):
        return any(uf.find(e) == root for e in info.ids.tolist())
    if isinstance(info, TupleInfo):
        return any(_carries(analysis, i, root) for i in info.items)
    return False


def _positions(analysis: ChannelAnalysis, info: ChannelInfo, root: int) -> List[int]:
    uf = analysis.analysis.uf
    return [p for p, e in enumerate(info.ids.tolist()) if uf.find(e) == root]


def _zero_padding(m: nn.Module) -> bool:
    pad = m.padding
    if isinstance(pad, str):
        return pad == "valid"
    return all(p == 0 for p in pad)


def _trace_constant(analysis: ChannelAnalysis, producer: str, root: int):
    """Walks from ``producer``'s node through the ops that carry the class ``root``; returns
    ([(consumer module, consumer node, input node)], None) or (None, why not)."""
    a = analysis.analysis
    gm = a.module
    nodes = {n.name: n for n in gm.graph.nodes}
    start = nodes[a.module_calls[producer][0]]
    consumers = []
    frontier, seen = [start], {start.name}
    while frontier:
        node = frontier.pop()
        for u in node.users:
            kind = a.kinds.get(u.name)
            info = a.infos.get(u.name)
            if kind in ("conv", "linear"):
                m = gm.get_submodule(u.target)
                if u.args[0] is not node:
                    return None, f"{u.name} takes it as a fused residual"
                if kind == "conv" and not _zero_padding(m):
                    return None, (f"consumer {u.target!r} pads its input: the constant is not exact at the borders, "
                                  "so the channel is kept")
                if len(a.module_calls.get(u.target, ())) != 1:
                    return None, f"consumer {u.target!r} is called more than once"
                consumers.append((u.target, u.name, node.name))
                continue
            if not _carries(analysis, info, root):
                continue  # e.g. a chunk piece or a slice without this channel
            if kind == "depthwise":
                if not _zero_padding(gm.get_submodule(u.target)):
                    return None, f"depthwise conv {u.target!r} pads: the constant is not exact at the borders"
            elif kind == "norm":
                pass
            elif kind == "elementwise":
                for arg in u.args:
                    if isinstance(arg, torch.fx.Node) and arg is not node:
                        shape = a.shapes.get(arg.name)
                        if isinstance(shape, tuple) and int(torch.Size(shape).numel()) > 1:
                            return None, f"{u.name} combines it with another tensor ({arg.name})"
            elif kind in ("spatial", "reduce", "structural"):
                pass
            elif kind in ("layernorm", "groupnorm"):
                return None, f"{u.target} normalizes it together with other channels"
            else:
                return None, f"it reaches {u.name} ({kind or u.op})"
            if u.name not in seen:
                seen.add(u.name)
                frontier.append(u)
    return consumers, None


def _plan_fold(analysis: ChannelAnalysis, producer: str, channel: int, empty: Set[int]):
    """(group id, group channel, consumers) for an empty filter that can be folded, or a reason string."""
    a = analysis.analysis
    calls = a.module_calls.get(producer, [])
    if len(calls) != 1:
        return "the module is not called exactly once"
    kind = a.kinds.get(calls[0])
    dim = {"conv": "out", "linear": "out", "depthwise": "features"}.get(kind)
    if dim is None:
        return "only groups=1 / depthwise convs and linears are folded"
    loc = analysis.locate(producer, dim, channel)
    if loc is None:
        return "the channel is in no channel group"
    gid, k = loc
    g = analysis.groups[gid]
    if not g.prunable:
        return f"its channel group {gid} is not prunable: {'; '.join(g.reasons[:2])}"
    root = analysis.class_roots[gid][k]
    for m in g.members:
        if m.dim == "param":
            return f"parameter {m.module!r} is combined with the channel"
        if m.module == producer:
            if not set(m.indices[k]) <= empty:
                return "the depthwise multiplier's other filters are not empty"
        elif m.dim == "out" and kind != "depthwise":
            # (a depthwise filter's input channel is in its class: the producer upstream of it goes too)
            return f"the channel is coupled to {m.module!r}'s output (a residual add or similar): not constant"
    consumers, why = _trace_constant(analysis, producer, root)
    if why:
        return why
    readers = {m.module for m in g.members if m.dim in ("in", "key_in", "value_in")}
    missing = readers - {c[0] for c in consumers}
    if missing:
        return f"{sorted(missing)[0]!r} reads the channel without it passing through the empty filter"
    if not consumers:
        return "the channel has no consumer to fold into"
    return gid, k, root, consumers


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm, wanted: Set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = value.detach().clone()
        return value


def _capture(analysis: ChannelAnalysis, model: nn.Module, example_input, wanted: Set[str]) -> Dict[str, torch.Tensor]:
    gm = analysis.analysis.module
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    cap = _Capture(gm, wanted)
    was = model.training
    try:
        model.eval()
        gm.eval()
        with torch.no_grad():
            cap.run(*args)
    finally:
        model.train(was)
    return cap.values


def fold_empty_filters(model: nn.Module, example_input, *, analysis: Optional[ChannelAnalysis] = None) -> FoldResult:
    """Removes the output channels of ``model`` whose filters are all zero, folding their constant output
    into the consumers' biases (see the module docstring for when this is exact, and :class:`FoldResult`).

    Args:
        model: any fx-traceable model with ``nn.Conv*d`` / ``PatternConv2d`` / ``nn.Linear`` layers.
        example_input: an example input (a tensor or tuple); the constants are checked on it.
        analysis: the :func:`analyze_channels` result of ``model`` (computed when None).
    """
    if analysis is None:
        analysis = analyze_channels(model, example_input)
    result = FoldResult(model)
    plans = []
    for producer, channels in empty_filters(model).items():
        empty = set(channels)
        for c in channels:
            plan = _plan_fold(analysis, producer, c, empty)
            if isinstance(plan, str):
                result.kept.append((producer, c, plan))
            else:
                plans.append((producer, c) + plan)
    # one channel of a class is enough (a depthwise multiplier's filters share one)
    by_root, plans_unique = {}, []
    for p in plans:
        if p[4] not in by_root:
            by_root[p[4]] = p
            plans_unique.append(p)
        else:
            result.folded.append((p[0], p[1]))  # removed with the class's first filter
    # every group keeps at least one channel
    per_group: Dict[int, List] = {}
    for p in plans_unique:
        per_group.setdefault(p[2], []).append(p)
    for gid, ps in per_group.items():
        if len(ps) == analysis.groups[gid].channels:
            last = ps.pop()
            result.kept.append((last[0], last[1], "it is the last channel of its group"))
            plans_unique.remove(last)
    # the constant each consumer receives, measured
    wanted = {inp for p in plans_unique for (_, _, inp) in p[5]}
    values = _capture(analysis, model, example_input, wanted) if wanted else {}
    a = analysis.analysis
    folds: Dict[str, torch.Tensor] = {}
    accepted = []
    for producer, c, gid, k, root, consumers in plans_unique:
        deltas, why = {}, None
        for module, _node, inp in consumers:
            info = a.infos[inp]
            x = values[inp]
            m = model.get_submodule(module)
            w = _weight(m).double()
            delta = torch.zeros(w.shape[0], dtype=torch.float64)
            for p in _positions(analysis, info, root):
                v = x.select(info.cdim, p).double()
                v0 = v.reshape(-1)[0]
                if float((v - v0).abs().max()) > 1e-6 + 1e-5 * abs(float(v0)):
                    why = f"its value at {module!r}'s input is not constant over positions (padding or pooling)"
                    break
                col = w[:, p]
                delta += float(v.mean()) * (col.reshape(col.shape[0], -1).sum(1))
            if why:
                break
            deltas[module] = delta
        if why:
            result.kept.append((producer, c, why))
            continue
        for module, delta in deltas.items():
            folds[module] = folds.get(module, 0) + delta
        accepted.append((producer, c, gid, k))
    work = copy.deepcopy(model)
    for module, delta in folds.items():
        m = work.get_submodule(module)
        old = m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype,
                                                                     device=m.weight.device)
        new_bias = (old.double() + delta.to(old.device)).to(m.weight.dtype)
        m.bias = nn.Parameter(new_bias, requires_grad=m.weight.requires_grad)
    keep: Dict[int, Set[int]] = {}
    for producer, c, gid, k in accepted:
        keep.setdefault(gid, set(range(analysis.groups[gid].channels))).discard(k)
        result.folded.append((producer, c))
    result.model = remove_channels(work, example_input, {g: sorted(s) for g, s in keep.items()}, analysis=analysis) \
        if keep else work
    result.folded.sort()
    result.kept.sort()
    return result
