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
