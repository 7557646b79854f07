"""FLOPs, parameter counts and latency measurement of whole models."""
import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt.measure import count_flops, count_params, layer_latency, measure_latency
from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan

# one torch thread per test (the shared fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 6)).eval()


def test_flops_and_params_by_hand():
    m = net()
    x = torch.randn(2, 3, 10, 10)
    assert count_flops(m, x) == 8 * 10 * 10 * 3 * 9 + 4 * 5 * 5 * 8 * 9 + 100 * 6  # per sample
    assert count_params(m) == sum(p.numel() for p in m.parameters())
    plan = {"version": 1, "layers": {"0": conv_layer_plan(PAPER6, [5, 5, 3, 3, 1, 1, 0, 0]),
                                     "2": conv_layer_plan(PAPER6, [2, 4, 5, 0])}}
    p = asc.sparsify(m, plan)
    kept0 = 9 + 9 + 6 + 6 + 3 + 3  # taps kept by the filters of layer 0
    kept2 = 3 + 6 + 9
    assert count_flops(p, x) == kept0 * 3 * 10 * 10 + kept2 * 8 * 5 * 5 + 100 * 6
    assert count_params(p) == kept0 * 3 + 8 + kept2 * 8 + 4 + 100 * 6 + 6


def test_attention_flops_dense_and_full_pattern_agree():
    from autosculpt.attention_patterns import ATTN6
    from autosculpt.models.vit import vit_attention_names
    from autosculpt.nn.attention import attention_layer_plan

    torch.manual_seed(0)
    vit = asc.models.get_model("vit_tiny", image_size=8, patch_size=2, in_chans=1, embed_dim=48, depth=2, num_heads=3).eval()
    x = torch.randn(1, 1, 8, 8)
    dense = count_flops(vit, x)
    seq, e = 17, 48  # 16 patches + CLS
    assert dense >= 2 * (4 * seq * e * e + 2 * seq * seq * e)
    full = {n: attention_layer_plan(ATTN6, [5, 5, 5], 4) for n in vit_attention_names(vit)}
    assert count_flops(asc.sparsify(vit, {"version": 1, "layers": full}), x) == dense
    pruned = {n: attention_layer_plan(ATTN6, [0, 5, 5], 4) for n in vit_attention_names(vit)}
    assert count_flops(asc.sparsify(vit, {"version": 1, "layers": pruned}), x) < dense


def test_latency_measurement_shapes():
    m = net()
    plan = {"version": 1, "layers": {"0": conv_layer_plan(PAPER6, [1] * 8)}}
    p = asc.sparsify(m, plan)
    t = measure_latency({"dense": m, "pruned": p}, torch.randn(2, 3, 10, 10), reps=3, warmup=1)
    assert set(t) == {"dense", "pruned"} and all(v > 0 for v in t.values())
    rows = layer_latency(m, p, torch.randn(2, 3, 10, 10), reps=3)
    assert [r["layer"] for r in rows] == ["0"] and rows[0]["input_shape"] == [2, 3, 10, 10]
    assert rows[0]["path"] in ("sparse", "dense") and abs(rows[0]["kept"] - 3 / 9) < 1e-6
