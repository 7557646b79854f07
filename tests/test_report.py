"""Report: Pareto front, history parsing, plots are valid PNGs, report.md and its numbers."""
import json
import random

import pytest

from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan
from autosculpt.report import (
    PLOTS,
    format_table,
    history_series,
    pareto_front,
    plan_pattern_mix,
    render_report,
    summary_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_force_front(points):
    out = []
    for i, (l, a) in enumerate(points):
        dominated = any((l2 <= l and a2 >= a) and (l2 < l or a2 > a) for l2, a2 in points)
        if not dominated:
            out.append(i)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    pts = [(rng.choice([0.5, 1.0, 1.5, 2.0, 2.5]) + rng.random() * 0.1, rng.random()) for _ in range(40)]
    front = pareto_front(pts)
    assert sorted(front) == sorted(brute_force_front(pts))
    lat = [pts[i][0] for i in front]
    acc = [pts[i][1] for i in front]
    assert lat == sorted(lat) and acc == sorted(acc)  # along the front, slower means more accurate


def test_history_series_reads_field_aliases():
    hist = [{"val_acc": 0.5, "predicted_ms": 2.0, "measured_ms": None, "reward": -1, "flops": 10},
            {"accuracy": 0.7, "latency_ms": 1.0, "measured_latency_ms": 1.1, "reward": 0.5}]
    s = history_series(hist)
    assert s["acc"] == [0.5, 0.7]
    assert s["predicted_ms"] == [2.0, 1.0]
    assert s["measured_ms"] == [None, 1.1]
    assert s["flops"] == [10.0, None]


def fake_run(tmp_path, n=12):
    rng = random.Random(0)
    history = [{"index": i, "val_acc": rng.random(), "predicted_ms": 1 + rng.random(), "measured_ms": None,
                "reward": rng.random() - 0.5, "flops": 1000 + i} for i in range(n)]
    history[3]["measured_ms"] = 1.2
    plan = {"version": 1, "layers": {
        "features.0.0": conv_layer_plan(PAPER6, [5, 5, 3, 1]),
        "features.1.0": conv_layer_plan(PAPER6, [0, 2, 4, 4, 5, 5]),
    }}
    summary = {
        "budget": "2× measured speedup", "device": "cpu", "threads": 2, "versions": {"autosculpt": "0", "torch": "0"},
        "config": {"model": "digits_cnn", "data": "digits", "seed": 0},
        "dense": {"val_acc": 0.99, "test_acc": 0.98, "flops": 2000, "params": 500},
        "pruned": {"val_acc": 0.97, "test_acc": 0.965, "flops": 1000, "params": 260},
        "latency_ms": {"1": {"dense": 0.5, "pruned": 0.25}, "8": {"dense": 2.0, "pruned": 0.8}},
        "search": {"chosen_index": 3, "budget_latency_ms": 1.3, "dense_latency_ms": 2.1, "episodes": n, "seconds": 5.0},
        "finetune": {"epochs": 3, "best_val_acc": 0.97, "best_epoch": 2, "test_acc": 0.965},
    }
    layers = [{"layer": "features.0.0", "dense_ms": 0.1, "pruned_ms": 0.05, "path": "sparse", "kept": 0.6},
              {"layer": "features.1.0", "dense_ms": 0.2, "pruned_ms": 0.2, "path": "dense", "kept": 0.5}]
    for name, obj in (("summary.json", summary), ("search_result.json", {"history": history, "best_plan": plan}),
                      ("plan.json", plan), ("layer_latency.json", layers)):
        (tmp_path / name).write_text(json.dumps(obj))
    return summary


def test_render_report_writes_valid_pngs_and_numbers(tmp_path):
    import matplotlib.image

    fake_run(tmp_path)
    out = render_report(str(tmp_path))
    for name in PLOTS:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        img = matplotlib.image.imread(tmp_path / "plots" / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # not a blank canvas
    md = open(out).read()
    assert "| latency, batch 1 | 0.500 ms | 0.250 ms | 2.00× speedup |" in md
    assert "| test accuracy | 98.00% | 96.50% |  |" in md
    assert "| FLOPs (MACs / sample) | 2,000 | 1,000 | 2.00× |" in md
    for name in PLOTS:
        assert f"plots/{name}" in md
    assert "| features.0.0 | 60.0% | sparse | 0.1000 | 0.0500 | 2.00× |" in md


def test_pattern_mix_of_a_plan():
    plan = {"version": 1, "layers": {"a": conv_layer_plan(PAPER6, [5, 5, 3, 0])}}
    (name, mix), = plan_pattern_mix(plan)
    assert name == "a" and mix["full"] == 0.5 and mix["right_2cols"] == 0.25 and mix["empty"] == 0.25
    assert abs(sum(mix.values()) - 1) < 1e-12


def test_summary_table_and_format():
    rows = summary_table({"dense": {"val_acc": 1.0, "test_acc": 0.5, "flops": 10, "params": 4},
                          "pruned": {"val_acc": 0.9, "test_acc": 0.25, "flops": 5, "params": 2},
                          "latency_ms": {"8": {"dense": 3.0, "pruned": 1.0}, "1": {"dense": 1.0, "pruned": 0.5}}})
    assert [r[0] for r in rows][-2:] == ["latency, batch 1", "latency, batch 8"]
    assert rows[-1][3] == "3.00× speedup"
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == len(rows) + 2 and len(lines[1]) == max(len(line) for line in lines)  # the rule spans all columns
    assert len({line.index("%") for line in lines[2:4]}) == 1  # right-aligned numbers


def test_missing_run_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder"):
        render_report(str(tmp_path / "nope"))
    fake_run(tmp_path)
    (tmp_path / "plan.json").unlink()
    with pytest.raises(FileNotFoundError, match="plan .*plan.json.* is missing"):
        render_report(str(tmp_path))
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        render_report(str(tmp_path))


def test_budget_verdict_and_the_users_budget_line():
    from autosculpt.report import budget_verdict, user_budget_ms

    summary = {"budget": "2× measured speedup", "met_budget_in_search": True,
               "config": {"target_speedup": 2.0}, "search": {"dense_latency_ms": 3.0, "budget_latency_ms": 1.3},
               "met_budget_final": {"met": False, "measured": 1.38, "target": 2.0, "what": "measured speedup at batch 8"}}
    assert "**NOT met**" in budget_verdict(summary) and "1.38 against 2" in budget_verdict(summary)
    summary["met_budget_final"].update(met=True, measured=2.2)
    assert "**met**" in budget_verdict(summary)
    assert user_budget_ms(summary) == pytest.approx(1.5)  # dense ÷ target, not the margin-tightened 1.3
    assert user_budget_ms({"config": {"target_latency_ms": 0.7}}) == 0.7
    assert user_budget_ms({"config": {"target_flops_ratio": 0.5}}) is None
