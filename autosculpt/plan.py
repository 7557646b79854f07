"""Pruning plans: plain JSON data saying how each prunable module is sparsified, and ``sparsify``.

A plan is ``{"version": 1, "layers": {module_name: layer_plan}}``. Each ``layer_plan`` is the JSON
of a typed layer plan (a :class:`LayerPlan` dataclass with ``to_json`` / ``from_json``), told apart by
its ``"kind"``. Each kind is defined beside the module it builds and registers itself here
(:func:`register_kind`), so this module imports none of them (``import autosculpt`` imports
:mod:`autosculpt.nn`, which registers them all, before anything can call :func:`sparsify`):

- ``"conv"`` (:class:`autosculpt.nn.conv.ConvPlan`): ``{"kind": "conv", "pattern_set":
  PatternSet.to_json(), "pattern_ids": [C_out ints]}`` turns an ``nn.Conv2d`` into a ``PatternConv2d``
  with ``tap_mask = masks[pattern_ids]``.
- ``"linear"`` (:class:`autosculpt.nn.linear.LinearPlan`) and ``"attention"``
  (:class:`autosculpt.nn.attention.AttentionPlan`).

Every pattern module's ``layer_plan()`` returns the JSON that rebuilds it from its dense module.
Parsing is strict (:func:`plan_int`, :func:`plan_bool`, unknown fields are errors); the JSON format is
the one plans have always had, so old files still load.

**Version 2** holds physical channel removal and per-layer structures in one plan::

    {"version": 2, "channels": <ChannelPlan.to_dict() or null>, "layers": {module_name: layer_plan}}

:func:`sparsify` applies the ``channels`` part first (:meth:`ChannelPlan.apply`: every member of a
channel group becomes a smaller dense layer, the module names stay those of the dense model), then the
``layers`` part to that channel-pruned model: a layer plan's module name and sizes (a conv's
``C_out``) are those of the channel-pruned model. Channel removal traces the model, so it needs an
example input (``sparsify(..., example_input=x)``; without one, zeros of the channel plan's recorded
``input_shape``). A version-2 plan whose ``channels`` is null (or absent) is the version-1 plan with
the same layers; :func:`make_plan` writes version 1 whenever there is no channel removal, so plans
without it stay readable by older releases.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Dict, Iterable, Optional, Tuple, Type

import torch
from torch import nn

from .patterns import PatternSet

__all__ = ["PLAN_VERSION", "PLAN_VERSIONS", "LATEST_PLAN_VERSION", "make_plan", "plan_channels", "channel_plan_of",
           "LayerPlan", "register_kind", "layer_plan_type", "layer_plan_from_json", "parse_plan",
           "validate_plan", "sparsify", "set_submodule", "plan_int", "plan_bool", "plan_int_list", "plan_fields",
           "is_prunable_conv", "conv_layer_plan", "dense_plan", "uniform_plan", "level_counts",
           "CHANNEL_PLAN_VERSION", "ChannelPlan", "PrunableStructures", "prunable_structures", "plan_for_mac_cut"]

#: the version of a plan of per-layer structures only (what the search writes)
PLAN_VERSION = 1
#: the version of a plan that can also remove channels (``"channels"``, applied before ``"layers"``)
LATEST_PLAN_VERSION = 2
#: the plan versions this release reads
PLAN_VERSIONS = (1, 2)
# kind -> its LayerPlan dataclass
_KINDS: Dict[str, Type["LayerPlan"]] = {}


def plan_int(value, name: str) -> int:
    """An integer field of a plan: a JSON integer (``3`` or ``3.0``), never a bool or a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def plan_bool(value, name: str) -> bool:
    """A boolean field of a plan: JSON ``true``/``false`` only (``"no"`` is not ``True``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value


def plan_int_list(value, name: str, what: str = "integers") -> tuple:
    """A list field of integers (each as :func:`plan_int`), as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of {what}, got {type(value).__name__}")
    return tuple(plan_int(v, name) for v in value)


def plan_index_list(value, name: str, size: int) -> tuple:
    """A list field of indices into a set of ``size`` patterns (each as :func:`plan_int`), as a tuple."""
    ids = plan_int_list(value, name)
    for i in ids:
        if not 0 <= i < size:
            raise ValueError(f"{name}: {i} is out of range for a set of {size} patterns")
    return ids


