"""pytest-benchmark suite for the CPU pattern conv (skipped by default: pyproject adds --benchmark-skip).

Run: ``pytest bench/test_bench_conv.py --benchmark-enable`` (add ``--benchmark-group-by=param:case`` to see
dense and sparse of one layer side by side). Threads are fixed to the machine's cores.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from autosculpt import _ext
from autosculpt.ops import pattern_conv2d
from autosculpt.timing import threads

from .conv_shapes import make_layer_inputs, make_tap_mask, shape_by_name

pytestmark = pytest.mark.skipif(_ext.extension() is None, reason="compiled extension not built")

CASES = {
    "resnet56-32x16-b8-50%": ("resnet56-32x16", 8, "50%:paper6-all"),
    "resnet50-128x28-b1-33%": ("resnet50-128x28", 1, "33%:rightcol+bottomrow"),
    "resnet50-256x14-b8-67%": ("resnet50-256x14", 8, "67%:right2cols+bottom2rows"),
    "resnet50-512x7-b1-11%": ("resnet50-512x7", 1, "11%:centre"),
}


@pytest.fixture(autouse=True)
def fixed_threads():
    with threads(os.cpu_count() or 1):
        yield


@pytest.mark.parametrize("provider", ["dense", "sparse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_conv(benchmark, case, provider):
    name, batch, mix = CASES[case]
    shape = shape_by_name(name)
    x, w, b = make_layer_inputs(shape, batch)
    mask = make_tap_mask(mix, shape.c_out)
    s, p = shape.stride, shape.padding
    benchmark.group = case
    benchmark.extra_info.update(kept=float(mask.float().mean()), threads=torch.get_num_threads())
    with torch.no_grad():
        if provider == "dense":
            wm = w * mask[:, None]
            out = benchmark(F.conv2d, x, wm, b, s, p)
        else:
            out = benchmark(pattern_conv2d, x, w, mask, b, s, p, backend="cpu", _cache_key=12345)
        ref = F.conv2d(x, w * mask[:, None], b, s, p)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
