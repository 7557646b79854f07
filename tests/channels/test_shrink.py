"""remove_channels: the shrunk model equals the original with the removed channels' consumer inputs
zeroed (an independent reference), members are physically smaller, MACs drop as counted."""
import pytest
import torch
from channel_helpers import (
    PlainCNN,
    SEBlock,
    TimmAttentionNet,
    TinyDenseNet,
    TinyShuffleNet,
    assert_close,
    group_of,
    masked_reference,
    random_keep,
    randomise,
    tv_models,
)
from torch import nn

from autosculpt.channels import (
    PrunedMultiheadAttention,
    analyze_channels,
    channel_groups,
    group_importance,
    keep_most_important,
    remove_channels,
)
from autosculpt.flops import count_macs
from autosculpt.models import mobilenetv2, resnet20, vit_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _shrink_and_compare(model, x, fraction=0.5, seed=0):
    model = randomise(model)
    an = analyze_channels(model, x)
    keep = random_keep(an, fraction, seed)
    assert keep, "nothing to prune"
    small = remove_channels(model, x, keep, analysis=an)
    ref = masked_reference(model, an, keep)
    with torch.no_grad():
        assert_close(small(x), ref(x))
    before, after = count_macs(model, x)["total"], count_macs(small, x)["total"]
    assert after < before
    params_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < params_before
    return model, small, an, keep


