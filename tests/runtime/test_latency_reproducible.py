"""LatencyModel in the deployed form: the route it chose, whole-model timings cached (a second
profile and a second verify of the same plan read them back: same predictions, same measurements),
and the load check that retakes a measurement the machine visibly disturbed."""
import pytest
import torch
from torch import nn

from autosculpt.deploy import QUICK_ROUTES
from autosculpt.patterns import PAPER6
from autosculpt.plan import uniform_plan
from autosculpt.runtime.latency import LatencyModel

X = torch.randn(2, 3, 12, 12)


def tiny_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 3)).eval()


def half_plan(model):
    return uniform_plan(model, PAPER6, 0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_cache_same_profile_same_verify(tmp_path):
    path = tmp_path / "lat.json"
    model = tiny_net()
    plan = half_plan(model)
    lm = LatencyModel(cache_path=path, reps=3, warmup=1).profile(model, X)
    assert lm.route in QUICK_ROUTES
    first = lm.verify(model, plan, X, reps=5)
    assert first["from_cache"] is False and first["takes"] >= 1 and first["measured_ms"] > 0
    lm2 = LatencyModel(cache_path=path, reps=3, warmup=1).profile(model, X)
    assert lm2.measurements == 0 and lm2.route == lm.route
    second = lm2.verify(model, plan, X, reps=5)
    if not first["loaded"]:  # a measurement taken on a loaded machine is never cached
        assert second["from_cache"] is True and second["takes"] == 0
        for k in ("measured_ms", "dense_measured_ms", "predicted_ms", "measured_speedup"):
            assert second[k] == first[k]


def test_loaded_measurement_is_retaken_then_reported(tmp_path, monkeypatch):
    model = tiny_net()
    plan = half_plan(model)
    lm = LatencyModel(cache_path=tmp_path / "lat.json", reps=3, warmup=1, retakes=2).profile(model, X)
    dense_ref = next(v for k, v in lm.cache.entries.items() if k.endswith("|dense-median"))
    calls = []

    def loaded(models, example_input, reps=None):  # the dense model 5x slower than profiled: a busy machine
        calls.append(len(models))
        return [1.0, 5 * dense_ref]

    monkeypatch.setattr(lm, "measure_models", loaded)
    with pytest.warns(RuntimeWarning, match="looks loaded"):
        out = lm.verify(model, plan, X)
    assert len(calls) == 3 and out["takes"] == 3 and out["loaded"] is True
    assert not any("|verify|" in k for k in lm.cache.entries)  # not cached: the next verify measures again

    answers = iter([[1.0, 5 * dense_ref], [1.0, dense_ref]])  # disturbed once, then quiet
    monkeypatch.setattr(lm, "measure_models", lambda models, x, reps=None: next(answers))
    out = lm.verify(model, plan, X)
    assert out["takes"] == 2 and out["loaded"] is False and out["measured_speedup"] == pytest.approx(dense_ref)
    assert any("|verify|" in k for k in lm.cache.entries)


def test_layers_timed_in_the_routes_layout():
    lm = LatencyModel(reps=1, warmup=0, route="autosculpt_channels_last").profile(tiny_net(), X)
    assert lm.route == "autosculpt_channels_last" and lm.channels_last
    assert all(k.split("|")[-2].startswith("nhwc-") or "|epilogue|nhwc|" in k or "|model-" in k
               for k in lm.cache.entries if "|conv" in k or "epilogue" in k)
    conv, x = lm._make_conv(lm.layers["0"])
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs, match", [
    ({"form": "onnx"}, "form: expected one of deployed, fused, eager"),
    ({"route": "inductor"}, "route: expected None or"),
    ({"form": "fused", "route": "autosculpt"}, "route: expected None or"),
    ({"retakes": -1}, "retakes: expected an int >= 0"),
])
def test_bad_form_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencyModel(**kwargs)
