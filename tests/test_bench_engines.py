"""Smoke test of bench/bench_engines.py: the built-in ResNet-20 at batch 1, 1 thread, 2 repeats."""
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")  # torch.onnx.export's default (dynamo) exporter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_engines_resnet20_smoke(tmp_path):
    import torch

    from bench import bench_engines as be

    prev = torch.get_num_threads()
    out = tmp_path / "engines.md"
    cuts = be.CUTS + ["ch2"]  # patterns at 2× and 3× of the 3×3 taps, channels at 2× of the whole model
    res = be.run(["resnet20"], [1], [1], repeats=2, out_path=out, cuts=cuts, min_time=0.002, peak_seconds=0.02,
                 log=lambda *a: None)
    assert torch.get_num_threads() == prev  # the run restores the caller's thread count
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["records"] == json.loads(json.dumps(res["records"]))
    recs = {r["provider"]: r for r in data["records"]}
    expected = be.DENSE_PROVIDERS + [be.pruned_name(c) for c in cuts]
    assert sorted(recs) == sorted(expected)
    for name, r in recs.items():
        assert "failed" not in r, (name, r.get("failed"))
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, name
        assert r["iqr_ms"] >= 0 and r["gflops"] > 0, name
        assert r["batch"] == 1 and r["threads"] == 1 and r["model"] == "resnet20"
    for cut in cuts:
        r = recs[be.pruned_name(cut)]
        assert r["rel_err"] < 1e-4, r  # deployed pruned model == the pruned eager model
        assert r["ideal"] > 1.5
    assert recs["autosculpt channels 2×"]["ideal"] == pytest.approx(2.0, rel=0.02)  # whole-model MACs ÷ 2
    for name in ("onnxruntime", "openvino", "inductor", "autosculpt dense"):
        assert recs[name]["rel_err"] < 1e-4, (name, recs[name]["rel_err"])
    assert data["fma_peak"]["gflops"]["1"] > 0
    assert len(data["loadavg_start"]) == 3 and {s["plans"] for s in data["summary"]} == {"patterns", "channels"}
    text = out.read_text()
    assert "| resnet20 | 1 | 1 | autosculpt 2× [autosculpt" in text and "## Summary" in text  # [chosen route]


def test_plan_files_are_timed_as_their_own_rows():
    """``--plan MODEL:LABEL=FILE`` (the plans the search finds): the model pruned by the file's plan,
    named 'autosculpt plan LABEL', its MACs those of the sparsified model; malformed specs are refused."""
    import torch

    import autosculpt as asc
    from autosculpt.flops import count_macs
    from bench import bench_engines as be

    plan_file = REPO / "bench" / "plans" / "resnet20-search-2x.json"
    model, res = be.build_model("resnet20")
    x = torch.randn(1, 3, res, res)
    pruned, how = be.make_pruned(model, x, "plan:s2", plan_file)
    want = asc.sparsify(model, json.loads(plan_file.read_text())).eval()
    assert how == "plan file resnet20-search-2x.json" and be.pruned_name("plan:s2") == "autosculpt plan s2"
    assert be.cut_kind("plan:s2") == "search"
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want(x))
    assert count_macs(pruned, x)["total"] < count_macs(model, x)["total"] / 2
    with pytest.raises(ValueError, match="no plan file"):
        be.make_pruned(model, x, "plan:s2", None)
    with pytest.raises(SystemExit):
        be.main(["--plan", "resnet20=missing", "--quick"])
