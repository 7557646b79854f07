"""fuse_for_inference: BN folding, residual and ReLU fusion give the same outputs as the unfused model."""
import pytest
import torch
from conftest import requires_ext
from torch import nn

import autosculpt as asc
from autosculpt.fuse import fuse_for_inference
from autosculpt.models import get_model
from autosculpt.nn import PatternConv2d
from autosculpt.patterns import PAPER6
from autosculpt.plan import uniform_plan


def _randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def _pruned(name, kept=0.5, in_chans=3):
    dense = _randomise_bn(get_model(name, num_classes=10, in_chans=in_chans)).eval()
    return dense, asc.sparsify(dense, uniform_plan(dense, PAPER6, kept)).eval()


@requires_ext
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_resnet_fusion_matches_and_counts(path):
    dense, pruned = _pruned("resnet20")
    for m in pruned.modules():
        if isinstance(m, PatternConv2d):
            m.path = path
    x = torch.randn(3, 3, 32, 32)
    fused = fuse_for_inference(pruned, x)
    rep = fused.fusion_report
    n_pattern = sum(isinstance(m, PatternConv2d) for m in pruned.modules())
    assert rep["bn_folded"] == sum(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    assert rep["residual"] == 9  # one per BasicBlock: the second conv takes the shortcut
    assert rep["relu"] == n_pattern  # every pattern conv of a ResNet is followed by a ReLU
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        ref, got = pruned(x), fused(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the original model is not modified
    assert any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    assert all(m.activation is None for m in pruned.modules() if isinstance(m, PatternConv2d))


@requires_ext
def test_dropped_taps_stay_zero_after_bn_folding():
    _, pruned = _pruned("digits_cnn", kept=0.4, in_chans=1)
    fused = fuse_for_inference(pruned, torch.randn(2, 1, 8, 8))
    for m in fused.modules():
        if isinstance(m, PatternConv2d):
            assert (m.weight * ~m.tap_mask[:, None]).abs().max() == 0
            assert m.bias is not None and m.activation == "relu"


def test_dense_model_gets_bn_folded_and_relu_left_alone():
    dense = _randomise_bn(get_model("vgg16", num_classes=10, in_chans=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = fuse_for_inference(dense, x)
    assert fused.fusion_report == {"bn_folded": 13, "residual": 0, "relu": 0, "max_pool": 5}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), dense(x), rtol=1e-4, atol=1e-4)


class _Broadcast(nn.Module):
    """A conv whose output is added to a broadcast tensor and used twice: nothing may be fused."""

    def __init__(self):
        super().__init__()
        self.conv = PatternConv2d(4, 4, 3, padding=1, tap_mask=PAPER6.masks[torch.tensor([1, 2, 3, 5])])
        self.shared = PatternConv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x) + x.mean((2, 3), keepdim=True)  # broadcast add: not a residual
        z = self.shared(torch.relu(y))
        return torch.relu(self.shared(z)) + z  # the shared module is called twice: no ReLU fusion


def test_unsafe_patterns_are_not_fused():
    model = _Broadcast().eval()
    x = torch.randn(2, 4, 6, 6)
    fused = fuse_for_inference(model, x)
    assert fused.fusion_report == {"bn_folded": 0, "residual": 0, "relu": 0, "max_pool": 0}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


def test_bad_inputs():
    dense, _ = _pruned("resnet20")
    with pytest.raises(ValueError, match="eval"):
        fuse_for_inference(dense.train(), torch.randn(1, 3, 32, 32))

    class Untraceable(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ValueError, match="trace"):
        fuse_for_inference(Untraceable().eval(), torch.randn(2))
    with pytest.raises(TypeError, match="example_input"):
        fuse_for_inference(dense.eval(), [1, 2])


def test_to_dense_refuses_a_fused_activation():
    layer = PatternConv2d(3, 4, 3, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        layer.to_dense()
    with pytest.raises(ValueError, match="activation"):
        PatternConv2d(3, 4, 3, activation="tanh")


def test_for_inference_warns_and_falls_back_for_untraceable_models():
    from autosculpt.fuse import for_inference

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # data-dependent control flow: fx cannot trace it

    model = Branchy().eval()
    with pytest.warns(RuntimeWarning, match="fusion skipped"):
        assert for_inference(model, torch.randn(1, 2, 5, 5)) is model
    single = nn.Conv2d(2, 3, 3)
    assert for_inference(single, torch.randn(1, 2, 5, 5)) is single  # nothing to fuse: no warning


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 5, 7, 9), (3, 2, 2, 3), (4, 1, 2, 6)])
def test_max_pool_2x2_equals_torch(shape):
    from autosculpt.fuse import MaxPool2x2

    x = torch.randn(shape)
    x.view(-1)[::7] = float("nan")  # NaN propagates as in max_pool2d
    ref, got = nn.MaxPool2d(2)(x), MaxPool2x2()(x)
    assert got.shape == ref.shape
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
    with pytest.raises(ValueError, match="too small"):
        MaxPool2x2()(torch.randn(1, 2, 1, 4))


def test_max_pools_without_dilation_or_ceil_mode_are_replaced():
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(3, 1, 1),
                          nn.MaxPool2d((2, 2), stride=2), nn.MaxPool2d(2, stride=1), nn.MaxPool2d(3, 2, 1),
                          nn.MaxPool2d(3, dilation=2)).eval()
    x = torch.randn(2, 3, 129, 129)
    fused = fuse_for_inference(model, x)
    assert fused.fusion_report["max_pool"] == 5
    kinds = [type(m).__name__ for m in fused.children()]
    assert kinds == ["MaxPool2x2", "MaxPool2d", "FastMaxPool2d", "MaxPool2x2", "FastMaxPool2d", "FastMaxPool2d",
                     "MaxPool2d"]
    torch.testing.assert_close(fused(x), model(x))


@pytest.mark.parametrize("shape,k,s,p", [((1, 64, 112, 112), 3, 2, 1), ((3, 5, 17, 13), 3, 2, 1), ((2, 3, 9, 9), 2, 2, 0),
                                         ((1, 2, 7, 8), (3, 2), (1, 3), (1, 1)), ((2, 4, 5, 5), 5, 1, 2), ((0, 3, 6, 6), 3, 2, 1),
                                         ((3, 6, 6), 2, 1, 1)])
def test_fast_max_pool_equals_torch(shape, k, s, p):
    from autosculpt.ops import max_pool2d

    x = torch.randn(shape)
    if x.numel():
        x.view(-1)[::11] = float("nan")
        x.view(-1)[3::13] = float("-inf")
    ref, got = torch.nn.functional.max_pool2d(x, k, s, p), max_pool2d(x, k, s, p)
    assert got.shape == ref.shape
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
    compiled = torch.compile(lambda t: max_pool2d(t, k, s, p), fullgraph=True, backend="eager")
    assert torch.equal(torch.nan_to_num(compiled(x)), torch.nan_to_num(ref))
