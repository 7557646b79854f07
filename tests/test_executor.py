"""The graph executor (route "autosculpt_graph"): a fused channels-last model as one C++ call, checked
against the eager model on every op it covers, fresh random inputs, odd shapes, non-finite inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosculpt as asc
from autosculpt.deploy import deployed_form, optimize_for_inference
from autosculpt.executor import GraphExecutorModel, UnsupportedGraph
from autosculpt.fuse import fuse_for_inference
from autosculpt.models import get_model
from autosculpt.patterns import PAPER6
from autosculpt.plan import uniform_plan

HAS_CPU = asc.runtime.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")


def executor_for(model, x):
    fused = fuse_for_inference(model, x, dense_convs=True).to(memory_format=torch.channels_last)
    return GraphExecutorModel(fused, x.contiguous(memory_format=torch.channels_last))


def pruned_resnet20(seed):
    """A resnet20 with half of every 3x3 conv's taps (PAPER6, uniform), eval mode."""
    torch.manual_seed(seed)
    dense = get_model("resnet20", num_classes=10).eval()
    return asc.sparsify(dense, uniform_plan(dense, PAPER6, 0.5)).eval()


def check(model, x, atol=1e-4):
    model = model.eval()
    with torch.no_grad():
        ref = model(x)
        out = executor_for(model, x)(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol * max(1.0, float(ref.abs().max())), rtol=1e-4)
    return out


def randomize_bn(model):
    """Non-trivial BN statistics, so that folding is exercised and activations keep their scale."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name,size,batch", [("resnet20", 32, 1), ("resnet20", 30, 3), ("vgg16", 32, 2),
                                             ("digits_cnn", 8, 5), ("resnet56", 32, 1), ("mobilenetv2", 32, 2)])
@pytest.mark.parametrize("pruned", [False, True])
def test_builtin_models_equal_eager(name, size, batch, pruned):
    torch.manual_seed(1)
    in_chans = 1 if name == "digits_cnn" else 3
    dense = randomize_bn(get_model(name, num_classes=10, **({"in_chans": 1} if name == "digits_cnn" else {})).eval())
    model = asc.sparsify(dense, uniform_plan(dense, PAPER6, 0.5)).eval() if pruned else dense
    check(model, torch.randn(batch, in_chans, size, size))


def test_torchvision_resnet18_equals_eager():
    from tests.channels.channel_helpers import tv_models

    torch.manual_seed(0)
    dense = tv_models().resnet18(num_classes=17).eval()
    check(dense, torch.randn(2, 3, 64, 64))
    check(asc.sparsify(dense, uniform_plan(dense, PAPER6, 0.4)), torch.randn(1, 3, 72, 56))


def test_torchvision_mobilenet_v2_equals_eager():
    from tests.channels.channel_helpers import tv_models

    torch.manual_seed(0)
    dense = randomize_bn(tv_models().mobilenet_v2(num_classes=11).eval())
    nn.init.normal_(dense.classifier[1].weight, std=0.5)  # outputs of order 1, not 1e-3
    out = check(dense, torch.randn(2, 3, 64, 64))
    assert float(out.abs().max()) > 0.1


class Depthwise(nn.Module):
    """Depthwise convs (stride 2, dilation 2, a pattern mask) with ReLU6 fused and standalone."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 20, 1)
        self.dw = nn.Conv2d(20, 20, 3, stride=2, padding=1, groups=20)
        self.dw2 = asc.nn.PatternConv2d(20, 20, 3, padding=2, dilation=2, groups=20,
                                        tap_mask=torch.rand(20, 3, 3) > 0.4)
        self.act = nn.ReLU6()

    def forward(self, x):
        y = self.act(self.dw(self.pw(x)))
        z = F.relu6(self.dw2(y))
        return z + y.relu()  # y has two readers: its ReLU is a step of its own

