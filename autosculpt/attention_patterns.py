"""Attention patterns: per-head block layouts for :func:`autosculpt.ops.block_sparse_attention`.

A pattern is a small JSON-able spec (``{"type": "local", "window": 1}``); for a sequence of ``L``
tokens cut into blocks of ``block_size`` it builds a bool layout ``(nb, nb)`` with ``nb =
ceil(L / block_size)``: True where a query block attends to a key block. Specs are independent of
``L``, so one plan serves every resolution. Types:

- ``dense``: every block attends to every block.
- ``local``: key blocks within ``window`` blocks of the query block (sliding window, causal=False).
- ``strided``: the local window plus every ``stride``-th block away from the query block (dilated).
- ``global_local``: the first ``num_global`` blocks (e.g. the CLS token's block) attend to and are
  attended by every block, plus the local window.
- ``empty``: nothing: the head is pruned (its Q/K/V/O slices are removed from the projections).

``ATTN6`` is the default named set for the search (index 0 = empty, last = dense, as ``PAPER6``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import torch

__all__ = [
    "AttentionPatternSet",
    "ATTN6",
    "PATTERN_TYPES",
    "attention_flops",
    "block_layout",
    "head_block_mask",
    "kept_token_fraction",
    "normalize_spec",
]

PATTERN_TYPES = ("dense", "local", "strided", "global_local", "empty")
_PARAMS = {
    "dense": {},
    "empty": {},
    "local": {"window": 1},
    "strided": {"window": 0, "stride": 2},
    "global_local": {"window": 1, "num_global": 1},
}


def normalize_spec(spec) -> Dict[str, int]:
    """A validated spec dict with every parameter filled in. Accepts a dict or a type name."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"attention pattern: expected a dict with a 'type' or a type name, got {spec!r}")
    kind = spec["type"]
    if kind not in PATTERN_TYPES:
        raise ValueError(f"attention pattern: unknown type {kind!r} (known: {', '.join(PATTERN_TYPES)})")
    out = {"type": kind}
    for key, default in _PARAMS[kind].items():
        value = spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"attention pattern {kind!r}: {key} must be a non-negative int, got {value!r}")
        out[key] = value
    unknown = set(spec) - set(out)
    if unknown:
        raise ValueError(f"attention pattern {kind!r}: unknown parameters {sorted(unknown)}")
    if kind == "strided" and out["stride"] < 1:
        raise ValueError(f"attention pattern 'strided': stride must be >= 1, got {out['stride']}")
    return out


def _num_blocks(length: int, block_size: int) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive int, got {length!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    return -(-length // block_size)


def block_layout(spec, length: int, block_size: int) -> torch.Tensor:
    """The (nb, nb) bool layout of one head's pattern for ``length`` tokens in blocks of ``block_size``."""
    s = normalize_spec(spec)
    nb = _num_blocks(length, block_size)
    i = torch.arange(nb)[:, None]
    j = torch.arange(nb)[None, :]
    dist = (i - j).abs()
    kind = s["type"]
    if kind == "dense":
        return torch.ones(nb, nb, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(nb, nb, dtype=torch.bool)
    local = dist <= s["window"]
    if kind == "local":
        return local
    if kind == "strided":
        return local | (dist % s["stride"] == 0)
    g = s["num_global"]
    return local | (i < g) | (j < g)  # global_local


def head_block_mask(specs: Sequence, length: int, block_size: int) -> torch.Tensor:
    """Stacks one layout per head: a bool (H, nb, nb) ``block_mask`` for ``block_sparse_attention``."""
    if len(specs) == 0:
        nb = _num_blocks(length, block_size)
        return torch.zeros(0, nb, nb, dtype=torch.bool)
    return torch.stack([block_layout(s, length, block_size) for s in specs])


def _block_lengths(length: int, block_size: int) -> torch.Tensor:
    nb = _num_blocks(length, block_size)
    sizes = torch.full((nb,), block_size, dtype=torch.float64)
    sizes[-1] = length - (nb - 1) * block_size
    return sizes


def kept_token_fraction(layout: torch.Tensor, length: int, block_size: int) -> float:
    """Fraction of the ``length x length`` (query, key) token pairs a layout (nb, nb) or (H, nb, nb) keeps
    (partial tail blocks counted by their real size)."""
    sizes = _block_lengths(length, block_size)
    pairs = sizes[:, None] * sizes[None, :]
    lay = layout.to(torch.float64)
    if lay.ndim == 2:
        lay = lay[None]
    return float((lay * pairs).sum() / (pairs.sum() * lay.shape[0]))


def attention_flops(block_mask: torch.Tensor, length: int, block_size: int, head_dim: int, batch: int = 1) -> int:
    """FLOPs of block-sparse attention with ``block_mask`` (H, nb, nb): 2·D for q·k and 2·D for p·v per kept
    (query, key) token pair (softmax not counted), times the batch."""
    sizes = _block_lengths(length, block_size)
    pairs = (block_mask.to(torch.float64) * (sizes[:, None] * sizes[None, :])).sum()
    return int(round(float(pairs) * 4 * head_dim * batch))


@dataclass(frozen=True)
class AttentionPatternSet:
    """An immutable, named set of attention pattern specs (JSON-able), indexed like ``PatternSet``."""

    names: Tuple[str, ...]
    specs: Tuple[str, ...]  # canonical JSON of each normalised spec (hashable, immutable)

    def __init__(self, patterns: Mapping[str, object]):
        names = tuple(str(n) for n in patterns)
        if len(names) == 0:
            raise ValueError("patterns: expected at least one named pattern")
        if len(set(names)) != len(names):
            raise ValueError(f"patterns: names must be unique, got {names}")
        specs = tuple(json.dumps(normalize_spec(s), sort_keys=True) for s in patterns.values())
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "specs", specs)

    def __len__(self) -> int:
        return len(self.names)

    def spec(self, i: int) -> Dict[str, int]:
        return json.loads(self.specs[i])

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"attention pattern {name!r} not in {self.names}") from None

    def layouts(self, length: int, block_size: int) -> torch.Tensor:
        """All patterns' layouts for one length, (P, nb, nb)."""
        return head_block_mask([self.spec(i) for i in range(len(self))], length, block_size)

    def kept_fractions(self, length: int, block_size: int) -> torch.Tensor:
        """Fraction of token pairs each pattern keeps at this length, shape (P,)."""
        lay = self.layouts(length, block_size)
        return torch.tensor([kept_token_fraction(l, length, block_size) for l in lay], dtype=torch.float64)

    def to_json(self) -> dict:
        return {"names": list(self.names), "specs": [self.spec(i) for i in range(len(self))]}

    @classmethod
    def from_json(cls, data: dict) -> "AttentionPatternSet":
        if not isinstance(data, dict) or "names" not in data or "specs" not in data:
            raise ValueError("attention pattern set: expected a dict with 'names' and 'specs'")
        if len(data["names"]) != len(data["specs"]):
            raise ValueError("attention pattern set: 'names' and 'specs' differ in length")
        return cls(dict(zip(data["names"], data["specs"])))


ATTN6 = AttentionPatternSet(
    {
        "empty": {"type": "empty"},
        "local1": {"type": "local", "window": 1},
        "strided2": {"type": "strided", "window": 0, "stride": 2},
        "global_local1": {"type": "global_local", "window": 1, "num_global": 1},
        "local2": {"type": "local", "window": 2},
        "dense": {"type": "dense"},
    }
)