def plan_fields(data, kind: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict:
    """Checks that ``data`` is a layer plan of ``kind`` with the ``required`` fields and no field other
    than those and the ``optional`` ones; returns it."""
    if not isinstance(data, dict):
        raise ValueError(f"{kind} layer plan: expected a dict, got {type(data).__name__}")
    if data.get("kind") != kind:
        raise ValueError(f"{kind} layer plan: expected kind {kind!r}, got {data.get('kind')!r}")
    required, optional = tuple(required), tuple(optional)
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{kind} layer plan: missing {', '.join(missing)}")
    unknown = sorted(str(k) for k in data if k not in ("kind",) + required + optional)
    if unknown:
        raise ValueError(f"{kind} layer plan: unknown field(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(required + optional)})")
    return data


class LayerPlan:
    """How one module is sparsified: the base of the typed layer plans, one frozen dataclass per kind.

    A kind subclasses this beside the module it builds, sets ``kind``, implements the three methods and
    registers itself with :func:`register_kind`. ``from_json`` checks everything that does not depend on
    the model (types, ranges, unknown fields); ``apply`` checks the rest against the module.
    """

    kind: ClassVar[str] = ""

    def to_json(self) -> dict:
        """The layer plan as JSON data (``{"kind": ..., ...}``), the format files hold."""
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: dict) -> "LayerPlan":
        """Parses (strictly) the JSON written by :meth:`to_json`; raises ValueError on bad data."""
        raise NotImplementedError

    def apply(self, module: nn.Module, backend: str) -> nn.Module:
        """The sparse replacement of ``module`` (which the plan names); raises TypeError/ValueError when
        the module does not fit the plan."""
        raise NotImplementedError


def register_kind(plan_type: Type[LayerPlan]) -> Type[LayerPlan]:
    """Registers a :class:`LayerPlan` subclass for its ``kind`` (usable as a class decorator)."""
    if not (isinstance(plan_type, type) and issubclass(plan_type, LayerPlan)) or not plan_type.kind:
        raise TypeError(f"register_kind: expected a LayerPlan subclass with a kind, got {plan_type!r}")
    _KINDS[plan_type.kind] = plan_type
    return plan_type


def layer_plan_type(kind: str) -> Type[LayerPlan]:
    """The registered :class:`LayerPlan` class of ``kind``; ValueError for an unknown kind."""
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {sorted(_KINDS)})")
    return _KINDS[kind]


def layer_plan_from_json(data: dict) -> LayerPlan:
    """Parses one layer plan of any registered kind."""
    if not isinstance(data, dict):
        raise ValueError(f"layer plan: expected a dict, got {type(data).__name__}")
    return layer_plan_type(data.get("kind")).from_json(data)


def conv_layer_plan(pattern_set: PatternSet, pattern_ids) -> dict:
    """The layer plan for a conv whose filters get ``pattern_ids`` from ``pattern_set`` (the JSON of
    :class:`autosculpt.nn.conv.ConvPlan`)."""
    return layer_plan_type("conv")(pattern_set, [int(i) for i in pattern_ids]).to_json()


def make_plan(layers: Optional[dict] = None, channels=None) -> dict:
    """A plan from its parts: ``layers`` (``{module name: layer plan JSON}``) and ``channels`` (a
    :class:`ChannelPlan`, its JSON, or None). Version 1 without channel removal, else version 2."""
    layers = dict(layers or {})
    if channels is None:
        return {"version": PLAN_VERSION, "layers": layers}
    if isinstance(channels, ChannelPlan):
        channels = channels.to_dict()
    return {"version": LATEST_PLAN_VERSION, "channels": channels, "layers": layers}


def _check_plan_header(plan) -> None:
    if not isinstance(plan, dict):
        raise ValueError(f"plan: expected a dict, got {type(plan).__name__}")
    version = plan.get("version")
    if isinstance(version, bool) or version not in PLAN_VERSIONS:
        raise ValueError(f"plan: expected version {' or '.join(map(str, PLAN_VERSIONS))}, got {version!r}")
    if version >= 2:
        unknown = sorted(str(k) for k in plan if k not in ("version", "channels", "layers"))
        if unknown:
            raise ValueError(f"plan: unknown field(s) {', '.join(map(repr, unknown))} in a version-2 plan "
                             "(known: version, channels, layers)")