class Mixed(nn.Module):
    """Every op the executor covers outside a fused ResNet: a padded non-2x2 max-pool, an unfused add,
    a standalone ReLU, dropout, a 5x5 dilated strided conv, flatten of a 3x3 map into a linear layer
    (NCHW flatten order) and a linear + ReLU classifier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.b = nn.Conv2d(24, 24, 5, stride=2, padding=4, dilation=2)
        self.c = nn.Conv2d(3, 24, 1, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fc1 = nn.Linear(24 * 3 * 3, 37)
        self.fc2 = nn.Linear(37, 5)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = self.b(self.a(x))
        y = F.relu(y + self.c(x))  # an add with two conv inputs and a ReLU after it
        y = self.pool(y)
        y = F.adaptive_avg_pool2d(y, 3)  # to its own size: no-op
        y = torch.flatten(y, 1)
        return self.fc2(self.drop(torch.relu(self.fc1(y))))


class GlobalMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 40, 3, padding=1)
        self.fc = nn.Linear(40, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_every_covered_op_equals_eager():
    torch.manual_seed(2)
    check(Mixed(), torch.randn(3, 3, 12, 12))
    check(GlobalMean(), torch.randn(4, 3, 9, 7))
    x = torch.randn(2, 3, 15, 13) * 4
    check(Depthwise(), x)


def test_every_output_element_is_written_and_buffers_do_not_leak_between_calls():
    model = pruned_resnet20(3)
    x = torch.randn(2, 3, 32, 32)
    ex = executor_for(model, x)
    call = ex.bound_call(x)
    out = call.keep[1]  # the output buffer the call writes
    out.fill_(float("nan"))
    call()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
        x2 = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ex(x2), model(x2), atol=1e-4, rtol=1e-4)  # a second input, same buffers
        x3 = torch.randn(5, 3, 32, 32)  # another batch: planned on its first call
        torch.testing.assert_close(ex(x3), model(x3), atol=1e-4, rtol=1e-4)
    assert ex.planned_shapes == [(2, 3, 32, 32), (5, 3, 32, 32)] and ex.num_steps > 0


def test_two_threads_equal_one():
    torch.manual_seed(4)
    dense = get_model("resnet20", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    ex = executor_for(dense, x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ex(x)
        torch.set_num_threads(2)
        two = ex(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)


def test_non_finite_input_propagates_as_the_reference():
    model = pruned_resnet20(5)
    x = torch.randn(2, 3, 32, 32)
    ex = executor_for(model, x)
    x[0, 1, 5, 7] = float("inf")
    x[1, 0, 0, 0] = float("nan")
    with torch.no_grad():
        ref, out = model(x), ex(x)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-4, rtol=1e-4)


class Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.a(x) * self.b(x)


def test_unsupported_models_say_which_node():
    torch.manual_seed(6)
    x = torch.randn(1, 3, 16, 16)
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)).eval()
    with pytest.raises(UnsupportedGraph, match="groups 2"):
        executor_for(grouped, x)
    with pytest.raises(UnsupportedGraph, match="GELU"):
        executor_for(nn.Sequential(nn.Conv2d(3, 8, 1), nn.GELU()).eval(), x)
    with pytest.raises(UnsupportedGraph, match="multiply of shapes"):  # only a map times a channel scale
        executor_for(Product().eval(), x)
    with pytest.raises(ValueError, match="x: expected a float32"):
        executor_for(nn.Sequential(nn.Conv2d(3, 8, 1)).eval(), x)(x.double())
    # the deployment race reports the route as skipped and deploys another one
    deployed = optimize_for_inference(grouped, x, routes=["autosculpt", "autosculpt_graph"], rounds=1)
    assert deployed.route == "autosculpt" and "groups 2" in deployed.report.skipped["autosculpt_graph"]
    with pytest.raises(RuntimeError, match="autosculpt_graph"):
        deployed_form(grouped, x, "autosculpt_graph")


def test_step_times_name_every_step():
    torch.manual_seed(7)
    model = GlobalMean().eval()
    x = torch.randn(2, 3, 9, 7)
    ex = executor_for(model, x)
    times = ex.step_times(x, repeats=3)
    assert [n.split(" ")[0] for n, _ in times] == ["conv", "mean", "fc"]  # the ReLU is fused into the conv
    assert all(t >= 0 for _, t in times) and len(times) == ex.num_steps
    with pytest.raises(ValueError, match="repeats"):
        ex.step_times(x, repeats=0)


def test_bound_call_runs_the_steps_into_its_own_buffer():
    torch.manual_seed(8)
    model = GlobalMean().eval()
    x = torch.randn(2, 3, 9, 7)
    ex = executor_for(model, x)
    call = ex.bound_call(x)
    with torch.no_grad():
        torch.testing.assert_close(call(), model(x), atol=1e-4, rtol=1e-4)
    mixed = executor_for(pruned_resnet20(9), torch.randn(1, 3, 32, 32))
    nan_x = torch.randn(1, 3, 32, 32)
    nan_x[0, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        mixed.bound_call(nan_x)()


class ChannelwiseChain(nn.Module):
    """conv -> ReLU -> max-pool -> depthwise -> conv (+ a second conv added to it) -> mean -> linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.b = nn.Conv2d(24, 20, 3, padding=1)
        self.c = nn.Conv2d(24, 20, 1)
        self.fc = nn.Linear(20, 5)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        h = self.dw(self.pool(torch.relu(self.a(x))))
        y = torch.relu(self.b(h) + self.c(h))
        return self.fc(y.mean((2, 3)))


