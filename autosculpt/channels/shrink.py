"""Physical channel removal: every member of a group becomes a smaller dense layer.

:func:`remove_channels` takes ``{group id: kept channel indices}`` (groups of :func:`channel_groups`)
and returns a copy of the model in which each member has lost the other channels: smaller
``Conv*d`` (a depthwise conv keeps ``groups == channels``; a ``PatternConv2d`` keeps the tap masks of
its kept filters), ``Linear``, ``BatchNorm`` / ``InstanceNorm`` / ``GroupNorm`` (whole groups) /
``LayerNorm``, ``PReLU``, ``Embedding``, sliced parameters (a ViT's ``cls_token`` / ``pos_embed``), and
attention with fewer heads or a narrower embedding (:class:`PrunedMultiheadAttention`, which
``nn.MultiheadAttention`` cannot express, and :class:`PrunedSelfAttention` for timm-style modules).

For an exact group (no LayerNorm statistics involved, see ``ChannelGroup.exact``) the result computes
what the original computes with the removed channels' inputs to their consumers zeroed. The new model is
run on the example input and every traced tensor's shape is checked against the analysis' prediction.
"""
from __future__ import annotations

import copy
import operator
from typing import Dict, Mapping, Optional, Sequence, Set

import torch
import torch.nn.functional as F
from torch import nn

from ._analysis import ChannelInfo, MemberKey, ParamInfo, TupleInfo, is_timm_attention, trace_model
from .groups import ChannelAnalysis, analyze_channels

__all__ = ["remove_channels", "ChannelShrinkError", "PrunedMultiheadAttention", "PrunedSelfAttention",
           "attention_replacement", "kept_indices"]


class ChannelShrinkError(RuntimeError):
    """The shrunk model does not have the shapes the channel analysis predicted (a bug or an op the
    analysis misread); the model is not returned."""


# --------------------------------------------------------------------------- attention


def _factory(t: torch.Tensor) -> dict:
    return {"device": t.device, "dtype": t.dtype}


