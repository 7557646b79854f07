"""End-to-end speedups of whole pruned models (issue: evaluation), CPU by default, CUDA with --device.

CNNs (CIFAR shapes, 3×32×32) are pruned with a uniform PAPER6 plan (:func:`autosculpt.plan.uniform_plan`,
filters assigned by weight energy) whose kept fraction makes the *whole model's* multiply-accumulates
drop by 2× and 3×, where 3×3 convs hold enough of them: a model whose 3×3 convs (depthwise ones in
MobileNetV2) hold few MACs cannot reach the cut with 3×3 patterns alone, and the report says so with
the largest cut it can reach (every filter at the menu's sparsest mix: half empty, half three taps).
The small ViT has no 3×3 convs: it is pruned with whole attention heads (``"attention"`` plans, empty
pattern for pruned heads, smaller Q/K/V/O projections) plus blocks of MLP hidden units
(``mlp_pair_plan``), heads and blocks kept by weight norm, sized to the same MAC cuts.

The pruned model runs as AutoSculpt deploys it for inference: :func:`autosculpt.fuse.fuse_for_inference`
folds BatchNorm into the convs, fuses shortcut adds and ReLUs into the pattern convs' epilogue and
rewrites 2×2 max-pools as a 4-way maximum. It is timed side by side with three dense baselines
(interleaved medians, threads fixed; on CUDA every call is synchronised): the dense eager model as
written; the dense model through the same ``fuse_for_inference`` (the fair baseline: BatchNorm folded,
max-pools rewritten; its ReLUs stay separate because ``nn.Conv2d`` has no epilogue); and the dense model
under ``torch.compile``. speedup ÷ ideal uses ideal = dense MACs ÷ pruned MACs. Target: ≥ 0.8 × ideal on
the CNNs against the dense eager model; the table also gives it against the fused dense model (on VGG-16
the max-pool rewrite alone makes the pruned model faster than the eager one, so that column is the
one that isolates sparsity).

    python -m bench.bench_models [--quick] [--out bench/results/models-cpu.md]
    python -m bench.bench_models --device cuda --out OUTDIR/models-gpu.md      # (also: bench.gpu_check --with-models)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autosculpt.timing import set_threads  # noqa: E402

MODELS = ["resnet20", "resnet56", "vgg16", "mobilenetv2", "vit_tiny"]
TARGETS = [2.0, 3.0]
SPARSEST_MENU_KEPT = 1.0 / 6  # PAPER6 menu's sparsest mix: half the filters empty, half with 3 of 9 taps


# --------------------------------------------------------------------------- CNN plans


def conv_mac_split(model: nn.Module, x: torch.Tensor) -> Tuple[float, float, float]:
    """(total MACs, MACs of the 3×3 convs patterns can prune, the rest)."""
    from autosculpt.flops import count_macs

    macs = count_macs(model, x)
    prunable = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)}
    f33 = float(sum(v for n, v in macs["layers"].items() if n in prunable))
    total = float(macs["total"])
    return total, f33, total - f33


def kept_fraction_for(model: nn.Module, x: torch.Tensor, target: float):
    """Kept fraction of the 3×3 convs that cuts the whole model's MACs by ``target``, or None when it
    is below the sparsest menu mix; also returns the largest cut reachable with 3×3 patterns alone."""
    total, f33, other = conv_mac_split(model, x)
    max_cut = total / (other + f33 * SPARSEST_MENU_KEPT) if f33 else 1.0
    if f33 == 0:
        return None, max_cut
    f = (total / target - other) / f33
    return (f if f >= SPARSEST_MENU_KEPT - 1e-9 else None), max_cut


# --------------------------------------------------------------------------- ViT plans


def vit_macs(model, heads_kept: List[int], hidden_kept: List[int], batch: int = 1) -> float:
    """MACs of the ViT with ``heads_kept[i]`` heads and ``hidden_kept[i]`` MLP hidden units in block i
    (count_macs does not see inside ``nn.MultiheadAttention``, so this counts analytically)."""
    d, L = model.pos_embed.shape[-1], model.seq_len
    hd = d // model.blocks[0].attn.num_heads
    total = model.num_patches * model.patch_embed.weight[0].numel() * d + d * model.head.out_features
    for hk, m in zip(heads_kept, hidden_kept):
        e = hk * hd
        total += L * d * 3 * e + 2 * L * L * e + L * e * d + 2 * L * d * m
    return float(total * batch)


def vit_plan(model, target: float, block_size: int = 16):
    """A plan keeping whole heads (largest Q/K/V weight norm) and MLP hidden blocks (largest fc1 row
    norm) so that the MACs drop by ``target``: the numbers of heads and blocks per layer whose MACs come
    closest to dense / target from below. Returns (plan, ideal, note) or (None, max reachable cut, note)."""
    from autosculpt.attention_patterns import ATTN6
    from autosculpt.models.vit import vit_attention_names, vit_mlp_pairs
    from autosculpt.nn.attention import attention_layer_plan
    from autosculpt.nn.linear import mlp_pair_plan
    from autosculpt.plan import PLAN_VERSION

    n_blocks = len(model.blocks)
    heads = model.blocks[0].attn.num_heads
    hidden = model.blocks[0].mlp.fc1.out_features
    nb = hidden // block_size
    dense = vit_macs(model, [heads] * n_blocks, [hidden] * n_blocks)
    # the (heads, MLP blocks) per layer whose MACs come closest to dense / target without exceeding it
    best = None
    for h in range(1, heads + 1):
        for k in range(1, nb + 1):
            macs = vit_macs(model, [h] * n_blocks, [k * block_size] * n_blocks)
            if macs <= dense / target and (best is None or macs > best[0]):
                best = (macs, h, k)
    if best is None:
        max_cut = dense / vit_macs(model, [1] * n_blocks, [block_size] * n_blocks)
        return None, max_cut, f"unreachable: one head and one {block_size}-unit MLP block per layer cut {max_cut:.2f}×"
    _, hk, chosen = best
    empty, full = ATTN6.index("empty"), len(ATTN6) - 1
    layers: Dict[str, dict] = {}
    for name, (fc1, fc2) in zip(vit_attention_names(model), vit_mlp_pairs(model)):
        attn = model.get_submodule(name)
        e = attn.embed_dim
        w = attn.in_proj_weight.detach().view(3, heads, e // heads, e)
        keep_heads = set(w.pow(2).sum((0, 2, 3)).topk(hk).indices.tolist())
        layers[name] = attention_layer_plan(ATTN6, [full if h in keep_heads else empty for h in range(heads)], block_size)
        rows = model.get_submodule(fc1).weight.detach().pow(2).sum(1).view(nb, block_size).sum(1)
        layers.update(mlp_pair_plan(fc1, fc2, rows.topk(chosen).indices.tolist(), block_size))
    ideal = dense / vit_macs(model, [hk] * n_blocks, [chosen * block_size] * n_blocks)
    return {"version": PLAN_VERSION, "layers": layers}, ideal, f"{hk}/{heads} heads, {chosen}/{nb} MLP blocks of {block_size} kept"


# --------------------------------------------------------------------------- timing


def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Lets every PatternConv2d measure its sparse-vs-dense choice for this input (per-layer fallback)."""
    from autosculpt.nn import PatternConv2d

    hooks = [m.register_forward_pre_hook(lambda mod, inp: mod.calibrate(inp[0]) and None)
             for m in model.modules() if isinstance(m, PatternConv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def run(models, batches, repeats, out_path: Path, device: str = "cpu", compile_dense: bool = True,
        targets=TARGETS, log=print) -> List[dict]:
    """Times every (model, target, batch); writes ``out_path`` (markdown) and its .json twin."""
    import autosculpt as asc
    from autosculpt.flops import count_macs
    from autosculpt.fuse import fuse_for_inference
    from autosculpt.models import get_model
    from autosculpt.nn import PatternConv2d
    from autosculpt.patterns import PAPER6
    from autosculpt.plan import uniform_plan
    from autosculpt.timing import time_interleaved

    from .timing import cpu_name, header

    torch.manual_seed(0)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, records, notes = [], [], []
    for name in models:
        dense = get_model(name, num_classes=10, in_chans=3).eval()
        x1 = torch.randn(1, 3, 32, 32)
        is_vit = name.startswith("vit")
        # plans are made on the CPU copy; the timed dense model lives on the device (and is compiled once)
        dense_dev = dense if device == "cpu" else copy.deepcopy(dense).to(device)
        compiled = torch.compile(dense_dev) if compile_dense else None
        for target in targets:
            if is_vit:
                plan, ideal_or_cut, how = vit_plan(dense, target)
            else:
                frac, max_cut = kept_fraction_for(dense, x1, target)
                plan = None if frac is None else uniform_plan(dense, PAPER6, min(frac, 1.0))
                how = (f"uniform PAPER6, kept fraction {frac:.3f} of the 3×3 taps" if frac is not None else
                       f"unreachable with 3×3 patterns alone: the largest cut is {max_cut:.2f}×")
            if plan is None:
                msg = f"{name} {target:g}×: {how}"
                notes.append(msg)
                rows.append(f"| {name} | {target:g}× | — | — | — | — | — | — | — | — | — | — | — | — | {how} |")
                log(msg)
                continue
            pruned = asc.sparsify(dense, plan).eval()
            if is_vit:
                ideal = ideal_or_cut
            else:
                ideal = count_macs(dense, x1)["total"] / count_macs(pruned, x1)["total"]
            pruned.to(device)
            for b in batches:
                x = torch.randn(b, 3, 32, 32, device=device)
                fused = fuse_for_inference(pruned, x)
                folded = fuse_for_inference(dense_dev, x)  # BN folded into nn.Conv2d, pools rewritten; ReLUs stay
                calibrate(fused, x)
                fns = {"dense": lambda: dense_dev(x), "folded": lambda: folded(x), "pruned": lambda: fused(x)}
                if compiled is not None:
                    fns["compiled"] = lambda: compiled(x)
                with torch.no_grad():
                    timings = time_interleaved(fns, repeats, warmup=3, min_time_s=0.02, device=device)
                t = {k: v.median_ms / 1e3 for k, v in timings.items()}  # seconds
                sp = t["dense"] / t["pruned"]
                spf = t["folded"] / t["pruned"]
                spc = t["compiled"] / t["pruned"] if "compiled" in t else None
                n_fallback = sum(1 for m in fused.modules() if isinstance(m, PatternConv2d) and m.active_path(x) == "dense")
                n_conv = sum(1 for m in fused.modules() if isinstance(m, PatternConv2d))
                comp = f"{t['compiled'] * 1e3:.2f}" if "compiled" in t else "—"
                rows.append(
                    f"| {name} | {target:g}× | {b} | {ideal:.2f} | {t['dense'] * 1e3:.2f} | {t['folded'] * 1e3:.2f} | {comp} "
                    f"| {t['pruned'] * 1e3:.2f} | {sp:.2f} | **{sp / ideal:.2f}** | {spf:.2f} | {spf / ideal:.2f} "
                    f"| {'—' if spc is None else f'{spc:.2f}'} | {n_fallback}/{n_conv} | {how} |")
                records.append(dict(model=name, target=target, batch=b, ideal=ideal, dense_ms=t["dense"] * 1e3,
                                    dense_bn_folded_ms=t["folded"] * 1e3,
                                    compiled_ms=t["compiled"] * 1e3 if "compiled" in t else None,
                                    pruned_ms=t["pruned"] * 1e3, speedup=sp, speedup_vs_bn_folded=spf,
                                    speedup_vs_compiled=spc, fusion=dict(fused.fusion_report),
                                    layers_on_dense_fallback=n_fallback, pattern_layers=n_conv, plan=how))
                log(rows[-1])
    summary = _summary(records)
    machine = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    load = ("" if load_start is None else
            f"\nLoad average (1 min) at start / end: {load_start:.1f} / {load_end:.1f} on {os.cpu_count()} cores "
            "(a shared machine is noisy: compare rows within one line only).\n")
    text = (
        header(f"Whole-model speedups ({device})")
        + (f"\nDevice: {machine}, fp32.\n" if device == "cuda" else "") + load
        + "\nCNNs: uniform PAPER6 plans at 2× / 3× whole-model MAC reduction (3×3 convs only; other layers dense). "
        "ViT: whole heads + MLP hidden blocks (see the plan column). The pruned model runs fused for inference "
        "(`autosculpt.fuse.fuse_for_inference`: BatchNorm folded, shortcut add and ReLU in the pattern conv's "
        "epilogue, 2×2 max-pools as a 4-way maximum). Baselines, timed interleaved with it (medians): *dense* = "
        "the dense eager model as written; *dense+fold* = the dense model through the same `fuse_for_inference` "
        "(BatchNorm folded, max-pools rewritten; ReLUs separate, as `nn.Conv2d` has no epilogue); "
        "*compiled* = the dense model under `torch.compile` (inductor). ideal = dense MACs ÷ pruned MACs. "
        "fallback = pattern layers that run the dense conv because the sparse kernel measured slower at this shape.\n\n"
        "| model | MAC cut | batch | ideal | dense ms | dense+fold ms | compiled ms | pruned ms | speedup | ÷ ideal "
        "| vs dense+fold | ÷ ideal | vs compiled | fallback | plan |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n" + summary + "\n"
        + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
        + f"\nReproduce: `python -m bench.bench_models{'' if device == 'cpu' else ' --device cuda'}`\n"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    out_path.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
         "loadavg_start_end": [load_start, load_end],
         "summary": summary, "notes": notes, "records": records}, indent=1))
    log(summary)
    return records


def _summary(records: List[dict]) -> str:
    """Median speedup ÷ ideal over the CNN rows, against both eager dense baselines."""
    cnn = [r for r in records if not r["model"].startswith("vit")]
    if not cnn:
        return "No CNN rows."

    def stats(key):
        v = sorted(r[key] / r["ideal"] for r in cnn)
        return f"{v[len(v) // 2]:.2f} (min {v[0]:.2f}, max {v[-1]:.2f})"

    return (f"Median speedup ÷ ideal over the {len(cnn)} CNN rows: **{stats('speedup')}** against the dense eager "
            f"model (target ≥ 0.8); {stats('speedup_vs_bn_folded')} against the dense model through the same "
            "fuse_for_inference (BatchNorm folded, max-pools rewritten).")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two models, batch 1, few repeats")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/models-<device>.md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    set_threads(args.threads)
    models = args.models or (MODELS[:2] if args.quick else MODELS)
    out = args.out or REPO / "bench" / "results" / f"models-{args.device}.md"
    run(models, [1] if args.quick else [1, 8], args.repeats or (5 if args.quick else 15), out, device=args.device,
        compile_dense=not args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
