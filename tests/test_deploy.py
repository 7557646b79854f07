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
