"""``PatternAttention``: self-attention whose heads each follow a block pattern; pruned heads removed.

A drop-in for ``nn.MultiheadAttention`` used as self-attention (returns ``(out, None)`` like it) and
for timm-style attention modules with ``qkv``/``proj`` linears and ``num_heads`` (returns a tensor).
Each head has an attention pattern (see :mod:`autosculpt.attention_patterns`); heads whose pattern is
``empty`` are physically removed: the Q/K/V projection and the output projection shrink to the kept
heads, so they run as smaller dense GEMMs. The kept heads run ``block_sparse_attention``.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..attention_patterns import (
    AttentionPatternSet,
    attention_flops,
    head_block_mask,
    kept_token_fraction,
    normalize_spec,
)
from ..ops.attention import block_sparse_attention
from ..plan import LayerPlan, plan_fields, plan_index_list, plan_int, register_kind
from .conv import faster_path

__all__ = ["PatternAttention", "AttentionPlan", "attention_layer_plan"]


# (input shape, dtype, device, threads, layer config) -> "sparse" | "dense", shared by identical layers
_PATH_DECISIONS: Dict[tuple, str] = {}


@lru_cache(maxsize=256)
def _cached_block_mask(specs_key: tuple, length: int, block_size: int, device: str) -> torch.Tensor:
    # specs_key: one tuple of sorted (name, value) items per head (hashable; torch.compile traces it)
    return head_block_mask([dict(items) for items in specs_key], length, block_size).to(device)


def pattern_self_attention(q, k, v, specs_key: tuple, block_size: int, backend: str):
    """Block-sparse attention of (B, H, L, D) q/k/v with per-head pattern specs (``specs_key``: one tuple
    of sorted spec items per head), building (and caching) the block mask for this length. Wrapped for
    torch.fx: traced models keep one call."""
    # Under torch.compile the mask is built inside the graph (the cache wrapper is not traceable).
    build = _cached_block_mask.__wrapped__ if torch.compiler.is_compiling() else _cached_block_mask
    mask = build(specs_key, q.shape[2], block_size, str(q.device))
    return block_sparse_attention(q, k, v, mask, block_size, backend=backend)


@lru_cache(maxsize=64)
def _cached_token_mask(specs_key: tuple, length: int, block_size: int, device: str):
    blocks = _cached_block_mask.__wrapped__(specs_key, length, block_size, device)
    tok = blocks.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :length, :length]
    empty = ~tok.any(-1, keepdim=True)
    return tok, (empty if bool(empty.any()) else None)


def pattern_masked_sdpa(q, k, v, specs_key: tuple, block_size: int):
    """The same function as :func:`pattern_self_attention` through dense SDPA with the patterns expanded
    to a token mask (the dense fallback path); rows with no kept key output zeros."""
    build = _cached_token_mask.__wrapped__ if torch.compiler.is_compiling() else _cached_token_mask
    tok, empty = build(specs_key, q.shape[2], block_size, str(q.device))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=tok)
    return o if empty is None else o.masked_fill(empty, 0.0)


torch.fx.wrap("pattern_self_attention")
torch.fx.wrap("pattern_masked_sdpa")


class PatternAttention(nn.Module):
    """Multi-head self-attention with per-head block patterns and pruned heads removed.

    Args:
        embed_dim: model width E.
        num_heads: heads of the dense layer (head dim = E / num_heads).
        head_patterns: one pattern spec (dict or type name, see ``attention_patterns``) per head.
        block_size: tokens per attention block.
        bias: projections with bias.
        batch_first: input layout (B, L, E) if True else (L, B, E), as ``nn.MultiheadAttention``.
        return_weights_tuple: return ``(out, None)`` like ``nn.MultiheadAttention`` (True) or ``out``.
        backend: kernel backend for ``block_sparse_attention`` (heads with block patterns). When every kept
            head is dense, the layer calls ``F.scaled_dot_product_attention`` instead (same function).
        path: ``"sparse"`` (the block-sparse kernel), ``"dense"`` (SDPA with the patterns as a token mask)
            or ``"auto"``: the faster of the two, measured once per input shape (the per-layer dense
            fallback; ``calibrate`` does it ahead, e.g. before ``torch.compile``).

    Parameters: ``qkv`` (Linear E -> 3·kept·hd, rows [q heads | k heads | v heads]) and ``proj``
    (Linear kept·hd -> E). The head patterns travel in the state dict (extra state).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_patterns: Optional[Sequence] = None,
        block_size: int = 16,
        bias: bool = True,
        batch_first: bool = True,
        return_weights_tuple: bool = True,
        backend: str = "auto",
        path: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if path not in ("auto", "sparse", "dense"):
            raise ValueError(f"path: expected 'auto', 'sparse' or 'dense', got {path!r}")
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"num_heads: must be >= 1 and divide embed_dim={embed_dim}, got {num_heads}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.block_size = block_size
        self.batch_first = batch_first
        self.return_weights_tuple = return_weights_tuple
        self.backend = backend
        self.path = path
        self._decided: Dict[tuple, str] = {}
        self.has_bias = bias
        self._factory = {"device": device, "dtype": dtype}
        self._set_patterns(head_patterns if head_patterns is not None else ["dense"] * num_heads)
        self._build_projections()

    # -- patterns ----------------------------------------------------------------------
    def _set_patterns(self, head_patterns: Sequence) -> None:
        if len(head_patterns) != self.num_heads:
            raise ValueError(f"head_patterns: expected {self.num_heads} patterns (one per head), got {len(head_patterns)}")
        self.head_patterns: List[dict] = [normalize_spec(p) for p in head_patterns]
        self.kept_heads: List[int] = [h for h, p in enumerate(self.head_patterns) if p["type"] != "empty"]
        self._specs_key = tuple(tuple(sorted(self.head_patterns[h].items())) for h in self.kept_heads)
        self._all_dense = all(self.head_patterns[h]["type"] == "dense" for h in self.kept_heads)

    def _build_projections(self) -> None:
        width = len(self.kept_heads) * self.head_dim
        with warnings.catch_warnings():  # all heads pruned: zero-size weights ("no-op init" warning)
            warnings.simplefilter("ignore")
            self.qkv = nn.Linear(self.embed_dim, 3 * width, bias=self.has_bias, **self._factory)
            self.proj = nn.Linear(width, self.embed_dim, bias=self.has_bias, **self._factory)

    def get_extra_state(self):
        return {"head_patterns": self.head_patterns, "block_size": self.block_size}

    def set_extra_state(self, state) -> None:
        if state["head_patterns"] != self.head_patterns or state["block_size"] != self.block_size:
            raise ValueError(
                "PatternAttention: the state dict was saved with other head patterns/block size "
                f"({state['head_patterns']}, {state['block_size']}); build the layer from the same plan first"
            )

    def block_mask(self, length: int) -> torch.Tensor:
        """The (kept heads, nb, nb) block mask used for sequences of ``length`` tokens."""
        return _cached_block_mask(self._specs_key, length, self.block_size, str(self.qkv.weight.device))

    def kept_fraction(self, length: int) -> float:
        """Fraction of the dense layer's attention token pairs (all heads) computed at ``length``."""
        full = head_block_mask(self.head_patterns, length, self.block_size)
        return kept_token_fraction(full, length, self.block_size)

    def layer_plan(self) -> dict:
        """The ``"attention"`` layer plan that rebuilds this layer from its dense module (``sparsify``): its
        distinct head patterns as the pattern set, in order of first use."""
        names, ids = {}, []
        for p in self.head_patterns:
            key = json.dumps(p, sort_keys=True)
            ids.append(names.setdefault(key, len(names)))
        ps = AttentionPatternSet({f"p{i}": json.loads(k) for k, i in names.items()})
        return attention_layer_plan(ps, ids, self.block_size)

    def macs(self, inputs: tuple, output) -> int:
        """Multiply-accumulates of one forward on ``inputs`` (used by ``autosculpt.flops``): the Q/K/V and
        output projections of the kept heads plus q·k and p·v over the kept (query, key) token pairs."""
        x = inputs[0]
        b, length = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        width = len(self.kept_heads) * self.head_dim
        proj = b * length * self.embed_dim * width * 4  # qkv (3 width) + output projection (width)
        kept = self.block_mask(length)
        pairs_flops = attention_flops(kept.cpu(), length, self.block_size, self.head_dim, batch=b)
        return int(proj + pairs_flops // 2)  # attention_flops counts 2 FLOPs per MAC

    # -- conversion --------------------------------------------------------------------
    @classmethod
    def from_dense(cls, attn: nn.Module, head_patterns: Sequence, block_size: int = 16,
                   backend: str = "auto", path: str = "auto") -> "PatternAttention":
        """Builds a PatternAttention with the weights of ``attn`` (``nn.MultiheadAttention`` or a timm-style
        module with ``qkv``, ``proj`` and ``num_heads``), keeping only the heads whose pattern is not empty."""
        w_in, b_in, w_out, b_out, e, h, batch_first, is_mha = _dense_weights(attn)
        layer = cls(e, h, head_patterns, block_size, bias=b_in is not None, batch_first=batch_first,
                    return_weights_tuple=is_mha, backend=backend, path=path, device=w_in.device, dtype=w_in.dtype)
        rows = layer._qkv_rows()
        cols = layer._proj_cols()
        with torch.no_grad():
            layer.qkv.weight.copy_(w_in[rows])
            layer.proj.weight.copy_(w_out[:, cols])
            if b_in is not None:
                layer.qkv.bias.copy_(b_in[rows])
            if b_out is not None:
                layer.proj.bias.copy_(b_out)
        return layer

    def _qkv_rows(self) -> torch.Tensor:
        e, hd = self.embed_dim, self.head_dim
        idx = [part * e + h * hd + i for part in range(3) for h in self.kept_heads for i in range(hd)]
        return torch.tensor(idx, dtype=torch.long, device=self.qkv.weight.device)

    def _proj_cols(self) -> torch.Tensor:
        hd = self.head_dim
        idx = [h * hd + i for h in self.kept_heads for i in range(hd)]
        return torch.tensor(idx, dtype=torch.long, device=self.qkv.weight.device)

    def to_dense(self) -> nn.Module:
        """A dense module of the source kind (``nn.MultiheadAttention`` or the built-in ViT's attention)
        with the same weights; pruned heads get zero Q/K/V/O weights (exactly zero output).

        The block patterns of kept heads are not part of a dense module: pass
        ``attn_mask=self.token_attn_mask(L)`` to the returned MultiheadAttention to compute the same function.
        """
        e, h = self.embed_dim, self.num_heads
        w_in = torch.zeros(3 * e, e, **self._tensor_factory())
        w_out = torch.zeros(e, e, **self._tensor_factory())
        b_in = torch.zeros(3 * e, **self._tensor_factory()) if self.has_bias else None
        rows, cols = self._qkv_rows(), self._proj_cols()
        with torch.no_grad():
            w_in[rows] = self.qkv.weight
            w_out[:, cols] = self.proj.weight
            if b_in is not None:
                b_in[rows] = self.qkv.bias
        if self.return_weights_tuple:
            dense = nn.MultiheadAttention(e, h, bias=self.has_bias, batch_first=self.batch_first, **self._tensor_factory())
            with torch.no_grad():
                dense.in_proj_weight.copy_(w_in)
                dense.out_proj.weight.copy_(w_out)
                if self.has_bias:
                    dense.in_proj_bias.copy_(b_in)
                    dense.out_proj.bias.copy_(self.proj.bias)
            return dense
        from ..models.vit import Attention

        dense = Attention(e, h, qkv_bias=self.has_bias, proj_bias=self.has_bias).to(**self._tensor_factory())
        with torch.no_grad():
            dense.qkv.weight.copy_(w_in)
            dense.proj.weight.copy_(w_out)
            if self.has_bias:
                dense.qkv.bias.copy_(b_in)
                dense.proj.bias.copy_(self.proj.bias)
        return dense

    def _tensor_factory(self) -> dict:
        return {"device": self.proj.weight.device, "dtype": self.proj.weight.dtype}

    def token_attn_mask(self, length: int) -> torch.Tensor:
        """Bool (num_heads, L, L) token mask of all heads (True = attend), for ``nn.MultiheadAttention``'s
        ``attn_mask`` after repeating over the batch. Pruned heads are all-True (their weights are zero)."""
        specs = [p if p["type"] != "empty" else {"type": "dense"} for p in self.head_patterns]
        m = head_block_mask(specs, length, self.block_size)
        bs = self.block_size
        return m.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :length, :length].to(self.qkv.weight.device)

    # -- forward -----------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """Self-attention of ``query`` (``key``/``value`` must be ``query`` or None). Masks other than the
        block patterns are not supported. Attention weights are never returned (``None``)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("PatternAttention computes self-attention: key and value must be the query tensor")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("PatternAttention: key_padding_mask, attn_mask and is_causal are not supported "
                             "(the block patterns are the mask)")
        if isinstance(query, torch.Tensor) and query.ndim == 2:  # unbatched (L, E), as nn.MultiheadAttention takes it
            out = self._attend(query[None])[0]
            return (out, None) if self.return_weights_tuple else out
        if isinstance(query, torch.Tensor) and query.ndim != 3:
            raise ValueError(f"query: expected (B, L, E) / (L, B, E) or unbatched (L, E), got shape {tuple(query.shape)}")
        x = query if self.batch_first else query.transpose(0, 1)
        out = self._attend(x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, None) if self.return_weights_tuple else out

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        kept = len(self.kept_heads)
        if kept == 0:  # every head pruned: the layer outputs its output bias
            return self.proj(x.new_zeros(b, length, 0))
        qkv = self.qkv(x).reshape(b, length, 3, kept, self.head_dim).permute(2, 0, 3, 1, 4)
        if self._all_dense:  # only dense heads left: plain SDPA computes exactly this (and is tuned for it)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        elif self._choose_path(x) == "dense":
            o = pattern_masked_sdpa(qkv[0], qkv[1], qkv[2], self._specs_key, self.block_size)
        else:
            o = pattern_self_attention(qkv[0], qkv[1], qkv[2], self._specs_key, self.block_size, self.backend)
        return self.proj(o.transpose(1, 2).reshape(b, length, kept * self.head_dim))

    # -- dense fallback ------------------------------------------------------------------
    def _decision_key(self, x: torch.Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, x.device.type, torch.get_num_threads())

    def _choose_path(self, x: torch.Tensor) -> str:
        """The path for batch-first ``x``: fixed, or measured once per input shape when ``path="auto"``."""
        if self.path != "auto":
            return self.path
        if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling():
            # Decisions are measured eagerly (calibrate() first); tracing keeps the one decided path
            # when there is exactly one, else the kernel.
            decided = set(self._decided.values())
            return decided.pop() if len(decided) == 1 else "sparse"
        return self._decided.get(self._decision_key(x)) or self._calibrate(x)

    def calibrate(self, query: torch.Tensor, reps: int = 7) -> str:
        """Times the block-sparse kernel against masked dense SDPA on ``query``'s shape (the layer's layout)
        and remembers the faster path (call before ``torch.compile``); identical layers share the choice."""
        return self._calibrate(query if self.batch_first else query.transpose(0, 1), reps)

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor, reps: int = 7) -> str:
        key = self._decision_key(x)
        shared = key + (self.embed_dim, self.head_dim, self._specs_key, self.block_size, self.backend)
        choice = _PATH_DECISIONS.get(shared)
        if choice is None:
            b, length, kept = x.shape[0], x.shape[1], len(self.kept_heads)
            qkv = self.qkv(x.detach()).reshape(b, length, 3, kept, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

            def sparse():
                pattern_self_attention(q, k, v, self._specs_key, self.block_size, self.backend)
                sync()

            def dense():
                pattern_masked_sdpa(q, k, v, self._specs_key, self.block_size)
                sync()

            choice = faster_path(sparse, dense, reps)
            _PATH_DECISIONS[shared] = choice
        self._decided[key] = choice
        return choice

    def active_path(self, x: Optional[torch.Tensor] = None) -> str:
        """The path used for ``x`` (batch-first) or the only one decided: "sparse", "dense", "undecided"."""
        if self._all_dense:
            return "dense"
        if self.path != "auto":
            return self.path
        if x is not None:
            return self._decided.get(self._decision_key(x), "undecided")
        paths = set(self._decided.values())
        return paths.pop() if len(paths) == 1 else ("undecided" if not paths else "mixed")

    def extra_repr(self) -> str:
        names = [p["type"] + "".join(f",{k}={v}" for k, v in p.items() if k != "type") for p in self.head_patterns]
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kept_heads={len(self.kept_heads)}, "
                f"block_size={self.block_size}, patterns={names}, backend={self.backend}, path={self.active_path()}")


