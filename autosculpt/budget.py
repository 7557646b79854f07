"""``Budget``: the speed a pruned model must reach, as the user states it.

One of three forms (DESIGN.md section 4.4): a target speedup over the dense model, a target latency, or
(paper-style) a fraction of the prunable layers' multiply-accumulates to remove. The search
(:func:`autosculpt.search`), its environment (:class:`autosculpt.rl.env.PruningEnv`), the plan
selection (:func:`autosculpt.search.select_plan`) and the baselines (:mod:`autosculpt.baselines`) all
take this one type; the run configuration (:mod:`autosculpt.config`) has one setting per form
(:data:`BUDGET_KEYS`).

This module imports nothing from the package, so every layer can use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Budget", "BUDGET_KEYS"]

# The three forms of a budget: the field names of Budget, the settings of autosculpt.config and the
# keyword arguments of autosculpt.search (exactly one is given).
BUDGET_KEYS = ("target_speedup", "target_latency_ms", "target_flops_ratio")


@dataclass(frozen=True)
class Budget:
    """A speed budget: exactly one of its three fields is given.

    Attributes:
        target_speedup: dense latency / pruned latency must reach this (> 1; 2.0 = twice as fast),
            measured at the search's example input.
        target_latency_ms: the pruned model's latency at the example input must be at most this (ms).
        target_flops_ratio: paper-style: at least this fraction (in (0, 1)) of the dense prunable
            layers' multiply-accumulates is removed. FLOPs are counted exactly, so a FLOPs budget needs
            no margin and no end-to-end measurement.

    ``Budget(target_speedup=2.0)``; a wrong combination or value raises ``ValueError``, a value that is
    not a number ``TypeError``.
    """

    target_speedup: Optional[float] = None
    target_latency_ms: Optional[float] = None
    target_flops_ratio: Optional[float] = None

    def __post_init__(self):
        given = [(k, v) for k, v in self.as_dict().items() if v is not None]
        if len(given) != 1:
            raise ValueError("budget: give exactly one of target_speedup, target_latency_ms, target_flops_ratio; "
                             f"got {dict(given) or 'none'}")
        k, v = given[0]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{k}: expected a number, got {type(v).__name__}")
        if k == "target_speedup" and not v > 1.0:
            raise ValueError(f"target_speedup: expected a number > 1 (e.g. 2.0 for twice as fast), got {v}")
        if k == "target_latency_ms" and not v > 0:
            raise ValueError(f"target_latency_ms: expected a positive number of milliseconds, got {v}")
        if k == "target_flops_ratio" and not 0 < v < 1:
            raise ValueError(f"target_flops_ratio: expected the fraction of FLOPs to remove, in (0, 1), got {v}")

    def as_dict(self) -> dict:
        """``{"target_speedup": ..., "target_latency_ms": ..., "target_flops_ratio": ...}`` (two are None)."""
        return {"target_speedup": self.target_speedup, "target_latency_ms": self.target_latency_ms,
                "target_flops_ratio": self.target_flops_ratio}

    @property
    def uses_flops(self) -> bool:
        """Whether this is a (paper-style) FLOPs budget rather than a speed one."""
        return self.target_flops_ratio is not None

    def with_margin(self, margin: float) -> "Budget":
        """The same budget tightened by ``margin`` (0.05: 5% faster than asked); FLOPs budgets are exact."""
        if self.target_speedup is not None:
            return Budget(target_speedup=self.target_speedup * (1.0 + margin))
        if self.target_latency_ms is not None:
            return Budget(target_latency_ms=self.target_latency_ms / (1.0 + margin))
        return self

    def limit(self, dense_ms: float, dense_flops: float) -> float:
        """The cost limit (ms, or MACs for a FLOPs budget)."""
        if self.target_speedup is not None:
            return dense_ms / self.target_speedup
        if self.target_latency_ms is not None:
            return float(self.target_latency_ms)
        return (1.0 - self.target_flops_ratio) * dense_flops
