"""Sparsified and fused models under torch.fx, dynamo (no graph break, no recompile), inductor and
torch.export: the same outputs as eager."""
import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt.models import get_model
from autosculpt.patterns import PAPER6
from autosculpt.plan import uniform_plan

HAS_CPU = asc.runtime.available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")


def _models():
    torch.manual_seed(0)
    dense = get_model("resnet20", num_classes=10).eval()
    sparse = asc.sparsify(dense, uniform_plan(dense, PAPER6, 0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    return sparse, asc.fuse_for_inference(sparse, x), x


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_dynamo_sees_one_graph_without_recompiles(grad_mode):
    sparse, fused, x = _models()
    for model in (sparse, fused):
        with grad_mode():
            explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        assert explained.graph_count == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fused, backend="eager")
    with grad_mode():
        ref = fused(x)
        for _ in range(3):
            torch.testing.assert_close(compiled(x), ref, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]


def test_fx_symbolic_trace_of_a_sparsified_model():
    sparse, fused, x = _models()
    for model in (sparse, fused):
        traced = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)
        targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
        assert torch.ops.autosculpt.pattern_conv2d.default in targets or torch.ops.autosculpt.pattern_conv2d in targets


def test_inductor_with_freezing_matches_eager():
    from torch._inductor import config as inductor_config

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 16, 16)
    sparse = asc.sparsify(model, uniform_plan(model, PAPER6, 0.5)).eval()
    fused = asc.fuse_for_inference(sparse, x)
    torch._dynamo.reset()
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(fused)
        torch.testing.assert_close(compiled(x), sparse(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled(torch.randn(2, 3, 16, 16)).shape, torch.Size([2, 8, 8, 8]))


def test_torch_export_round_trip(tmp_path):
    sparse, fused, x = _models()
    with torch.no_grad():
        exported = torch.export.export(fused, (x,))
        path = tmp_path / "m.pt2"
        torch.export.save(exported, path)
        loaded = torch.export.load(path)
        torch.testing.assert_close(loaded.module()(x), fused(x), atol=1e-5, rtol=1e-5)
