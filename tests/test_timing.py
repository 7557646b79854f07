"""autosculpt.timing: call order (warm-up, rounds, bursts, rotation), statistics, thread pinning.
A fake clock makes the timings exact, so nothing here depends on the machine's speed."""
import pytest
import torch

from autosculpt.timing import Timing, set_threads, threads, time_fn, time_interleaved


class FakeClock:
    """A clock that only the timed functions advance (by their ``cost`` in seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def recorder(log, clock=None, cost=0.0):
    def make(name):
        def fn():
            log.append(name)
            if clock is not None:
                clock.now += cost[name] if isinstance(cost, dict) else cost
        return fn
    return make


def test_statistics():
    t = Timing((5.0, 1.0, 3.0, 2.0, 4.0))
    assert t.median_ms == 3.0 and t.min_ms == 1.0
    assert (t.q1_ms, t.q3_ms, t.iqr_ms) == (2.0, 4.0, 2.0)
    assert t.stat("min") == 1.0 and t.stat("median") == 3.0
    with pytest.raises(ValueError, match="stat"):
        t.stat("mean")
    assert Timing((7.0,)).iqr_ms == 0.0 and Timing((7.0,)).median_ms == 7.0


def test_fully_interleaved_by_default_with_warmup_first():
    log = []
    make = recorder(log)
    time_interleaved({"a": make("a"), "b": make("b")}, reps=3, warmup=2)
    assert log == ["a", "b"] * 2 + ["a", "b"] * 3


def test_rounds_time_bursts_with_rewarm_and_rotation():
    log = []
    make = recorder(log)
    out = time_interleaved({"a": make("a"), "b": make("b")}, reps=4, warmup=1, rounds=2, rewarm=1)
    # warm-up pass, then per round: a (rewarm + burst of 2), b (rewarm + burst of 2)
    assert log == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2
    assert all(len(t.samples_ms) == 4 for t in out.values())
    log.clear()
    time_interleaved({"a": make("a"), "b": make("b"), "c": make("c")}, reps=3, warmup=0, rotate=True)
    assert log == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_samples_are_exact_with_a_fake_clock():
    clock = FakeClock()
    log = []
    make = recorder(log, clock, cost={"fast": 0.001, "slow": 0.004})
    out = time_interleaved({"fast": make("fast"), "slow": make("slow")}, reps=5, warmup=1, clock=clock)
    assert out["fast"].samples_ms == pytest.approx((1.0,) * 5)
    assert out["slow"].median_ms == pytest.approx(4.0) and out["slow"].iqr_ms == pytest.approx(0.0)
    t = time_fn(make("fast"), reps=3, warmup=0, clock=clock)
    assert t.samples_ms == pytest.approx((1.0,) * 3) and t.inner == 1


def test_min_time_calls_short_functions_several_times_per_sample():
    calls = []
    t = time_fn(lambda: calls.append(1), reps=2, warmup=0, min_time_s=0.002)
    assert t.inner > 1 and len(calls) >= t.inner * 3  # calibration + 2 samples of `inner` calls


def test_min_total_keeps_adding_rounds():
    calls = []
    t = time_fn(lambda: calls.append(1), reps=1, warmup=0, min_total_s=0.01)
    assert len(t.samples_ms) > 1


def test_progress_callback_and_bad_arguments():
    seen = []
    time_interleaved({"a": lambda: None, "b": lambda: None}, reps=2, warmup=0, on_burst=lambda r, n: seen.append((r, n)))
    assert seen == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert time_interleaved({}, reps=3) == {}
    for bad in (dict(reps=0), dict(reps=True), dict(warmup=-1), dict(rounds=0), dict(cuda_events=True)):
        with pytest.raises(ValueError):
            time_fn(lambda: None, **{"reps": 1, **bad})


def test_threads_sets_and_restores():
    before = torch.get_num_threads()
    with threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with threads(None) as n:
        assert n == before
    with pytest.raises(ValueError, match="threads"):
        with threads(0):
            pass
    old = set_threads(1)
    try:
        assert old == before and torch.get_num_threads() == 1
    finally:
        set_threads(old)
