"""``PatternLinear``: a Linear that keeps blocks of output features (and/or input features) and runs
the kept part as a smaller dense GEMM.

MLP pruning removes hidden units in blocks (e.g. 16 or 32): ``fc1`` keeps some output blocks and
``fc2`` drops the matching input columns. A plan expresses the pair as two ``"linear"`` layer plans
built together by :func:`mlp_pair_plan`:

- ``fc1``: ``{"kind": "linear", "block_size": bs, "out_blocks": [...], "compact_output": true}`` — its
  output holds only the kept units (width ``kept``), so the activation between runs on fewer units;
- ``fc2``: ``{"kind": "linear", "block_size": bs, "in_blocks": [...], "compact_input": true}`` — it reads
  that compact input with a weight that has only the kept columns.

Anything between fc1 and fc2 must be elementwise (GELU, dropout). A single layer may also keep output
blocks with ``compact_output: false``: it then scatters its kept outputs into a full-width zero tensor
(a drop-in that needs no partner, at the cost of the scatter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import LayerPlan, plan_bool, plan_fields, plan_int, plan_int_list, register_kind

__all__ = ["PatternLinear", "LinearPlan", "blocks_to_features", "linear_layer_plan", "mlp_pair_plan"]


def blocks_to_features(blocks: Sequence[int], block_size: int, features: int) -> torch.Tensor:
    """Feature indices covered by ``blocks`` of ``block_size`` (the last block may be partial), sorted."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    nb = -(-features // block_size)
    blocks = sorted(set(int(b) for b in blocks))
    for b in blocks:
        if not 0 <= b < nb:
            raise ValueError(f"blocks: block {b} is out of range for {features} features in blocks of {block_size}")
    idx = [f for b in blocks for f in range(b * block_size, min((b + 1) * block_size, features))]
    return torch.tensor(idx, dtype=torch.long)


