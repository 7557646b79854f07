"""Host-side metadata shared by the GPU pattern-conv kernels (Triton and CUDA).

Filters are grouped by identical tap mask (within each conv group). A group with kept taps T is a
dense implicit GEMM: M = output pixels, N = the group's filters, K = |T| * C_in/groups, with K ordered
(kept tap, input channel). The kernels receive:

* ``perm`` (int32, C_out): output channel of each packed row, groups back to back. Every output
  channel appears exactly once, so the kernels write the whole output — filters with an empty mask
  form a group with no taps whose tiles only write the bias (or zero).
* ``taps`` (int32): the kept tap indices ``r * kw + s`` of all groups, back to back.
* ``tiles`` (int32, rows of :data:`TILE_FIELDS`): one row per (group, block of ``block_n`` filters),
  one section per supported ``block_n`` (16, 32, 64, 128) so autotuned kernels can pick theirs.
* packed weights: per group a row-major ``[K_g, n_g]`` block (input dtype), built by one gather from
  the flat weight with a cached index, so a changed weight costs one gather, not a re-grouping.

Everything that depends only on the mask is cached by the mask's bytes; with a layer cache key
(``PatternConv2d``) the packed weights are cached too and rebuilt when the weight changes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

BLOCK_NS = (16, 32, 64, 128)
# Fields of one tile row: first packed row (into perm), filters in the tile, offset of the tile's first
# column in the packed weights, leading dimension of the group's packed block (its filter count),
# offset of the group's taps, number of taps, first input channel of the conv group, spare.
TILE_FIELDS = 8
_I32_MAX = 2**31 - 1


@dataclass(frozen=True)
class GroupMeta:
    """Mask-dependent metadata of one layer, on the layer's device."""

    perm: torch.Tensor          # int32 (C_out,)
    taps: torch.Tensor          # int32 (sum of |T_g|,) — at least one element
    tiles: torch.Tensor         # int32 (sum over BLOCK_NS of tiles, TILE_FIELDS)
    tile_offsets: Dict[int, Tuple[int, int]]  # block_n -> (first row in ``tiles``, number of tiles)
    gather_index: torch.Tensor  # int64 (packed size,) into weight.flatten()
    kept_macs_per_pixel: int    # sum over filters of |T| * C_in/groups
    num_groups: int

    def tile_table(self, block_n: int) -> Tuple[int, int]:
        """(first row, row count) of the tile section for ``block_n``."""
        if block_n not in self.tile_offsets:
            raise ValueError(f"block_n: expected one of {BLOCK_NS}, got {block_n}")
        return self.tile_offsets[block_n]


