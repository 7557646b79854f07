"""Regression tests for the hardening issue's kernel items (stale weights, NaN/Inf, sizes, drop-in
shapes). Each test is named after the item it proves fixed."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosculpt as asc
from autosculpt.nn import PatternConv2d
from autosculpt.ops import block_sparse_attention, pattern_conv2d
from autosculpt.reference import block_sparse_attention_ref

HAS_CPU = asc.runtime.available_backends()["cpu"]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")


def _masked_ref(layer: PatternConv2d, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.detach() * layer.tap_mask[:, None].to(layer.weight.dtype)
    return F.conv2d(x, w, layer.bias.detach(), layer.stride, layer.padding, layer.dilation, layer.groups)


def _layer(path="sparse", seed=0):
    torch.manual_seed(seed)
    mask = torch.rand(8, 3, 3) < 0.5
    mask[0] = True
    return PatternConv2d.from_dense(nn.Conv2d(4, 8, 3, padding=1), mask, path=path)


@needs_cpu
@pytest.mark.parametrize("opt_name", ["Adam", "AdamW", "SGD", "Adagrad"])
def test_item1_fused_optimizer_step_repacks(opt_name):
    layer = _layer()
    x = torch.randn(2, 4, 9, 9)
    kwargs = {"lr": 0.1, "fused": True}
    opt = getattr(torch.optim, opt_name)(layer.parameters(), **kwargs)
    with torch.no_grad():
        layer(x)  # packs the weights
    for _ in range(2):
        layer(x).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)


@needs_cpu
@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("write", ["data_mul", "data_copy", "weight_mul"])
def test_item1_data_writes_repack(path, write):
    layer = _layer(path)
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        before = layer(x).clone()
        if write == "data_mul":
            layer.weight.data.mul_(3.0)
        elif write == "data_copy":
            layer.weight.data.copy_(torch.randn_like(layer.weight) * layer.tap_mask[:, None])
        else:
            layer.weight.mul_(-1.0)
        after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _masked_ref(layer, x), atol=1e-4, rtol=1e-4)


@needs_cpu
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_item1_tap_mask_in_place_write(path):
    layer = _layer(path)
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        layer(x)
        layer.tap_mask[0, 1, 1] = False  # in place, through indexing
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)
        layer.tap_mask.data[1].fill_(False)  # in place, through .data (no version bump)
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)


@needs_cpu
def test_item1_frozen_inference_form_follows_optimizer_steps():
    """A frozen (inference-snapshot) layer still repacks after optimizer steps and version bumps."""
    layer = _layer().freeze()
    x = torch.randn(1, 4, 7, 7)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)
        layer.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), _masked_ref(layer, x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- item 2: NaN in a kept key


@needs_cpu
@pytest.mark.parametrize("block_size,length", [(16, 40), (32, 64), (24, 50)])  # tiled and generic kernels
@pytest.mark.parametrize("isa", [0, 1, 3])
def test_item2_nan_in_kept_key_propagates(block_size, length, isa):
    from autosculpt.ops.attention import _cpu_backend

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
    k[0, 0, 3, 0] = float("nan")
    nb = -(-length // block_size)
    mask = torch.ones(2, nb, nb, dtype=torch.bool)
    mask[0, -1, 0] = False  # the last query block of head 0 does not attend the NaN key
    out = _cpu_backend(q, k, v, mask, block_size, 0.25, isa=isa)
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, block_size, 0.25)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 0, : length - block_size].isnan().all()  # every row attending key 3
    assert not out[0, 1].isnan().any()
    fin = ~ref.isnan()
    torch.testing.assert_close(out[fin].double(), ref[fin], atol=1e-5, rtol=1e-5)


@needs_cpu
def test_item2_inf_and_dropped_block_values():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 32, 16) for _ in range(3))
    mask = torch.tensor([[[True, False], [True, True]]])
    v[0, 0, 20] = float("nan")   # in key block 1: kept by query block 1 only
    k[0, 0, 5, 0] = float("inf")  # in key block 0: kept by both
    out = block_sparse_attention(q, k, v, mask, 16, backend="cpu")
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, 16)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 0, 16:].isnan().all()
    fin = ~ref.isnan()
    torch.testing.assert_close(out[fin].double(), ref[fin], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- item 3: NaN through a dropped tap


def _nan_case():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 9, 9)
    x[0, 1, 4, 4] = float("nan")
    x[1, 2, 0, 8] = float("inf")
    mask = torch.zeros(6, 3, 3, dtype=torch.bool)
    mask[:, 1, 1] = True  # centre tap only: the NaN is read through dropped taps by the 8 neighbours
    mask[5] = True
    w = torch.randn(6, 4, 3, 3)
    return x, w, mask


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_item3_nan_through_dropped_tap_is_nan_on_every_backend(backend):
    x, w, mask = _nan_case()
    ref = F.conv2d(x.double(), (w * mask[:, None]).double(), padding=1)
    out = pattern_conv2d(x, w, mask, padding=1, backend=backend)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, :, 3:6, 3:6].isnan().all()
    fin = ~ref.isnan()
    torch.testing.assert_close(out[fin].double(), ref[fin], atol=1e-4, rtol=1e-4)


@needs_cpu
@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("grad", [False, True])
def test_item3_every_path_agrees_on_nan(path, grad):
    x, w, mask = _nan_case()
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    layer = PatternConv2d.from_dense(conv, mask, path=path)
    layer.activation = "relu"
    with torch.set_grad_enabled(grad):
        out = layer(x, residual=torch.zeros(2, 6, 9, 9))
    ref = torch.relu(F.conv2d(x, w * mask[:, None], padding=1))
    assert torch.equal(out.isnan(), ref.isnan())


# --------------------------------------------------------------------------- item 4: block sizes


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
@pytest.mark.parametrize("block_size", [10**9, 2**24, 2**18, 97, 200, 4099])
def test_item4_large_block_sizes(backend, block_size):
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    nb = -(-300 // block_size)
    mask = torch.rand(2, nb, nb) < 0.6
    mask[:, 0, 0] = True
    out = block_sparse_attention(q, k, v, mask, block_size, backend=backend)
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, block_size)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [2**31, 2**62, 2**63 - 1])
def test_item4_absurd_block_size_is_a_clear_error(block_size):
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="block_size: must be <="):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 1, dtype=torch.bool), block_size, backend="auto")


# --------------------------------------------------------------------------- item 5: batch 0, unbatched


@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("grad", [False, True])
def test_item5_batch_zero_and_unbatched_conv(path, grad):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = PatternConv2d.from_dense(conv, torch.rand(6, 3, 3) < 0.5, path=path)
    with torch.set_grad_enabled(grad):
        empty = layer(torch.randn(0, 4, 9, 9))
        assert empty.shape == conv(torch.randn(0, 4, 9, 9)).shape == (0, 6, 5, 5)
        x3 = torch.randn(4, 9, 9)
        out = layer(x3)
    assert out.shape == (6, 5, 5)
    torch.testing.assert_close(out, F.conv2d(x3, layer.weight * layer.tap_mask[:, None], layer.bias, 2, 1),
                               atol=1e-5, rtol=1e-5)
    assert pattern_conv2d(torch.randn(0, 4, 9, 9), conv.weight, layer.tap_mask).shape == (0, 6, 7, 7)


def test_item5_unbatched_attention():
    from autosculpt.nn import PatternAttention

    torch.manual_seed(5)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    layer = PatternAttention.from_dense(mha, [{"type": "dense"}] * 4, block_size=16)
    x = torch.randn(20, 32)
    with torch.no_grad():
        out = layer(x)
        ref, _ = mha(x, x, x, need_weights=False)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    q, k, v = (torch.randn(2, 40, 16) for _ in range(3))
    m = torch.ones(2, 3, 3, dtype=torch.bool)
    torch.testing.assert_close(block_sparse_attention(q, k, v, m, 16), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_sparse_attention(q[0], k[0], v[0], m[0], 16),
                               F.scaled_dot_product_attention(q[0], k[0], v[0]), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- item 6: bad arguments


@pytest.mark.parametrize("groups", [0, -1, 1.5, True])
def test_item6_bad_groups_is_a_value_error(groups):
    with pytest.raises(ValueError, match="groups"):
        PatternConv2d(4, 8, 3, groups=groups)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("bad,msg", [((1, 5, 8, 8), "weight: expects C_in/groups"), ((1, 4, 1, 1), "too small"),
                                     ((2, 8), "x: expected 4-D")])
def test_item6_dense_and_sparse_paths_raise_the_same_error(path, bad, msg):
    layer = PatternConv2d.from_dense(nn.Conv2d(4, 8, 3), torch.ones(8, 3, 3, dtype=torch.bool), path=path)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=msg):
            layer(torch.randn(*bad))


@pytest.mark.parametrize("bad_id", [1.5, True, "2", None])
def test_item6_plan_pattern_ids_must_be_integers(bad_id):
    from autosculpt.patterns import PAPER6
    from autosculpt.plan import conv_layer_plan

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    plan = {"version": 1, "layers": {"0": conv_layer_plan(PAPER6, [5, 5, 5, 5])}}
    plan["layers"]["0"]["pattern_ids"][2] = bad_id
    with pytest.raises(ValueError, match="pattern_ids"):
        asc.sparsify(model, plan)
    plan["layers"]["0"]["pattern_ids"][2] = 3.0  # a JSON integer written as a float is fine
    assert asc.sparsify(model, plan)[0].tap_mask[2].sum() == 6


@pytest.mark.parametrize("field,value", [("compact_output", "no"), ("compact_input", 1), ("block_size", 2.5),
                                         ("out_blocks", [0, 1.5])])
def test_item6_linear_plan_fields_are_strict(field, value):
    from autosculpt.nn.linear import linear_layer_plan

    model = nn.Sequential(nn.Linear(32, 32))
    layer = linear_layer_plan(16, out_blocks=[0], compact_output=False)
    layer[field] = value
    with pytest.raises(ValueError, match=field):
        asc.sparsify(model, {"version": 1, "layers": {"0": layer}})


@needs_cpu
@pytest.mark.parametrize("block_size", [1, 16, 24])
@pytest.mark.parametrize("isa", [0, 1, 3])
def test_item2_minus_inf_scores_are_not_nan(block_size, isa):
    """A -inf score (from a -inf key) is a zero probability, even when it is the first a row sees; a row
    whose kept scores are all -inf is NaN, as in SDPA."""
    from autosculpt.ops.attention import _cpu_backend

    torch.manual_seed(6)
    q, k, v = torch.randn(1, 1, 48, 16).abs(), torch.randn(1, 1, 48, 16), torch.randn(1, 1, 48, 16)
    k[0, 0, 0, 3] = float("-inf")  # q >= 0: key 0's score is -inf for every query
    nb = -(-48 // block_size)
    mask = torch.ones(1, nb, nb, dtype=torch.bool)
    out = _cpu_backend(q, k, v, mask, block_size, 0.25, isa=isa)
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, block_size, 0.25)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    k[0, 0, :, 3] = float("-inf")  # every score -inf
    out = _cpu_backend(q, k, v, mask, block_size, 0.25, isa=isa)
    assert out.isnan().all() and block_sparse_attention_ref(q, k, v, mask, block_size, 0.25).isnan().all()
