"""channel_groups: the groups found from the fx graph, for every coupling kind, and what blocks a group."""
import pytest
import torch
import torch.nn.functional as F
from channel_helpers import (
    PlainCNN,
    SEBlock,
    TimmAttentionNet,
    TinyDenseNet,
    TinyShuffleNet,
    Untraceable,
    WithOpaqueOp,
    group_of,
    randomise,
    tv_models,
)
from torch import nn

from autosculpt.channels import ChannelTraceError, analyze_channels, channel_groups
from autosculpt.models import mobilenetv2, resnet20, vit_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _dims(group):
    return {(m.module, m.dim) for m in group.members}


def test_plain_cnn_groups_and_flatten_mapping():
    groups = channel_groups(PlainCNN().eval(), torch.randn(2, 3, 8, 8))
    g1 = group_of(groups, "c1", "out")
    assert g1.prunable and g1.exact and g1.channels == 8
    assert _dims(g1) == {("c1", "out"), ("b1", "features"), ("c2", "in")}
    g2 = group_of(groups, "c2", "out")
    assert _dims(g2) == {("c2", "out"), ("b2", "features"), ("fc", "in")}
    # flatten of a 12x2x2 map: channel c is the linear's features 4c .. 4c+3
    fc = g2.member("fc", "in")
    assert fc.per_channel == 4 and fc.indices[5] == (20, 21, 22, 23)
    # the model input and output cannot lose channels
    assert not group_of(groups, "c1", "in").prunable
    out = group_of(groups, "fc", "out")
    assert not out.prunable and any("model output" in r for r in out.reasons)


def test_resnet20_residual_stage_is_one_group():
    model = resnet20()
    groups = channel_groups(model, torch.randn(1, 3, 32, 32))
    stage1 = group_of(groups, "conv1", "out")
    # the stem and every block's second conv of stage 1 are added together: one group of 16
    assert stage1.channels == 16 and stage1.prunable
    for b in range(3):
        assert ("layer1.%d.conv2" % b, "out") in _dims(stage1)
        assert ("layer1.%d.conv1" % b, "in") in _dims(stage1)
    # stage 2: the 1x1 shortcut joins its blocks' outputs
    stage2 = group_of(groups, "layer2.0.shortcut.0", "out")
    assert stage2.channels == 32 and ("layer2.2.conv2", "out") in _dims(stage2)
    # each block's hidden channels are their own group
    hidden = group_of(groups, "layer2.1.conv1", "out")
    assert _dims(hidden) == {("layer2.1.conv1", "out"), ("layer2.1.bn1", "features"), ("layer2.1.conv2", "in")}
    assert sum(g.prunable for g in groups) == 3 + 9  # 3 stages + 9 blocks


def test_bottleneck_resnet_hidden_and_residual_groups():
    tvm = tv_models()
    model = tvm.resnet50()
    groups = channel_groups(model, torch.randn(1, 3, 64, 64))
    b = "layer2.1"
    assert _dims(group_of(groups, f"{b}.conv1", "out")) == {(f"{b}.conv1", "out"), (f"{b}.bn1", "features"),
                                                             (f"{b}.conv2", "in")}
    assert _dims(group_of(groups, f"{b}.conv2", "out")) == {(f"{b}.conv2", "out"), (f"{b}.bn2", "features"),
                                                             (f"{b}.conv3", "in")}
    stage = group_of(groups, "layer2.0.downsample.0", "out")
    assert stage.channels == 512 and stage.prunable
    assert {("layer2.%d.conv3" % i, "out") for i in range(4)} <= _dims(stage)
    assert ("layer3.0.downsample.0", "in") in _dims(stage)
    last = group_of(groups, "layer4.2.conv3", "out")
    assert ("fc", "in") in _dims(last) and last.member("fc", "in").per_channel == 1


