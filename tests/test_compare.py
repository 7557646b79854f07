"""The evaluation harness (bench/compare.py), the baselines it compares against, and the README
results generator, on tiny budgets with a deterministic latency model (latency ∝ MACs that run)."""
import json
import math

import pytest
import torch
from torch import nn

from autosculpt.baselines import (
    filter_prune,
    halp_greedy,
    l1_filter_baseline,
    l1_filter_prune,
    mlp_encoder,
    random_search,
    tap_importance,
    taylor_filter_baseline,
    taylor_gradients,
    uniform_baseline,
)
from autosculpt.models import get_model
from autosculpt.runtime.latency import FlopsLatencyModel

pytest.importorskip("torch_pruning")


# one torch thread per test (the shared fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def mac_latency_model():
    return FlopsLatencyModel(ms_per_mflop=1.0, overhead_ms=0.0, remainder_ms=0.0)


@pytest.fixture(scope="module")
def tiny_cnn():
    torch.manual_seed(0)
    return get_model("digits_cnn", channels=(8, 16, 16, 16)).eval()


@pytest.fixture(scope="module")
def tiny_resnet():
    torch.manual_seed(0)
    return get_model("resnet20", num_classes=10, in_chans=1).eval()


def x8(shape=(1, 8, 8)):
    return torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_uniform_baseline_meets_budget_and_is_the_largest_that_does(tiny_cnn, target):
    from autosculpt.plan import uniform_plan

    lm = mac_latency_model()
    r = uniform_baseline(tiny_cnn, lm, x8(), target)
    limit = lm.dense_ms() / target
    assert r.met_budget and r.plan is not None
    assert lm.predict(r.plan) <= limit * (1 + 1e-9)
    assert lm.measure_model(r.model, x8()) <= lm.measure_model(tiny_cnn, x8()) / target * (1 + 1e-9)
    # a visibly larger kept fraction would miss: the bisection did not stop early
    looser = uniform_plan(tiny_cnn, lm.pattern_set, min(1.0, r.setting + 0.05), layers=set(lm.layers))
    assert lm.predict(looser) > limit
    # the same mix in every layer
    fracs = {n: m.kept_fraction() for n, m in r.model.named_modules() if hasattr(m, "tap_mask")}
    assert len(fracs) == 4 and max(fracs.values()) - min(fracs.values()) < 0.1


