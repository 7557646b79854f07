"""An exported deployed.pt2 run through the graph executor (autosculpt.load_deployed): built-in models,
dense, pattern-pruned and channel-pruned, equal to eager at the example batch and at another one;
non-finite inputs propagate as in eager; uncovered ops raise UnsupportedGraph naming the node."""
import warnings

import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt.executor import UnsupportedGraph
from autosculpt.export import _export_dynamic_batch, export_model
from autosculpt.fuse import fuse_for_inference
from autosculpt.models import get_model
from autosculpt.patterns import PAPER6
from autosculpt.plan import plan_for_mac_cut, uniform_plan
from autosculpt.program import executor_from_program

HAS_CPU = asc.runtime.available_backends()["cpu"]
pytestmark = [pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built"), pytest.mark.usefixtures("one_thread")]

SHAPES = {"resnet20": (3, 16, 16), "vgg16": (3, 32, 32), "mobilenetv2": (3, 16, 16), "digits_cnn": (1, 8, 8)}


def randomize_bn(model):
    """Non-trivial BN statistics, so that folding is exercised and activations keep their scale."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def build(name, kind, x):
    torch.manual_seed(3)
    kw = {"in_chans": 1} if name == "digits_cnn" else {}
    model = randomize_bn(get_model(name, num_classes=10, **kw)).eval()
    if kind == "pruned":
        model = asc.sparsify(model, uniform_plan(model, PAPER6, 0.5)).eval()
    elif kind == "channels":
        model = plan_for_mac_cut(model, x, 2).apply(model, x).eval()
    return model


def save_deployed(model, x, path):
    """deployed.pt2 as ``autosculpt export`` writes it (the fused form, dynamic batch)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        ep = _export_dynamic_batch(fuse_for_inference(model, x), x, 4096)
    torch.export.save(ep, str(path))
    return str(path)


def assert_equal(out, ref):
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4 * max(1.0, float(ref.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("name,kind", [(n, k) for n in SHAPES for k in ("dense", "pruned")]
                         + [("resnet20", "channels")])
def test_loaded_program_equals_eager(tmp_path, name, kind):
    x = torch.randn(2, *SHAPES[name])
    model = build(name, kind, x)
    run = asc.load_deployed(save_deployed(model, x, tmp_path / "deployed.pt2"), x)
    assert run.executor.num_steps > 0
    with torch.no_grad():
        assert_equal(run(x), model(x))
        assert_equal(run(x.contiguous(memory_format=torch.channels_last)), model(x))
        xb = torch.randn(3, *SHAPES[name])  # another batch size: planned on its first call
        assert_equal(run(xb), model(xb))


@pytest.fixture(scope="module")
def resnet20_pruned(tmp_path_factory):
    """(model, example input, loaded executor) of a pattern-pruned resnet20."""
    x = torch.randn(2, 3, 16, 16)
    model = build("resnet20", "pruned", x)
    return model, x, asc.load_deployed(save_deployed(model, x, tmp_path_factory.mktemp("r20") / "deployed.pt2"), x)


def test_residual_adds_and_relus_run_in_conv_epilogues(resnet20_pruned):
    model, x, run = resnet20_pruned
    from autosculpt.deploy import deployed_form

    # the same C++ steps as the deploy route's executor built from the Python model
    assert run.executor.num_steps == deployed_form(model, x, "autosculpt_graph").inner.num_steps
    convs = [m for m in run.module.modules() if hasattr(m, "tap_mask")]
    assert len(convs) == 21 and sum(m.activation == "relu" for m in convs) == 19
    residual = [n for n in run.module.graph.nodes if n.op == "call_module" and "residual" in n.kwargs]
    assert len(residual) == 9  # every block's shortcut add (identity or 1x1 conv) is the conv's residual


def test_non_finite_inputs_propagate_as_in_eager(resnet20_pruned):
    model, _, run = resnet20_pruned
    bad = torch.randn(3, 3, 16, 16)
    bad[0, 1, 4, 5] = float("nan")
    bad[1, 0, 7, 7] = float("inf")
    with torch.no_grad():
        ref, out = model(bad), run(bad)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(ref[:2]).any())
    assert_equal(out[2], ref[2])


class SigmoidHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.sigmoid(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def test_uncovered_op_raises_naming_it_and_export_still_succeeds(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(SigmoidHead()).eval()
    path = save_deployed(model, x, tmp_path / "deployed.pt2")
    with pytest.raises(UnsupportedGraph, match="sigmoid"):
        asc.load_deployed(path, x)
    paths = export_model(model, x, str(tmp_path / "exported"), onnx=False)
    assert "deployed_pt2" in paths and not paths.executor_ok
    assert any("not covered" in n and "sigmoid" in n for n in paths.notes)


def test_export_checks_the_executor_route(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    model = build("digits_cnn", "pruned", x)
    paths = export_model(model, x, str(tmp_path), onnx=False)
    assert paths.executor_ok and any("equals the model" in n for n in paths.notes)
    run = executor_from_program(torch.export.load(paths["deployed_pt2"]), x)  # an ExportedProgram, not a path
    xb = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert_equal(run(xb), model(xb))
