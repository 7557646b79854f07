"""The attention benchmarks run end to end on tiny inputs (numbers are not checked, only the plumbing)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autosculpt import _ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(_ext.extension() is None, reason="compiled extension not built")
def test_cpu_bench_runs_and_writes_markdown():
    from bench import bench_attention as ba

    rows = ba.run([(256, 2)], (0.5,), reps=1, threads=1, with_flex=False, progress=lambda s: None)
    assert len(rows) == 1 and rows[0]["kept"] == pytest.approx(0.5, abs=0.01)
    assert rows[0]["ideal"] == pytest.approx(1 / rows[0]["kept"])
    text = ba.to_markdown(rows, threads=1, reps=1, quick=True)
    assert "| 256 | 2 | 50% |" in text and "speedup÷ideal" in text
    with pytest.raises(ValueError, match="threads=1"):
        ba.run([(256, 2)], (0.5,), reps=1, threads=2, with_flex=False, clock="cpu")


def test_random_block_mask_sparsity_and_diagonal():
    from bench.bench_attention import random_block_mask

    m = random_block_mask(3, 16, 0.75, seed=0)
    assert m.shape == (3, 16, 16)
    assert all(int(m[h].sum()) == 64 for h in range(3))
    assert bool(m[:, range(16), range(16)].all())


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="triton not installed")
def test_gpu_bench_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_attention", "--dry-run", "--reps", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.count("| float32 |") == 4 and "NO" not in text