@pytest.mark.parametrize("source", ["builtin", "torchvision"])
def test_mobilenetv2_inverted_residual_hidden_group_holds_the_depthwise_conv(source):
    if source == "builtin":
        model, x = mobilenetv2(), torch.randn(1, 3, 32, 32)
        b = "features.5.conv"
        expand, bn1, dw, bn2, project = f"{b}.0", f"{b}.1", f"{b}.3", f"{b}.4", f"{b}.6"
    else:
        model, x = tv_models().mobilenet_v2(), torch.randn(1, 3, 64, 64)
        b = "features.5.conv"
        expand, bn1, dw, bn2, project = f"{b}.0.0", f"{b}.0.1", f"{b}.1.0", f"{b}.1.1", f"{b}.2"
    groups = channel_groups(model, x)
    g = group_of(groups, expand, "out")
    assert g.prunable and g.channels == model.get_submodule(expand).out_channels
    assert _dims(g) == {(expand, "out"), (bn1, "features"), (dw, "features"), (bn2, "features"), (project, "in")}
    # the residual stream: project outputs of a stage share channels
    stream = group_of(groups, project, "out")
    assert stream.prunable and (f"features.4.conv.{'6' if source == 'builtin' else '2'}", "out") in _dims(stream)


def test_concatenation_gives_each_part_its_offset():
    model = TinyDenseNet()
    groups = channel_groups(model, torch.randn(1, 3, 8, 8))
    stem = group_of(groups, "stem", "out")
    assert stem.channels == 6
    # the stem's channels sit at offset 0 of every later layer's input
    assert {m.module for m in stem.members if m.dim == "in"} == {"convs.0", "convs.1", "convs.2", "fc"}
    assert all(m.offset == 0 for m in stem.members)
    g1 = group_of(groups, "convs.1", "out")  # second layer's output: after 6 + 4 channels
    assert g1.channels == 4 and g1.prunable
    assert g1.member("convs.2", "in").offset == 10 and g1.member("fc", "in").offset == 10
    assert g1.member("head_norm", "features").indices == ((10,), (11,), (12,), (13,))
    assert ("norms.2", "features") in _dims(g1)


def test_channel_shuffle_and_split_couple_the_halves():
    model = TinyShuffleNet(8)
    an = analyze_channels(model, torch.randn(1, 3, 8, 8))
    groups = an.groups
    stem = group_of(groups, "stem.0", "out")
    assert stem.prunable
    # chunk(2) + shuffle: the groups keep the two halves equal, so no group is a single lone half
    branch_hidden = group_of(groups, "units.0.branch.0", "out")
    assert _dims(branch_hidden) == {("units.0.branch.0", "out"), ("units.0.branch.1", "features"),
                                    ("units.0.branch.3", "features"), ("units.0.branch.4", "features"),
                                    ("units.0.branch.5", "in")}
    # chunk(2) couples stem channel j with j+4 (the pieces stay equal); the shuffle then couples the
    # passed-through half with the branch output, and the next unit's chunk couples j with j+2
    assert stem.channels == 2
    assert stem.member("stem.0", "out").indices == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert stem.member("units.0.branch.0", "in").indices == ((0, 2), (1, 3))
    assert ("units.0.branch.5", "out") in _dims(stem) and ("units.1.branch.5", "out") in _dims(stem)


def test_torchvision_shufflenet_traces_and_groups():
    model = tv_models().shufflenet_v2_x0_5()
    groups = channel_groups(model, torch.randn(1, 3, 64, 64))
    assert sum(g.prunable for g in groups) >= 15
    branch = group_of(groups, "stage2.1.branch2.0", "out")
    assert branch.prunable and ("stage2.1.branch2.3", "features") in _dims(branch)  # its depthwise conv


def test_squeeze_excitation_scale_joins_the_channels():
    model = SEBlock()
    groups = channel_groups(model, torch.randn(1, 3, 8, 8))
    g = group_of(groups, "conv", "out")
    assert _dims(g) == {("conv", "out"), ("bn", "features"), ("fc1", "in"), ("fc2", "out"), ("out", "in")}
    assert g.prunable and g.exact
    squeeze = group_of(groups, "fc1", "out")
    assert _dims(squeeze) == {("fc1", "out"), ("fc2", "in")}