def parse_plan(plan: dict) -> Dict[str, LayerPlan]:
    """Checks a plan (not against a model) and parses its layers: ``{module name: LayerPlan}``. Raises
    ValueError on bad data, naming the layer. (A version-2 plan's channel part: :func:`plan_channels`.)"""
    _check_plan_header(plan)
    layers = plan.get("layers", {} if plan["version"] >= 2 else None)
    if not isinstance(layers, dict):
        raise ValueError("plan: 'layers' must be a dict of module name -> layer plan")
    parsed = {}
    for name, layer in layers.items():
        if not isinstance(name, str) or not isinstance(layer, dict):
            raise ValueError(f"plan: layer {name!r} must map a module name to a dict")
        kind = layer.get("kind")
        if kind not in _KINDS:
            raise ValueError(f"plan: layer {name!r} has unknown kind {kind!r} (known: {sorted(_KINDS)})")
        try:
            parsed[name] = _KINDS[kind].from_json(layer)
        except ValueError as e:
            raise ValueError(f"plan: layer {name!r}: {e}") from None
    return parsed


def plan_channels(plan: dict) -> Optional["ChannelPlan"]:
    """The channel removal of a plan (its ``"channels"``, parsed), or None: a version-1 plan, or a
    version-2 plan without channel removal. Raises ValueError on bad data."""
    _check_plan_header(plan)
    data = plan.get("channels") if plan["version"] >= 2 else None
    if data is None:
        return None
    try:
        return ChannelPlan.from_dict(data)
    except ValueError as e:
        raise ValueError(f"plan: channels: {e}") from None


def validate_plan(plan: dict) -> dict:
    """Checks a plan's structure, every layer plan's fields and (version 2) its channel plan, not
    against a model; returns it. Raises ValueError on bad data."""
    parse_plan(plan)
    plan_channels(plan)
    return plan


def sparsify(model: nn.Module, plan: dict, *, example_input=None, inplace: bool = False,
             backend: str = "auto") -> nn.Module:
    """Applies a plan to a model: channel removal first (version 2), then each named module is replaced
    by its pattern-sparse version.

    Args:
        model: any ``nn.Module`` whose submodule names match the plan's (for a version-2 plan with
            channel removal: the *dense* model the channel plan was made for).
        plan: a plan dict (see module docstring); validated first.
        example_input: an input the model is traced and run on to find its channel groups (a tensor, or a
            tuple of positional inputs); only used when the plan removes channels. When None, zeros of
            the channel plan's recorded ``input_shape`` (float, on the model's device) are used.
        inplace: modify ``model`` itself instead of a deep copy (not possible when the plan removes
            channels: that builds a new, smaller model).
        backend: kernel backend for the new layers.
    Raises ValueError for a bad plan or a model it does not fit (``example_input`` named when it is
    missing or unusable), KeyError for a module name the model lacks.
    """
    layers = parse_plan(plan)
    channels = plan_channels(plan)
    if channels is None:
        target = model if inplace else copy.deepcopy(model)
    else:
        if inplace:
            raise ValueError("inplace: the plan removes channels, which builds a new, smaller model; "
                             "call sparsify with inplace=False and use the model it returns")
        target = _apply_channels(model, channels, example_input)
    modules = dict(target.named_modules())
    for name, layer in layers.items():
        if name not in modules:
            where = " (after channel removal)" if channels is not None else ""
            raise KeyError(f"plan: module {name!r} not found in {type(model).__name__}{where}")
        set_submodule(target, name, layer.apply(modules[name], backend))
    return target


