"""Host-side metadata shared by the GPU pattern-conv kernels (Triton and CUDA).

Filters are grouped by identical tap mask (within each conv group) and each group is cut into tiles
of at most ``block_n`` filters. A tile with taps T is a dense implicit GEMM: M = output pixels,
N = its filters, K = |T| * C_in/groups, ordered (tap, input channel). Groups smaller than a tile
would waste most of it, so partial tiles of one conv group are merged greedily while the union of
their taps costs less than running them apart (|T1 u T2| <= |T1| + |T2|); a merged tile runs the union
of taps with zero weights where a filter drops a tap. One tile layout per ``block_n`` in
:data:`BLOCK_NS`, so autotuned kernels can pick theirs. The kernels receive, per layout:

* ``perm`` (int32): output channel of each tile column, tiles back to back (each layout lists every
  output channel exactly once, so the kernels write the whole output; filters with an empty mask sit in
  tiles with no taps, or are merged into another tile, and only get the bias).
* ``taps`` (int32): tap indices ``r * kw + s`` of all tiles, back to back.
* ``tiles`` (int32, rows of :data:`TILE_FIELDS`), see below.
* packed weights: per tile a row-major ``[K, ld]`` block (input dtype; ``ld`` = its filter count
  rounded up to 16, zero padded), built by one scatter with cached indices, so a changed weight costs
  one copy, not a re-grouping.

Everything that depends only on the mask is cached by the mask's bytes; with a layer cache key
(``PatternConv2d``) the packed weights are cached too and rebuilt when the weight changes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from . import weight_cache
from .weight_cache import WeightCache

BLOCK_NS = (16, 32, 64, 128)
ALIGN = 16  # packed rows and blocks start at multiples of 16 elements (16-byte vector loads)
# Fields of one tile row: first column (into perm), filters in the tile, offset of its packed block /
# ALIGN, leading dimension of the block / ALIGN (filter count rounded up), offset of its taps, number of
# taps, conv group index, and the filter count rounded up / ALIGN (columns up to there are zero padding:
# safe to load). Offsets are stored divided by ALIGN so kernels multiply them back and compilers know
# the alignment.
TILE_FIELDS = 8
_I32_MAX = 2**31 - 1
_MERGE_LIMIT = 64  # partial tiles per conv group above which merging is skipped (quadratic search)


@dataclass(frozen=True)
class GroupMeta:
    """Mask-dependent metadata of one layer, on the layer's device."""

    perm: torch.Tensor          # int32 (len(BLOCK_NS) * C_out,)
    taps: torch.Tensor          # int32 (all tiles' taps,) — at least one element
    tiles: torch.Tensor         # int32 (all layouts' tiles, TILE_FIELDS)
    tile_offsets: Dict[int, Tuple[int, int]]  # block_n -> (first row in ``tiles``, number of tiles)
    gather_src: torch.Tensor    # int64: positions in weight.flatten() ...
    gather_dst: torch.Tensor    # int64: ... and where they go in the packed buffer (the rest stays 0)
    packed_size: int
    kept_macs_per_pixel: int    # sum over filters of kept taps * C_in/groups (the ideal)
    executed_macs_per_pixel: Dict[int, int]  # block_n -> sum over tiles of |T| * C_in/groups * block_n
    num_groups: int             # distinct (conv group, tap mask) pairs

    def tile_table(self, block_n: int) -> Tuple[int, int]:
        """(first row, row count) of the tile section for ``block_n``."""
        if block_n not in self.tile_offsets:
            raise ValueError(f"block_n: expected one of {BLOCK_NS}, got {block_n}")
        return self.tile_offsets[block_n]


def plan_tiles(groups: List[Tuple[int, Tuple[int, ...], List[int]]], block_n: int) -> List[Tuple[int, Tuple[int, ...], List[int]]]:
    """Cuts (conv group, taps, filters) groups into tiles of <= ``block_n`` filters and merges partial
    tiles of one conv group while that does not add work: returns (conv group, taps, filters) tiles.

    Work of a tile ~ its number of taps (every tile computes all ``block_n`` columns), so two partial
    tiles that fit in one merge when their taps overlap (``|T1 u T2| < |T1| + |T2|``), best saving first;
    an empty (bias-only) tile merges into any tile with room, saving a thread block.
    """
    tiles, partial = [], {}
    for g, taps, filters in groups:
        for j0 in range(0, len(filters), block_n):
            chunk = filters[j0:j0 + block_n]
            if len(chunk) == block_n:
                tiles.append((g, taps, chunk))
            else:
                partial.setdefault(g, []).append((frozenset(taps), chunk))
    for g, parts in partial.items():
        while 1 < len(parts) <= _MERGE_LIMIT:
            best = None
            for i in range(len(parts)):
                for j in range(i + 1, len(parts)):
                    (ti, fi), (tj, fj) = parts[i], parts[j]
                    if len(fi) + len(fj) > block_n:
                        continue
                    saved = len(ti) + len(tj) - len(ti | tj)
                    # Disjoint taps save no work and cost parallelism: merge those only to drop an
                    # empty (bias-only) tile.
                    if saved == 0 and ti and tj:
                        continue
                    if best is None or saved > best[0]:
                        best = (saved, i, j)
            if best is None:
                break
            _, i, j = best
            (ti, fi), (tj, fj) = parts[i], parts[j]
            parts[i] = (ti | tj, fi + fj)
            del parts[j]
        tiles.extend((g, tuple(sorted(t)), f) for t, f in parts)
    return tiles


