"""fold_empty_filters: an all-zero filter's constant output is folded into its consumers' biases and the
channel removed; the folded model computes what the original computes (fp32), and channels whose
constant would not be exact are kept with a reason."""
import pytest
import torch
import torch.nn.functional as F
from channel_helpers import SEBlock, assert_close, randomise
from torch import nn

from autosculpt.channels import empty_filters, fold_empty_filters
from autosculpt.flops import count_macs
from autosculpt.models import mobilenetv2, resnet20
from autosculpt.nn import PatternConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


class Chain(nn.Module):
    """c1 (3x3, pad) -> BN -> ReLU -> c2 (1x1) -> BN -> ReLU -> c3 (3x3, pad) -> ReLU -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 1)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.c3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def _zero(conv, rows):
    with torch.no_grad():
        conv.weight[rows] = 0


def test_zeroed_conv_filters_fold_exactly():
    model = randomise(Chain())
    _zero(model.c1, [1, 5])  # consumer c2 is 1x1: folded
    _zero(model.c2, [0, 3])  # consumer c3 pads: kept
    _zero(model.c3, [2, 7, 11])  # pooled, flattened, read by fc: folded
    x = torch.randn(3, 3, 8, 8)
    assert empty_filters(model) == {"c1": [1, 5], "c2": [0, 3], "c3": [2, 7, 11]}
    result = fold_empty_filters(model, x)
    assert result.folded == [("c1", 1), ("c1", 5), ("c3", 2), ("c3", 7), ("c3", 11)]
    assert [(m, c) for m, c, _ in result.kept] == [("c2", 0), ("c2", 3)]
    assert all("pads its input" in why for _, _, why in result.kept)
    small = result.model
    assert (small.c1.out_channels, small.b1.num_features, small.c2.in_channels) == (6, 6, 6)
    assert (small.c3.out_channels, small.fc.in_features) == (9, 36)
    with torch.no_grad():
        assert_close(small(x), model(x))
        x2 = torch.randn(2, 3, 8, 8) * 3  # the constants do not depend on the input
        assert_close(small(x2), model(x2))
    assert count_macs(small, x)["total"] < count_macs(model, x)["total"]


def test_pattern_zero_filters_of_pattern_convs_fold():
    model = randomise(Chain())
    masks = torch.ones(8, 3, 3, dtype=torch.bool)
    masks[[0, 4, 6]] = False  # pattern 0: an empty filter
    masks[2, 0] = False  # another filter keeps some taps
    model.c1 = PatternConv2d.from_dense(model.c1, masks, path="dense")
    masks3 = torch.ones(12, 3, 3, dtype=torch.bool)
    masks3[[3, 9]] = False
    model.c3 = PatternConv2d.from_dense(model.c3, masks3, path="dense")
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    result = fold_empty_filters(model, x)
    assert result.folded == [("c1", 0), ("c1", 4), ("c1", 6), ("c3", 3), ("c3", 9)]
    small = result.model
    assert isinstance(small.c1, PatternConv2d) and small.c1.out_channels == 5
    assert torch.equal(small.c1.tap_mask, masks[[1, 2, 3, 5, 7]])
    with torch.no_grad():
        assert_close(small(x), model(x))


def test_mobilenetv2_depthwise_pattern_zero_folds_into_the_projection():
    model = randomise(mobilenetv2())
    block = model.features[4].conv
    _zero(block[3], [0, 5, 7])  # depthwise filters: constant after BN/ReLU6, read by the 1x1 projection
    _zero(block[0], [1])  # expansion filter: read by the padded depthwise conv, kept
    x = torch.randn(2, 3, 32, 32)
    result = fold_empty_filters(model, x)
    assert result.folded == [("features.4.conv.3", 0), ("features.4.conv.3", 5), ("features.4.conv.3", 7)]
    assert len(result.kept) == 1 and "pads" in result.kept[0][2]
    small = result.model.features[4].conv
    hidden = model.features[4].conv[0].out_channels - 3
    assert small[0].out_channels == small[3].out_channels == small[3].groups == small[6].in_channels == hidden
    with torch.no_grad():
        assert_close(result.model(x), model(x))


def test_residual_and_coupled_channels_are_kept():
    model = randomise(resnet20())
    _zero(model.layer1[0].conv2, [3])  # added to the shortcut: not constant
    _zero(model.layer1[1].conv1, [2])  # consumer conv2 pads
    x = torch.randn(1, 3, 32, 32)
    result = fold_empty_filters(model, x)
    assert result.folded == []
    reasons = {(m, c): why for m, c, why in result.kept}
    assert "residual" in reasons[("layer1.0.conv2", 3)]
    assert "pads" in reasons[("layer1.1.conv1", 2)]
    with torch.no_grad():
        assert_close(result.model(x), model(x))

    se = randomise(SEBlock())
    _zero(se.conv, [1])  # scaled by the SE branch: its output is not constant
    result = fold_empty_filters(se, torch.randn(2, 3, 8, 8))
    assert result.folded == [] and "coupled" in result.kept[0][2]


class _PaddedPool(nn.Module):
    def __init__(self, count_include_pad):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad)
        self.c2 = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.c2(self.pool(F.relu(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_constant_is_checked_over_positions(count_include_pad):
    model = randomise(_PaddedPool(count_include_pad))
    with torch.no_grad():
        model.c1.bias[1] = 0.7  # the constant: relu(0.7) = 0.7
    _zero(model.c1, [1])
    x = torch.randn(2, 3, 6, 6)
    result = fold_empty_filters(model, x)
    if count_include_pad:  # zero padding averaged in: the borders differ
        assert result.folded == [] and "not constant" in result.kept[0][2]
    else:
        assert result.folded == [("c1", 1)]
    with torch.no_grad():
        assert_close(result.model(x), model(x))


def test_a_group_keeps_its_last_channel():
    model = randomise(Chain())
    _zero(model.c1, list(range(8)))
    x = torch.randn(1, 3, 8, 8)
    result = fold_empty_filters(model, x)
    assert len(result.folded) == 7 and result.model.c1.out_channels == 1
    assert any("last channel" in why for _, _, why in result.kept)
    with torch.no_grad():
        assert_close(result.model(x), model(x))


def test_nothing_empty_is_a_copy():
    model = randomise(Chain())
    x = torch.randn(1, 3, 8, 8)
    result = fold_empty_filters(model, x)
    assert result.folded == [] and result.kept == [] and result.model is not model
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_empty_mlp_hidden_units_fold_into_fc2():
    from autosculpt.models import vit_tiny

    model = randomise(vit_tiny(embed_dim=48, depth=2, num_heads=3))
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[[4, 10, 50]] = 0  # GELU(bias) is a constant for fc2
    x = torch.randn(2, 3, 32, 32)
    result = fold_empty_filters(model, x)
    assert result.folded == [("blocks.1.mlp.fc1", 4), ("blocks.1.mlp.fc1", 10), ("blocks.1.mlp.fc1", 50)]
    assert result.model.blocks[1].mlp.fc2.in_features == 93
    with torch.no_grad():
        assert_close(result.model(x), model(x))