def _copy_linear(dst: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    with torch.no_grad():
        dst.weight.copy_(weight)
        if dst.bias is not None:
            dst.bias.copy_(bias)


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def _float_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (without ``bias_k``/``bias_v``/``add_zero_attn``) with separate q/k/v
    projections whose inner width ``num_heads * head_dim`` need not equal the embedding: heads can be
    removed and the query / key / value inputs and the output can be narrower. Called like
    ``nn.MultiheadAttention`` (same arguments, returns ``(output, weights)``).

    ``head_ids`` are the original indices of the kept heads (a 3-D ``attn_mask`` is given per original
    head); the softmax scale stays ``head_dim ** -0.5``."""

    attention_kind = "mha"

    def __init__(self, q_in: int, k_in: int, v_in: int, out_features: int, num_heads: int, head_dim: int,
                 bias: bool = True, out_bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 head_ids: Optional[Sequence[int]] = None, original_heads: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(q_in, inner, bias, **f)
        self.k_proj = nn.Linear(k_in, inner, bias, **f)
        self.v_proj = nn.Linear(v_in, inner, bias, **f)
        self.out_proj = nn.Linear(inner, out_features, out_bias, **f)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.head_ids = list(range(num_heads)) if head_ids is None else [int(h) for h in head_ids]
        self.original_heads = num_heads if original_heads is None else original_heads

    @classmethod
    def from_module(cls, m: nn.Module) -> "PrunedMultiheadAttention":
        """The same function as ``m`` (an ``nn.MultiheadAttention`` or a PrunedMultiheadAttention)."""
        if isinstance(m, PrunedMultiheadAttention):
            return copy.deepcopy(m)
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(m).__name__}")
        if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
            raise ValueError("bias_k / bias_v / add_zero_attn are not supported")
        h, d = m.num_heads, m.head_dim
        if m.in_proj_weight is not None:
            wq, wk, wv = m.in_proj_weight.detach().chunk(3)
        else:
            wq, wk, wv = (w.detach() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
        bias = m.in_proj_bias is not None
        bq, bk, bv = m.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        new = cls(wq.shape[1], wk.shape[1], wv.shape[1], m.out_proj.out_features, h, d, bias,
                  m.out_proj.bias is not None, m.batch_first, m.dropout, **_factory(wq))
        _copy_linear(new.q_proj, wq, bq)
        _copy_linear(new.k_proj, wk, bk)
        _copy_linear(new.v_proj, wv, bv)
        _copy_linear(new.out_proj, m.out_proj.weight.detach(), None if m.out_proj.bias is None else m.out_proj.bias.detach())
        return new.train(m.training)

    def select(self, in_keep=None, key_keep=None, value_keep=None, out_keep=None, heads_keep=None):
        """A copy keeping the given query/key/value input columns, output rows and heads (None: all)."""
        heads = list(range(self.num_heads)) if heads_keep is None else [int(h) for h in heads_keep]
        rows = _head_rows(heads, self.head_dim)
        sel = {}
        for name, proj, keep in (("q", self.q_proj, in_keep), ("k", self.k_proj, key_keep),
                                 ("v", self.v_proj, value_keep)):
            w = proj.weight.detach()[rows]
            if keep is not None:
                w = w[:, torch.as_tensor(keep, dtype=torch.long)]
            sel[name] = (w, None if proj.bias is None else proj.bias.detach()[rows])
        wo = self.out_proj.weight.detach()[:, rows]
        bo = None if self.out_proj.bias is None else self.out_proj.bias.detach()
        if out_keep is not None:
            idx = torch.as_tensor(out_keep, dtype=torch.long)
            wo, bo = wo[idx], None if bo is None else bo[idx]
        new = PrunedMultiheadAttention(sel["q"][0].shape[1], sel["k"][0].shape[1], sel["v"][0].shape[1], wo.shape[0],
                                       len(heads), self.head_dim, self.q_proj.bias is not None, bo is not None,
                                       self.batch_first, self.dropout, [self.head_ids[h] for h in heads],
                                       self.original_heads, **_factory(wo))
        for name, proj in (("q", new.q_proj), ("k", new.k_proj), ("v", new.v_proj)):
            _copy_linear(proj, *sel[name])
        _copy_linear(new.out_proj, wo, bo)
        return new.train(self.training)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal needs attn_mask (as nn.MultiheadAttention)")
        n, length, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, length, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, s, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, s, h, d).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            m = _float_mask(attn_mask, q.dtype)
            if m.dim() == 3:
                m = m.view(n, self.original_heads, length, s)[:, self.head_ids]
            mask = m
        if key_padding_mask is not None:
            kpm = _float_mask(key_padding_mask, q.dtype).view(n, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            w = scores.softmax(-1)
            if p > 0:
                w = F.dropout(w, p)
            o = w @ v
            weights = w.mean(1) if average_attn_weights else w
            if unbatched:
                weights = weights[0]
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(o.transpose(1, 2).reshape(n, length, h * d))
        if unbatched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def macs(self, inputs: tuple, output) -> int:
        """Projections, q·k and p·v (count_macs); key/value given as keywords count as self-attention."""
        q = inputs[0]
        if q.dim() == 2:
            n, length = 1, q.shape[0]
        else:
            n, length = (q.shape[0], q.shape[1]) if self.batch_first else (q.shape[1], q.shape[0])
        k = inputs[1] if len(inputs) > 1 and isinstance(inputs[1], torch.Tensor) else q
        s = k.shape[0] if k.dim() == 2 else (k.shape[1] if self.batch_first else k.shape[0])
        inner = self.num_heads * self.head_dim
        proj = length * self.q_proj.in_features + s * (self.k_proj.in_features + self.v_proj.in_features)
        return n * (proj * inner + 2 * length * s * inner + length * inner * self.out_proj.out_features)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}/{self.original_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")


class PrunedSelfAttention(nn.Module):
    """timm-style self-attention (``qkv`` / ``proj`` linears, ``num_heads``; as
    :class:`autosculpt.models.vit.Attention`) whose inner width ``num_heads * head_dim`` need not equal the
    embedding, so heads can be removed and input / output narrowed. ``forward(x) -> tensor``."""

    attention_kind = "timm"

    def __init__(self, in_features: int, out_features: int, num_heads: int, head_dim: int, qkv_bias: bool = True,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(in_features, 3 * num_heads * head_dim, qkv_bias, **f)
        self.proj = nn.Linear(num_heads * head_dim, out_features, proj_bias, **f)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    @classmethod
    def from_module(cls, m: nn.Module) -> "PrunedSelfAttention":
        if isinstance(m, PrunedSelfAttention):
            return copy.deepcopy(m)
        if not is_timm_attention(m):
            raise TypeError(f"expected a timm-style attention (qkv, proj, num_heads), got {type(m).__name__}")
        for norm in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(m, norm, nn.Identity()), nn.Identity):
                raise ValueError(f"its {norm} is not supported")
        heads = m.num_heads
        head_dim = m.qkv.out_features // 3 // heads
        attn_drop = getattr(m, "attn_drop", 0.0)
        attn_drop = attn_drop.p if isinstance(attn_drop, nn.Dropout) else float(attn_drop or 0.0)
        proj_drop = getattr(m, "proj_drop", None)
        proj_drop = proj_drop.p if isinstance(proj_drop, nn.Dropout) else 0.0
        new = cls(m.qkv.in_features, m.proj.out_features, heads, head_dim, m.qkv.bias is not None,
                  m.proj.bias is not None, attn_drop, proj_drop, **_factory(m.qkv.weight))
        _copy_linear(new.qkv, m.qkv.weight.detach(), None if m.qkv.bias is None else m.qkv.bias.detach())
        _copy_linear(new.proj, m.proj.weight.detach(), None if m.proj.bias is None else m.proj.bias.detach())
        return new.train(m.training)

    def select(self, in_keep=None, out_keep=None, heads_keep=None) -> "PrunedSelfAttention":
        heads = list(range(self.num_heads)) if heads_keep is None else [int(h) for h in heads_keep]
        rows = _head_rows(heads, self.head_dim)
        inner = self.num_heads * self.head_dim
        qkv_rows = torch.cat([rows + part * inner for part in range(3)])
        w = self.qkv.weight.detach()[qkv_rows]
        b = None if self.qkv.bias is None else self.qkv.bias.detach()[qkv_rows]
        if in_keep is not None:
            w = w[:, torch.as_tensor(in_keep, dtype=torch.long)]
        wp = self.proj.weight.detach()[:, rows]
        bp = None if self.proj.bias is None else self.proj.bias.detach()
        if out_keep is not None:
            idx = torch.as_tensor(out_keep, dtype=torch.long)
            wp, bp = wp[idx], None if bp is None else bp[idx]
        new = PrunedSelfAttention(w.shape[1], wp.shape[0], len(heads), self.head_dim, b is not None, bp is not None,
                                  self.attn_drop, self.proj_drop.p, **_factory(w))
        _copy_linear(new.qkv, w, b)
        _copy_linear(new.proj, wp, bp)
        return new.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, h * d)))

    def macs(self, inputs: tuple, output) -> int:
        x = inputs[0]
        b, n = x.shape[0], x.shape[1]
        inner = self.num_heads * self.head_dim
        return b * (n * self.qkv.in_features * 3 * inner + 2 * n * n * inner + n * inner * self.proj.out_features)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}"


def attention_replacement(m: nn.Module) -> nn.Module:
    """The re-implementation of an attention leaf that can lose heads and channels (same function)."""
    if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        return PrunedMultiheadAttention.from_module(m)
    if isinstance(m, PrunedSelfAttention) or is_timm_attention(m):
        return PrunedSelfAttention.from_module(m)
    raise TypeError(f"{type(m).__name__} is not a supported attention module")


# --------------------------------------------------------------------------- layers


def _idx(keep) -> Optional[torch.Tensor]:
    return None if keep is None else torch.as_tensor(sorted(keep), dtype=torch.long)


def _shrink_conv(m: nn.Module, keep: Dict[str, torch.Tensor]) -> nn.Module:
    out_idx, in_idx, feat_idx = keep.get("out"), keep.get("in"), keep.get("features")
    w = m.weight.detach()
    if feat_idx is not None or (m.groups > 1 and m.groups == m.in_channels):
        mult = m.out_channels // m.in_channels
        rows = feat_idx if feat_idx is not None else torch.arange(m.out_channels)
        if len(rows) % mult:
            raise ValueError(f"{type(m).__name__}: a depthwise multiplier's outputs must go together")
        weight, groups, c_in = w[rows], len(rows) // mult, len(rows) // mult
        bias_rows = rows
    else:
        rows = out_idx if out_idx is not None else torch.arange(m.out_channels)
        cols = in_idx if in_idx is not None else torch.arange(w.shape[1])
        weight, groups, c_in, bias_rows = w[rows][:, cols], m.groups, len(cols) * m.groups, rows
    bias = None if m.bias is None else m.bias.detach()[bias_rows]
    if hasattr(m, "tap_mask"):  # PatternConv2d: the kept filters keep their tap masks
        new = type(m)(c_in, weight.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, groups, bias is not None,
                      tap_mask=m.tap_mask[bias_rows], backend=m.backend, path=m.path, activation=m.activation,
                      **_factory(w))
    else:
        base = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(m, c))
        new = base(c_in, weight.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, groups, bias is not None,
                   m.padding_mode, **_factory(w))
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    if hasattr(new, "enforce_mask"):
        new.enforce_mask()
    new.weight.requires_grad_(m.weight.requires_grad)
    return new.train(m.training)


def _shrink_linear(m: nn.Linear, keep) -> nn.Linear:
    rows = keep.get("out", torch.arange(m.out_features))
    cols = keep.get("in", torch.arange(m.in_features))
    new = nn.Linear(len(cols), len(rows), m.bias is not None, **_factory(m.weight))
    _copy_linear(new, m.weight.detach()[rows][:, cols], None if m.bias is None else m.bias.detach()[rows])
    return new.train(m.training)


def _copy_norm_state(new: nn.Module, m: nn.Module, idx: torch.Tensor) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor):
                getattr(new, name).copy_(p.detach()[idx])
        for name in ("running_mean", "running_var"):
            b = getattr(m, name, None)
            if isinstance(b, torch.Tensor):
                getattr(new, name).copy_(b[idx])
        if getattr(m, "num_batches_tracked", None) is not None and getattr(new, "num_batches_tracked", None) is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)


def _module_factory(m: nn.Module) -> dict:
    t = next(iter(m.parameters()), None)
    if t is None:
        t = next(iter(m.buffers()), None)
    return {} if t is None else _factory(t)


def _shrink_norm(m: nn.Module, keep) -> nn.Module:
    idx = keep["features"]
    f = _module_factory(m)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        new = type(m)(len(idx), eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats, **f)
        if hasattr(m, "process_group"):  # SyncBatchNorm
            new.process_group = m.process_group
    elif isinstance(m, nn.GroupNorm):
        if m.num_groups == m.num_channels:
            groups = len(idx)
        elif m.num_groups == 1:
            groups = 1
        else:  # whole normalization groups go (the analysis couples each group's channels)
            groups = len(idx) // (m.num_channels // m.num_groups)
        new = nn.GroupNorm(groups, len(idx), m.eps, m.affine, **f)
    elif isinstance(m, nn.LayerNorm):
        new = nn.LayerNorm((len(idx),), m.eps, m.elementwise_affine, bias=m.bias is not None, **f)
    elif isinstance(m, nn.PReLU):
        new = nn.PReLU(len(idx), **f)
    else:  # pragma: no cover - the analysis only gives features to the types above
        raise TypeError(f"cannot shrink {type(m).__name__}")
    _copy_norm_state(new, m, idx)
    for name in ("weight", "bias"):
        p, q = getattr(m, name, None), getattr(new, name, None)
        if isinstance(p, nn.Parameter) and isinstance(q, nn.Parameter):
            q.requires_grad_(p.requires_grad)
    return new.train(m.training)


def _shrink_embedding(m: nn.Embedding, keep) -> nn.Embedding:
    cols = keep["out"]
    new = nn.Embedding(m.num_embeddings, len(cols), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq,
                       m.sparse, **_factory(m.weight))
    with torch.no_grad():
        new.weight.copy_(m.weight.detach()[:, cols])
    return new.train(m.training)


def _shrink_attention(m: nn.Module, keep) -> nn.Module:
    rep = attention_replacement(m)
    if isinstance(rep, PrunedMultiheadAttention):
        return rep.select(keep.get("in"), keep.get("key_in"), keep.get("value_in"), keep.get("out"), keep.get("heads"))
    return rep.select(keep.get("in"), keep.get("out"), keep.get("heads"))


def _shrunk_module(m: nn.Module, keep: Dict[str, torch.Tensor]) -> nn.Module:
    from ._analysis import _is_conv

    if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention, PrunedSelfAttention)) or is_timm_attention(m):
        return _shrink_attention(m, keep)
    if _is_conv(m):
        return _shrink_conv(m, keep)
    if isinstance(m, nn.Linear):
        return _shrink_linear(m, keep)
    if isinstance(m, nn.Embedding):
        return _shrink_embedding(m, keep)
    return _shrink_norm(m, keep)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _shrink_param(root: nn.Module, target: str, keep_by_axis: Dict[int, torch.Tensor]) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    p = getattr(owner, attr)
    t = p.detach()
    for axis, idx in sorted(keep_by_axis.items()):
        t = t.index_select(axis, idx.to(t.device))
    t = t.clone()
    if isinstance(p, nn.Parameter):
        setattr(owner, attr, nn.Parameter(t, requires_grad=p.requires_grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = t
    else:
        setattr(owner, attr, t)


# --------------------------------------------------------------------------- removal


def kept_indices(analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int]]):
    """Validates a removal request; returns ({member key: removed indices}, {removed class roots})."""
    groups = analysis.groups
    removed: Dict[MemberKey, Set[int]] = {}
    roots: Set[int] = set()
    if not isinstance(keep, Mapping):
        raise TypeError(f"keep: expected a mapping of group id -> kept channel indices, got {type(keep).__name__}")
    for gid, kept in keep.items():
        given = gid
        try:
            gid = operator.index(gid)  # ints and numpy / torch integers, never bools or floats
        except TypeError:
            gid = None
        if gid is None or isinstance(given, bool) or not 0 <= gid < len(groups):
            raise ValueError(f"keep: {given!r} is not a group id (0..{len(groups) - 1})")
        g = groups[gid]
        kept_set = {operator.index(k) for k in kept}
        bad = [k for k in kept_set if not 0 <= k < g.channels]
        if bad:
            raise ValueError(f"keep[{gid}]: channel(s) {sorted(bad)[:5]} out of range for a group of {g.channels}")
        if len(kept_set) == g.channels:
            continue
        if not g.prunable:
            raise ValueError(f"keep[{gid}]: group {gid} is not prunable: {'; '.join(g.reasons[:3])}")
        if not kept_set:
            raise ValueError(f"keep[{gid}]: a group must keep at least one channel")
        for k in range(g.channels):
            if k in kept_set:
                continue
            roots.add(analysis.class_roots[gid][k])
            for m in g.members:
                removed.setdefault((m.module, m.dim, m.axis), set()).update(m.indices[k])
    return removed, roots


def _member_sizes(analysis: ChannelAnalysis) -> Dict[MemberKey, int]:
    sizes: Dict[MemberKey, int] = {}
    for (key, index) in analysis.analysis.slots:
        sizes[key] = max(sizes.get(key, 0), index + 1)
    return sizes


def remove_channels(model: nn.Module, example_input, keep: Mapping[int, Sequence[int]], *,
                    analysis: Optional[ChannelAnalysis] = None, verify: bool = True) -> nn.Module:
    """A copy of ``model`` in which each group ``g`` of ``keep`` keeps only channels ``keep[g]`` (indices into
    the group, see :func:`channel_groups`), every member physically smaller. ``model`` is not changed.

    Args:
        model: the model the groups were found on.
        example_input: the example input (a tensor or a tuple of inputs).
        keep: ``{group id: kept channel indices}``; groups not listed keep everything.
        analysis: the :func:`analyze_channels` result for ``model`` and ``example_input`` (computed when
            None; pass it to shrink the same model many times).
        verify: run the new model on the example input and check every traced tensor's shape against
            the analysis (:class:`ChannelShrinkError` on a mismatch).

    Raises ValueError for an unknown group, a group that is not prunable, an out-of-range or empty kept
    set, or a removal that would leave a layer without channels.
    """
    if analysis is None:
        analysis = analyze_channels(model, example_input)
    removed, roots = kept_indices(analysis, keep)
    sizes = _member_sizes(analysis)
    for key, idx in removed.items():
        if len(idx) >= sizes[key]:
            raise ValueError(f"removing these channels would leave {key[0]!r} ({key[1]}) with none")
    new = copy.deepcopy(model)
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    per_param: Dict[str, Dict[int, torch.Tensor]] = {}
    for key, idx in removed.items():
        name, dim, axis = key
        kept = _idx(i for i in range(sizes[key]) if i not in idx)
        if dim == "param":
            per_param.setdefault(name, {})[axis] = kept
        else:
            per_module.setdefault(name, {})[dim] = kept
    for name, dims in per_module.items():
        _set_submodule(new, name, _shrunk_module(new.get_submodule(name), dims))
    for target, axes in per_param.items():
        _shrink_param(new, target, axes)
    if verify:
        verify_shapes(analysis, new, example_input, removed, roots)
    return new


def _expected(analysis: ChannelAnalysis, info, shape, removed, roots):
    uf = analysis.analysis.uf
    if isinstance(info, TupleInfo) and isinstance(shape, list):
        return [_expected(analysis, i, s, removed, roots) for i, s in zip(info.items, shape)]
    if not isinstance(shape, tuple):
        return shape
    out = list(shape)
    if isinstance(info, ChannelInfo) and roots:
        out[info.cdim] = sum(1 for e in info.ids.tolist() if uf.find(e) not in roots)
    elif isinstance(info, ParamInfo):
        for d, axis in enumerate(info.axes):
            if axis is not None:
                gone = removed.get((info.target, "param", axis), ())
                out[d] = shape[d] - len(gone)
    return tuple(out)


def _record_shapes(model: nn.Module, example_input) -> Dict[str, object]:
    from ._analysis import _shape

    gm = trace_model(model)
    shapes: Dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            shapes[n.name] = _shape(value)
            return value

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was = model.training
    try:
        model.eval()
        gm.eval()
        with torch.no_grad():
            Recorder(gm).run(*args)
    finally:
        model.train(was)
    return shapes


def verify_shapes(analysis: ChannelAnalysis, new: nn.Module, example_input, removed, roots) -> None:
    """Runs ``new`` and compares each traced tensor's shape with what the analysis predicts after the
    removal; raises :class:`ChannelShrinkError` on the first difference."""
    try:
        got = _record_shapes(new, example_input)
    except Exception as exc:
        raise ChannelShrinkError(f"remove_channels: the shrunk model fails on the example input: "
                                 f"{type(exc).__name__}: {exc}") from exc
    a = analysis.analysis
    for name, shape in a.shapes.items():
        if name not in got or shape is None:
            continue
        want = _expected(analysis, a.infos.get(name), shape, removed, roots)
        if got[name] != want:
            raise ChannelShrinkError(f"remove_channels: node {name!r} of the shrunk model has shape {got[name]}, "
                                     f"the channel analysis predicted {want} (original {shape}); the model uses "
                                     "channels in a way the analysis misread")