class PatternLinear(nn.Module):
    """Linear layer restricted to kept output features ``out_index`` and kept input features ``in_index``.

    Computes ``F.linear(x_in, W[out_index][:, in_index], b[out_index])`` as one smaller dense GEMM, where
    ``x_in`` is ``x`` itself when ``compact_input`` (x already holds only the kept inputs, e.g. a pruned
    fc1's output) or ``x[..., in_index]`` otherwise. With ``compact_output`` the result has only the kept
    outputs; otherwise it is scattered into a full-width tensor whose pruned units are exactly zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 out_index: Optional[torch.Tensor] = None, in_index: Optional[torch.Tensor] = None,
                 compact_output: bool = False, compact_input: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        out_index = torch.arange(out_features) if out_index is None else torch.as_tensor(out_index, dtype=torch.long)
        in_index = torch.arange(in_features) if in_index is None else torch.as_tensor(in_index, dtype=torch.long)
        for name, idx, n in (("out_index", out_index, out_features), ("in_index", in_index, in_features)):
            if idx.ndim != 1 or (idx.numel() and (idx.min() < 0 or idx.max() >= n)) or idx.unique().numel() != idx.numel():
                raise ValueError(f"{name}: expected distinct indices in [0, {n}), got {idx.tolist()[:8]}...")
        self.compact_output, self.compact_input = bool(compact_output), bool(compact_input)
        self._blocks = None  # (block_size, out_blocks, in_blocks) when built by from_dense
        self.register_buffer("out_index", out_index.sort().values.to(device))
        self.register_buffer("in_index", in_index.sort().values.to(device))
        self._full_in = in_index.numel() == in_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_index.numel(), in_index.numel(), **factory))
        self.bias = nn.Parameter(torch.zeros(out_index.numel(), **factory)) if bias else None
        if self.weight.numel():
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_dense(cls, linear: nn.Linear, out_blocks: Optional[Sequence[int]] = None,
                   in_blocks: Optional[Sequence[int]] = None, block_size: int = 16, compact_output: bool = False,
                   compact_input: bool = False) -> "PatternLinear":
        """Keeps ``out_blocks`` of the output features and ``in_blocks`` of the input features (None = all)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        out_idx = None if out_blocks is None else blocks_to_features(out_blocks, block_size, linear.out_features)
        in_idx = None if in_blocks is None else blocks_to_features(in_blocks, block_size, linear.in_features)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, out_idx, in_idx,
                    compact_output, compact_input, device=w.device, dtype=w.dtype)
        layer._blocks = (int(block_size), None if out_blocks is None else sorted(set(int(b) for b in out_blocks)),
                         None if in_blocks is None else sorted(set(int(b) for b in in_blocks)))
        with torch.no_grad():
            layer.weight.copy_(w[layer.out_index][:, layer.in_index])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[layer.out_index])
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` of the original size with pruned rows/columns (and bias entries) exactly zero.
        (It reads full-width input and writes full-width output: use it for the fc1/fc2 pair together.)"""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.zero_()
            dense.weight[self.out_index[:, None], self.in_index[None, :]] = self.weight
            if self.bias is not None:
                dense.bias.zero_()
                dense.bias[self.out_index] = self.bias
        return dense

    def layer_plan(self) -> dict:
        """The ``"linear"`` layer plan that rebuilds this layer from its dense ``nn.Linear`` (``sparsify``).
        Available for layers built by :meth:`from_dense` (which knows the blocks)."""
        blocks = self._blocks
        if blocks is None:
            raise ValueError("PatternLinear: layer_plan() needs a layer built with from_dense (its blocks are unknown)")
        bs, out_blocks, in_blocks = blocks
        return linear_layer_plan(bs, out_blocks, in_blocks, self.compact_output, self.compact_input)

    def macs(self, inputs: tuple, output) -> int:
        """Multiply-accumulates of one forward (used by ``autosculpt.flops``): the smaller GEMM only."""
        rows = output.numel() // max(1, output.shape[-1])
        return int(rows * self.weight.numel())

    def kept_fraction(self) -> float:
        """Fraction of the dense layer's weights (and MACs) computed."""
        return self.weight.numel() / max(1, self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compact_input and not self._full_in:
            x = x.index_select(-1, self.in_index)
        y = F.linear(x, self.weight, self.bias)
        if self.compact_output or self.out_index.numel() == self.out_features:
            return y
        full = y.new_zeros(*y.shape[:-1], self.out_features)
        return full.index_copy(-1, self.out_index, y)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kept_out={self.out_index.numel()}, kept_in={self.in_index.numel()}, "
                f"compact_output={self.compact_output}, compact_input={self.compact_input}, "
                f"bias={self.bias is not None}")


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class LinearPlan(LayerPlan):
    """The ``"linear"`` layer plan: an ``nn.Linear`` becomes a :class:`PatternLinear` keeping
    ``out_blocks`` of its outputs and ``in_blocks`` of its inputs (None = all) in blocks of ``block_size``.

    JSON: ``{"kind": "linear", "block_size": bs, "compact_output": bool, "compact_input": bool}`` plus
    ``"out_blocks"`` / ``"in_blocks"`` (sorted lists) when given; ``compact_input`` needs ``in_blocks``.
    """

    kind: ClassVar[str] = "linear"
    block_size: int = 16
    out_blocks: Optional[Tuple[int, ...]] = None
    in_blocks: Optional[Tuple[int, ...]] = None
    compact_output: bool = False
    compact_input: bool = False

    def __post_init__(self):
        bs = plan_int(self.block_size, "block_size")
        if bs < 1:
            raise ValueError(f"block_size: expected a positive int, got {self.block_size!r}")
        object.__setattr__(self, "block_size", bs)
        for key in ("out_blocks", "in_blocks"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, plan_int_list(value, key, "block indices"))
        plan_bool(self.compact_output, "compact_output")
        plan_bool(self.compact_input, "compact_input")
        if self.compact_input and self.in_blocks is None:
            raise ValueError("linear layer plan: compact_input needs in_blocks")

    def to_json(self) -> dict:
        out = {"kind": "linear", "block_size": self.block_size, "compact_output": self.compact_output,
               "compact_input": self.compact_input}
        if self.out_blocks is not None:
            out["out_blocks"] = sorted(self.out_blocks)
        if self.in_blocks is not None:
            out["in_blocks"] = sorted(self.in_blocks)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "LinearPlan":
        plan_fields(data, "linear", (), ("block_size", "out_blocks", "in_blocks", "compact_output", "compact_input"))
        return cls(data.get("block_size", 16), data.get("out_blocks"), data.get("in_blocks"),
                   data.get("compact_output", False), data.get("compact_input", False))

    def apply(self, module: nn.Module, backend: str) -> nn.Module:
        del backend  # smaller dense GEMMs: torch's own kernels
        if not isinstance(module, nn.Linear):
            raise TypeError(f"a 'linear' layer plan needs an nn.Linear, found {type(module).__name__}")
        return PatternLinear.from_dense(module, self.out_blocks, self.in_blocks, self.block_size,
                                        self.compact_output, self.compact_input)


register_kind(LinearPlan)


def linear_layer_plan(block_size: int, out_blocks: Optional[Sequence[int]] = None,
                      in_blocks: Optional[Sequence[int]] = None, compact_output: bool = False,
                      compact_input: bool = False) -> dict:
    """The layer plan of one Linear keeping ``out_blocks``/``in_blocks`` (None = all) of ``block_size``
    (the JSON of :class:`LinearPlan`)."""
    return LinearPlan(int(block_size), None if out_blocks is None else [int(b) for b in out_blocks],
                      None if in_blocks is None else [int(b) for b in in_blocks], bool(compact_output),
                      bool(compact_input)).to_json()


def mlp_pair_plan(fc1: str, fc2: str, kept_blocks: Sequence[int], block_size: int) -> dict:
    """Layer plans ``{fc1: ..., fc2: ...}`` that prune the hidden units between two Linears in blocks: fc1
    keeps ``kept_blocks`` of its outputs (compact) and fc2 keeps the matching input columns."""
    return {
        fc1: linear_layer_plan(block_size, out_blocks=kept_blocks, compact_output=True),
        fc2: linear_layer_plan(block_size, in_blocks=kept_blocks, compact_input=True),
    }
