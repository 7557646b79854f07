"""Attention patterns and PatternAttention vs nn.MultiheadAttention and the masked reference."""
import json
import math

import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt import _ext
from autosculpt.attention_patterns import (
    ATTN6,
    AttentionPatternSet,
    attention_flops,
    block_layout,
    head_block_mask,
    kept_token_fraction,
    normalize_spec,
)
from autosculpt.models.vit import Attention
from autosculpt.nn import PatternAttention
from autosculpt.nn.attention import attention_layer_plan
from autosculpt.reference import block_sparse_attention_ref

BACKENDS = ["torch"] + (["cpu"] if _ext.extension() is not None else [])


# --------------------------------------------------------------------------- patterns


def _brute_layout(spec, nb):
    s = normalize_spec(spec)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        for j in range(nb):
            d = abs(i - j)
            t = s["type"]
            out[i, j] = {
                "dense": True,
                "empty": False,
                "local": d <= s.get("window", 0),
                "strided": d <= s.get("window", 0) or d % s.get("stride", 1) == 0,
                "global_local": d <= s.get("window", 0) or i < s.get("num_global", 0) or j < s.get("num_global", 0),
            }[t]
    return out


@pytest.mark.parametrize("length, bs", [(65, 16), (197, 16), (1025, 64), (10, 16)])
@pytest.mark.parametrize("name", list(ATTN6.names) + ["strided3"])
def test_layouts_match_definition(length, bs, name):
    spec = ATTN6.spec(ATTN6.index(name)) if name in ATTN6.names else {"type": "strided", "window": 1, "stride": 3}
    nb = math.ceil(length / bs)
    lay = block_layout(spec, length, bs)
    assert lay.shape == (nb, nb) and lay.dtype == torch.bool
    assert torch.equal(lay, _brute_layout(spec, nb))


def test_flops_and_fractions_count_real_token_pairs():
    length, bs, d = 70, 16, 8
    specs = ["dense", {"type": "local", "window": 1}, "empty"]
    mask = head_block_mask(specs, length, bs)
    tok = mask.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :length, :length]
    assert attention_flops(mask, length, bs, d, batch=3) == int(tok.sum()) * 4 * d * 3
    assert kept_token_fraction(mask, length, bs) == pytest.approx(float(tok.float().mean()))
    fr = ATTN6.kept_fractions(length, bs)
    assert fr[0] == 0 and fr[-1] == 1 and bool(((fr >= 0) & (fr <= 1)).all())


def test_pattern_set_json_round_trip_and_errors():
    again = AttentionPatternSet.from_json(json.loads(json.dumps(ATTN6.to_json())))
    assert again == ATTN6 and again.names[0] == "empty" and again.names[-1] == "dense"
    with pytest.raises(ValueError, match="unknown type"):
        normalize_spec({"type": "banded"})
    with pytest.raises(ValueError, match="window must be a non-negative int"):
        normalize_spec({"type": "local", "window": -1})
    with pytest.raises(ValueError, match="unknown parameters"):
        normalize_spec({"type": "dense", "window": 1})
    with pytest.raises(ValueError, match="stride must be >= 1"):
        normalize_spec({"type": "strided", "stride": 0})
    with pytest.raises(ValueError, match="at least one"):
        AttentionPatternSet({})
    with pytest.raises(ValueError, match="differ in length"):
        AttentionPatternSet.from_json({"names": ["a", "b"], "specs": ["dense"]})
    with pytest.raises(ValueError, match="block_size"):
        block_layout("dense", 10, 0)


# --------------------------------------------------------------------------- PatternAttention


