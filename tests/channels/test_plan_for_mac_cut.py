"""plan_for_mac_cut and prunable_structures: a uniform channel plan reaches a MAC cut (measured on the
shrunk model with autosculpt.flops), round-trips through JSON, and says when a cut is unreachable."""
import json
import re

import pytest
import torch
from channel_helpers import WithOpaqueOp, randomise

from autosculpt.channels import analyze_channels, remove_channels
from autosculpt.flops import count_macs
from autosculpt.models import mobilenetv2, resnet20, resnet56, vit_tiny
from autosculpt.plan import ChannelPlan, plan_for_mac_cut, prunable_structures

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"resnet20": (resnet20, (1, 3, 32, 32)), "mobilenetv2": (mobilenetv2, (1, 3, 16, 16))}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: (randomise(make()), torch.randn(*shape)) for name, (make, shape) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cut", [2.0, 3.0])
def test_reaches_the_cut_within_two_percent(models, name, cut):
    model, x = models[name]
    plan = plan_for_mac_cut(model, x, cut, multiple=1)
    small = plan.apply(model, x)
    achieved = count_macs(model, x)["total"] / count_macs(small, x)["total"]
    assert achieved == pytest.approx(cut, rel=0.02)
    assert plan.mac_cut == pytest.approx(achieved, rel=1e-9)
    assert 0.0 < plan.keep_ratio < 1.0
    kept = sum(len(k) for k in plan.keep.values()) / sum(plan.group_sizes.values())
    assert plan.keep_ratio == pytest.approx(kept, rel=1e-12)
    # uniform: every group keeps about the same fraction
    fractions = [len(plan.keep[g]) / plan.group_sizes[g] for g in plan.keep if plan.group_sizes[g] >= 16]
    assert max(fractions) - min(fractions) < 0.1
    with torch.no_grad():
        assert small(x).shape == model(x).shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_rounds_kept_counts_to_whole_vectors(models, name):
    model, x = models[name]
    plan = plan_for_mac_cut(model, x, 2.0)
    small = plan.apply(model, x)
    achieved = count_macs(model, x)["total"] / count_macs(small, x)["total"]
    assert achieved == pytest.approx(2.0, rel=0.03)
    counts = [(len(plan.keep[g]), plan.group_sizes[g]) for g in plan.keep]
    # the coarsest step (16, 8, 1) whose plan lands within 3%: every count a multiple of it or the whole group
    step = next(s for s in (16, 8, 1) if all(k % s == 0 or k == n for k, n in counts))
    assert step == next(s for s in (16, 8, 1) if plan_within(model, x, s))
    with pytest.raises(ValueError, match="multiple"):
        plan_for_mac_cut(model, x, 2.0, multiple=0)


def test_coarse_steps_mix_neighbouring_counts_to_land_on_the_cut(models):
    """With 8-channel steps a single keep ratio jumps past a 3x cut on ResNet-20 (its 16-channel groups
    keep 8 or 16); moving groups one step up or down lands within 3%, every count a multiple of 8."""
    model, x = models["resnet20"]
    single = plan_for_mac_cut(model, x, 3.0, multiple=8)
    small = single.apply(model, x)
    achieved = count_macs(model, x)["total"] / count_macs(small, x)["total"]
    assert achieved == pytest.approx(3.0, rel=0.03)
    assert all(len(v) % 8 == 0 for v in single.keep.values())
    assert single.mac_cut == pytest.approx(achieved, rel=1e-9)
    # keep_ratio reports what the refined plan keeps, not the bisection's ratio before the moves
    kept = sum(len(k) for k in single.keep.values()) / sum(single.group_sizes.values())
    assert single.keep_ratio == pytest.approx(kept, rel=1e-12)


def plan_within(model, x, step, cut=2.0):
    try:
        p = plan_for_mac_cut(model, x, cut, multiple=step)
    except ValueError:
        return False
    return abs(p.mac_cut - cut) <= 0.03 * cut