def test_block_channel_order_only_where_every_reader_can_follow():
    """A conv whose output reaches only convs and linears (through channelwise ops) stores its channels
    block by block; one whose output meets another producer's (an add, a residual) or the graph's
    output keeps the order. The result equals eager either way."""
    torch.manual_seed(11)
    x = torch.randn(2, 3, 32, 32)
    ex = executor_for(pruned_resnet20(11), x)
    convs1 = {f"layer{i}_{j}_conv1" for i in (1, 2, 3) for j in range(3)}
    assert set(ex.reordered_layers) == convs1  # conv2 / shortcuts / stem feed the residual adds
    dense = ChannelwiseChain().eval()
    masks = {n: PAPER6.masks[torch.randint(1, 6, (m.out_channels,))] for n, m in dense.named_children()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1}
    model = dense
    for name, m in masks.items():
        setattr(model, name, asc.nn.PatternConv2d.from_dense(getattr(dense, name), m))
    ex = executor_for(model.eval(), x)
    assert ex.reordered_layers == ["a"]  # through ReLU, max-pool and the depthwise conv into b and c
    check(model, x)


@pytest.mark.parametrize("name,batch", [("vgg16", 4), ("mobilenetv2", 6), ("resnet20", 9), ("resnet20", 3)])
def test_batches_run_image_by_image_on_two_threads(name, batch):
    """Batches run image by image through each run of per-image steps (a thread per image with 2
    threads; values inside a run in thread-private buffers), and convs with large weights per image
    (VGG-16's 512-channel convs on 2x2 maps) and the classifier on the whole batch between them: the
    result equals eager with 1 and 2 threads, and a non-finite value in one image still gives the
    reference's output."""
    torch.manual_seed(12)
    dense = randomize_bn(get_model(name, num_classes=10).eval())
    model = asc.sparsify(dense, uniform_plan(dense, PAPER6, 0.5)).eval()
    x = torch.randn(batch, 3, 32, 32)
    ex = executor_for(model, x)
    # whole images per thread for an even batch or one of at least 4 per thread (3 on 2: shared images)
    split, whole = ex.batch_schedule(x, threads=2)
    assert split == (batch != 3) and ex.batch_schedule(x, threads=1)[0] is False
    assert whole[-1].startswith(("fc", "classifier", "linear"))  # the classifier: the whole batch
    if name == "vgg16":  # and its 512-channel convs on 2x2 maps
        assert any("PatternConv2d" in n for n in whole)
    else:
        assert len(whole) == 1
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.no_grad():
                ref = model(x)
                torch.testing.assert_close(ex(x), ref, atol=1e-4 * max(1.0, float(ref.abs().max())), rtol=1e-4)
        bad = x.clone()
        bad[batch - 1, 0, 5, 5] = float("inf")
        with torch.no_grad():
            ref, out = model(bad), ex(bad)
        assert torch.equal(out.isnan(), ref.isnan())
        torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=1e-3, rtol=1e-3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 9, 17, 26])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0), (2, 0)])
