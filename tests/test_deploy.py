"""optimize_for_inference (the deployed form) and the exported deployment artifacts."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt.deploy import CHANNELS_LAST_ROUTES, QUICK_ROUTES, DeployedModel, deployed_form, optimize_for_inference
from autosculpt.export import export_model
from autosculpt.models import get_model
from autosculpt.patterns import PAPER6
from autosculpt.plan import uniform_plan

HAS_CPU = asc.runtime.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")
REPO = Path(__file__).resolve().parents[1]


def _pruned(name="resnet20"):
    torch.manual_seed(0)
    dense = get_model(name, num_classes=10).eval()
    return dense, asc.sparsify(dense, uniform_plan(dense, PAPER6, 0.5)).eval()


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_optimize_for_inference_equals_eager_and_reports_routes(which):
    dense, pruned = _pruned()
    model = dense if which == "dense" else pruned
    x = torch.randn(2, 3, 32, 32)
    routes = ["autosculpt"] if which == "pruned" else ["autosculpt", "inductor_channels_last"]
    lines = []
    deployed = optimize_for_inference(model, x, routes=routes, rounds=3, log=lines.append)
    assert isinstance(deployed, DeployedModel) and deployed.route in routes
    assert set(deployed.report.median_ms) == set(routes) and not deployed.report.skipped
    assert all(v > 0 for v in deployed.report.median_ms.values())
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(deployed(x), ref, atol=1e-4, rtol=1e-4)
    assert any("deployed route" in line for line in lines)


def test_optimize_for_inference_rejects_bad_arguments():
    dense, pruned = _pruned()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="routes: unknown route"):
        optimize_for_inference(dense, x, routes=["tensorrt"])
    with pytest.raises(ValueError, match="inductor_channels_last"):
        optimize_for_inference(pruned, x, routes=["inductor_channels_last"])
    with pytest.raises(ValueError, match="eval"):
        optimize_for_inference(dense.train(), x)
    with pytest.raises(TypeError, match="example_input"):
        optimize_for_inference(dense.eval(), [1, 2])


@pytest.mark.parametrize("route", QUICK_ROUTES)
def test_deployed_form_builds_one_route_checked_against_eager(route):
    dense, pruned = _pruned()
    x = torch.randn(3, 3, 32, 32)  # an odd batch, not the one the form was checked at
    deployed = deployed_form(pruned, x[:2], route)
    assert deployed.route == route and deployed.report is None
    assert deployed.channels_last == (route in CHANNELS_LAST_ROUTES)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), pruned(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="route: unknown route"):
        deployed_form(pruned, x, "tensorrt")
    with pytest.raises(ValueError, match="inductor_channels_last"):
        deployed_form(pruned, x, "inductor_channels_last")


def test_deployed_form_raises_when_the_route_disagrees(monkeypatch):
    import autosculpt.deploy as deploy

    dense, _ = _pruned()
    x = torch.randn(1, 3, 32, 32)
    real = deploy._build_route
    monkeypatch.setattr(deploy, "_build_route", lambda *a: (lambda t: real(*a)[0](t) + 1.0, None, False))
    with pytest.raises(RuntimeError, match="output differs from the eager model"):
        deployed_form(dense, x, "autosculpt")


def test_export_writes_the_deployed_form_with_a_dynamic_batch(tmp_path):
    _, pruned = _pruned()
    x = torch.randn(2, 3, 32, 32)
    paths = export_model(pruned, x, str(tmp_path), onnx=False)
    assert {"deployed_pt2", "pruned_pt2", "dense_equivalent_pt2"} <= set(paths)
    program = torch.export.load(paths["deployed_pt2"]).module()
    with torch.no_grad():
        for b in (1, 5):
            xb = torch.randn(b, 3, 32, 32)
            torch.testing.assert_close(program(xb), pruned(xb), atol=1e-4, rtol=1e-4)
    names = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert any("autosculpt" in str(t) for t in names)  # the deployed program runs AutoSculpt's kernels


@pytest.mark.slow
def test_aoti_package_runs_without_the_model_class(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    pruned = asc.sparsify(model, uniform_plan(model, PAPER6, 0.5)).eval()
    x = torch.randn(2, 3, 16, 16)
    paths = export_model(pruned, x, str(tmp_path), onnx=False, aoti=True)
    xb = torch.randn(3, 3, 16, 16)
    torch.save({"x": xb, "y": pruned(xb).detach()}, tmp_path / "io.pt")
    code = ("import sys, torch, autosculpt; "
            "run = torch._inductor.aoti_load_package(sys.argv[1]); d = torch.load(sys.argv[2]); "
            "torch.testing.assert_close(run(d['x']), d['y'], atol=1e-4, rtol=1e-4); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, paths["deployed_aoti_pt2"], str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def _with_empty_filters():
    """A small net whose 3×3 convs have empty filters (pattern 0): those of ``a`` feed a 1×1 conv (foldable),
    those of ``c`` reach the classifier through average pooling (foldable), those of ``b`` feed a padded
    3×3 conv (kept: the constant would be wrong at the borders)."""
    from collections import OrderedDict

    from autosculpt.plan import conv_layer_plan

    torch.manual_seed(1)
    net = nn.Sequential(OrderedDict([
        ("a", nn.Conv2d(3, 24, 3, padding=1)), ("a_bn", nn.BatchNorm2d(24)), ("a_relu", nn.ReLU()),
        ("p", nn.Conv2d(24, 16, 1)), ("p_relu", nn.ReLU()),
        ("b", nn.Conv2d(16, 16, 3, padding=1)), ("b_relu", nn.ReLU()),
        ("c", nn.Conv2d(16, 20, 3, padding=1)), ("c_relu", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(20, 5))])).eval()
    for bn in [net.a_bn]:
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.data.uniform_(-0.5, 1)
    ids = {"a": [0 if f % 3 == 0 else 1 + f % 5 for f in range(24)],  # 8 empty
           "b": [0 if f < 4 else 2 for f in range(16)],                # 4 empty
           "c": [0 if f % 2 else 1 + f % 5 for f in range(20)]}        # 10 empty
    plan = {"version": 1, "layers": {n: conv_layer_plan(PAPER6, v) for n, v in ids.items()}}
    return asc.sparsify(net, plan).eval()


@pytest.mark.parametrize("route", QUICK_ROUTES)
def test_deployed_form_removes_empty_filters_as_channels(route):
    """Pattern 0 is real channel removal in the deployed form: empty filters whose constant output can be
    folded exactly are gone from the producer and the consumers (smaller 1×1 conv and classifier), the
    others stay, and the form equals the eager model on a fresh input."""
    model = _with_empty_filters()
    x = torch.randn(2, 3, 12, 10)
    deployed = deployed_form(model, x, route)
    widths = {tuple(m.weight.shape[:2]) for m in deployed.source.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) or hasattr(m, "tap_mask")}
    # (filters, inputs): a keeps 16 of 24 filters, p sees 16 inputs, b keeps all 16 (its consumer pads),
    # c keeps 10 of 20 and the classifier sees those 10
    assert widths == {(16, 3), (16, 16), (10, 16), (5, 10)}
    xt = torch.randn(3, 3, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(deployed(xt), model(xt), atol=1e-4, rtol=1e-4)


def test_export_removes_empty_filters_as_channels(tmp_path):
    """``deployed.pt2`` is the folded form too: the classifier of the exported program sees 10 inputs, and
    the program equals the eager model at another batch size."""
    model = _with_empty_filters()
    x = torch.randn(2, 3, 12, 10)
    paths = export_model(model, x, str(tmp_path), onnx=False)
    program = torch.export.load(paths["deployed_pt2"]).module()
    shapes = {tuple(p.shape) for p in program.state_dict().values()}
    assert (5, 10) in shapes and (5, 20) not in shapes
    with torch.no_grad():
        xb = torch.randn(3, 3, 12, 10)
        torch.testing.assert_close(program(xb), model(xb), atol=1e-4, rtol=1e-4)