MODELS = {
    "plain_cnn": (PlainCNN, (2, 3, 8, 8)),
    "resnet20": (resnet20, (2, 3, 32, 32)),
    "mobilenetv2": (mobilenetv2, (2, 3, 32, 32)),
    "densenet_tiny": (TinyDenseNet, (3, 3, 8, 8)),
    "shufflenet_tiny": (TinyShuffleNet, (2, 3, 8, 8)),
    "se_block": (SEBlock, (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_shrunk_model_equals_masked_original(name, fraction):
    make, shape = MODELS[name]
    _shrink_and_compare(make(), torch.randn(*shape), fraction, seed=hash(name) % 100)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "shufflenet_v2_x0_5"])
def test_torchvision_models_shrink_exactly(name):
    model = getattr(tv_models(), name)()
    _shrink_and_compare(model, torch.randn(1, 3, 64, 64), 0.5)


def test_plain_cnn_shapes_and_macs():
    model = randomise(PlainCNN())
    x = torch.randn(2, 3, 8, 8)
    groups = channel_groups(model, x)
    g1, g2 = group_of(groups, "c1", "out"), group_of(groups, "c2", "out")
    small = remove_channels(model, x, {g1.id: [0, 2, 5], g2.id: [1, 4, 7, 9, 11]})
    assert (small.c1.out_channels, small.b1.num_features, small.c2.in_channels) == (3, 3, 3)
    assert (small.c2.out_channels, small.b2.num_features, small.fc.in_features) == (5, 5, 20)
    torch.testing.assert_close(small.c1.weight, model.c1.weight[[0, 2, 5]])
    torch.testing.assert_close(small.b1.running_var, model.b1.running_var[[0, 2, 5]])
    torch.testing.assert_close(small.fc.weight, model.fc.weight[:, [f for c in (1, 4, 7, 9, 11) for f in range(4 * c, 4 * c + 4)]])
    hw, n = 64, 2
    want = n * (3 * 3 * 9 * hw + 5 * 3 * 9 * hw + 10 * 20)
    assert count_macs(small, x)["total"] == want


def test_importance_keeps_the_largest_channels():
    model = randomise(PlainCNN())
    x = torch.randn(1, 3, 8, 8)
    an = analyze_channels(model, x)
    g = group_of(an.groups, "c1", "out")
    with torch.no_grad():
        model.c1.weight[3].mul_(100)  # channel 3 of c1: by far the largest
    imp = group_importance(model, g, "l1")
    assert int(torch.argmax(imp)) == 3
    want = (model.c1.weight[3].abs().sum() + model.b1.weight[3].abs() + model.c2.weight[:, 3].abs().sum()).item()
    assert imp[3].item() == pytest.approx(want, rel=1e-6)
    l2 = group_importance(model, g, "l2")
    assert l2[3].item() == pytest.approx((model.c1.weight[3] ** 2).sum().item() + (model.b1.weight[3] ** 2).item()
                                         + (model.c2.weight[:, 3] ** 2).sum().item(), rel=1e-6)
    assert 3 in keep_most_important(imp, 1)


def test_vit_heads_and_mlp_hidden_units_exact():
    model = randomise(vit_tiny(embed_dim=48, depth=2, num_heads=3))
    x = torch.randn(2, 3, 32, 32)
    an = analyze_channels(model, x)
    keep = {}
    for g in an.groups:
        if g.kind == "heads":
            keep[g.id] = [0, 2]
        elif any(m.dim == "out" and m.module.endswith("mlp.fc1") for m in g.members):
            keep[g.id] = list(range(0, g.channels, 3))
    small = remove_channels(model, x, keep, analysis=an)
    attn = small.blocks[0].attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2 and attn.q_proj.out_features == 32
    assert small.blocks[1].mlp.fc1.out_features == 32 and small.blocks[1].mlp.fc2.in_features == 32
    ref = masked_reference(model, an, keep)
    with torch.no_grad():
        assert_close(small(x), ref(x))
    assert count_macs(small, x)["total"] < count_macs(model, x)["total"]


def test_vit_embedding_width_shrinks_params_and_layernorms():
    model = randomise(vit_tiny(embed_dim=48, depth=2, num_heads=3))
    x = torch.randn(2, 3, 32, 32)
    an = analyze_channels(model, x)
    embed = group_of(an.groups, "patch_embed", "out")
    assert not embed.exact
    kept = list(range(0, 48, 2))
    small = remove_channels(model, x, {embed.id: kept}, analysis=an)
    assert small.cls_token.shape == (1, 1, 24) and small.pos_embed.shape == (1, 65, 24)
    assert small.norm.normalized_shape == (24,) and small.head.in_features == 24
    torch.testing.assert_close(small.pos_embed, model.pos_embed[..., kept])
    assert small(x).shape == (2, 10)
    # the LayerNorms see fewer channels: the only difference from a model that never had them
    attn = small.blocks[0].attn
    assert attn.q_proj.in_features == 24 and attn.out_proj.out_features == 24 and attn.num_heads == 3


def test_pattern_conv_keeps_its_tap_masks():
    import autosculpt as asc
    from autosculpt.nn import PatternConv2d
    from autosculpt.patterns import PAPER6
    from autosculpt.plan import uniform_plan

    dense = randomise(resnet20())
    model = asc.sparsify(dense, uniform_plan(dense, PAPER6, 0.5)).eval()
    for m in model.modules():
        if isinstance(m, PatternConv2d):
            m.path = "dense"
    x = torch.randn(2, 3, 32, 32)
    an = analyze_channels(model, x)
    keep = random_keep(an, 0.5, seed=3)
    small = remove_channels(model, x, keep, analysis=an)
    g = group_of(an.groups, "layer2.1.conv1", "out")
    conv = small.get_submodule("layer2.1.conv1")
    assert isinstance(conv, PatternConv2d) and conv.out_channels == len(keep[g.id])
    assert torch.equal(conv.tap_mask, model.get_submodule("layer2.1.conv1").tap_mask[keep[g.id]])
    ref = masked_reference(model, an, keep)
    with torch.no_grad():
        assert_close(small(x), ref(x))


def test_removal_requests_are_checked():
    model = PlainCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    an = analyze_channels(model, x)
    groups = an.groups
    blocked = next(g for g in groups if not g.prunable)
    ok = next(g for g in groups if g.prunable)
    with pytest.raises(ValueError, match="not prunable"):
        remove_channels(model, x, {blocked.id: [0]}, analysis=an)
    with pytest.raises(ValueError, match="at least one"):
        remove_channels(model, x, {ok.id: []}, analysis=an)
    with pytest.raises(ValueError, match="out of range"):
        remove_channels(model, x, {ok.id: [0, 99]}, analysis=an)
    with pytest.raises(ValueError, match="not a group id"):
        remove_channels(model, x, {len(groups): [0]}, analysis=an)
    # keeping everything (even of an unprunable group) is the identity
    same = remove_channels(model, x, {blocked.id: list(range(blocked.channels))}, analysis=an)
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_pruned_multihead_attention_matches_torch(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(24, 4, batch_first=batch_first).eval()
    rep = PrunedMultiheadAttention.from_module(mha).eval()
    q = torch.randn(3, 7, 24) if batch_first else torch.randn(7, 3, 24)
    kv = torch.randn(3, 5, 24) if batch_first else torch.randn(5, 3, 24)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, -2:] = True
    mask = torch.triu(torch.ones(7, 5, dtype=torch.bool), 1)
    with torch.no_grad():
        for args, kwargs in (((q, q, q), {}), ((q, kv, kv), {"key_padding_mask": kpm}),
                             ((q, kv, kv), {"attn_mask": mask})):
            want = mha(*args, need_weights=need_weights, **kwargs)
            got = rep(*args, need_weights=need_weights, **kwargs)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
            else:
                assert got[1] is None and want[1] is None
    # fewer heads == the original with those heads' output columns zeroed
    small = rep.select(heads_keep=[1, 3])
    ref = PrunedMultiheadAttention.from_module(mha)
    with torch.no_grad():
        ref.out_proj.weight[:, 0:6] = 0
        ref.out_proj.weight[:, 12:18] = 0
        torch.testing.assert_close(small(q, q, q, need_weights=False)[0], ref(q, q, q, need_weights=False)[0],
                                   rtol=1e-5, atol=1e-5)


def test_timm_style_attention_shrinks_exactly():
    from autosculpt.channels import PrunedSelfAttention
    model = randomise(TimmAttentionNet())
    x = torch.randn(2, 7, 5)
    an = analyze_channels(model, x)
    keep = {group_of(an.groups, "attn", "heads").id: [1], group_of(an.groups, "inp", "out").id: [0, 3, 4, 8, 11]}
    small = remove_channels(model, x, keep, analysis=an)
    assert isinstance(small.attn, PrunedSelfAttention) and small.attn.num_heads == 1
    assert small.attn.qkv.weight.shape == (12, 5) and small.attn.proj.weight.shape == (12, 4)
    with torch.no_grad():
        assert_close(small(x), masked_reference(model, an, keep)(x))


def test_pruned_vit_can_be_pruned_again():
    model = randomise(vit_tiny(embed_dim=48, depth=1, num_heads=4))
    x = torch.randn(1, 3, 32, 32)
    an = analyze_channels(model, x)
    once = remove_channels(model, x, {group_of(an.groups, "blocks.0.attn", "heads").id: [0, 1, 3]}, analysis=an)
    an2 = analyze_channels(once, x)
    heads = group_of(an2.groups, "blocks.0.attn", "heads")
    assert heads.channels == 3 and heads.prunable
    twice = remove_channels(once, x, {heads.id: [0, 2]}, analysis=an2)
    assert twice.blocks[0].attn.head_ids == [0, 3]
    ref = masked_reference(model, an, {group_of(an.groups, "blocks.0.attn", "heads").id: [0, 3]})
    with torch.no_grad():
        assert_close(twice(x), ref(x))


class _MiscLayers(nn.Module):
    """GroupNorm (whole groups), PReLU per channel, InstanceNorm, a depthwise conv with multiplier 2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.act = nn.PReLU(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.b = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.dw(self.act(self.gn(self.a(x))))
        return self.fc(self.b(torch.relu(self.inorm(x))).mean((2, 3)))


def test_groupnorm_prelu_instancenorm_depthwise_multiplier():
    model = randomise(_MiscLayers())
    with torch.no_grad():
        model.act.weight.uniform_(0.1, 0.5)
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 6, 6)
    an = analyze_channels(model, x)
    g = group_of(an.groups, "a", "out")
    assert g.channels == 4 and g.prunable and g.exact
    small = remove_channels(model, x, {g.id: [1, 3]}, analysis=an)
    assert (small.gn.num_groups, small.gn.num_channels, small.act.num_parameters) == (2, 4, 4)
    assert (small.dw.in_channels, small.dw.out_channels, small.dw.groups, small.inorm.num_features) == (4, 8, 4, 8)
    with torch.no_grad():
        assert_close(small(x), masked_reference(model, an, {g.id: [1, 3]})(x))