def test_l1_filter_prune_removes_lowest_l1_channels(tiny_cnn):
    x = x8()
    pruned = l1_filter_prune(tiny_cnn, x, 0.5)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    dense_convs = [m for m in tiny_cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [c.out_channels // 2 for c in dense_convs]
    assert pruned(x).shape == tiny_cnn(x).shape  # the classifier keeps its 10 classes
    # the last conv (nothing downstream couples its channels except BN + linear) keeps its largest-L1 filters
    w, wp = dense_convs[-1].weight, convs[-1].weight
    norms = w.abs().sum((1, 2, 3))
    kept = sorted(norms.topk(wp.shape[0]).indices.tolist())
    assert torch.allclose(wp, w[kept][:, _kept_inputs(convs[-2], dense_convs[-2])])
    with pytest.raises(ValueError, match="ratio"):
        l1_filter_prune(tiny_cnn, x, 1.0)


def _kept_inputs(pruned_prev, dense_prev):
    norms = dense_prev.weight.abs().sum((1, 2, 3))
    return sorted(norms.topk(pruned_prev.out_channels).indices.tolist())


@pytest.mark.parametrize("net,target", [("tiny_resnet", 2.0), ("tiny_cnn", 3.0)])
def test_l1_filter_baseline_meets_measured_budget(net, target, request):
    model = request.getfixturevalue(net)
    x = x8((1, 32, 32)) if net == "tiny_resnet" else x8()
    lm = mac_latency_model()
    r = l1_filter_baseline(model, lm, x, target, tolerance=0.0, iters=5)
    assert r.met_budget and r.plan is None
    assert lm.measure_model(model, x) / lm.measure_model(r.model, x) >= target
    assert r.model(x).shape == (8, 10)
    # the smallest ratio that meets it (within the bisection's resolution, 0.9 / 2^5): a bit less pruning misses
    less = l1_filter_prune(model, x, max(0.0, r.setting - 0.05))
    assert lm.measure_model(model, x) / lm.measure_model(less, x) < target


def test_random_search_evaluates_the_requested_number_of_plans(tiny_cnn):
    from autosculpt.data.digits import load_digits_splits

    train, val, _ = load_digits_splits(0)
    lm = mac_latency_model()
    res = random_search(tiny_cnn, train, val, num_plans=6, latency_model=lm, example_input=x8(), target_speedup=2.0,
                        seed=3, bn_batches=1)
    assert len(res.history) == 6
    assert len({tuple(h["action"]) for h in res.history}) == 6
    if res.met_budget:
        assert res.best_record["meets_budget"]
        assert res.best_record["val_acc"] == max(h["val_acc"] for h in res.history if h["meets_budget"])
    with pytest.raises(ValueError, match="num_plans"):
        random_search(tiny_cnn, train, val, num_plans=0, latency_model=lm, example_input=x8(), target_speedup=2.0)


@pytest.fixture(scope="module")
def digits():
    from autosculpt.data.digits import load_digits_splits

    return load_digits_splits(0)


def test_taylor_importance_removes_a_large_filter_nothing_reads_where_l1_keeps_it(tiny_cnn, digits):
    """A filter with the largest weights whose output the next conv ignores: its loss gradient is 0, so
    Taylor importance ranks it last and removes it; the L1 norm ranks it first and keeps it."""
    model = __import__("copy").deepcopy(tiny_cnn)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = 10 * float(convs[1].weight[1:].detach().abs().max())
    with torch.no_grad():
        convs[1].weight[0] = big  # the largest L1 filter of conv 1 (every weight 10× any other filter's)
        convs[2].weight[:, 0] = 0.0  # ...and conv 2 does not read it
    x = x8()
    grads = taylor_gradients(model, digits[0], batches=2, seed=0)
    assert all(float(g[0].abs().sum()) == 0.0 for g in grads["features.1.0.weight"])  # no loss gradient reaches it
    ratio = 1.0 / convs[1].out_channels  # one channel per group
    kept = {}
    for kind in ("l1", "taylor"):
        pruned = filter_prune(model, x, ratio, kind, grads if kind == "taylor" else None)
        pc = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)][1]
        assert pc.out_channels == convs[1].out_channels - 1
        kept[kind] = bool(pc.weight.abs().max() >= 0.99 * big)
    assert kept == {"l1": True, "taylor": False}
    with pytest.raises(ValueError, match="gradients"):
        filter_prune(model, x, ratio, "taylor")


def test_taylor_filter_baseline_meets_measured_budget(tiny_cnn, digits):
    lm = mac_latency_model()
    r = taylor_filter_baseline(tiny_cnn, lm, x8(), 2.0, train_data=digits[0], tolerance=0.0, iters=5)
    assert r.met_budget and r.method == "taylor_filter"
    assert lm.measure_model(tiny_cnn, x8()) / lm.measure_model(r.model, x8()) >= 2.0
    assert r.model(x8()).shape == (8, 10)


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_halp_greedy_meets_the_budget_removing_least_importance_per_ms_first(tiny_cnn, target):
    from autosculpt.patterns import PAPER6, assign
    from autosculpt.plan import level_counts

    lm = mac_latency_model()
    x = x8()
    lm.profile(tiny_cnn, x)
    layers = list(lm.layers)
    imp = tap_importance(tiny_cnn, layers, "magnitude")
    cheap = layers[1]
    imp[cheap] = imp[cheap] * 1e-3  # this layer's taps are worth almost nothing
    r = halp_greedy(tiny_cnn, lm, x, target, importance=imp, tolerance=0.0)
    limit = lm.dense_ms() / target
    assert r.met_budget and r.method == "halp"
    assert lm.predict(r.plan) <= limit * (1 + 1e-9)
    assert lm.measure_model(tiny_cnn, x) / lm.measure_model(r.model, x) >= target
    steps = r.trials[-1]["steps_taken"]
    # every step took the candidate with the least importance lost per ms saved
    for st in steps:
        assert st["ratio"] == min(st["candidates"].values()) and st["ms_saved"] > 0
    # ... and the first one is what an independent computation of the first rung of every layer says
    first = {}
    masks = PAPER6.masks.double()
    for n in layers:
        w = dict(tiny_cnn.named_modules())[n].weight
        ids = assign(imp[n].sqrt().unsqueeze(1).float(), PAPER6, level_counts(PAPER6, w.shape[0], 1 - 1 / 12))
        lost = float(imp[n].sum() - (imp[n] * masks[ids]).sum())
        first[n] = lost / (lm.layer_ms(n, None) - lm.layer_ms(n, masks[ids].float()))
    assert steps[0]["layer"] == min(first, key=first.get) == cheap
    assert steps[0]["ratio"] == pytest.approx(first[cheap])
    # the cheap layer is pruned hardest; it stops only once further steps there save nothing or it hit the floor
    kept = {n: getattr(r.model.get_submodule(n), "kept_fraction", lambda: 1.0)() for n in layers}
    assert kept[cheap] == min(kept.values()) and kept[cheap] < 0.5
    # greedy is a stopping rule: one step fewer misses the limit
    assert lm.predict(r.plan) + steps[-1]["ms_saved"] > limit - 1e-9


