"""Same seed + warm latency cache → the same plan, for a MEASURED speed budget too: every timing the
search depends on (layers, remainder, in-model factors, route, verified plans) is read back from the
cache on the second run, so noise on the machine cannot change the result."""
import pytest
import torch

import autosculpt as asc
from autosculpt.data.digits import load_digits_splits
from autosculpt.models import get_model
from autosculpt.runtime.latency import LatencyModel
from autosculpt.train import train_classifier

pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(not asc.runtime.available_backends()["cpu"], reason="C++ extension not built")]


def test_same_seed_warm_cache_same_plan_with_a_speed_budget(tmp_path):
    tr, va, _ = load_digits_splits(seed=0)
    torch.manual_seed(0)
    model = get_model("digits_cnn", channels=(16, 32, 32, 32))
    train_classifier(model, tr, va, epochs=2, lr=0.05, batch_size=64, seed=0)
    model.eval()
    x = torch.stack([tr[i][0] for i in range(8)])
    cache = tmp_path / "latency.json"

    def run():
        lm = LatencyModel(cache_path=cache, reps=6, warmup=1)
        return asc.search(model, tr, va, target_speedup=1.3, episodes=6, seed=3, progress=False, latency_model=lm,
                          example_input=x, bn_batches=1), lm

    first, _ = run()  # fills the cache (a cold run measures; its result is whatever the machine said)
    second, lm2 = run()
    third, lm3 = run()
    assert lm2.measurements == 0 and lm3.measurements == 0  # the warm runs measured nothing new ...
    assert second.best_plan == third.best_plan  # ... so they choose the same plan
    assert [r.get("predicted_ms") for r in second.history] == [r.get("predicted_ms") for r in third.history]
    # (a budget this digits CNN reaches by prediction, so the chosen plan is measured end to end)
    assert second.verification is not None and third.verification is not None
    if second.verification["loaded"]:  # a disturbed measurement is never cached: the next run measures again
        assert third.verification["takes"] >= 1 and not third.verification["from_cache"]
    else:  # an undisturbed one is cached and read back: the same numbers
        keys = ("predicted_ms", "measured_ms", "dense_measured_ms", "measured_speedup", "predicted_speedup")
        assert [second.verification[k] for k in keys] == [third.verification[k] for k in keys]
        assert third.verification["from_cache"] and third.verification["takes"] == 0
