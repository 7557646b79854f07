"""The built-in ViT: shapes, torch.fx tracing, and sparsify round trips with attention + MLP plans."""
import json

import pytest
import torch
import torch.fx
from torch import nn

import autosculpt as asc
from autosculpt.attention_patterns import ATTN6
from autosculpt.models import vit_tiny
from autosculpt.models.vit import vit_attention_names, vit_mlp_pairs
from autosculpt.nn import PatternAttention, PatternLinear
from autosculpt.nn.attention import attention_layer_plan
from autosculpt.nn.linear import mlp_pair_plan


def _digits_vit():
    torch.manual_seed(0)
    return vit_tiny(num_classes=10, image_size=8, patch_size=2, in_chans=1, embed_dim=48, depth=2, num_heads=3).eval()


@pytest.mark.parametrize("cfg, shape", [
    (dict(image_size=8, patch_size=2, in_chans=1, embed_dim=48, depth=2, num_heads=3), (2, 1, 8, 8)),
    (dict(image_size=32, patch_size=4, in_chans=3), (2, 3, 32, 32)),
])
def test_shapes_and_fx_trace(cfg, shape):
    torch.manual_seed(0)
    model = vit_tiny(num_classes=7, **cfg).eval()
    x = torch.randn(*shape)
    y = model(x)
    assert y.shape == (2, 7)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), y)
    assert any(n.op == "call_module" and n.target.endswith("attn") for n in traced.graph.nodes)


def test_bad_config():
    with pytest.raises(ValueError, match="patch_size"):
        vit_tiny(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        vit_tiny(embed_dim=50, num_heads=3)


def _plan(model):
    layers = {}
    for i, name in enumerate(vit_attention_names(model)):
        layers[name] = attention_layer_plan(ATTN6, [0, 1 + i, 5], block_size=4)
    for i, (fc1, fc2) in enumerate(vit_mlp_pairs(model)):
        layers.update(mlp_pair_plan(fc1, fc2, [0, 2 + i], block_size=16))
    return {"version": 1, "layers": layers}


class _MaskedDense(nn.Module):
    """Dense MHA + the PatternAttention's token mask: the reference for a sparsified attention."""

    def __init__(self, pa: PatternAttention):
        super().__init__()
        self.dense, self.pa = pa.to_dense(), pa

    def forward(self, q, k, v, need_weights=False):
        allowed = self.pa.token_attn_mask(q.shape[1]).repeat(q.shape[0], 1, 1)
        return self.dense(q, k, v, attn_mask=~allowed, need_weights=False)


def test_sparsified_vit_matches_dense_reference_and_round_trips():
    model = _digits_vit()
    plan = json.loads(json.dumps(_plan(model)))
    sparse = asc.sparsify(model, plan)
    assert isinstance(sparse.blocks[0].attn, PatternAttention) and isinstance(sparse.blocks[1].mlp.fc1, PatternLinear)
    assert sparse.blocks[0].attn.qkv.out_features == 3 * 2 * 16  # one of three heads removed
    x = torch.randn(3, 1, 8, 8)
    y = sparse(x)

    # reference: the same weights as dense modules with the masks applied
    ref = asc.sparsify(model, plan)
    for blk in ref.blocks:
        blk.attn = _MaskedDense(blk.attn)
        blk.mlp.fc1, blk.mlp.fc2 = blk.mlp.fc1.to_dense(), blk.mlp.fc2.to_dense()
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-4)

    # save = plan + state_dict; rebuild from a fresh model of the same class
    state = sparse.state_dict()
    rebuilt = asc.sparsify(_digits_vit(), plan)
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt(x), y)
    # the sparsified model still traces with torch.fx
    torch.testing.assert_close(torch.fx.symbolic_trace(sparse)(x), y)


def test_identity_plan_keeps_outputs():
    model = _digits_vit()
    layers = {n: attention_layer_plan(ATTN6, [5, 5, 5], 4) for n in vit_attention_names(model)}
    for fc1, fc2 in vit_mlp_pairs(model):
        layers.update(mlp_pair_plan(fc1, fc2, range(6), 16))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(asc.sparsify(model, {"version": 1, "layers": layers})(x), model(x), atol=1e-5, rtol=1e-4)


def test_layer_plans_rebuild_the_sparsified_model():
    model = _digits_vit()
    plan = _plan(model)
    sparse = asc.sparsify(model, plan)
    rebuilt_plan = {"version": 1, "layers": {
        name: m.layer_plan() for name, m in sparse.named_modules() if isinstance(m, (PatternAttention, PatternLinear))
    }}
    again = asc.sparsify(_digits_vit(), json.loads(json.dumps(rebuilt_plan)))
    again.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again(x), sparse(x))