def _build(mask_cpu: torch.Tensor, c_in_pg: int, groups: int, device: torch.device) -> GroupMeta:
    c_out, kh, kw = mask_cpu.shape
    ntap = kh * kw
    c_out_pg = c_out // groups
    flat = mask_cpu.reshape(c_out, ntap)
    # Group filters by (conv group, tap tuple); keep the first-seen order so the layout is deterministic.
    index: "OrderedDict[Tuple[int, Tuple[int, ...]], list]" = OrderedDict()
    rows = flat.tolist()
    for co in range(c_out):
        taps = tuple(t for t in range(ntap) if rows[co][t])
        index.setdefault((co // c_out_pg, taps), []).append(co)
    perm, taps_all, gather = [], [], []
    group_info = []  # (row0, n_g, wbase, tap0, ntaps, cin_base)
    wbase = 0
    for (g, taps), filters in index.items():
        n_g = len(filters)
        group_info.append((len(perm), n_g, wbase, len(taps_all), len(taps), g * c_in_pg))
        if taps:
            f = torch.tensor(filters, dtype=torch.int64)
            t = torch.tensor(taps, dtype=torch.int64)
            ci = torch.arange(c_in_pg, dtype=torch.int64)
            # packed[k = ti * C + ci, j] = weight[filters[j], ci, taps[ti]]
            idx = (f[None, None, :] * (c_in_pg * ntap) + ci[None, :, None] * ntap + t[:, None, None])
            gather.append(idx.reshape(-1))
            wbase += len(taps) * c_in_pg * n_g
        perm.extend(filters)
        taps_all.extend(taps)
    if wbase > _I32_MAX:
        raise ValueError(f"weight: {wbase} packed elements exceed the GPU kernels' 32-bit offsets")
    tiles, offsets = [], {}
    for bn in BLOCK_NS:
        start = len(tiles)
        for row0, n_g, wb, tap0, ntaps, cin_base in group_info:
            for j0 in range(0, n_g, bn):
                tiles.append((row0 + j0, min(bn, n_g - j0), wb + j0, n_g, tap0, ntaps, cin_base, 0))
        offsets[bn] = (start, len(tiles) - start)
    kept = int(sum(n_g * ntaps for _, n_g, _, _, ntaps, _ in group_info)) * c_in_pg
    gather_index = torch.cat(gather) if gather else torch.zeros(0, dtype=torch.int64)
    return GroupMeta(
        perm=torch.tensor(perm, dtype=torch.int32, device=device),
        taps=torch.tensor(taps_all or [0], dtype=torch.int32, device=device),
        tiles=torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, TILE_FIELDS),
        tile_offsets=offsets,
        gather_index=gather_index.to(device),
        kept_macs_per_pixel=kept,
        num_groups=len(group_info),
    )


_META: "OrderedDict[tuple, GroupMeta]" = OrderedDict()
_META_LIMIT = 256
# cache_key -> (fingerprint, meta, packed weight)
_PACKED: Dict[int, Tuple[tuple, GroupMeta, torch.Tensor]] = {}


def group_meta(tap_mask: torch.Tensor, c_in_pg: int, groups: int) -> GroupMeta:
    """Metadata for a mask, cached by the mask's contents (reads the mask to the host: one small copy)."""
    mask_cpu = tap_mask.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(mask_cpu.shape), mask_cpu.numpy().tobytes(), c_in_pg, groups, str(tap_mask.device))
    hit = _META.get(key)
    if hit is not None:
        _META.move_to_end(key)
        return hit
    meta = _build(mask_cpu, c_in_pg, groups, tap_mask.device)
    _META[key] = meta
    if len(_META) > _META_LIMIT:
        _META.popitem(last=False)
    return meta


def pack_weight(weight: torch.Tensor, meta: GroupMeta) -> torch.Tensor:
    """The weights of all groups packed as ``[K_g, n_g]`` blocks (one gather, input dtype)."""
    flat = weight.detach().reshape(-1)
    if meta.gather_index.numel() == 0:
        return flat.new_zeros(1)  # all filters empty: kernels never read it, but need a valid pointer
    return flat.index_select(0, meta.gather_index)


def prepared(weight: torch.Tensor, tap_mask: torch.Tensor, groups: int, cache_key: int) -> Tuple[GroupMeta, torch.Tensor]:
    """(metadata, packed weight) for one call; with a nonzero ``cache_key`` both are reused until the
    weight or mask tensor changes (data pointer, in-place version counter, shape, dtype)."""
    fingerprint = (
        weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device,
        tap_mask.data_ptr(), tap_mask._version, groups,
    )
    if cache_key:
        hit = _PACKED.get(cache_key)
        if hit is not None and hit[0] == fingerprint:
            return hit[1], hit[2]
    meta = group_meta(tap_mask, weight.shape[1], groups)
    packed = pack_weight(weight, meta)
    if cache_key:
        _PACKED[cache_key] = (fingerprint, meta, packed)
    return meta, packed


def release(cache_key: int) -> None:
    """Forgets the packed weights cached under a layer key."""
    _PACKED.pop(cache_key, None)


def fp32_conv_precision() -> str:
    """"tf32" when torch lets cuDNN convolutions use TF32 for fp32 inputs (so our kernels do too), else
    "ieee". Reads the new ``torch.backends.cudnn.conv.fp32_precision`` flag, then the legacy one."""
    conv_flags = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv_flags in ("tf32", "ieee"):
        return conv_flags
    try:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    except RuntimeError:  # legacy and new TF32 flags were mixed: be exact
        return "ieee"


def empty_output(x: torch.Tensor, c_out: int, out_h: int, out_w: int) -> torch.Tensor:
    """Output buffer in x's dtype, device and memory format (channels_last in, channels_last out)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], c_out, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)
