"""PatternLinear: kept blocks of output/input features as a smaller dense GEMM."""
import json

import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt.nn import PatternLinear
from autosculpt.nn.linear import blocks_to_features, linear_layer_plan, mlp_pair_plan


def _linear(i, o, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.bias.normal_()
    return lin


def _zeroed(lin, out_idx=None, in_idx=None):
    """The dense layer with pruned output units (rows, bias) and pruned input columns set to zero."""
    d = nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        d.weight.copy_(lin.weight)
        d.bias.copy_(lin.bias)
        if out_idx is not None:
            keep = torch.zeros(lin.out_features, dtype=torch.bool)
            keep[out_idx] = True
            d.weight[~keep] = 0
            d.bias[~keep] = 0
        if in_idx is not None:
            keep = torch.zeros(lin.in_features, dtype=torch.bool)
            keep[in_idx] = True
            d.weight[:, ~keep] = 0
    return d


def test_blocks_to_features_partial_tail():
    assert blocks_to_features([2, 0], 16, 40).tolist() == list(range(16)) + list(range(32, 40))
    with pytest.raises(ValueError, match="out of range"):
        blocks_to_features([3], 16, 40)
    with pytest.raises(ValueError, match="block_size"):
        blocks_to_features([0], 0, 40)


@pytest.mark.parametrize("out_blocks, bs", [([0, 2], 16), ([1], 32), ([0, 1, 2, 3, 4], 16), ([], 16)])
def test_out_blocks_equal_dense_with_pruned_units_zeroed(out_blocks, bs):
    lin = _linear(48, 72, 1)  # 72 = 4.5 blocks of 16: partial tail block
    pl = PatternLinear.from_dense(lin, out_blocks=out_blocks, block_size=bs)
    x = torch.randn(3, 5, 48)
    idx = blocks_to_features(out_blocks, bs, 72)
    want = _zeroed(lin, out_idx=idx)(x)
    got = pl(x)
    assert got.shape == (3, 5, 72)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pruned = torch.ones(72, dtype=torch.bool)
    pruned[idx] = False
    assert torch.count_nonzero(got[..., pruned]) == 0
    assert pl.weight.shape == (idx.numel(), 48)  # a smaller dense GEMM
    torch.testing.assert_close(pl.to_dense()(x), want, atol=1e-5, rtol=1e-5)


def test_mlp_pair_compact_equals_dense_pipeline():
    fc1, fc2 = _linear(32, 80, 2), _linear(80, 32, 3)
    kept = [0, 3, 4]
    plan = mlp_pair_plan("fc1", "fc2", kept, 16)
    p1 = PatternLinear.from_dense(fc1, out_blocks=kept, block_size=16, compact_output=True)
    p2 = PatternLinear.from_dense(fc2, in_blocks=kept, block_size=16, compact_input=True)
    x = torch.randn(4, 32)
    hidden = p1(x)
    assert hidden.shape == (4, 16 * 3)
    got = p2(torch.nn.functional.gelu(hidden))
    idx = blocks_to_features(kept, 16, 80)
    want = _zeroed(fc2, in_idx=idx)(torch.nn.functional.gelu(_zeroed(fc1, out_idx=idx)(x)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the pair's dense forms compute the same function
    torch.testing.assert_close(p2.to_dense()(torch.nn.functional.gelu(p1.to_dense()(x))), want, atol=1e-5, rtol=1e-5)
    # through a plan on a model
    model = nn.Sequential()
    model.add_module("fc1", fc1)
    model.add_module("act", nn.GELU())
    model.add_module("fc2", fc2)
    sparse = asc.sparsify(model, {"version": 1, "layers": json.loads(json.dumps(plan))})
    torch.testing.assert_close(sparse(x), want, atol=1e-5, rtol=1e-5)
    assert sparse.fc1.kept_fraction() == pytest.approx(48 / 80)


def test_in_blocks_non_compact_selects_columns():
    lin = _linear(40, 8, 4)
    pl = PatternLinear.from_dense(lin, in_blocks=[1], block_size=16)
    x = torch.randn(2, 40)
    torch.testing.assert_close(pl(x), _zeroed(lin, in_idx=blocks_to_features([1], 16, 40))(x), atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_and_gradients():
    lin = _linear(32, 64, 5)
    pl = PatternLinear.from_dense(lin, out_blocks=[1, 3], block_size=16)
    fresh = PatternLinear(32, 64, out_index=blocks_to_features([1, 3], 16, 64))
    fresh.load_state_dict(pl.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), pl(x))
    pl(x).sum().backward()
    assert pl.weight.grad.shape == (32, 32)


def test_bad_inputs():
    with pytest.raises(TypeError, match="linear: expected nn.Linear"):
        PatternLinear.from_dense(nn.Conv2d(1, 1, 1), out_blocks=[0])
    with pytest.raises(ValueError, match="out_index"):
        PatternLinear(4, 4, out_index=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="compact_input needs in_blocks"):
        asc.sparsify(nn.Sequential(nn.Linear(4, 4)), {"version": 1, "layers": {
            "0": linear_layer_plan(16, compact_input=True)}})
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        asc.sparsify(nn.Sequential(nn.ReLU()), {"version": 1, "layers": {"0": linear_layer_plan(16, [0])}})


def test_macs_count_the_smaller_gemm():
    from autosculpt.flops import count_macs

    model = nn.Sequential()
    model.add_module("fc1", _linear(32, 80, 7))
    model.add_module("act", nn.GELU())
    model.add_module("fc2", _linear(80, 32, 8))
    x = torch.randn(5, 32)
    dense = count_macs(model, x)["total"]
    assert dense == 5 * (32 * 80 + 80 * 32)
    sparse = asc.sparsify(model, {"version": 1, "layers": mlp_pair_plan("fc1", "fc2", [0, 2], 16)})
    assert count_macs(sparse, x)["total"] == 5 * (32 * 32 + 32 * 32)
