"""Typed layer plans: one dataclass per kind beside its module (registered with autosculpt.plan, which
imports none of them), strict to_json/from_json with the JSON format plans always had, layer_plan() on
every pattern module, and one definition of a prunable conv."""
import ast
import json
import pathlib

import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt import plan as plan_mod
from autosculpt.attention_patterns import ATTN6
from autosculpt.nn import PatternAttention, PatternConv2d, PatternLinear
from autosculpt.nn.attention import AttentionPlan, attention_layer_plan
from autosculpt.nn.conv import ConvPlan
from autosculpt.nn.linear import LinearPlan, linear_layer_plan, mlp_pair_plan
from autosculpt.patterns import PAPER6
from autosculpt.plan import (
    LayerPlan,
    conv_layer_plan,
    dense_plan,
    is_prunable_conv,
    layer_plan_from_json,
    layer_plan_type,
    parse_plan,
    uniform_plan,
    validate_plan,
)

# Layer plans exactly as files written by earlier versions hold them.
OLD_CONV = {"kind": "conv", "pattern_set": PAPER6.to_json(), "pattern_ids": [5, 0, 3, 1]}
OLD_LINEAR_FC1 = {"kind": "linear", "block_size": 16, "compact_output": True, "compact_input": False, "out_blocks": [0, 2]}
OLD_LINEAR_FC2 = {"kind": "linear", "block_size": 16, "compact_output": False, "compact_input": True, "in_blocks": [0, 2]}
OLD_ATTENTION = {"kind": "attention", "pattern_set": ATTN6.to_json(), "head_pattern_ids": [0, 1, 5], "block_size": 4}


