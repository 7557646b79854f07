"""The Triton block-sparse attention kernel under TRITON_INTERPRET=1 (CPU tensors, fp32, tiny shapes).

Triton decides at kernel-definition time whether to interpret, so the cases run in a fresh
subprocess with the variable set; the parent never imports triton.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, math
    import torch
    from autosculpt.ops import block_sparse_attention
    from autosculpt.reference import block_sparse_attention_ref
    results = []
    cases = [(1, 2, 65, 65, 32, 16), (2, 1, 97, 40, 24, 32), (1, 2, 130, 130, 64, 64)]
    for i, (b, h, lq, lk, d, bs) in enumerate(cases):
        g = torch.Generator().manual_seed(100 + i)
        q = torch.randn(b, h, lq, d, generator=g)
        k = torch.randn(b, h, lk, d, generator=g)
        v = torch.randn(b, h, lk, d, generator=g)
        mask = torch.rand(h, math.ceil(lq / bs), math.ceil(lk / bs), generator=g) < 0.5
        mask[0, 0] = False          # a query block with no kept key block
        mask[-1, -1, -1] = True     # the partial tail block kept
        out = block_sparse_attention(q, k, v, mask, bs, backend="triton")
        ref = block_sparse_attention_ref(q, k, v, mask, bs)
        results.append({"case": [b, h, lq, lk, d, bs], "max_err": (out - ref).abs().max().item(),
                        "finite": bool(torch.isfinite(out).all()),
                        "zero_rows_ok": bool((out[:, 0, :bs] == 0).all())})
    # the pruned-head case: every block empty
    q = torch.randn(1, 1, 33, 16)
    out = block_sparse_attention(q, q, q, torch.zeros(1, 3, 3, dtype=torch.bool), 16, backend="triton")
    results.append({"case": "empty", "max_err": out.abs().max().item(), "finite": True, "zero_rows_ok": True})
    try:
        block_sparse_attention(q, q, q, torch.ones(1, 5, 5, dtype=torch.bool), 8, backend="triton")
        results.append({"case": "bs8", "error": None})
    except ValueError as exc:
        results.append({"case": "bs8", "error": str(exc)})
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton not installed"
)
def test_triton_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    results = json.loads(line[len("RESULTS"):])
    for r in results[:-1]:
        if "max_err" in r:
            assert r["finite"], r
            assert r["zero_rows_ok"], r
            assert r["max_err"] < 2e-5, r
    assert "power of two" in results[-1]["error"]