def _apply_channels(model: nn.Module, channels: "ChannelPlan", example_input) -> nn.Module:
    """``channels.apply(model, example_input)`` with errors that name ``example_input``."""
    from .channels import ChannelTraceError

    if example_input is None and not channels.input_shape:
        raise ValueError("example_input: the plan removes channels, which traces the model on an example input, "
                         "and its channel plan records no input_shape; pass sparsify(model, plan, example_input=x)")
    try:
        return channels.apply(model, example_input)
    except ChannelTraceError as e:
        if example_input is not None:
            raise
        raise ValueError(f"example_input: channel removal traced {type(model).__name__} on zeros of the channel "
                         f"plan's input_shape {list(channels.input_shape)} and failed ({e}); pass the model's "
                         "example_input") from e


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the submodule ``name`` (dotted, e.g. ``"layer1.0.conv1"``) of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def is_prunable_conv(module: nn.Module, pattern_set: Optional[PatternSet]) -> bool:
    """THE definition of a prunable conv (the search's graph, the latency model and the plans here all
    use it): an ``nn.Conv2d`` (or an already sparse conv: a module with a ``tap_mask``) whose kernel
    matches ``pattern_set``'s (any kernel when None) and that uses plain numeric zero padding, i.e.
    exactly the convs :meth:`autosculpt.nn.PatternConv2d.from_dense` accepts."""
    if not isinstance(module, nn.Conv2d) and not hasattr(module, "tap_mask"):
        return False
    ks = tuple(getattr(module, "kernel_size", ()))
    if pattern_set is not None and ks != tuple(pattern_set.kernel_size):
        return False
    if isinstance(getattr(module, "padding", 0), str) or getattr(module, "padding_mode", "zeros") != "zeros":
        return False
    return True


