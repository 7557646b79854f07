"""LatencyModel: on-disk cache round trip, corrupt cache, keys, interpolation at grid points,
predictions vs the deterministic FlopsLatencyModel, argument checks."""
import json
import math

import pytest
import torch
from torch import nn

from autosculpt import __version__
from autosculpt.deploy import QUICK_ROUTES
from autosculpt.patterns import PAPER6, keep_level_grid
from autosculpt.plan import conv_layer_plan, sparsify
from autosculpt.runtime.grid import grid_mask
from autosculpt.runtime.latency import FlopsLatencyModel, LatencyModel
from autosculpt.runtime.predict import plan_tap_masks, sparse_layer_ms


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
        nn.ReLU(), nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


X = torch.randn(2, 3, 10, 10)


def half_plan(model):
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            layers[name] = conv_layer_plan(PAPER6, [1, 3] * (m.out_channels // 2))
    return {"version": 1, "layers": layers}


def test_cache_round_trip(tmp_path):
    path = tmp_path / "lat.json"
    lm = LatencyModel(cache_path=path, reps=2, warmup=1)
    lm.profile(tiny_net(), X)
    assert list(lm.layers) == ["0", "2"]  # only the 3×3 convs are prunable; the 1×1 is part of the remainder
    assert lm.layers["2"]["in_shape"] == (2, 8, 10, 10)
    n_grid = len(keep_level_grid(PAPER6))
    # dense + grid points per layer, + each layer's ReLU (fused into the sparse kernel, separate after dense),
    # + the whole model: the route race (one per quick route), remainder, dense, reference plan, dense median and IQR
    assert lm.measurements == 2 * (1 + n_grid) + 2 + len(QUICK_ROUTES) + 5
    assert lm.route in QUICK_ROUTES and lm.profile_data.meta["route"] == lm.route
    if lm.route == "autosculpt_graph":  # dense and pruned layers fuse their epilogues alike there
        assert lm.epilogue_ms("0") == 0 and lm.epilogue_ms("2") == 0 and lm.profile_data.remainder_ms >= 0
    else:
        assert lm.epilogue_ms("0") > 0 and lm.epilogue_ms("2") > 0
    data = json.loads(path.read_text())
    assert data["format"] == 1 and len(data["entries"]) == lm.measurements
    key = next(iter(data["entries"]))
    assert lm.device_name in key and __version__ in key and lm.backend in key
    plan = half_plan(tiny_net())
    lm2 = LatencyModel(cache_path=path, reps=2, warmup=1).profile(tiny_net(), X)
    assert lm2.measurements == 0  # everything came from the cache, whole-model timings included
    assert lm2.profile_data.to_json() == lm.profile_data.to_json()  # the same profile: reproducible predictions
    assert lm2.route == lm.route and lm2.predict(plan) == lm.predict(plan)
    mask = plan_tap_masks(plan)["2"]
    assert sparse_layer_ms(lm2.profile_data, "2", mask) == sparse_layer_ms(lm.profile_data, "2", mask)


def test_corrupt_cache_is_reported_and_rebuilt(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text('{"format": 1, "entries": {"a": ')  # truncated
    with pytest.warns(RuntimeWarning, match="corrupt"):
        lm = LatencyModel(cache_path=path, reps=1, warmup=0)
    lm.profile(tiny_net(), X)
    assert json.loads(path.read_text())["entries"]  # rewritten, valid
    path.write_text(json.dumps({"format": 1, "entries": ["not", "a", "dict"]}))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        LatencyModel(cache_path=path)
    assert not list(tmp_path.glob(".latency-*"))  # no temp files left behind


def test_prediction_interpolates_between_measured_grid_points():
    lm = LatencyModel(reps=1, warmup=0).profile(tiny_net(), X)
    info = lm.layers["2"]
    for g in keep_level_grid(PAPER6):
        m = grid_mask(PAPER6, g, info["c_out"])
        f, fs = lm.in_model_factor, lm.sparse_in_model_factor
        want = fs * lm.measure_sparse(info, m)  # cached: the same number the grid holds, scaled to in-model
        assert lm.layer_ms("2", m, path="sparse") == pytest.approx(want)
        # dense fallback: the dense conv plus the ReLU it cannot fuse
        assert lm.layer_ms("2", m) == pytest.approx(min(want, f * lm.dense_layer_ms("2") + lm.epilogue_ms("2")))
    (k0, t0), (k1, t1) = lm.profile_data.grid["2"][2], lm.profile_data.grid["2"][3]
    mid = torch.zeros(16, 3, 3, dtype=torch.bool)
    mid.view(16, -1)[:, : round(9 * (k0 + k1) / 2)] = True
    kmid = float(mid.float().mean())
    assert lm.layer_ms("2", mid, path="sparse") == pytest.approx(fs * (t0 + (t1 - t0) * (kmid - k0) / (k1 - k0)))
    total = lm.predict(half_plan(tiny_net()))
    assert math.isfinite(total) and total > 0
    assert lm.predict({"version": 1, "layers": {}}) == pytest.approx(lm.dense_ms())
    v = lm.verify(tiny_net(), half_plan(tiny_net()), X, reps=2)
    assert v["measured_ms"] > 0 and v["rel_error"] == pytest.approx(abs(v["predicted_ms"] - v["measured_ms"]) / v["measured_ms"])


def test_flops_latency_model_is_exact_and_deterministic():
    net = tiny_net()
    plan = half_plan(net)
    lm = FlopsLatencyModel(ms_per_mflop=1.0, overhead_ms=0.5, remainder_ms=2.0).profile(net, X)
    dense0 = 8 * 3 * 9 * 10 * 10 * 2
    dense2 = 16 * 8 * 9 * 5 * 5 * 2
    assert lm.flops() == dense0 + dense2
    kept = (3 + 6) / 2 / 9  # half the filters keep 3 taps (pattern 1), half keep 6 (pattern 3)
    assert lm.flops(plan) == pytest.approx(kept * (dense0 + dense2))
    assert lm.predict(plan) == pytest.approx(2.0 + 2 * 0.5 + kept * (dense0 + dense2) / 1e6)
    sparse = sparsify(net, plan, backend="torch")
    assert lm.measure_model(sparse, X) == pytest.approx(lm.predict(plan))
    assert lm.verify(net, plan, X)["rel_error"] == pytest.approx(0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="device"):
        LatencyModel(device="abacus")
    with pytest.raises(ValueError, match="stat"):
        LatencyModel(stat="mean")
    with pytest.raises(ValueError, match="backend"):
        LatencyModel(backend="fortran")
    with pytest.raises(RuntimeError, match="profile"):
        LatencyModel().predict({"version": 1, "layers": {}})
    lm = FlopsLatencyModel().profile(tiny_net(), X)
    with pytest.raises(KeyError, match="not prunable"):
        lm.predict({"version": 1, "layers": {"5": conv_layer_plan(PAPER6, [5] * 8)}})
    with pytest.raises(ValueError, match="no prunable conv"):
        FlopsLatencyModel().profile(nn.Sequential(nn.Flatten(), nn.Linear(300, 2)), X)


def test_stubbed_remainder_and_fusable_epilogues():
    from autosculpt.runtime.hooks import fusable_epilogues, stub_layers

    net = tiny_net()
    stubbed = stub_layers(net, X, ["0", "2"])
    with torch.no_grad():
        out = stubbed(X)
    assert out.shape == net(X).shape
    assert type(stubbed[0]).__name__ == "_ConvStub" and isinstance(net[0], nn.Conv2d)  # the original is untouched
    # conv 0 -> ReLU fuses; conv 2 -> BN -> ReLU: BN folds, then the ReLU fuses; no shortcut adds here
    assert fusable_epilogues(net, X, PAPER6, ["0", "2"]) == {"0": (True, False), "2": (True, False)}


def test_item10_invalid_cache_entries_are_measured_again(tmp_path):
    path = tmp_path / "lat.json"
    first = LatencyModel(cache_path=path, reps=1, warmup=0).profile(tiny_net(), X)
    data = json.loads(path.read_text())
    keys = sorted(data["entries"])
    bad = {keys[0]: float("nan"), keys[1]: -3.95, keys[2]: float("inf"), keys[3]: "1.0", keys[4]: True}
    data["entries"].update(bad)
    path.write_text(json.dumps(data))  # json writes NaN / Infinity literals
    with pytest.warns(RuntimeWarning, match=r"5 invalid entries.*measured again"):
        lm = LatencyModel(cache_path=path, reps=1, warmup=0)
    assert not set(bad) & set(lm.cache.entries)
    lm.profile(tiny_net(), X)
    assert lm.measurements == len(bad)  # exactly the bad ones were re-measured
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == set(keys) and all(math.isfinite(v) and v >= 0 and not isinstance(v, bool) for v in entries.values())
    plan = half_plan(tiny_net())
    assert math.isfinite(lm.predict(plan)) and lm.predict(plan) > 0 and first.measurements == len(keys)


def test_item10_runs_sharing_the_cache_merge_their_entries_under_a_lock(tmp_path):
    import fcntl
    import threading

    path = tmp_path / "lat.json"
    other_net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    a = LatencyModel(cache_path=path, reps=1, warmup=0)  # both start before either has written
    b = LatencyModel(cache_path=path, reps=1, warmup=0)
    a.profile(tiny_net(), X)
    b.profile(other_net, X)  # the last writer must not drop a's entries
    entries = json.loads(path.read_text())["entries"]
    assert set(a.cache.entries) <= set(entries) and set(b.cache.entries) <= set(entries)
    assert len(entries) == a.measurements + b.measurements
    # the read-merge-write waits for the lock another process holds
    with open(str(path) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        b.cache.entries["extra-key"] = 1.5
        saver = threading.Thread(target=b.save_cache)
        saver.start()
        saver.join(0.5)
        assert saver.is_alive()  # blocked on the lock
        assert "extra-key" not in json.loads(path.read_text())["entries"]
        fcntl.flock(lock, fcntl.LOCK_UN)
    saver.join(10)
    assert not saver.is_alive() and json.loads(path.read_text())["entries"]["extra-key"] == 1.5