def test_depthwise_3x3_every_width_equals_eager(width, stride, padding):
    """3x3 depthwise convs run their inner columns through a constant-shape tile and the border ones
    through the general tile: every width, stride and padding matches eager (channels not a multiple of
    16: masked lanes)."""
    if width + 2 * padding < 3:
        pytest.skip("no output column")
    torch.manual_seed(width * 10 + stride)
    model = nn.Sequential(nn.Conv2d(21, 21, 3, stride=stride, padding=padding, groups=21), nn.ReLU6()).eval()
    check(model, torch.randn(2, 21, 7, width))


class SqueezeExcite(nn.Module):
    """SiLU / sigmoid (modules and functions) and squeeze-excitation: a map times a per-channel scale of
    each image, in both operand orders, on an odd channel count (vector tails)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 21, 3, padding=1)
        self.fc1 = nn.Conv2d(21, 5, 1)
        self.fc2 = nn.Conv2d(5, 21, 1)
        self.act, self.gate = nn.SiLU(), nn.Sigmoid()
        self.dw = nn.Conv2d(21, 21, 3, padding=1, groups=21)
        self.head = nn.Linear(21, 4)

    def forward(self, x):
        y = self.act(self.conv(x))
        s = self.gate(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = s * y
        z = self.dw(y)
        z = z * torch.sigmoid(z.mean((2, 3), keepdim=True))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.silu(z), 1), 1))


@pytest.mark.parametrize("batch", [1, 3])
def test_silu_sigmoid_and_squeeze_excitation_equal_eager(batch):
    torch.manual_seed(batch)
    check(SqueezeExcite(), torch.randn(batch, 3, 9, 7) * 3)


def test_smooth_activations_at_extremes_and_nan():
    """The executor's SiLU and sigmoid against torch on large magnitudes (the exp clamp), every tail
    length of a 16-lane vector, and NaN (propagated, as in torch)."""
    from autosculpt import _C

    for numel in (1, 15, 16, 17, 40):
        x = torch.linspace(-120.0, 120.0, numel)
        if numel > 3:
            x[3] = float("nan")
        for act, ref in ((1, F.silu(x)), (2, torch.sigmoid(x))):
            ex = _C.GraphExecutor([numel, numel], 1)
            ex.add_act(0, 1, numel, act)
            out = torch.empty(numel)
            assert ex.run(x.data_ptr(), out.data_ptr(), 1)
            assert torch.equal(out.isnan(), ref.isnan())
            torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=1e-6, rtol=1e-6)


def test_torchvision_efficientnet_b0_equals_eager():
    from tests.channels.channel_helpers import tv_models

    torch.manual_seed(0)
    dense = randomize_bn(tv_models().efficientnet_b0(num_classes=9).eval())
    nn.init.normal_(dense.classifier[1].weight, std=0.5)
    out = check(dense, torch.randn(2, 3, 64, 64))
    assert float(out.abs().max()) > 0.1
    route = optimize_for_inference(dense, torch.randn(1, 3, 64, 64), routes=("autosculpt_graph",)).route
    assert route == "autosculpt_graph"
    # channel-pruned (squeeze-excitation groups shrink with their blocks) through the executor too
    from autosculpt.plan import plan_for_mac_cut

    x = torch.randn(1, 3, 64, 64)
    small = plan_for_mac_cut(dense, x, 2.0).apply(dense, x).eval()
    check(small, torch.randn(3, 3, 64, 64))