def test_kinds_register_from_their_modules_and_plan_imports_none_of_them():
    assert layer_plan_type("conv") is ConvPlan and ConvPlan.__module__ == "autosculpt.nn.conv"
    assert layer_plan_type("linear") is LinearPlan and LinearPlan.__module__ == "autosculpt.nn.linear"
    assert layer_plan_type("attention") is AttentionPlan and AttentionPlan.__module__ == "autosculpt.nn.attention"
    assert all(issubclass(t, LayerPlan) for t in (ConvPlan, LinearPlan, AttentionPlan))
    tree = ast.parse(pathlib.Path(plan_mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):  # lazy imports too
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [m for m in imported if m.lstrip(".").split(".")[0] == "nn" or m.startswith("autosculpt.nn")], imported
    with pytest.raises(ValueError, match="unknown kind"):
        layer_plan_type("rootkit")


@pytest.mark.parametrize("old", [OLD_CONV, OLD_LINEAR_FC1, OLD_LINEAR_FC2, OLD_ATTENTION], ids=lambda d: d["kind"])
def test_old_json_parses_and_writes_back_identically(old):
    typed = layer_plan_from_json(json.loads(json.dumps(old)))
    assert type(typed).kind == old["kind"]
    assert typed.to_json() == old
    assert json.dumps(typed.to_json()) == json.dumps(old)  # same keys, same order
    assert type(typed).from_json(typed.to_json()) == typed


def test_builders_write_the_typed_plans_json():
    assert conv_layer_plan(PAPER6, torch.tensor([5, 0, 3, 1])) == OLD_CONV == ConvPlan(PAPER6, [5, 0, 3, 1]).to_json()
    assert mlp_pair_plan("fc1", "fc2", [2, 0], 16) == {"fc1": OLD_LINEAR_FC1, "fc2": OLD_LINEAR_FC2}
    assert linear_layer_plan(16, out_blocks=[2, 0], compact_output=True) == OLD_LINEAR_FC1
    assert attention_layer_plan(ATTN6, [0, 1, 5], 4) == OLD_ATTENTION == AttentionPlan(ATTN6, [0, 1, 5], 4).to_json()
    # a forced path is an optional field, written only when not "auto"
    assert ConvPlan(PAPER6, [5], path="dense").to_json() == {**ConvPlan(PAPER6, [5]).to_json(), "path": "dense"}
    assert ConvPlan.from_json({**OLD_CONV, "path": "dense"}).path == "dense"


BAD = [
    (OLD_CONV, "pattern_ids", [5, 1.5, 0, 0], "pattern_ids: expected an integer"),
    (OLD_CONV, "pattern_ids", [5, True, 0, 0], "pattern_ids: expected an integer"),
    (OLD_CONV, "pattern_ids", [5, 6, 0, 0], "out of range"),
    (OLD_CONV, "pattern_ids", "5", "pattern_ids: expected a list"),
    (OLD_CONV, "path", "fast", "path"),
    (OLD_CONV, "pattern_set", {"names": ["a"]}, "pattern set"),
    (OLD_LINEAR_FC1, "block_size", 2.5, "block_size: expected an integer"),
    (OLD_LINEAR_FC1, "block_size", 0, "block_size: expected a positive int"),
    (OLD_LINEAR_FC1, "compact_output", "no", "compact_output: expected true or false"),
    (OLD_LINEAR_FC1, "compact_input", 1, "compact_input: expected true or false"),
    (OLD_LINEAR_FC1, "out_blocks", [0, 1.5], "out_blocks: expected an integer"),
    (OLD_LINEAR_FC1, "out_blocks", 3, "out_blocks: expected a list"),
    (OLD_ATTENTION, "head_pattern_ids", [0, True, 5], "head_pattern_ids: expected an integer"),
    (OLD_ATTENTION, "head_pattern_ids", [0, 9, 5], "out of range"),
    (OLD_ATTENTION, "block_size", "4", "block_size: expected an integer"),
]


@pytest.mark.parametrize("old,field,value,message", BAD, ids=[f"{o['kind']}-{f}-{v!r}" for o, f, v, _ in BAD])
def test_strict_fields(old, field, value, message):
    bad = {**old, field: value}
    with pytest.raises(ValueError, match=message):
        layer_plan_from_json(bad)
    with pytest.raises(ValueError, match=f"plan: layer 'x': .*{message}"):
        validate_plan({"version": 1, "layers": {"x": bad}})


def test_unknown_and_missing_fields_are_errors():
    with pytest.raises(ValueError, match="unknown field.*'pattern_id'"):
        ConvPlan.from_json({**OLD_CONV, "pattern_id": [1]})
    with pytest.raises(ValueError, match="missing pattern_ids"):
        ConvPlan.from_json({"kind": "conv", "pattern_set": PAPER6.to_json()})
    with pytest.raises(ValueError, match="compact_input needs in_blocks"):
        LinearPlan.from_json({"kind": "linear", "compact_input": True})
    with pytest.raises(ValueError, match="expected kind 'conv'"):
        ConvPlan.from_json(OLD_ATTENTION)
    assert parse_plan({"version": 1, "layers": {"a": OLD_CONV}}) == {"a": ConvPlan(PAPER6, [5, 0, 3, 1])}


def test_every_pattern_module_returns_its_typed_plan():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    pc = PatternConv2d.from_dense(conv, PAPER6.masks[torch.tensor([5, 0, 3, 3])])
    cp = ConvPlan.from_json(pc.layer_plan())
    assert torch.equal(cp.apply(conv, "auto").tap_mask, pc.tap_mask)
    lin = nn.Linear(48, 40)
    pl = PatternLinear.from_dense(lin, out_blocks=[0, 2], block_size=16, compact_output=True)
    assert LinearPlan.from_json(pl.layer_plan()) == LinearPlan(16, [0, 2], None, True, False)
    mha = nn.MultiheadAttention(24, 3, batch_first=True)
    pa = PatternAttention.from_dense(mha, [ATTN6.spec(i) for i in (0, 1, 5)], block_size=4)
    ap = AttentionPlan.from_json(pa.layer_plan())
    assert [ap.pattern_set.spec(i) for i in ap.head_pattern_ids] == pa.head_patterns and ap.block_size == 4


def test_io_reconstructs_attention_and_linear_plans(tmp_path):
    from autosculpt.io import plan_from_model
    from autosculpt.models.vit import vit_attention_names, vit_mlp_pairs, vit_tiny

    def vit():
        torch.manual_seed(0)
        return vit_tiny(num_classes=10, image_size=8, patch_size=2, in_chans=1, embed_dim=48, depth=2, num_heads=3)

    dense = vit()
    layers = {n: attention_layer_plan(ATTN6, [0, 1, 5], 4) for n in vit_attention_names(dense)}
    for fc1, fc2 in vit_mlp_pairs(dense):
        layers.update(mlp_pair_plan(fc1, fc2, [0, 2], 16))
    plan = {"version": 1, "layers": layers}
    sparse = asc.sparsify(dense, plan).eval()
    rebuilt = plan_from_model(sparse)
    assert sorted(rebuilt["layers"]) == sorted(layers)
    for name, layer in rebuilt["layers"].items():  # linears exactly; attention: the distinct head patterns used
        assert layer == layers[name] or layer["kind"] == "attention"
    asc.save(sparse, tmp_path / "v.pt")  # no plan= needed any more
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(asc.load(tmp_path / "v.pt", vit).eval()(x), sparse(x))
    odd = nn.Sequential(PatternLinear(8, 8))  # not built from a dense layer: its blocks are unknown
    with pytest.raises(ValueError, match="cannot reconstruct the plan of '0'.*pass plan="):
        plan_from_model(odd)


def _mixed_padding_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(4, 4, 3, padding=0, stride=2),
        nn.Conv2d(4, 4, 1),
    )


def _from_dense_accepts(conv) -> bool:
    try:
        PatternConv2d.from_dense(conv, torch.ones(conv.out_channels, *conv.kernel_size, dtype=torch.bool))
        return True
    except ValueError:
        return False


def test_uniform_plan_never_picks_a_conv_from_dense_rejects():
    """Regression: plan.py's prunable convs skipped the padding check, so uniform_plan could pick a
    reflect-padded or string-padded conv that PatternConv2d.from_dense rejects."""
    model = _mixed_padding_net()
    for fraction in (1.0, 0.5, 1 / 3):
        plan = uniform_plan(model, PAPER6, fraction)
        assert sorted(plan["layers"]) == ["0", "4"]
        for name in plan["layers"]:
            assert _from_dense_accepts(model.get_submodule(name)), name
        asc.sparsify(model, plan)  # applies: every picked conv is accepted
    assert sorted(dense_plan(model, PAPER6)["layers"]) == ["0", "4"]
    # one definition: the graph and the plans agree, and it is exactly what from_dense accepts (3x3)
    from autosculpt.graph import build

    assert build.is_prunable_conv is is_prunable_conv
    for m in model:
        if m.kernel_size == (3, 3):
            assert is_prunable_conv(m, PAPER6) == _from_dense_accepts(m), m
    assert not is_prunable_conv(model[5], PAPER6) and is_prunable_conv(model[5], None)