def test_json_round_trip_and_apply_without_an_input(models):
    model, x = models["resnet20"]
    plan = plan_for_mac_cut(model, x, 2.0)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["kind"] == "channels" and data["version"] == 1 and data["input_shape"] == [1, 3, 32, 32]
    again = ChannelPlan.from_dict(data)
    assert again == plan
    a, b = plan.apply(model, x), again.apply(model)  # zeros of input_shape find the same groups
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    # the kept channels are the largest-magnitude ones of each group
    an = analyze_channels(model, x)
    ref = remove_channels(model, x, dict(plan.keep), analysis=an)
    with torch.no_grad():
        torch.testing.assert_close(a(x), ref(x))


def test_bad_plans_are_rejected(models):
    model, x = models["resnet20"]
    data = plan_for_mac_cut(model, x, 2.0).to_dict()
    for change, needle in (({"version": 2}, "version"), ({"kind": "conv"}, "kind"), ({"extra": 1}, "unknown"),
                           ({"groups": [dict(data["groups"][0], keep=[])]}, "at least one")):
        with pytest.raises(ValueError, match=needle):
            ChannelPlan.from_dict({**data, **change})
    with pytest.raises(ValueError, match="not the group the plan was made for"):
        ChannelPlan.from_dict(data).apply(randomise(resnet56()), x)


def test_unreachable_cut_states_the_largest_reachable_one(models):
    model, x = models["resnet20"]
    with pytest.raises(ValueError, match="unreachable") as info:
        plan_for_mac_cut(model, x, 1000.0)
    largest = float(re.search(r"largest reachable cut is ([0-9.]+)x", str(info.value)).group(1))
    an = analyze_channels(model, x)
    one_each = {g.id: [0] for g in an.groups if g.prunable}
    floor = count_macs(remove_channels(model, x, one_each, analysis=an), x)["total"]
    assert largest == pytest.approx(count_macs(model, x)["total"] / floor, rel=1e-3)
    assert plan_for_mac_cut(model, x, largest * 0.999).mac_cut == pytest.approx(largest, rel=0.02)
    for bad in (0.5, -1, "2", True):
        with pytest.raises(ValueError, match="mac_cut"):
            plan_for_mac_cut(model, x, bad)
    identity = plan_for_mac_cut(model, x, 1.0)
    assert identity.mac_cut == 1.0 and all(len(k) == identity.group_sizes[g] for g, k in identity.keep.items())


def test_vit_exact_only_leaves_the_embedding():
    model = randomise(vit_tiny(embed_dim=48, depth=2, num_heads=3))
    x = torch.randn(1, 3, 32, 32)
    plan = plan_for_mac_cut(model, x, 1.5, exact_only=True)
    small = plan.apply(model, x)
    assert small.cls_token.shape[-1] == 48 and small.blocks[0].mlp.fc1.out_features < 96
    assert count_macs(model, x)["total"] / count_macs(small, x)["total"] == pytest.approx(1.5, rel=0.05)


def test_prunable_structures_lists_kinds_and_mac_shares():
    x = torch.randn(1, 3, 32, 32)
    s = prunable_structures(resnet20(), x)
    assert len(s.channel_groups) == 12 and len(s.pattern_convs) == 19 and s.attention == ()
    assert s.mac_share["channel_groups"] == pytest.approx(1.0)
    conv_macs = sum(v for k, v in s.layer_macs.items() if k in s.pattern_convs)
    assert s.mac_share["pattern_convs"] == pytest.approx(conv_macs / s.total_macs) and 0.95 < conv_macs / s.total_macs < 1
    assert s.total_macs == count_macs(resnet20(), x)["total"]

    v = prunable_structures(vit_tiny(embed_dim=48, depth=2, num_heads=3), x)
    assert v.attention == ("blocks.0.attn", "blocks.1.attn") and v.pattern_convs == ()
    assert 0 < v.mac_share["attention"] < 1 and v.mac_share["channel_groups"] == pytest.approx(1.0)
    assert sum(g.kind == "heads" for g in v.channel_groups) == 2

    o = prunable_structures(WithOpaqueOp(), torch.randn(1, 3, 8, 8))
    assert any(any("opaque_channel_op" in r for r in g.reasons) for g in o.unprunable_groups)
    assert "prunable channel groups" in o.summary()
