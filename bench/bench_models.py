"""End-to-end CPU speedups of whole pruned models (issue: evaluation).

Each CNN (CIFAR shapes, 32×32) is pruned with a uniform PAPER6 plan whose kept fraction is chosen so
that the *whole model's* MACs drop by 2× and 3× (when 3×3 convs hold enough of the MACs to reach it),
then timed side by side with the dense eager model and the dense model under ``torch.compile``
(interleaved medians, threads fixed). speedup ÷ ideal uses ideal = dense MACs ÷ pruned MACs.

    python -m bench.bench_models [--quick] [--out bench/results/models-cpu.md]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import autosculpt as asc
from autosculpt.flops import count_macs
from autosculpt.models import get_model
from autosculpt.nn import PatternConv2d
from autosculpt.patterns import PAPER6
from autosculpt.plan import uniform_plan

from .timing import header, interleaved_medians

MODELS = ["resnet20", "resnet56", "vgg16", "mobilenetv2", "vit_tiny"]
TARGETS = [2.0, 3.0]


def kept_fraction_for(model, x, target: float):
    """Kept fraction of the prunable 3×3 convs that cuts the whole model's MACs by ``target``."""
    macs = count_macs(model, x)
    prunable = {n for n, m in model.named_modules()
                if isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3)}
    f33 = sum(v for n, v in macs["layers"].items() if n in prunable)
    other = macs["total"] - f33
    if f33 == 0:
        return None, macs["total"]
    f = (macs["total"] / target - other) / f33
    return (f if f > 0 else None), macs["total"]


def calibrate(model, x):
    """Lets every PatternConv2d measure its sparse-vs-dense choice for this input (per-layer fallback)."""
    hooks = [m.register_forward_pre_hook(lambda mod, inp: mod.calibrate(inp[0]) and None)
             for m in model.modules() if isinstance(m, PatternConv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()


def run(models, batches, repeats, out_path: Path):
    torch.manual_seed(0)
    rows, records = [], []
    for name in models:
        try:
            dense = get_model(name, num_classes=10, in_chans=3).eval()
        except Exception as exc:  # a model this checkout does not have yet
            print(f"skip {name}: {exc}")
            continue
        x1 = torch.randn(1, 3, 32, 32)
        compiled = torch.compile(dense)
        for target in TARGETS:
            frac, dense_macs = kept_fraction_for(dense, x1, target)
            if frac is None:
                rows.append(f"| {name} | {target:.0f}× | unreachable with 3×3 patterns alone | | | | | | |")
                continue
            # PAPER6 kept levels are 0, 1/3, 2/3, 1: a fraction between levels mixes two of them
            pruned = asc.sparsify(dense, uniform_plan(dense, PAPER6, min(frac, 1.0))).eval()
            ideal = dense_macs / count_macs(pruned, x1)["total"]
            for b in batches:
                x = torch.randn(b, 3, 32, 32)
                calibrate(pruned, x)
                with torch.no_grad():
                    t = interleaved_medians(
                        {"dense": lambda: dense(x), "compiled": lambda: compiled(x), "pruned": lambda: pruned(x)},
                        repeats=repeats, warmup=3, min_time=0.02)
                sp, spc = t["dense"] / t["pruned"], t["compiled"] / t["pruned"]
                n_dense = sum(1 for m in pruned.modules() if isinstance(m, PatternConv2d) and m.active_path(x) == "dense")
                rows.append(
                    f"| {name} | {target:.0f}× | {b} | {ideal:.2f} | {t['dense']*1e3:.2f} | {t['compiled']*1e3:.2f} "
                    f"| {t['pruned']*1e3:.2f} | {sp:.2f} | {sp/ideal:.2f} | {spc:.2f} | {n_dense} |"
                )
                records.append(dict(model=name, target=target, batch=b, ideal=ideal, dense_ms=t["dense"] * 1e3,
                                    compiled_ms=t["compiled"] * 1e3, pruned_ms=t["pruned"] * 1e3,
                                    speedup=sp, speedup_vs_compiled=spc, layers_on_dense_fallback=n_dense))
                print(rows[-1], flush=True)
    cnn = [r["speedup"] / r["ideal"] for r in records if r["model"] != "vit_tiny"]
    summary = (
        f"\nMedian speedup ÷ ideal over the CNN rows: {sorted(cnn)[len(cnn)//2]:.2f} "
        f"(min {min(cnn):.2f}, max {max(cnn):.2f}); target ≥ 0.8.\n" if cnn else "\nNo CNN rows.\n"
    )
    text = (
        header("Whole-model CPU speedups")
        + "\nUniform PAPER6 plans at 2× / 3× whole-model MAC reduction; eager PyTorch dense vs pruned, and the "
        "dense model under `torch.compile` (inductor). Interleaved medians.\n\n"
        "| model | MAC cut | batch | ideal | dense ms | compiled ms | pruned ms | speedup | ÷ ideal | vs compiled | layers on dense fallback |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n" + summary
        + "\nReproduce: `python -m bench.bench_models`\n"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    out_path.with_suffix(".json").write_text(json.dumps(records, indent=1))
    print(summary)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two models, batch 1, few repeats")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("bench/results/models-cpu.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models or (MODELS[:2] if args.quick else MODELS)
    run(models, [1] if args.quick else [1, 8], 5 if args.quick else 15, args.out)


if __name__ == "__main__":
    main()