def _dense_weights(attn: nn.Module):
    """(in_proj weight (3E, E), bias, out weight (E, E), bias, E, H, batch_first, is_mha) of a dense attention."""
    if isinstance(attn, nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim:
            raise ValueError("attn: PatternAttention needs kdim == vdim == embed_dim (self-attention)")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("attn: add_bias_kv and add_zero_attn are not supported")
        b_out = attn.out_proj.bias
        return (attn.in_proj_weight.detach(), None if attn.in_proj_bias is None else attn.in_proj_bias.detach(),
                attn.out_proj.weight.detach(), None if b_out is None else b_out.detach(),
                attn.embed_dim, attn.num_heads, attn.batch_first, True)
    qkv, proj, heads = getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(attn, "num_heads", None)
    if isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int):
        e = proj.out_features
        if qkv.in_features != e or qkv.out_features != 3 * e or proj.in_features != e:
            raise ValueError(f"attn: expected qkv Linear({e}, {3 * e}) and proj Linear({e}, {e})")
        if (qkv.bias is None) != (proj.bias is None):
            raise ValueError("attn: qkv and proj must both have or both lack a bias")
        for extra in ("q_norm", "k_norm"):
            if not isinstance(getattr(attn, extra, nn.Identity()), nn.Identity):
                raise ValueError(f"attn: {extra} is not supported by PatternAttention")
        return (qkv.weight.detach(), None if qkv.bias is None else qkv.bias.detach(), proj.weight.detach(),
                None if proj.bias is None else proj.bias.detach(), e, heads, True, False)
    raise TypeError(
        f"attn: expected nn.MultiheadAttention or a module with qkv/proj Linear layers and num_heads, "
        f"got {type(attn).__name__}"
    )