def test_vit_heads_mlp_hidden_units_and_embedding():
    model = vit_tiny(embed_dim=48, depth=2, num_heads=3)
    groups = channel_groups(model, torch.randn(1, 3, 32, 32))
    for i in range(2):
        heads = group_of(groups, f"blocks.{i}.attn", "heads")
        assert heads.kind == "heads" and heads.channels == 3 and heads.prunable and heads.exact
        mlp = group_of(groups, f"blocks.{i}.mlp.fc1", "out")
        assert _dims(mlp) == {(f"blocks.{i}.mlp.fc1", "out"), (f"blocks.{i}.mlp.fc2", "in")}
        assert mlp.channels == 96 and mlp.exact
    embed = group_of(groups, "patch_embed", "out")
    dims = _dims(embed)
    assert {("cls_token", "param"), ("pos_embed", "param"), ("blocks.0.attn", "in"), ("blocks.1.attn", "out"),
            ("norm", "features"), ("head", "in")} <= dims
    assert embed.prunable and not embed.exact and any("LayerNorm" in n for n in embed.notes)
    assert embed.member("cls_token", "param").axis == 2


def test_timm_style_attention_heads():
    groups = channel_groups(TimmAttentionNet(), torch.randn(2, 7, 5))
    heads = group_of(groups, "attn", "heads")
    assert heads.channels == 3 and heads.prunable
    assert _dims(group_of(groups, "inp", "out")) == {("inp", "out"), ("attn", "in")}


def test_unsupported_op_makes_its_group_unprunable_with_a_reason():
    groups = channel_groups(WithOpaqueOp(), torch.randn(1, 3, 8, 8))
    g = group_of(groups, "c1", "out")
    assert not g.prunable and any("opaque_channel_op" in r for r in g.reasons)
    # the op's output has unknown channels too: c2 cannot drop its inputs
    assert not group_of(groups, "c2", "in").prunable
    # the channels after it are fine
    assert group_of(groups, "c2", "out").prunable


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(ChannelTraceError, match="torch.fx could not trace Untraceable"):
        channel_groups(Untraceable(), torch.randn(1, 3, 8, 8))


class _FixedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x):
        return self.fc(self.c(x).view(-1, 64))  # 64 is baked in: removing a channel would reinterpret rows


class _PositionalSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.a, self.b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.c(x)
        return self.a(y[:, :4]) + self.b(y[:, 4:])


class _ChannelSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.d(F.softmax(self.c(x), dim=1))


@pytest.mark.parametrize("model, needle", [(_FixedView(), "fixed size"), (_PositionalSlice(), "by position"),
                                           (_ChannelSoftmax(), "softmax over channels")])
def test_uses_that_depend_on_the_channel_count_block_the_group(model, needle):
    groups = channel_groups(model, torch.randn(2, 3, 4, 4))
    g = group_of(groups, "c", "out")
    assert not g.prunable and any(needle in r for r in g.reasons), g.reasons


def test_norms_grouped_conv_and_depthwise_multiplier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.gn = nn.GroupNorm(4, 8)  # 2 channels per normalization group: they go together
            self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, multiplier 2
            self.g = nn.Conv2d(16, 8, 1, groups=2)  # grouped: not pruned
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.g(self.dw(self.gn(self.a(x))))
            return self.fc(self.ln(x.mean((2, 3))))

    groups = channel_groups(Net(), torch.randn(1, 3, 4, 4))
    a = group_of(groups, "a", "out")
    assert a.channels == 4 and a.member("a", "out").indices[1] == (2, 3)
    assert a.member("dw", "features").indices[1] == (4, 5, 6, 7)  # 2 inputs x multiplier 2
    assert not a.prunable and any("grouped conv" in r for r in a.reasons)
    ln = group_of(groups, "g", "out")
    assert not ln.prunable and not ln.exact  # blocked by the grouped conv, and a LayerNorm note


def test_analysis_does_not_change_the_model():
    model = randomise(resnet20()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_groups(model, torch.randn(2, 3, 32, 32))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics untouched


def test_tied_weights_and_misread_spatial_ops_block():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.mid = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight  # tied: slicing one would silently untie them

        def forward(self, ids):
            return self.head(torch.relu(self.mid(self.emb(ids))))

    groups = channel_groups(Tied(), torch.randint(0, 10, (2, 5)))
    g = group_of(groups, "emb", "out")
    assert not g.prunable and any("tied" in r for r in g.reasons)

    class PoolOverChannels(nn.Module):  # a 2-D pool on a 3-D (B, C, L) tensor pools C and L
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(3, 8, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.c(x)).flatten(1)

    g = group_of(channel_groups(PoolOverChannels(), torch.randn(2, 3, 5)), "c", "out")
    assert not g.prunable and any("spatial op over the channel dim" in r for r in g.reasons)
