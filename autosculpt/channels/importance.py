"""Magnitude importance of each channel of a group: the L1 or squared-L2 norm of the weights the channel
removes, summed over the group's members (conv / linear rows and columns, norm scales, attention head
slices, parameter slices)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .groups import ChannelGroup, ChannelMember

__all__ = ["member_weights", "group_importance", "channel_importance", "keep_most_important"]


def _masked_weight(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    if hasattr(m, "tap_mask"):  # a PatternConv2d: only the kept taps count
        w = w * m.tap_mask[:, None].to(w.dtype)
    return w


def _head_slices(m: nn.Module, h: int):
    """The weights head ``h`` of an attention module removes: its q/k/v rows and output columns."""
    d = m.head_dim
    rows = slice(h * d, (h + 1) * d)
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        if m.in_proj_weight is not None:
            w = m.in_proj_weight.detach()
            parts = [w[rows], w[e + h * d:e + (h + 1) * d], w[2 * e + h * d:2 * e + (h + 1) * d]]
        else:
            parts = [p.detach()[rows] for p in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
        return parts + [m.out_proj.weight.detach()[:, rows]]
    if hasattr(m, "q_proj"):  # PrunedMultiheadAttention
        return [p.weight.detach()[rows] for p in (m.q_proj, m.k_proj, m.v_proj)] + [m.out_proj.weight.detach()[:, rows]]
    inner = m.num_heads * d  # timm-style qkv / proj
    w = m.qkv.weight.detach()
    return [w[part * inner + h * d:part * inner + (h + 1) * d] for part in range(3)] + [m.proj.weight.detach()[:, rows]]


def _attention_matrix(m: nn.Module, dim: str) -> torch.Tensor:
    """An attention module's weight whose columns (inputs) or rows (outputs) ``dim`` indexes."""
    if isinstance(m, nn.MultiheadAttention):
        if dim == "out":
            return m.out_proj.weight.detach()
        if m.in_proj_weight is not None:
            part = {"in": 0, "key_in": 1, "value_in": 2}[dim]
            return m.in_proj_weight.detach().chunk(3)[part]
        return {"in": m.q_proj_weight, "key_in": m.k_proj_weight, "value_in": m.v_proj_weight}[dim].detach()
    if hasattr(m, "q_proj"):
        return {"in": m.q_proj, "key_in": m.k_proj, "value_in": m.v_proj, "out": m.out_proj}[dim].weight.detach()
    return (m.proj if dim == "out" else m.qkv).weight.detach()


def member_weights(model: nn.Module, member: ChannelMember, index: int) -> List[torch.Tensor]:
    """The weight tensors that index ``index`` of ``member`` removes (empty for weight-free members)."""
    if member.dim == "param":
        owner, _, attr = member.module.rpartition(".")
        p = getattr(model.get_submodule(owner) if owner else model, attr)
        return [p.detach().select(member.axis, index)]
    m = model.get_submodule(member.module)
    if member.dim == "heads":
        return _head_slices(m, index)
    if hasattr(m, "out_proj") or hasattr(m, "qkv"):
        w = _attention_matrix(m, member.dim)
        return [w[index] if member.dim == "out" else w[:, index]]
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        return []
    if isinstance(m, nn.Embedding):
        return [w.detach()[:, index]]
    if member.dim in ("out", "features"):
        return [_masked_weight(m)[index]] if w.dim() > 1 else [w.detach()[index:index + 1]]
    return [_masked_weight(m)[:, index]]


def group_importance(model: nn.Module, group: ChannelGroup, norm: str = "l1",
                     dims: Optional[Iterable[str]] = None) -> torch.Tensor:
    """Importance of each channel of ``group`` (float64, shape ``(group.channels,)``): for ``norm="l1"``
    the sum of absolute weights, for ``"l2"`` the sum of squared weights, over every member (or the
    members whose dim is in ``dims``) and every index the channel covers."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm: expected 'l1' or 'l2', got {norm!r}")
    dims = None if dims is None else set(dims)
    score = torch.zeros(group.channels, dtype=torch.float64)
    for member in group.members:
        if dims is not None and member.dim not in dims:
            continue
        for k, indices in enumerate(member.indices):
            for i in indices:
                for w in member_weights(model, member, i):
                    w = w.double()
                    score[k] += float(w.abs().sum() if norm == "l1" else (w * w).sum())
    return score


def channel_importance(model: nn.Module, groups: Iterable[ChannelGroup], norm: str = "l1") -> Dict[int, torch.Tensor]:
    """``{group id: group_importance(...)}`` for the prunable groups among ``groups``."""
    return {g.id: group_importance(model, g, norm) for g in groups if g.prunable}


def keep_most_important(importance: torch.Tensor, n_keep: int) -> List[int]:
    """The indices of the ``n_keep`` largest scores, sorted (ties: the lower index wins)."""
    n = int(importance.numel())
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep: expected 1..{n}, got {n_keep}")
    order = sorted(range(n), key=lambda i: (-float(importance[i]), i))
    return sorted(order[:n_keep])