# --------------------------------------------------------------------------- plans


_PATHS = ("auto", "sparse", "dense")


@dataclass(frozen=True, eq=False)
class AttentionPlan(LayerPlan):
    """The ``"attention"`` layer plan: a self-attention module (``nn.MultiheadAttention`` or timm-style)
    becomes a :class:`PatternAttention` whose head ``h`` follows ``pattern_set``'s pattern
    ``head_pattern_ids[h]`` (heads with the ``empty`` pattern are removed).

    JSON: ``{"kind": "attention", "pattern_set": AttentionPatternSet.to_json(), "head_pattern_ids": [H
    ints], "block_size": bs}``, plus ``"path"`` when the layer's path is forced.
    """

    kind: ClassVar[str] = "attention"
    pattern_set: AttentionPatternSet
    head_pattern_ids: Tuple[int, ...]
    block_size: int = 16
    path: str = "auto"

    def __post_init__(self):
        if not isinstance(self.pattern_set, AttentionPatternSet):
            raise ValueError(f"pattern_set: expected an AttentionPatternSet, got {type(self.pattern_set).__name__}")
        object.__setattr__(self, "head_pattern_ids", plan_index_list(self.head_pattern_ids, "head_pattern_ids", len(self.pattern_set)))
        bs = plan_int(self.block_size, "block_size")
        if bs < 1:
            raise ValueError(f"block_size: expected a positive int, got {self.block_size!r}")
        object.__setattr__(self, "block_size", bs)
        if self.path not in _PATHS:
            raise ValueError(f"path: expected one of {', '.join(map(repr, _PATHS))}, got {self.path!r}")

    # equal plans: equal JSON (AttentionPatternSet compares by identity)
    def __eq__(self, other) -> bool:
        return type(other) is AttentionPlan and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def to_json(self) -> dict:
        out = {"kind": "attention", "pattern_set": self.pattern_set.to_json(),
               "head_pattern_ids": list(self.head_pattern_ids), "block_size": self.block_size}
        if self.path != "auto":
            out["path"] = self.path
        return out

    @classmethod
    def from_json(cls, data: dict) -> "AttentionPlan":
        plan_fields(data, "attention", ("pattern_set", "head_pattern_ids"), ("block_size", "path"))
        try:
            ps = AttentionPatternSet.from_json(data["pattern_set"])
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"pattern_set: {e}") from None
        return cls(ps, data["head_pattern_ids"], data.get("block_size", 16), data.get("path", "auto"))

    def apply(self, module: nn.Module, backend: str) -> nn.Module:
        heads = module.num_heads if hasattr(module, "num_heads") else None
        if heads is not None and len(self.head_pattern_ids) != heads:
            raise ValueError(f"head_pattern_ids: expected {heads} ids (one per head), got {len(self.head_pattern_ids)}")
        return PatternAttention.from_dense(module, [self.pattern_set.spec(i) for i in self.head_pattern_ids],
                                           block_size=self.block_size, backend=backend, path=self.path)


register_kind(AttentionPlan)


def attention_layer_plan(pattern_set: AttentionPatternSet, head_pattern_ids: Sequence[int], block_size: int) -> dict:
    """The layer plan for an attention module whose head ``h`` gets pattern ``head_pattern_ids[h]`` (the
    JSON of :class:`AttentionPlan`)."""
    return AttentionPlan(pattern_set, [int(i) for i in head_pattern_ids], int(block_size)).to_json()
