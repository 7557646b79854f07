"""Shared pieces of the differential fuzzers: the case count, a per-case RNG and the tally.

Each fuzzer draws seeded random cases (awkward shapes, strides, layouts, NaN/Inf, batch 0), runs the
kernel under test and a float64 reference, and records every mismatch and every crash. The default
run is a few hundred cases in all; ``AUTOSCULPT_FUZZ_CASES=10000`` runs that many cases per fuzzer.
``AUTOSCULPT_FUZZ_REPORT=path.json`` appends each fuzzer's figures (cases, mismatches, crashes) there.
"""
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import List

import pytest
import torch


def case_count(default: int) -> int:
    raw = os.environ.get("AUTOSCULPT_FUZZ_CASES")
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise pytest.UsageError(f"AUTOSCULPT_FUZZ_CASES: expected an integer, got {raw!r}") from None
    if n < 1:
        raise pytest.UsageError(f"AUTOSCULPT_FUZZ_CASES: must be >= 1, got {n}")
    return n


@dataclass
class Tally:
    """What one fuzzer saw; ``check()`` fails the test with the first few failures' descriptions."""

    name: str
    cases: int = 0
    compared: int = 0
    mismatches: List[str] = field(default_factory=list)
    crashes: List[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def check(self) -> None:
        report = os.environ.get("AUTOSCULPT_FUZZ_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(json.dumps({"fuzzer": self.name, "cases": self.cases, "compared": self.compared,
                                    "mismatches": len(self.mismatches), "crashes": len(self.crashes),
                                    "seconds": round(time.perf_counter() - self.started, 1),
                                    "first_failures": (self.mismatches + self.crashes)[:5]}) + "\n")
        assert self.cases > 0
        problems = self.mismatches + self.crashes
        assert not problems, f"{self.name}: {len(self.mismatches)} mismatches, {len(self.crashes)} crashes " \
                             f"in {self.cases} cases; first: " + "\n".join(problems[:5])


def rng_for(name: str, case: int) -> random.Random:
    """A generator for one case, reproducible from (fuzzer name, case index) alone."""
    seed = (sum(map(ord, name)) * 1_000_003 + case) % (2**31)
    torch.manual_seed(seed)
    return random.Random(seed)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels_last (4-D) or a strided view."""
    if kind == "channels_last" and t.ndim == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1] + 1,), float("nan"), dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    return t.contiguous()


def inject_nonfinite(rng: random.Random, t: torch.Tensor, count: int) -> None:
    """Writes ``count`` NaN / +inf / -inf values at random positions of ``t`` (in place)."""
    if t.numel() == 0:
        return
    flat = t.view(-1)
    for _ in range(count):
        flat[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])


def same_values(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, nonfinite_as_one: bool = False) -> str:
    """'' when ``out`` matches ``ref``: the same NaN positions, the same infinities, and finite values
    within ``bound`` (elementwise, float64); otherwise a description of the first difference. With
    ``nonfinite_as_one`` only the positions of non-finite values must agree (NaN vs inf may differ)."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.double(), ref.double()
    if nonfinite_as_one:
        if not torch.equal(o.isfinite(), r.isfinite()):
            return f"non-finite positions differ: {int((~o.isfinite()).sum())} vs {int((~r.isfinite()).sum())}"
        o, r = o.nan_to_num(0, 0, 0), r.nan_to_num(0, 0, 0)
    if not torch.equal(o.isnan(), r.isnan()):
        return f"NaN positions differ: {int(o.isnan().sum())} vs {int(r.isnan().sum())} in the reference"
    inf = r.isinf()
    if not torch.equal(o.isinf(), inf) or not torch.equal(o[inf], r[inf]):
        return "infinities differ"
    fin = r.isfinite()
    err = (o[fin] - r[fin]).abs()
    if err.numel() and bool((err > bound.expand_as(r)[fin]).any()):
        i = int((err - bound.expand_as(r)[fin]).argmax())
        return f"max error {float(err.max()):.3g} over bound (at a value {float(r[fin][i]):.3g})"
    return ""