def _mha(e=64, h=4, batch_first=True, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(e, h, batch_first=batch_first)
    with torch.no_grad():  # non-zero biases so wrong bias slicing fails
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m.eval()


def _masked_reference(mha, x, specs, bs):
    """MHA's projections + block_sparse_attention_ref with every head's mask (pruned heads give zeros)."""
    b, length, e = x.shape
    h = mha.num_heads
    qkv = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    qkv = qkv.reshape(b, length, 3, h, e // h).permute(2, 0, 3, 1, 4)
    mask = head_block_mask(specs, length, bs)
    o = block_sparse_attention_ref(qkv[0], qkv[1], qkv[2], mask, bs)
    return mha.out_proj(o.transpose(1, 2).reshape(b, length, e))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [65, 97])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("spec", ["dense", {"type": "local", "window": 1000}], ids=["sdpa-path", "kernel-path"])
def test_dense_pattern_equals_multihead_attention(backend, length, batch_first, spec):
    # "dense" heads take the SDPA fast path; a window wider than L is dense too but runs the kernel.
    mha = _mha(batch_first=batch_first)
    pa = PatternAttention.from_dense(mha, [spec] * 4, block_size=16, backend=backend)
    assert pa._all_dense == (spec == "dense")
    x = torch.randn(2, length, 64) if batch_first else torch.randn(length, 2, 64)
    want = mha(x, x, x, need_weights=False)[0]
    got, weights = pa(x, x, x)
    assert weights is None
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length, bs", [(65, 16), (197, 32), (97, 64)])
def test_sparse_patterns_equal_masked_reference(backend, length, bs):
    mha = _mha(seed=length)
    specs = ["empty", {"type": "local", "window": 1}, {"type": "global_local", "window": 0, "num_global": 1},
             {"type": "strided", "window": 0, "stride": 2}]
    pa = PatternAttention.from_dense(mha, specs, block_size=bs, backend=backend)
    x = torch.randn(3, length, 64)
    torch.testing.assert_close(pa(x)[0], _masked_reference(mha, x, specs, bs), atol=2e-5, rtol=1e-4)
    # the pruned head is physically gone from the projections
    assert pa.qkv.weight.shape == (3 * 3 * 16, 64) and pa.proj.weight.shape == (64, 3 * 16)


def test_to_dense_round_trip_with_token_mask():
    mha = _mha(seed=3)
    specs = ["empty", "local", "dense", {"type": "global_local", "window": 1}]
    pa = PatternAttention.from_dense(mha, specs, block_size=16)
    dense = pa.to_dense()
    assert isinstance(dense, nn.MultiheadAttention)
    x = torch.randn(2, 65, 64)
    allowed = pa.token_attn_mask(65).repeat(2, 1, 1)  # (B*H, L, L); MHA's bool mask marks *disallowed*
    want = dense(x, x, x, attn_mask=~allowed, need_weights=False)[0]
    torch.testing.assert_close(pa(x)[0], want, atol=2e-5, rtol=1e-4)
    # pruned head's weights are exactly zero in the dense module
    assert torch.count_nonzero(dense.out_proj.weight[:, :16]) == 0
    assert torch.count_nonzero(dense.in_proj_weight[:16]) == 0


def test_timm_style_attention_module():
    torch.manual_seed(1)
    attn = Attention(48, 3).eval()
    pa = PatternAttention.from_dense(attn, ["dense"] * 3, block_size=16)
    x = torch.randn(2, 17, 48)
    out = pa(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, attn(x), atol=2e-5, rtol=1e-4)
    back = PatternAttention.from_dense(attn, ["local", "empty", "dense"], block_size=16).to_dense()
    assert isinstance(back, Attention)


def test_state_dict_round_trip_and_pattern_mismatch():
    mha = _mha(seed=5)
    specs = ["local", "empty", "dense", "strided"]
    pa = PatternAttention.from_dense(mha, specs, block_size=16)
    sd = pa.state_dict()
    fresh = PatternAttention(64, 4, specs, block_size=16)
    fresh.load_state_dict(sd)
    x = torch.randn(1, 50, 64)
    assert torch.equal(fresh(x)[0], pa(x)[0])
    other = PatternAttention(64, 4, ["dense", "empty", "dense", "strided"], block_size=16)
    with pytest.raises(ValueError, match="other head patterns"):
        other.load_state_dict(sd)


def test_all_heads_pruned_outputs_bias_and_gradients_flow():
    mha = _mha(seed=6)
    pa = PatternAttention.from_dense(mha, ["empty"] * 4)
    x = torch.randn(2, 20, 64)
    torch.testing.assert_close(pa(x)[0], mha.out_proj.bias.expand(2, 20, 64))
    pa2 = PatternAttention.from_dense(mha, ["local", "empty", "dense", "dense"])
    pa2(x)[0].sum().backward()
    assert pa2.qkv.weight.grad is not None and torch.isfinite(pa2.qkv.weight.grad).all()


def test_bad_inputs():
    mha = _mha()
    with pytest.raises(ValueError, match="expected 4 patterns"):
        PatternAttention.from_dense(mha, ["dense"] * 3)
    with pytest.raises(TypeError, match="attn: expected nn.MultiheadAttention"):
        PatternAttention.from_dense(nn.Linear(4, 4), ["dense"])
    pa = PatternAttention.from_dense(mha, ["dense"] * 4)
    x = torch.randn(1, 8, 64)
    with pytest.raises(ValueError, match="self-attention"):
        pa(x, torch.randn(1, 8, 64), x)
    with pytest.raises(ValueError, match="attn_mask"):
        pa(x, x, x, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_heads"):
        PatternAttention(64, 5)


def test_attention_plan_kind_via_sparsify():
    model = nn.Sequential()
    model.add_module("attn", _mha(seed=9))
    plan = {"version": 1, "layers": {"attn": attention_layer_plan(ATTN6, [5, 0, 1, 2], 16)}}
    plan = json.loads(json.dumps(plan))  # plans are plain JSON
    sparse = asc.sparsify(model, plan)
    assert isinstance(sparse.attn, PatternAttention)
    x = torch.randn(2, 40, 64)
    specs = [ATTN6.spec(i) for i in (5, 0, 1, 2)]
    torch.testing.assert_close(sparse.attn(x)[0], _masked_reference(model.attn, x, specs, 16), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="expected 4 ids"):
        asc.sparsify(model, {"version": 1, "layers": {"attn": attention_layer_plan(ATTN6, [5, 0], 16)}})
    with pytest.raises(ValueError, match="out of range"):
        attention_layer_plan(ATTN6, [9], 16)


def test_torch_compile_fullgraph_and_export():
    mha = _mha(seed=12)
    pa = PatternAttention.from_dense(mha, ["local", "empty", "dense", "strided"], block_size=16)
    x = torch.randn(2, 70, 64)
    want = pa(x)[0]
    compiled = torch.compile(pa, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], want)
    exported = torch.export.export(pa, (x,))
    torch.testing.assert_close(exported.module()(x)[0], want)


def test_macs_count_kept_heads_and_token_pairs():
    mha = _mha(seed=13)
    specs = ["empty", "dense", {"type": "local", "window": 0}, "dense"]
    pa = PatternAttention.from_dense(mha, specs, block_size=16)
    b, length, e, hd = 2, 40, 64, 16
    x = torch.randn(b, length, e)
    mask = head_block_mask(specs, length, 16)
    tok = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :length, :length]
    want = b * length * e * 3 * hd * 4 + int(tok.sum()) * 2 * hd * b  # 3 heads kept: 4 projections of 3*hd
    assert pa.macs((x,), pa(x)[0]) == want


@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
def test_paths_compute_the_same_function(path):
    mha = _mha(seed=14)
    specs = ["empty", "local", {"type": "global_local", "window": 0}, "strided"]
    pa = PatternAttention.from_dense(mha, specs, block_size=16, path=path)
    x = torch.randn(2, 70, 64)
    torch.testing.assert_close(pa(x)[0], _masked_reference(mha, x, specs, 16), atol=2e-5, rtol=1e-4)
    if path == "auto":
        assert pa.active_path(x) in ("sparse", "dense") and pa.calibrate(x) == pa.active_path(x)
    else:
        assert pa.active_path(x) == path
    with pytest.raises(ValueError, match="path"):
        PatternAttention(64, 4, path="fast")


def test_masked_sdpa_rows_without_keys_are_zero():
    from autosculpt.nn.attention import pattern_masked_sdpa

    q = torch.randn(1, 2, 20, 8)
    key = ((("type", "empty"),), (("type", "dense"),))
    out = pattern_masked_sdpa(q, q, q, key, 8)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    torch.testing.assert_close(out[:, 1], torch.nn.functional.scaled_dot_product_attention(q, q, q)[:, 1])
