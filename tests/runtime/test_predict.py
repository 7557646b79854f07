"""Latency predictions are pure functions of a Profile: a hand-made profile, nothing timed. Also the
profile's JSON round trip and that profiling is one pass (layers collected once, no state carried
between calls)."""
import json

import pytest
import torch
from torch import nn

from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan
from autosculpt.runtime import predict as P
from autosculpt.runtime.latency import FlopsLatencyModel, LatencyModel
from autosculpt.runtime.profile import Profile

INFO = {"in_shape": (1, 4, 8, 8), "c_in": 4, "c_out": 6, "kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1),
        "dilation": (1, 1), "groups": 1, "bias": False}


def hand_profile(**kw) -> Profile:
    """Two layers: "a" has a sparse kernel at 2 ms (all taps) .. 0.5 ms (none); "b" at 4 .. 1 ms."""
    args = dict(
        layers={"a": dict(INFO), "b": dict(INFO, c_out=12)},
        dense_ms={"a": 1.5, "b": 3.0},
        grid={"a": [(0.0, 0.5), (0.5, 1.0), (1.0, 2.0)], "b": [(0.0, 1.0), (1.0, 4.0)]},
        remainder_ms=10.0, epilogue_ms={"a": 0.25},
    )
    args.update(kw)
    return Profile(**args)


def mask_keeping(c_out: int, taps: int) -> torch.Tensor:
    m = torch.zeros(c_out, 3, 3, dtype=torch.bool)
    m.view(c_out, -1)[:, :taps] = True
    return m


def test_predictions_from_a_hand_made_profile():
    p = hand_profile()
    # dense: remainder less the epilogue charged to "a", + each dense layer (+ a's epilogue)
    assert P.dense_ms(p) == pytest.approx((10.0 - 0.25) + (1.5 + 0.25) + 3.0)
    assert P.predict(p, {"version": 1, "layers": {}}) == pytest.approx(P.dense_ms(p))
    # "a" at 3/9 taps: interpolated between (0, 0.5) and (0.5, 1.0); the sparse kernel wins over 1.75 dense
    third = mask_keeping(6, 3)
    assert P.sparse_layer_ms(p, "a", third) == pytest.approx(0.5 + 0.5 * (1 / 3) / 0.5)
    assert P.layer_ms(p, "a", third) == pytest.approx(0.5 + (1 / 3))
    # all taps kept: sparse 2.0 loses against dense 1.5 + 0.25 -> "auto" falls back, "sparse" forces it
    full = mask_keeping(6, 9)
    assert P.layer_ms(p, "a", full) == pytest.approx(1.75)
    assert P.layer_ms(p, "a", full, path="sparse") == pytest.approx(2.0)
    # in-model factors scale each side
    p2 = hand_profile(in_model_factor=2.0, sparse_in_model_factor=0.5)
    assert P.layer_ms(p2, "a", None) == pytest.approx(2 * 1.5 + 0.25)
    assert P.layer_ms(p2, "a", full, path="sparse") == pytest.approx(1.0)
    # a whole plan, as masks or as a plan with a forced dense path
    masks = {"a": third, "b": mask_keeping(12, 0)}
    want = (10.0 - 0.25) + (0.5 + 1 / 3) + 1.0
    assert P.predict(p, masks) == pytest.approx(want)
    plan = {"version": 1, "layers": {"a": conv_layer_plan(PAPER6, [1] * 6),
                                     "b": dict(conv_layer_plan(PAPER6, [0] * 12), path="dense")}}
    assert P.predict(p, plan) == pytest.approx((10.0 - 0.25) + (0.5 + 1 / 3) + 3.0)  # PAPER6[1] keeps 3 taps
    shares = P.latency_shares(p)
    assert sum(shares.values()) < 1 and shares["b"] == pytest.approx(3.0 / P.dense_ms(p))
    assert P.flops(p) == 2 * (6 + 12) * 9 * 4 * 64 // 2 and P.flops(p, plan) == 6 * 3 * 4 * 64 + 0


def test_prediction_errors():
    p = hand_profile()
    with pytest.raises(KeyError, match="not prunable"):
        P.predict(p, {"c": mask_keeping(6, 3)})
    with pytest.raises(KeyError, match="not a profiled"):
        P.layer_ms(p, "c")
    with pytest.raises(RuntimeError, match="profile"):
        P.predict(Profile({}, {}, {}), {"version": 1, "layers": {}})


def test_profile_json_round_trip(tmp_path):
    p = hand_profile(meta={"device": "hand"})
    data = json.loads(json.dumps(p.to_json()))
    q = Profile.from_json(data)
    assert q == p and q.layers["a"]["in_shape"] == (1, 4, 8, 8)
    p.save(tmp_path / "profile.json")
    assert Profile.load(tmp_path / "profile.json") == p
    old_state = {k: v for k, v in data.items() if k not in ("format", "meta")}  # a state dict of earlier versions
    assert Profile.from_json(old_state).grid == p.grid
    with pytest.raises(ValueError, match="format"):
        Profile.from_json(dict(data, format=99))


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()


def test_flops_model_state_round_trip_and_old_states():
    x = torch.randn(1, 3, 8, 8)
    lm = FlopsLatencyModel().profile(tiny_net(), x)
    plan = {"version": 1, "layers": {"2": conv_layer_plan(PAPER6, [2] * 8)}}
    other = FlopsLatencyModel()
    other.load_state_dict(lm.state_dict())
    assert other.predict(plan) == lm.predict(plan)
    state = dict(lm.state_dict(), grid=None)  # flops states saved before profiles carried a grid
    del state["format"]
    other.load_state_dict(state)
    assert other.predict(plan) == pytest.approx(lm.predict(plan))


def test_profile_collects_layers_once_and_keeps_no_state_between_calls(monkeypatch):
    from autosculpt.runtime import base

    calls = []
    real = base.collect_layers
    monkeypatch.setattr(base, "collect_layers", lambda *a: calls.append(1) or real(*a))
    lm = LatencyModel(reps=1, warmup=0, rounds=1)
    x = torch.randn(1, 3, 8, 8)
    lm.profile(tiny_net(), x)
    assert len(calls) == 1
    first = lm.profile_data
    assert lm.measure_model(tiny_net(), x, reps=2) > 0 and lm.reps == 1
    wide = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    lm.profile(wide, x)
    assert list(lm.layers) == ["0"] and lm.layers["0"]["c_out"] == 4 and first.layers["2"]["c_out"] == 8
    assert set(lm.profile_data.grid) == {"0"} and lm.profile_data.meta["input_shape"] == [1, 3, 8, 8]