def _dense_prunable_convs(model: nn.Module, pattern_set: PatternSet):
    """(name, conv) of the dense convs a plan can sparsify (:func:`is_prunable_conv`)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and is_prunable_conv(m, pattern_set):
            yield name, m


def dense_plan(model: nn.Module, pattern_set: PatternSet) -> dict:
    """A plan that keeps every tap of every prunable conv (:func:`is_prunable_conv`: kernel matching
    ``pattern_set``'s, zero padding): the identity plan."""
    full = int(torch.argmax(pattern_set.kept_taps()))
    layers = {}
    for name, m in _dense_prunable_convs(model, pattern_set):
        layers[name] = conv_layer_plan(pattern_set, [full] * m.out_channels)
    return {"version": PLAN_VERSION, "layers": layers}


def level_counts(pattern_set: PatternSet, n_filters: int, kept_fraction: float) -> list:
    """How many of ``n_filters`` get each pattern so the mean kept fraction is ``kept_fraction``.

    Uses the two kept-fraction levels of the set that bracket the target (e.g. PAPER6's 1/3 and 2/3
    for 0.5), and spreads each level's filters over the patterns of that level in whole kernel blocks
    (:func:`autosculpt.patterns.block_friendly_counts`). The result's kept fraction is the closest
    reachable with whole filters.
    """
    if not 0.0 <= kept_fraction <= 1.0:
        raise ValueError(f"kept_fraction: expected a value in [0, 1], got {kept_fraction}")
    fr = pattern_set.kept_fractions().tolist()
    levels = sorted(set(fr))
    hi = next(level for level in levels if level >= kept_fraction - 1e-12)
    lo = max((level for level in levels if level <= kept_fraction + 1e-12), default=hi)
    if hi == lo:
        n_hi = n_filters
    else:
        n_hi = int(round(n_filters * (kept_fraction - lo) / (hi - lo)))
    counts = [0] * len(pattern_set)
    for level, n in ((hi, n_hi), (lo, n_filters - n_hi)):
        if n == 0:
            continue
        members = [i for i, f in enumerate(fr) if f == level]
        for j, p in enumerate(members):
            counts[p] += n // len(members) + (1 if j < n % len(members) else 0)
    from .patterns import block_friendly_counts

    return block_friendly_counts(pattern_set, counts)


def uniform_plan(model: nn.Module, pattern_set: PatternSet, kept_fraction: float, layers=None) -> dict:
    """The same pattern mix in every prunable conv (:func:`is_prunable_conv`: kernel matching the set,
    zero padding), filters assigned by weight energy (:func:`autosculpt.patterns.assign`). ``layers``
    restricts it to some module names."""
    from .patterns import assign

    out = {}
    for name, m in _dense_prunable_convs(model, pattern_set):
        if layers is not None and name not in layers:
            continue
        counts = level_counts(pattern_set, m.out_channels, kept_fraction)
        out[name] = conv_layer_plan(pattern_set, assign(m.weight, pattern_set, counts))
    return {"version": PLAN_VERSION, "layers": out}


# --------------------------------------------------------------------------- channel plans and prunable structures

CHANNEL_PLAN_VERSION = 1
# where ChannelPlan.apply records itself on the model it builds (a plain attribute: deep copies keep it)
_CHANNEL_PLAN_ATTR = "_autosculpt_channel_plan"
_COMPOSED = "composed"


def _channel_fingerprint(group) -> Tuple[str, ...]:
    return tuple(f"{m.module}:{m.dim}" + (f":{m.axis}" if m.axis is not None else "") for m in group.members)


@dataclass(frozen=True)
class ChannelPlan:
    """Physical channel removal for a whole model: the kept channels of each channel group
    (:func:`autosculpt.channels.channel_groups`), applied with :func:`autosculpt.channels.remove_channels`.

    JSON (:meth:`to_dict`): ``{"kind": "channels", "version": 1, "input_shape": [...], "groups": [{"id": g,
    "channels": n, "members": ["module:dim", ...], "keep": [...]}], "keep_ratio": r, "mac_cut": c}``.
    ``members`` fingerprints each group so a plan applied to another architecture is an error, not a
    silently different model; ``keep_ratio`` (the kept fraction of all the groups' channels) and
    ``mac_cut`` (the cut measured when planned) are informational.
    """

    kind: ClassVar[str] = "channels"
    keep: Dict[int, Tuple[int, ...]]
    group_sizes: Dict[int, int]
    members: Dict[int, Tuple[str, ...]]
    input_shape: Tuple[int, ...]
    keep_ratio: Optional[float] = None
    mac_cut: Optional[float] = None

    def to_dict(self) -> dict:
        groups = [{"id": g, "channels": self.group_sizes[g], "members": list(self.members[g]),
                   "keep": list(self.keep[g])} for g in sorted(self.keep)]
        return {"kind": self.kind, "version": CHANNEL_PLAN_VERSION, "input_shape": list(self.input_shape),
                "groups": groups, "keep_ratio": self.keep_ratio, "mac_cut": self.mac_cut}

    @classmethod
    def from_dict(cls, data: dict) -> "ChannelPlan":
        """Parses (strictly) the JSON written by :meth:`to_dict`; ValueError on bad data."""
        if not isinstance(data, dict):
            raise ValueError(f"channel plan: expected a dict, got {type(data).__name__}")
        if data.get("kind") != cls.kind:
            raise ValueError(f"channel plan: expected kind {cls.kind!r}, got {data.get('kind')!r}")
        if data.get("version") != CHANNEL_PLAN_VERSION:
            raise ValueError(f"channel plan: expected version {CHANNEL_PLAN_VERSION}, got {data.get('version')!r}")
        unknown = sorted(set(data) - {"kind", "version", "input_shape", "groups", "keep_ratio", "mac_cut"})
        if unknown:
            raise ValueError(f"channel plan: unknown field(s) {', '.join(map(repr, unknown))}")
        shape = plan_int_list(data.get("input_shape"), "input_shape")
        groups = data.get("groups")
        if not isinstance(groups, list):
            raise ValueError("channel plan: 'groups' must be a list")
        keep, sizes, members = {}, {}, {}
        for i, g in enumerate(groups):
            plan_fields({"kind": "group", **g} if isinstance(g, dict) else g, "group",
                        ("id", "channels", "members", "keep"))
            gid = plan_int(g["id"], f"groups[{i}].id")
            n = plan_int(g["channels"], f"groups[{i}].channels")
            kept = plan_int_list(g["keep"], f"groups[{i}].keep")
            if not kept or len(set(kept)) != len(kept) or not all(0 <= k < n for k in kept):
                raise ValueError(f"groups[{i}].keep: expected distinct channels in 0..{n - 1}, at least one")
            if not isinstance(g["members"], list) or not all(isinstance(m, str) for m in g["members"]):
                raise ValueError(f"groups[{i}].members: expected a list of strings")
            if gid in keep:
                raise ValueError(f"groups[{i}].id: group {gid} listed twice")
            keep[gid], sizes[gid], members[gid] = tuple(sorted(kept)), n, tuple(g["members"])
        ratio, cut = data.get("keep_ratio"), data.get("mac_cut")
        for name, v in (("keep_ratio", ratio), ("mac_cut", cut)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{name}: expected a number or null, got {v!r}")
        return cls(keep, sizes, members, shape, None if ratio is None else float(ratio),
                   None if cut is None else float(cut))

    def apply(self, model: nn.Module, example_input=None) -> nn.Module:
        """The model with the plan's channels removed (a new model; ``model`` is not changed). Without an
        ``example_input``, zeros of ``input_shape`` are used to find the groups. Raises ValueError when the
        model's channel groups are not the ones the plan was made for."""
        from .channels import analyze_channels, remove_channels

        if example_input is None:
            if not self.input_shape:
                raise ValueError("channel plan: no input_shape recorded (the plan was made on several inputs); "
                                 "pass example_input")
            p = next(iter(model.parameters()), None)
            example_input = torch.zeros(self.input_shape, device=None if p is None else p.device)
        analysis = analyze_channels(model, example_input)
        for gid, kept in self.keep.items():
            if gid >= len(analysis.groups):
                raise ValueError(f"channel plan: group {gid} does not exist in {type(model).__name__}")
            g = analysis.groups[gid]
            if g.channels != self.group_sizes[gid] or _channel_fingerprint(g) != self.members[gid]:
                raise ValueError(f"channel plan: group {gid} of {type(model).__name__} ({g.describe()[:200]}) is not "
                                 "the group the plan was made for")
        small = remove_channels(model, example_input, dict(self.keep), analysis=analysis)
        # The result remembers the plan that built it (so io.save writes it into the model's plan); a model
        # channel-pruned twice has no single channel plan of its dense model.
        already = getattr(model, _CHANNEL_PLAN_ATTR, None)
        object.__setattr__(small, _CHANNEL_PLAN_ATTR, self if already is None else _COMPOSED)
        return small


def channel_plan_of(model: nn.Module) -> Optional[ChannelPlan]:
    """The :class:`ChannelPlan` that built ``model`` (recorded by :meth:`ChannelPlan.apply`, hence by
    :func:`sparsify` with a version-2 plan and by ``autosculpt.load``), or None for a model whose
    channels were not removed by a plan. Raises ValueError for a model channel-pruned twice (no single
    plan of the dense model describes it)."""
    record = getattr(model, _CHANNEL_PLAN_ATTR, None)
    if record is _COMPOSED or (record is not None and not isinstance(record, ChannelPlan)):
        raise ValueError(f"{type(model).__name__} was channel-pruned more than once; no single channel plan of its "
                         "dense model describes it (prune the dense model with one plan)")
    return record


@dataclass(frozen=True)
class PrunableStructures:
    """What :func:`prunable_structures` found.

    Attributes:
        channel_groups: the prunable channel groups (:class:`autosculpt.channels.ChannelGroup`).
        unprunable_groups: the other groups, each with its ``reasons``.
        pattern_convs: the convs a pattern plan can sparsify (:func:`is_prunable_conv`).
        attention: the attention modules (heads / attention patterns).
        total_macs: the model's MACs on the example input (:func:`autosculpt.flops.count_macs`).
        layer_macs: MACs per counted layer.
        mac_share: fraction of ``total_macs`` in the layers each kind can prune: ``"channel_groups"``
            (layers with a member in a prunable group), ``"pattern_convs"``, ``"attention"``. A layer can
            belong to several kinds, so the shares overlap.
    """

    channel_groups: Tuple
    unprunable_groups: Tuple
    pattern_convs: Tuple[str, ...]
    attention: Tuple[str, ...]
    total_macs: int
    layer_macs: Dict[str, int]
    mac_share: Dict[str, float]

    def summary(self) -> str:
        """A few lines for people."""
        share = ", ".join(f"{k} {v:.1%}" for k, v in self.mac_share.items())
        return (f"{len(self.channel_groups)} prunable channel groups ({len(self.unprunable_groups)} not), "
                f"{len(self.pattern_convs)} pattern convs, {len(self.attention)} attention modules; "
                f"{self.total_macs} MACs; MAC share: {share}")


def _is_attention_module(m: nn.Module) -> bool:
    from .channels import is_timm_attention

    return isinstance(m, nn.MultiheadAttention) or hasattr(m, "attention_kind") or is_timm_attention(m) or (
        hasattr(m, "head_patterns") and hasattr(m, "num_heads"))


def prunable_structures(model: nn.Module, example_input, pattern_set: Optional[PatternSet] = None) -> PrunableStructures:
    """Lists what can be pruned in ``model``: channel groups (found from its fx graph), convs whose
    kernel matches ``pattern_set`` (PAPER6's 3×3 by default) for pattern plans, and attention modules,
    with the share of the model's MACs each kind covers (see :class:`PrunableStructures`)."""
    from .channels import analyze_channels
    from .flops import count_macs
    from .patterns import PAPER6

    pattern_set = PAPER6 if pattern_set is None else pattern_set
    analysis = analyze_channels(model, example_input)
    macs = count_macs(model, example_input)
    layer_macs, total = dict(macs["layers"]), int(macs["total"])
    prunable = tuple(g for g in analysis.groups if g.prunable)
    blocked = tuple(g for g in analysis.groups if not g.prunable)
    modules = dict(model.named_modules())
    convs = tuple(name for name, m in modules.items() if name and is_prunable_conv(m, pattern_set))
    attention = tuple(name for name, m in modules.items() if name and _is_attention_module(m))
    in_groups = {m.module for g in prunable for m in g.members if m.dim != "param"}

    def share(names) -> float:
        return sum(v for k, v in layer_macs.items() if k in names) / total if total else 0.0

    return PrunableStructures(prunable, blocked, convs, attention, total, layer_macs,
                              {"channel_groups": share(in_groups), "pattern_convs": share(set(convs)),
                               "attention": share(set(attention))})


def plan_for_mac_cut(model: nn.Module, example_input, mac_cut: float, *, norm: str = "l1", exact_only: bool = False,
                     rel_tol: float = 0.005, max_iter: int = 40, multiple: Optional[int] = None) -> ChannelPlan:
    """A uniform channel plan that divides the model's MACs by ``mac_cut`` (2.0 = half the MACs).

    Every prunable channel group keeps the same fraction ``r`` of its channels (at least one), the ones
    with the largest magnitude (:func:`autosculpt.channels.group_importance`, ``norm`` "l1" or "l2");
    ``r`` is found by bisection on the MACs of the shrunk model, measured with
    :func:`autosculpt.flops.count_macs` on ``example_input``, until they are within ``rel_tol`` of the
    target or no group's count changes any more. ``exact_only`` leaves out the groups whose removal
    changes LayerNorm statistics (e.g. a ViT's embedding width).

    ``multiple`` rounds each group's kept count to a multiple of it (at least one multiple; a group no
    larger than it stays whole), so that the CPU kernels run whole 16-lane vectors of output channels
    (a 37-channel layer computes 48 lanes): resnet18, 3x cut, batch 1, graph-executor route: 2.40x
    measured unrounded, 2.82x rounded to 16. None (default): 16, else 8, else 1 - the coarsest whose
    plan lands within 3% of the cut (small models fall back to finer steps); 1: no rounding.

    Raises ValueError when the cut is below 1, when nothing can be pruned, or when even one channel per
    group does not reach it (the message states the largest reachable cut).
    """
    from .channels import analyze_channels, group_importance, remove_channels
    from .flops import count_macs

    if isinstance(mac_cut, bool) or not isinstance(mac_cut, (int, float)) or not mac_cut >= 1.0:
        raise ValueError(f"mac_cut: expected a number >= 1 (2.0 = half the MACs), got {mac_cut!r}")
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ValueError(f"multiple: expected None (automatic) or a positive int (1: no rounding), got {multiple!r}")
    analysis = analyze_channels(model, example_input)
    groups = [g for g in analysis.groups if g.prunable and (g.exact or not exact_only)]
    if not groups and mac_cut > 1.0:
        raise ValueError(f"plan_for_mac_cut: {type(model).__name__} has no prunable channel group")
    total = int(count_macs(model, example_input)["total"])
    if total <= 0:
        raise ValueError(f"plan_for_mac_cut: {type(model).__name__} has no counted MACs")
    ranked = {}
    for g in groups:
        score = group_importance(model, g, norm)
        ranked[g.id] = sorted(range(g.channels), key=lambda i: (-float(score[i]), i))

    cache: Dict[tuple, int] = {}

    def count(ratio: float, channels: int, step: int) -> int:
        if step > 1:
            if channels <= step:
                return channels
            return min(channels, max(step, int(round(ratio * channels / step)) * step))
        return max(1, min(channels, int(round(ratio * channels))))

    def counts_for(ratio: float, step: int) -> Tuple[int, ...]:
        return tuple(count(ratio, g.channels, step) for g in groups)

    def keep_of(counts: Tuple[int, ...]) -> Dict[int, Tuple[int, ...]]:
        return {g.id: tuple(sorted(ranked[g.id][:k])) for g, k in zip(groups, counts)}

    def keep_for(ratio: float, step: int) -> Dict[int, Tuple[int, ...]]:
        return keep_of(counts_for(ratio, step))

    def macs_of(counts: Tuple[int, ...]) -> int:
        if counts not in cache:
            small = remove_channels(model, example_input, keep_of(counts), analysis=analysis, verify=False)
            cache[counts] = int(count_macs(small, example_input)["total"])
        return cache[counts]

    def macs_for(ratio: float, step: int) -> int:
        return macs_of(counts_for(ratio, step))

    def refine(counts: Tuple[int, ...], step: int) -> Tuple[int, ...]:
        """Moves groups one rounding step up or down (never below one step) while that brings the MACs
        closer to the target: with coarse steps a single ratio jumps past the cut (CIFAR ResNets'
        16-channel groups keep 8 or 16), a mix of neighbouring steps lands on it."""
        best, err = counts, abs(macs_of(counts) - target)
        for _ in range(4 * len(groups)):
            moves = []
            for i, g in enumerate(groups):
                if g.channels <= step:
                    continue
                for d in (-step, step):
                    k = best[i] + d
                    if step <= k <= g.channels:
                        cand = best[:i] + (k,) + best[i + 1:]
                        moves.append((abs(macs_of(cand) - target), cand))
            if not moves:
                break
            e, cand = min(moves)
            if e >= err:
                break
            best, err = cand, e
        return best

    target = total / float(mac_cut)

    def solve(step: int) -> Tuple[float, int, int]:
        """(keep ratio, its MACs, the MACs at the smallest keep) for one rounding step: bisection."""
        low_macs = macs_for(0.0, step)
        best_ratio, best_macs = (0.0, low_macs) if abs(low_macs - target) < abs(total - target) else (1.0, total)
        if low_macs > target * (1.0 + rel_tol):
            return best_ratio, best_macs, low_macs
        lo, hi = 0.0, 1.0
        for _ in range(max_iter):
            mid = 0.5 * (lo + hi)
            m = macs_for(mid, step)
            if abs(m - target) < abs(best_macs - target):
                best_ratio, best_macs = mid, m
            if abs(m - target) <= rel_tol * target:
                break
            if m > target:
                hi = mid
            else:
                lo = mid
            if keep_for(lo, step) == keep_for(hi, step):
                break
        return best_ratio, best_macs, low_macs

    best_ratio, best_macs, step = 1.0, total, 1
    best_counts = counts_for(1.0, 1)
    if mac_cut > 1.0:
        steps = [multiple] if multiple is not None else [16, 8, 1]
        for step in steps:
            best_ratio, best_macs, low_macs = solve(step)
            best_counts = counts_for(best_ratio, step)
            reachable = low_macs <= target * (1.0 + rel_tol)
            if reachable and step > 1 and abs(total / best_macs - mac_cut) > 0.03 * mac_cut:
                best_counts = refine(best_counts, step)
                best_macs = macs_of(best_counts)
            # automatic rounding: the coarsest step whose plan is within 3% of the cut
            if multiple is not None or reachable and abs(total / best_macs - mac_cut) <= 0.03 * mac_cut:
                break
        if low_macs > target * (1.0 + rel_tol):
            left = "one channel" if step == 1 else f"min(group size, {step}) channels"
            raise ValueError(f"plan_for_mac_cut: a {mac_cut:g}x MAC cut is unreachable for {type(model).__name__} by "
                             f"uniform channel removal; the largest reachable cut is {total / low_macs:.3f}x "
                             f"({left} left in each of its {len(groups)} prunable groups)")
    keep = keep_of(best_counts)
    shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else ()
    # the kept fraction of the groups' channels (the bisection's uniform ratio before refine moved groups)
    kept = sum(best_counts) / float(max(1, sum(g.channels for g in groups)))
    return ChannelPlan({g: keep[g] for g in keep}, {g.id: g.channels for g in groups},
                       {g.id: _channel_fingerprint(g) for g in groups}, shape, kept, total / best_macs)