def test_halp_greedy_taylor_needs_training_data(tiny_cnn):
    with pytest.raises(ValueError, match="train_data"):
        halp_greedy(tiny_cnn, mac_latency_model(), x8(), 2.0)


def test_mlp_encoder_ignores_the_graph_and_drives_the_search(tiny_cnn, digits):
    from autosculpt import search
    from autosculpt.rl.policy import MLPEncoder

    enc = mlp_encoder()
    assert isinstance(enc, MLPEncoder) and enc.out_dim == 64
    x = torch.randn(5, enc.inp.in_features)
    e1, e2 = torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.tensor([[4], [0]])
    assert torch.equal(enc(x, e1), enc(x, e2))  # no message passing
    train, val, _ = digits
    res = search(tiny_cnn, train, val, target_speedup=2.0, episodes=2, seed=0, latency_model=mac_latency_model(),
                 example_input=x8(), progress=False, encoder=mlp_encoder())
    assert len(res.history) >= 1 and res.best_plan["layers"]


def test_ci95_and_target_summary():
    from bench.compare import ci95, target_summary

    assert ci95([1.0]) == 0.0
    assert ci95([0.0, 1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    recs = []
    for seed in range(3):
        for method, acc, met in (("autosculpt", 0.90 + seed / 100, True), ("halp", 0.88, True), ("uniform", 0.85, False)):
            recs.append({"model": "resnet20", "target_speedup": 2.0, "seed": seed, "method": method, "test_acc": acc,
                         "met_budget_final": met})
    (row,) = target_summary(recs)
    assert row["best_baseline"] == "halp" and row["margin"] == pytest.approx(0.03) and row["target_met"]
    assert row["ours_met"] == "3/3" and row["best_met_baseline"] == "halp"
    recs[0]["met_budget_final"] = False  # one autosculpt seed misses the budget: the target is not met
    assert not target_summary(recs)[0]["target_met"]


def test_baselines_reject_bad_targets(tiny_cnn):
    with pytest.raises(ValueError, match="target_speedup"):
        uniform_baseline(tiny_cnn, mac_latency_model(), x8(), 1.0)
    with pytest.raises(ValueError, match="target_speedup"):
        l1_filter_baseline(tiny_cnn, mac_latency_model(), x8(), "2")


# --------------------------------------------------------------------------- the harness


def tiny_config():
    from bench.compare import CompareConfig

    return CompareConfig(models=["digits_cnn"], targets=[2.0], seeds=[0], episodes=3, finetune_epochs=1, dense_epochs=2,
                         repeats=3, train_subset=200, latency="flops",
                         model_kwargs={"digits_cnn": {"channels": [8, 16, 16, 16]}})


def test_compare_runs_every_method_with_complete_records_and_resumes(tmp_path, cache_dir, monkeypatch):
    import bench.compare as cmp

    out = tmp_path / "compare.json"
    cfg = tiny_config()
    records = cmp.run_compare(cfg, out, work=tmp_path / "work", log=lambda *_: None)
    assert sorted(r["method"] for r in records) == sorted(cmp.METHODS)
    for r in records:
        for k in cmp.RECORD_FIELDS:
            assert k in r, (r["method"], k)
        for k in ("val_acc", "test_acc", "latency_ms_b1", "latency_ms_b8", "speedup_b1", "speedup_b8", "search_seconds"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] >= 0, (r["method"], k, r[k])
        assert 0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert r["model"] == "digits_cnn" and r["target_speedup"] == 2.0 and r["seed"] == 0
    by = {r["method"]: r for r in records}
    # baselines meet the budget they were given, according to the (deterministic) latency model
    for m in ("uniform", "l1_filter", "taylor_filter", "halp"):
        assert by[m]["met_budget"], by[m]["budget_check"]
        assert by[m]["budget_check"]["measured_speedup"] >= 2.0 * (1 - cmp.TOLERANCE)
        assert by[m]["macs_ratio"] < 0.6
    assert by["random"]["evaluated_plans"] == by["autosculpt"]["evaluated_plans"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    md = out.with_suffix(".md").read_text()
    assert all(m in md for m in cmp.METHODS) and "| digits_cnn | 2× | *dense* |" in md

    # resume: nothing is recomputed, records unchanged
    def boom(*a, **k):
        raise AssertionError("a completed record was run again")

    monkeypatch.setattr(cmp, "run_method", boom)
    again = cmp.run_compare(cfg, out, work=tmp_path / "work", log=lambda *_: None)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(records))
    # a file from other settings is not silently mixed in
    other = tiny_config()
    other.finetune_epochs = 2
    with pytest.raises(ValueError, match="other settings"):
        cmp.run_compare(other, out, work=tmp_path / "work", log=lambda *_: None)


def test_compare_resumes_after_an_interruption(tmp_path, cache_dir, monkeypatch):
    """A run killed after the first record keeps it and the next run only does the rest."""
    import bench.compare as cmp

    out = tmp_path / "compare.json"
    cfg = tiny_config()
    cfg.methods = ["uniform", "l1_filter"]
    real, calls = cmp.run_method, []

    def flaky(method, *a, **k):
        calls.append(method)
        if method == "l1_filter" and calls.count("l1_filter") == 1:
            raise KeyboardInterrupt
        return real(method, *a, **k)

    monkeypatch.setattr(cmp, "run_method", flaky)
    with pytest.raises(KeyboardInterrupt):
        cmp.run_compare(cfg, out, work=tmp_path / "work", log=lambda *_: None)
    assert [r["method"] for r in json.loads(out.read_text())] == ["uniform"]
    records = cmp.run_compare(cfg, out, work=tmp_path / "work", log=lambda *_: None)
    assert calls == ["uniform", "l1_filter", "l1_filter"]
    assert [r["method"] for r in records] == ["uniform", "l1_filter"]


def test_compare_config_rejects_bad_settings():
    from bench.compare import CompareConfig

    with pytest.raises(ValueError, match="models"):
        CompareConfig(models=["nope"]).check()
    with pytest.raises(ValueError, match="random"):
        CompareConfig(methods=["random"]).check()
    with pytest.raises(ValueError, match="targets"):
        CompareConfig(targets=[1.0]).check()
    with pytest.raises(SystemExit):
        from bench.compare import main

        main(["--seeds", "0"])


# --------------------------------------------------------------------------- README generator


def _fake_results(folder):
    recs = []
    for method in ("autosculpt", "uniform"):
        for seed in (0, 1):
            recs.append({"method": method, "model": "resnet20", "target_speedup": 2.0, "seed": seed, "val_acc": 0.9 + seed / 100,
                         "test_acc": 0.8 + seed / 100, "latency_ms_b1": 1.0, "latency_ms_b8": 4.0, "speedup_b1": 1.5,
                         "speedup_b8": 2.1, "search_seconds": 10.0, "met_budget": method == "autosculpt",
                         "dense_val_acc": 0.95, "dense_test_acc": 0.94, "machine": "TestCPU", "threads": 1, "budget_batch": 8})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.json").write_text(json.dumps(recs))
    (folder / "models-cpu.json").write_text(json.dumps({"machine": "TestCPU", "threads": 2, "notes": ["a note"], "records": [
        {"model": "vgg16", "target": 2.0, "batch": 1, "ideal": 2.0, "speedup": 1.7, "speedup_vs_bn_folded": 1.6,
         "speedup_vs_compiled": 1.5}]}))


def test_readme_results_rewrites_only_between_markers_and_is_idempotent(tmp_path):
    from bench.readme_results import END, START, build_section, update_readme

    results = tmp_path / "results"
    _fake_results(results)
    (results / "cpu-conv.md").write_text("# conv\n\n- machine: TestCPU\n- date: x\n\n| a |\n\n## Summary\n\n- batch 8: median 0.9\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{START}\nold stuff 123\n{END}\n\n## After\ntail text\n")
    section = build_section(results)
    assert update_readme(readme, section)
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n" + START) and text.endswith(END + "\n\n## After\ntail text\n")
    assert "old stuff 123" not in text
    assert "| resnet20 | 2× | autosculpt | 0.805 ± 0.007 | 0.905 ± 0.007 | 1.500 ± 0.000 | 2.100 ± 0.000 | 2/2 | 0/2 | 10 |" in text
    assert "| resnet20 | 2× | uniform |" in text and "0/2" in text
    assert "resnet20 at 2×: methods meeting the budget in most seeds: autosculpt; most accurate of them: **autosculpt**" in text
    assert "| vgg16 | 2× | 1 | 2.00 | 1.70 | 0.85 | 1.60 | 0.80 | 1.50 |" in text and "TestCPU" in text and "- a note" in text
    assert "python -m bench.compare" in text and "python -m bench.bench_models" in text
    assert "- batch 8: median 0.9" in text and "- machine: TestCPU" in text and "- date: x" not in text
    assert not update_readme(readme, build_section(results))  # idempotent
    assert readme.read_text() == text


def test_readme_results_appends_markers_when_absent_and_rejects_broken_ones(tmp_path):
    from bench.readme_results import END, START, build_section, update_readme

    results = tmp_path / "results"
    _fake_results(results)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbody\n")
    update_readme(readme, build_section(results))
    text = readme.read_text()
    assert text.startswith("# Title\n\nbody\n\n" + START) and text.rstrip().endswith(END)
    assert not update_readme(readme, build_section(results))
    readme.write_text(f"# T\n{START}\nx\n")
    with pytest.raises(ValueError, match="marker"):
        update_readme(readme, "s")
    readme.write_text(f"# T\n{END}\nx\n{START}\n")
    with pytest.raises(ValueError, match="before"):
        update_readme(readme, "s")


# --------------------------------------------------------------------------- whole-model benchmark plans


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_bench_models_cnn_plan_hits_the_mac_cut(target):
    from autosculpt import sparsify
    from autosculpt.flops import count_macs
    from autosculpt.patterns import PAPER6
    from autosculpt.plan import uniform_plan
    from bench.bench_models import kept_fraction_for

    model = get_model("resnet20", num_classes=10, in_chans=3).eval()
    x = torch.randn(1, 3, 32, 32)
    frac, max_cut = kept_fraction_for(model, x, target)
    assert frac is not None and max_cut > 3
    pruned = sparsify(model, uniform_plan(model, PAPER6, frac))
    cut = count_macs(model, x)["total"] / count_macs(pruned, x)["total"]
    assert cut == pytest.approx(target, rel=0.03)


def test_bench_models_says_when_3x3_patterns_cannot_reach_the_cut():
    from bench.bench_models import kept_fraction_for

    model = get_model("mobilenetv2", num_classes=10, in_chans=3).eval()
    frac, max_cut = kept_fraction_for(model, torch.randn(1, 3, 32, 32), 2.0)
    assert frac is None and 1.0 < max_cut < 2.0  # depthwise 3×3 convs hold few of the MACs


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_bench_models_vit_plan_prunes_heads_and_mlp_to_the_cut(target):
    from autosculpt import sparsify
    from bench.bench_models import vit_macs, vit_plan

    model = get_model("vit_tiny", num_classes=10, in_chans=3).eval()
    plan, ideal, how = vit_plan(model, target)
    assert plan is not None and target <= ideal < target * 1.15, how
    pruned = sparsify(model, plan).eval()
    heads = [len(pruned.get_submodule(f"blocks.{i}.attn").kept_heads) for i in range(len(pruned.blocks))]
    hidden = [pruned.get_submodule(f"blocks.{i}.mlp.fc1").out_index.numel() for i in range(len(pruned.blocks))]
    dense_macs = vit_macs(model, [3] * 4, [192] * 4)
    assert dense_macs / vit_macs(model, heads, hidden) == pytest.approx(ideal)
    x = torch.randn(2, 3, 32, 32)
    assert pruned(x).shape == (2, 10)
