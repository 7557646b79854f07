"""Channel groups: the sets of channels that must be removed together, found from the fx graph.

:func:`channel_groups` traces a model, runs it once on an example input and returns one
:class:`ChannelGroup` per set of coupled channels (see :mod:`autosculpt.channels._analysis` for how):

- a conv / linear's output channels with the next layers' input channels and the norms between
  (bottleneck and inverted-residual hidden channels, MLP hidden units);
- every tensor of a residual add shares its channel indices (a whole ResNet stage is one group);
- a concatenation: each part's producer is its own group, with its channel offset into the consumers;
- channel split / chunk and channel shuffle: the pieces must stay equal, so channel ``j`` of every
  piece goes together;
- squeeze-excitation: the per-channel scale (``x * s``) couples the SE's last layer to ``x``;
- BatchNorm / InstanceNorm / GroupNorm (whole normalization groups) / LayerNorm features, depthwise convs
  (coupled to their input), parameters added to the channels (ViT ``cls_token`` / ``pos_embed``);
- a flatten after pooling: channel ``c`` of a C×H×W map is the linear's input features
  ``c*H*W .. c*H*W + H*W - 1``;
- attention heads (``nn.MultiheadAttention`` and timm-style ``qkv`` / ``proj`` attention).

A group that touches an op the analysis cannot follow, the model's input or output, or a tensor used
in a way that would change if channels went (a reshape to a fixed size, slicing channels by position, a
reduction over channels) is listed with ``prunable=False`` and the reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from ._analysis import Analysis, ChannelTraceError, MemberKey, analyze

__all__ = ["ChannelMember", "ChannelGroup", "ChannelAnalysis", "channel_groups", "analyze_channels",
           "ChannelTraceError"]

# the weight dimensions a member can lose channels from
MEMBER_DIMS = ("out", "in", "features", "heads", "param", "key_in", "value_in")


@dataclass(frozen=True)
class ChannelMember:
    """One weight dimension of a group.

    Attributes:
        module: the module's name (``model.get_submodule``), or for ``dim == "param"`` the parameter's
            or buffer's dotted name.
        dim: ``"out"`` (output channels: conv filters, linear rows), ``"in"`` (input channels: conv / linear
            columns, an attention's query input), ``"features"`` (per-channel weights: BatchNorm, LayerNorm,
            GroupNorm, PReLU, and a depthwise conv's channels), ``"heads"`` (attention heads),
            ``"param"`` (a parameter's axis ``axis``), ``"key_in"`` / ``"value_in"`` (an attention's key and
            value inputs).
        indices: for each channel of the group, its indices along ``dim`` (several when one group channel
            covers several: a flatten's H*W features, a GroupNorm group, a depthwise multiplier).
        axis: the parameter axis (``dim == "param"`` only).
    """

    module: str
    dim: str
    indices: Tuple[Tuple[int, ...], ...]
    axis: Optional[int] = None

    @property
    def offset(self) -> int:
        """The first index this member's part of the group starts at (e.g. a concatenation's offset)."""
        return min(i for idx in self.indices for i in idx)

    @property
    def per_channel(self) -> int:
        """How many indices one group channel covers in this member."""
        return len(self.indices[0]) if self.indices else 0

    def describe(self) -> str:
        where = f"{self.module}.{self.dim}" + (f"[axis {self.axis}]" if self.axis is not None else "")
        extra = f" x{self.per_channel}" if self.per_channel != 1 else ""
        return f"{where}@{self.offset}{extra}"


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together.

    Attributes:
        id: its index in :func:`channel_groups`'s list (the key of a ``remove_channels`` request).
        channels: how many channels it has (removable one by one, each from every member).
        members: the weight dimensions each channel is removed from.
        prunable: False when some channel touches something that cannot lose channels (``reasons``).
        reasons: why it is not prunable.
        notes: caveats that do not block removal: a LayerNorm (or one-group GroupNorm) over these channels
            normalizes with statistics that change when channels go, so the shrunk model is then not the
            original with those channels zeroed (``exact`` is False).
        kind: ``"heads"`` for attention heads, ``"channels"`` otherwise.
    """

    id: int
    channels: int
    members: Tuple[ChannelMember, ...]
    prunable: bool
    reasons: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    kind: str = "channels"

    @property
    def exact(self) -> bool:
        """True when removing channels equals zeroing their inputs to the consumers (no norm statistics)."""
        return not self.notes

    def member(self, module: str, dim: Optional[str] = None) -> ChannelMember:
        """The member of ``module`` (and ``dim``); KeyError when there is none."""
        for m in self.members:
            if m.module == module and (dim is None or m.dim == dim):
                return m
        raise KeyError(f"group {self.id} has no member {module!r}" + (f" dim {dim!r}" if dim else ""))

    def modules(self) -> List[str]:
        """The names of the modules (and parameters) with a member, in order."""
        out: List[str] = []
        for m in self.members:
            if m.module not in out:
                out.append(m.module)
        return out

    def describe(self) -> str:
        state = "prunable" if self.prunable else "not prunable: " + "; ".join(self.reasons[:3])
        return f"group {self.id} ({self.kind}, {self.channels} channels, {state}): " + ", ".join(
            m.describe() for m in self.members)


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyze_channels`: the groups plus what ``remove_channels`` and
    ``fold_empty_filters`` need (the traced graph, each node's channel info, each channel's class)."""

    groups: List[ChannelGroup]
    analysis: Analysis = field(repr=False)
    class_roots: List[List[int]] = field(repr=False)  # group id -> channel -> union-find root
    input_shapes: Tuple[Tuple[int, ...], ...] = ()

    def root_of(self, key: MemberKey, index: int) -> Optional[int]:
        e = self.analysis.slots.get((key, index))
        return None if e is None else self.analysis.uf.find(e)

    def locate(self, module: str, dim: str, index: int, axis: Optional[int] = None) -> Optional[Tuple[int, int]]:
        """(group id, channel) of ``module``'s index ``index`` along ``dim``, or None if it is in no group."""
        root = self.root_of((module, dim, axis), index)
        if root is None:
            return None
        return self._root_index().get(root)

    def _root_index(self) -> Dict[int, Tuple[int, int]]:
        cache = self.__dict__.get("_roots")
        if cache is None:
            cache = {r: (g, k) for g, roots in enumerate(self.class_roots) for k, r in enumerate(roots)}
            self.__dict__["_roots"] = cache
        return cache


def _build_groups(a: Analysis) -> Tuple[List[ChannelGroup], List[List[int]]]:
    uf = a.uf
    classes: Dict[int, List[Tuple[MemberKey, int]]] = {}
    for (key, index), e in a.slots.items():
        classes.setdefault(uf.find(e), []).append((key, index))
    reasons: Dict[int, set] = {}
    for e, rs in uf.reasons.items():
        r = uf.find(e)
        if r in classes:
            reasons.setdefault(r, set()).update(rs)
    notes: Dict[int, set] = {}
    for e, ns in uf.notes.items():
        r = uf.find(e)
        if r in classes:
            notes.setdefault(r, set()).update(ns)
    order = a.key_order
    by_signature: Dict[tuple, List[int]] = {}
    first: Dict[int, tuple] = {}
    for root, slots in classes.items():
        keys = tuple(sorted({k for k, _ in slots}, key=order.__getitem__))
        sig = (keys, root in reasons)
        by_signature.setdefault(sig, []).append(root)
        first[root] = min((order[k], i) for k, i in slots)
    groups, roots_out = [], []
    for sig in sorted(by_signature, key=lambda s: min(first[r] for r in by_signature[s])):
        keys, blocked = sig
        roots = sorted(by_signature[sig], key=first.__getitem__)
        members = []
        per_class = {r: {} for r in roots}
        for r in roots:
            for k, i in classes[r]:
                per_class[r].setdefault(k, []).append(i)
        for k in keys:
            members.append(ChannelMember(k[0], k[1], tuple(tuple(sorted(per_class[r][k])) for r in roots), k[2]))
        rs = sorted(set().union(*(reasons.get(r, set()) for r in roots)))
        ns = sorted(set().union(*(notes.get(r, set()) for r in roots)))
        kind = "heads" if all(m.dim == "heads" for m in members) else "channels"
        groups.append(ChannelGroup(len(groups), len(roots), tuple(members), not blocked, tuple(rs), tuple(ns), kind))
        roots_out.append(roots)
    return groups, roots_out


def analyze_channels(model: nn.Module, example_input) -> ChannelAnalysis:
    """Traces ``model`` (``torch.fx``; :class:`ChannelTraceError` when it cannot) and runs it once on
    ``example_input`` (a tensor, or a tuple of positional inputs) to find its channel groups.

    The model runs in eval mode without gradients (its mode is restored; BatchNorm statistics are not
    updated)."""
    a = analyze(model, example_input)
    groups, roots = _build_groups(a)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    shapes = tuple(tuple(x.shape) for x in inputs if hasattr(x, "shape"))
    return ChannelAnalysis(groups, a, roots, shapes)


def channel_groups(model: nn.Module, example_input) -> List[ChannelGroup]:
    """The channel groups of ``model`` (see the module docstring), prunable or not, in graph order."""
    return analyze_channels(model, example_input).groups