def _build(mask_cpu: torch.Tensor, c_in_pg: int, groups: int, device: torch.device) -> GroupMeta:
    c_out, kh, kw = mask_cpu.shape
    ntap = kh * kw
    c_out_pg = c_out // groups
    rows = mask_cpu.reshape(c_out, ntap).tolist()
    # Group filters by (conv group, tap tuple); first-seen order keeps the layout deterministic.
    index: "OrderedDict[Tuple[int, Tuple[int, ...]], list]" = OrderedDict()
    for co in range(c_out):
        index.setdefault((co // c_out_pg, tuple(t for t in range(ntap) if rows[co][t])), []).append(co)
    grouped = [(g, taps, filters) for (g, taps), filters in index.items()]

    perm, taps_all, src, dst, tiles, offsets, executed = [], [], [], [], [], {}, {}
    wbase = 0
    ci = torch.arange(c_in_pg, dtype=torch.int64)
    for bn in BLOCK_NS:
        first = len(tiles)
        work = 0
        for g, taps, filters in plan_tiles(grouped, bn):
            n = len(filters)
            ld = -(-n // ALIGN) * ALIGN
            tiles.append((len(perm), n, wbase // ALIGN, ld // ALIGN, len(taps_all), len(taps), g, ld // ALIGN))
            for ti, t in enumerate(taps):
                # packed[wbase + (ti * C + ci) * ld + j] = weight[filters[j], ci, t] where filter j keeps t
                keep = [j for j, co in enumerate(filters) if rows[co][t]]
                if not keep:
                    continue
                j = torch.tensor(keep, dtype=torch.int64)
                co = torch.tensor([filters[k] for k in keep], dtype=torch.int64)
                src.append((co[None, :] * (c_in_pg * ntap) + ci[:, None] * ntap + t).reshape(-1))
                dst.append((wbase + (ti * c_in_pg + ci[:, None]) * ld + j[None, :]).reshape(-1))
            wbase += len(taps) * c_in_pg * ld
            work += len(taps) * c_in_pg * bn  # the whole tile width runs, used or not
            perm.extend(filters)
            taps_all.extend(taps)
        offsets[bn] = (first, len(tiles) - first)
        executed[bn] = work
    if wbase > _I32_MAX:
        raise ValueError(f"weight: {wbase} packed elements exceed the GPU kernels' 32-bit offsets")
    empty = torch.zeros(0, dtype=torch.int64)
    return GroupMeta(
        perm=torch.tensor(perm, dtype=torch.int32, device=device),
        taps=torch.tensor(taps_all or [0], dtype=torch.int32, device=device),
        tiles=torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, TILE_FIELDS),
        tile_offsets=offsets,
        gather_src=(torch.cat(src) if src else empty).to(device),
        gather_dst=(torch.cat(dst) if dst else empty).to(device),
        packed_size=max(wbase, 1),
        kept_macs_per_pixel=int(mask_cpu.sum()) * c_in_pg,
        executed_macs_per_pixel=executed,
        num_groups=len(grouped),
    )


_META: "OrderedDict[tuple, GroupMeta]" = OrderedDict()
_META_LIMIT = 256
# cache_key -> (meta, packed weight); cache_key -> masked weight
_PACKED = WeightCache()
_MASKED = WeightCache()


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
    """The weights of all groups packed as ``[K_g, ld_g]`` blocks (input dtype, zero padding)."""
    flat = weight.detach().reshape(-1)
    packed = flat.new_zeros(meta.packed_size)
    if meta.gather_src.numel():
        packed[meta.gather_dst] = flat[meta.gather_src]
    return packed


def prepared(weight: torch.Tensor, tap_mask: torch.Tensor, groups: int, cache_key: int) -> Tuple[GroupMeta, torch.Tensor]:
    """(metadata, packed weight) for one call; with a nonzero ``cache_key`` both are reused while the
    weight and mask are unchanged (see :mod:`.weight_cache`)."""

    def build():
        meta = group_meta(tap_mask, weight.shape[1], groups)
        return meta, pack_weight(weight, meta)

    return _PACKED.get_or_build(cache_key, weight, tap_mask, (groups,), build)


def masked_weight(weight: torch.Tensor, tap_mask: torch.Tensor, cache_key: int, x: torch.Tensor) -> torch.Tensor:
    """``weight * tap_mask`` in x's memory format (so cuDNN does not convert it per call), cached per
    layer key while weight and mask are unchanged: the dense fallback then costs what ``F.conv2d`` costs."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return _MASKED.get_or_build(
        cache_key, weight, tap_mask, (channels_last,),
        lambda: (weight.detach() * tap_mask[:, None].to(weight.dtype)).contiguous(memory_format=fmt))


def release(cache_key: int) -> None:
    """Forgets the packed and masked weights cached under a layer key."""
    weight_cache.release(cache_key)


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
    """Output buffer in x's dtype and device, in the op's layout (``ops.conv.output_memory_format``:
    channels_last for a channels_last CUDA input), so the fake impl's strides are the real ones."""
    from .conv import output_memory_format

    return torch.empty((x.shape[0], c_out, out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))
