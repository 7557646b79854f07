"""Search benchmark: LatencyModel build time, predicted vs measured latency (CIFAR ResNet-56 shapes and
the digits CNN), and search wall-clock per episode. Writes markdown to bench/results/search.md.

    PYTHONPATH=. python bench/bench_search.py --threads 2 [--quick] [--out bench/results/search.md]

Threads are fixed (autosculpt.timing.set_threads); times are the minimum of repeats (LatencyModel's default,
robust to one-sided noise on shared machines); every ratio compares numbers measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from autosculpt.data.digits import load_digits_splits  # noqa: E402
from autosculpt.models import get_model  # noqa: E402
from autosculpt.patterns import PAPER6  # noqa: E402
from autosculpt.plan import PLAN_VERSION, conv_layer_plan  # noqa: E402
from autosculpt.rl.actions import MixMenu  # noqa: E402
from autosculpt.runtime import available_backends  # noqa: E402
from autosculpt.runtime.device import device_name  # noqa: E402
from autosculpt.runtime.latency import LatencyModel  # noqa: E402
from autosculpt.timing import set_threads  # noqa: E402


def plans_for(model, layers, seed=0, n_random=3):
    """Uniform plans (every layer the same menu entry) and random per-layer mixes."""
    menu = MixMenu(PAPER6)
    modules = dict(model.named_modules())
    out = []
    for i in range(len(menu)):
        out.append((f"uniform keep {menu.kept_fractions[i]:.2f}", [i] * len(layers)))
    g = torch.Generator().manual_seed(seed)
    for r in range(n_random):
        out.append((f"random mix #{r}", torch.randint(0, len(menu), (len(layers),), generator=g).tolist()))
    plans = []
    for label, action in out:
        plan = {"version": PLAN_VERSION, "layers": {
            n: conv_layer_plan(PAPER6, menu.pattern_ids(modules[n].weight, a)) for n, a in zip(layers, action)}}
        plans.append((label, plan))
    return plans


def latency_table(name, model, x, threads, reps, quick):
    rows = []
    cache = os.path.join(tempfile.mkdtemp(), "lat.json")
    t0 = time.perf_counter()
    lm = LatencyModel("cpu", cache_path=cache, threads=threads, reps=reps)
    lm.profile(model, x)
    build = time.perf_counter() - t0
    n_meas = lm.measurements
    t1 = time.perf_counter()
    LatencyModel("cpu", cache_path=cache, threads=threads, reps=reps).profile(model, x)
    cached = time.perf_counter() - t1
    plans = plans_for(model, list(lm.layers), n_random=1 if quick else 3)
    if quick:
        plans = plans[::2]
    errs = []
    for label, plan in plans:
        v = lm.verify(model, plan, x, reps=reps)
        errs.append(v["rel_error"])
        rows.append(f"| {name} | {label} | {v['dense_measured_ms']:.2f} | {v['predicted_ms']:.2f} | {v['measured_ms']:.2f} | "
                    f"{100 * v['rel_error']:.1f}% | {v['predicted_speedup']:.2f}× | {v['measured_speedup']:.2f}× |")
    summary = (f"| {name} | {tuple(x.shape)} | {len(lm.layers)} | {n_meas} | {build:.1f} s | {cached:.1f} s | "
               f"{100 * sum(errs) / len(errs):.1f}% | {100 * max(errs):.1f}% |")
    return summary, rows, lm


def bench_search(threads, episodes, quick):
    tr, va, _ = load_digits_splits(seed=0)
    torch.manual_seed(0)
    model = get_model("digits_cnn")
    from autosculpt.train import train_classifier

    t0 = time.perf_counter()
    train_classifier(model, tr, va, epochs=3 if quick else 6, lr=0.05, batch_size=64, seed=0)
    train_s = time.perf_counter() - t0
    import autosculpt as asc

    t0 = time.perf_counter()
    res = asc.search(model, tr, va, target_speedup=2.0, episodes=episodes, seed=0, progress=False,
                     latency_model=LatencyModel("cpu", threads=threads))
    total = time.perf_counter() - t0
    b = res.best_record
    return {
        "train_s": train_s, "search_s": total, "episodes": episodes, "per_episode_s": total / episodes,
        "plans": len(res.history), "met": res.met_budget, "best_val_acc": b["val_acc"], "dense_val_acc": res.dense["val_acc"],
        "pred_speedup": b["predicted_speedup"], "meas_speedup": b.get("measured_speedup"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="fewer plans and episodes (smoke run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "search.md"))
    args = ap.parse_args()
    set_threads(args.threads)
    lines = [
        "# Search benchmark", "",
        f"Machine: {device_name('cpu')}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, threads={args.threads}, "
        f"python {platform.python_version()}, backends {[k for k, v in available_backends().items() if v]}.", "",
        "Latency = min of repeats. `rel err` = |predicted − measured| / measured, end to end (`LatencyModel.verify`). "
        "Speedups are dense/pruned, both measured in the same run.", "",
        "## LatencyModel: build time and prediction error", "",
        "| model | input | prunable layers | timings run | build | rebuild from cache | mean rel err | max rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    detail = ["", "## Predicted vs measured latency per plan", "",
              "| model | plan | dense measured ms | predicted ms | measured ms | rel err | predicted speedup | measured speedup |",
              "|---|---|---|---|---|---|---|---|"]
    configs = [("resnet56 (CIFAR)", get_model("resnet56").eval(), torch.randn(8 if args.quick else 32, 3, 32, 32))]
    configs.append(("digits_cnn", get_model("digits_cnn").eval(), torch.randn(64, 1, 8, 8)))
    for name, model, x in configs:
        print(f"[bench] latency model on {name} {tuple(x.shape)}", flush=True)
        summary, rows, _ = latency_table(name, model, x, args.threads, args.reps, args.quick)
        lines.append(summary)
        detail += rows
    lines += detail
    episodes = 20 if args.quick else args.episodes
    print(f"[bench] search on digits ({episodes} episodes)", flush=True)
    s = bench_search(args.threads, episodes, args.quick)
    lines += ["", "## Search wall-clock (digits CNN, 2× speedup target, measured LatencyModel)", "",
              "| train dense | search total (incl. latency profile + verification) | episodes | per episode | plans evaluated | "
              "met budget (measured) | best val acc | dense val acc | predicted speedup | measured speedup |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| {s['train_s']:.1f} s | {s['search_s']:.1f} s | {s['episodes']} | {s['per_episode_s']:.2f} s | {s['plans']} | "
              f"{s['met']} | {s['best_val_acc']:.4f} | {s['dense_val_acc']:.4f} | {s['pred_speedup']:.2f}× | "
              f"{(s['meas_speedup'] or float('nan')):.2f}× |"]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
