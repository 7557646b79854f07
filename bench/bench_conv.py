"""CPU pattern-conv benchmark: dense ``F.conv2d`` (oneDNN) vs AutoSculpt's kernel, side by side.

Run: ``python -m bench.bench_conv [--quick] [--out bench/results/cpu-conv.md]``

For every layer shape (bench/conv_shapes.py), batch (1 and 8) and tap mask (~67/50/33/11 % kept) it
times, interleaved within each repeat so machine noise hits all providers alike:

* ``dense``    ``F.conv2d`` with the masked weights (the baseline, oneDNN on x86);
* ``sparse``   ``autosculpt.ops.pattern_conv2d(..., backend="cpu")`` (the public op, incl. its Python
               dispatch);
* ``kernel``   the packed C++ kernel called directly (``PackedPatternConv.forward``), i.e. the op
               without the Python/custom-op overhead;
* ``layer``    ``autosculpt.nn.PatternConv2d`` with ``path="auto"`` (calibrated dense fallback);
* ``native``   oneDNN in its native layouts: a prepacked ``to_mkldnn`` conv on nChw16c tensors, and a
               channels_last ``F.conv2d`` (``dense_nhwc``); the better of the two is the fair per-layer
               baseline (plain ``F.conv2d`` on NCHW pays a reorder per call);
* ``nhwc``     AutoSculpt's channels-last kernel (``pattern_conv2d`` on a channels_last input);
* ``existing`` the "existing engine" baseline: one ``F.conv2d`` per distinct pattern shape (kernel
               cropped to the pattern's bounding box) on the filters having it, outputs put back in order.

Reported: median times, speedup = dense / x, ideal = dense MACs / kept MACs, speedup ÷ ideal. Threads are
fixed to the machine's cores (``--threads`` to override) for torch and the kernel alike.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F
import torch.utils.mkldnn

from autosculpt import _ext
from autosculpt.nn import PatternConv2d
from autosculpt.ops import conv as conv_ops
from autosculpt.ops import pattern_conv2d
from autosculpt.timing import set_threads, time_interleaved

from .conv_shapes import MASK_MIXES, QUICK_SHAPES, SHAPES, ConvShape, make_layer_inputs, make_tap_mask
from .timing import cpu_name


def existing_engine(x, weight, tap_mask, bias, stride: int, padding: int) -> Callable[[], torch.Tensor]:
    """The per-pattern baseline: for each distinct tap mask, one ``F.conv2d`` over the filters having
    it, with the kernel cropped to the mask's bounding box (so a 3×1 pattern is a 3×1 conv); results
    are written back into the filters' output channels. Filters with an empty mask get the bias."""
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    flat = tap_mask.flatten(1)
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    plans = []
    empty_idx = None
    for u in range(uniq.shape[0]):
        idx = (inverse == u).nonzero().flatten()
        m = uniq[u].view(kh, kw)
        if not bool(m.any()):
            empty_idx = idx
            continue
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        r0, r1, s0, s1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        wk = (weight[idx] * m.to(weight.dtype))[:, :, r0:r1, s0:s1].contiguous()
        plans.append((idx, wk, bias[idx].contiguous() if bias is not None else None, r0, s0))

    def run() -> torch.Tensor:
        xp = F.pad(x, (padding, padding, padding, padding))
        out = torch.empty(n, c_out, oh, ow, dtype=x.dtype)
        for idx, wk, bk, r0, s0 in plans:
            y = F.conv2d(xp[:, :, r0:, s0:], wk, bk, stride)
            out[:, idx] = y[:, :, :oh, :ow]
        if empty_idx is not None:
            out[:, empty_idx] = (bias[empty_idx] if bias is not None else torch.zeros(len(empty_idx))).view(1, -1, 1, 1)
        return out

    return run


def kernel_only(x, weight, tap_mask, bias, stride: int, padding: int, threads: int) -> Callable[[], torch.Tensor]:
    """The packed kernel called directly (weights packed once, output allocated once)."""
    ext = _ext.require()
    w = weight.contiguous()
    m8 = tap_mask.to(torch.uint8).contiguous()
    c_out, c_in, kh, kw = w.shape
    packed = ext.PackedPatternConv(w.data_ptr(), m8.data_ptr(), c_out, c_in, kh, kw, 1)
    n, _, h, wd = x.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    out = torch.empty(n, c_out, oh, ow)

    def run() -> torch.Tensor:
        packed.forward(x.data_ptr(), bias.data_ptr(), out.data_ptr(), n, h, wd, stride, stride, padding, padding,
                       1, 1, threads)
        return out

    return run


def bench_one(shape: ConvShape, batch: int, mix: str, threads: int, reps: int, check: bool = True,
              clock=time.perf_counter) -> dict:
    x, w, b = make_layer_inputs(shape, batch)
    mask = make_tap_mask(mix, shape.c_out)
    wm = w * mask[:, None].to(w.dtype)
    s, p = shape.stride, shape.padding
    conv = torch.nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, s, p)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    layer = PatternConv2d.from_dense(conv, mask, path="auto")
    layer.calibrate(x)
    key = conv_ops.new_cache_key()  # the op's own packing-cache entry (the layer has another)
    key_nhwc = conv_ops.new_cache_key()
    # oneDNN in its native layouts: a prepacked blocked (nChw16c) conv on mkldnn tensors, and the
    # channels_last (NHWC) conv that the deployed form runs; our NHWC kernel against the latter.
    dense_conv = torch.nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, s, p)
    with torch.no_grad():
        dense_conv.weight.copy_(wm)
        dense_conv.bias.copy_(b)
    mk = torch.utils.mkldnn.to_mkldnn(dense_conv)
    xm = x.to_mkldnn()
    xcl = x.contiguous(memory_format=torch.channels_last)
    wm_cl = wm.contiguous(memory_format=torch.channels_last)
    fns = {
        "native": lambda: mk(xm),
        "dense_nhwc": lambda: F.conv2d(xcl, wm_cl, b, s, p),
        "nhwc": lambda: pattern_conv2d(xcl, w, mask, b, s, p, backend="cpu", _cache_key=key_nhwc),
        "dense": lambda: F.conv2d(x, wm, b, s, p),
        "sparse": lambda: pattern_conv2d(x, w, mask, b, s, p, backend="cpu", _cache_key=key),
        "kernel": kernel_only(x, w, mask, b, s, p, threads),
        "layer": lambda: layer(x),
        "existing": existing_engine(x, w, mask, b, s, p),
    }
    with torch.no_grad():
        if check:  # a benchmark of wrong results is worthless: compare every provider once
            ref = fns["dense"]()
            scale = float(ref.abs().max())
            for name, fn in fns.items():
                out = fn()
                out = out.to_dense() if out.is_mkldnn else out
                err = float((out - ref).abs().max()) / scale
                if not err <= 1e-4:
                    raise AssertionError(f"{shape.name} b{batch} {mix}: provider {name} differs, rel err {err:.2e}")
        # warm-up: packing, oneDNN primitive creation, allocator; every repeat runs all providers, rotating
        timings = time_interleaved(fns, reps, warmup=2, rotate=True, clock=clock)
    t = {k: v.median_ms / 1e3 for k, v in timings.items()}  # seconds
    best = {k: v.min_ms / 1e3 for k, v in timings.items()}  # noise-robust companion figure (shared machines)
    kept = float(mask.float().mean())
    ideal = 1.0 / kept if kept > 0 else float("inf")
    sp = t["dense"] / t["sparse"]
    native = min(t["native"], t["dense_nhwc"])  # the better of oneDNN's native layouts
    dense_flop, kept_flop = 2.0 * shape.dense_macs(batch), 2.0 * shape.dense_macs(batch) * kept
    return {
        "native_ms": t["native"] * 1e3, "dense_nhwc_ms": t["dense_nhwc"] * 1e3, "nhwc_ms": t["nhwc"] * 1e3,
        "nhwc_ratio_native": native / t["nhwc"] / ideal,
        "native_gflops": dense_flop / native / 1e9, "nhwc_gflops_kept": kept_flop / t["nhwc"] / 1e9,
        "shape": shape.name, "batch": batch, "mask": mix, "kept": kept, "ideal": ideal,
        "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3, "kernel_ms": t["kernel"] * 1e3,
        "speedup": sp, "ratio": sp / ideal, "kernel_ratio": t["dense"] / t["kernel"] / ideal,
        "layer_speedup": t["dense"] / t["layer"], "layer_path": layer.active_path(x),
        "existing_speedup": t["dense"] / t["existing"],
        "ratio_best": best["dense"] / best["sparse"] / ideal, "kernel_ratio_best": best["dense"] / best["kernel"] / ideal,
        "layer_speedup_best": best["dense"] / best["layer"], "reps": reps,
    }


def reps_for(shape: ConvShape, batch: int, budget_s: float, lo: int, hi: int) -> int:
    # ~ 150 GFLOP/s dense on 2 cores; five providers per repeat cost ~4 dense calls
    est = 2 * shape.dense_macs(batch) / 150e9 + 60e-6
    return int(max(lo, min(hi, budget_s / (4 * est))))


def to_markdown(rows: List[dict], meta: dict) -> str:
    out = ["# CPU pattern conv benchmark", ""]
    for k, v in meta.items():
        if not k.startswith("_"):
            out.append(f"- {k}: {v}")
    out += ["", "speedup = dense ms / x ms; ideal = dense MACs / kept MACs; ratio = speedup ÷ ideal. "
            "`sparse` is `pattern_conv2d(backend='cpu')`; `kernel` is the same C++ kernel called "
            "directly (no Python dispatch); `layer` is `PatternConv2d(path='auto')` with its dense fallback; "
            "`existing` is one `F.conv2d` per pattern shape.", ""]
    for batch in sorted({r["batch"] for r in rows}):
        out += [f"## batch {batch}", "",
                "| shape | mask | kept % | dense ms | sparse ms | speedup | ideal | speedup ÷ ideal | kernel ÷ ideal "
                "| layer (fallback) speedup | layer path | existing-engine speedup |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in rows:
            if r["batch"] != batch:
                continue
            out.append(
                f"| {r['shape']} | {r['mask'].split(':', 1)[1]} | {100 * r['kept']:.1f} | {r['dense_ms']:.3f} | "
                f"{r['sparse_ms']:.3f} | {r['speedup']:.2f} | {r['ideal']:.2f} | {r['ratio']:.2f} | "
                f"{r['kernel_ratio']:.2f} | {r['layer_speedup']:.2f} | {r['layer_path']} | {r['existing_speedup']:.2f} |")
        out.append("")
        peak = meta.get("_peak")
        out += [f"### batch {batch}: against oneDNN in its native layout", "",
                "native = the faster of a prepacked mkldnn conv (nChw16c) and a channels_last conv; `nhwc` = "
                "AutoSculpt's channels-last kernel (`pattern_conv2d` on a channels_last input). GFLOP/s of ours "
                "count kept MACs only" + (f"; % of the FMA peak ({peak:.0f} GFLOP/s at these threads)" if peak else "")
                + ".", "",
                "| shape | mask | mkldnn ms | dense NHWC ms | nhwc ms | nhwc vs native ÷ ideal | native GFLOP/s | "
                "nhwc GFLOP/s (kept) | native % peak | nhwc % peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["batch"] != batch:
                continue
            pk = (lambda g: f"{100 * g / peak:.0f}%") if peak else (lambda g: "—")
            out.append(f"| {r['shape']} | {r['mask'].split(':', 1)[1]} | {r['native_ms']:.3f} | {r['dense_nhwc_ms']:.3f} "
                       f"| {r['nhwc_ms']:.3f} | {r['nhwc_ratio_native']:.2f} | {r['native_gflops']:.0f} | "
                       f"{r['nhwc_gflops_kept']:.0f} | {pk(r['native_gflops'])} | {pk(r['nhwc_gflops_kept'])} |")
        out.append("")
    out += ["## Summary", ""] + [f"- {line}" for line in summary_lines(rows)] + [""]
    return "\n".join(out)


def summary_lines(rows: List[dict]) -> List[str]:
    lines = []
    for batch in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == batch]
        lines.append(f"batch {batch}: median speedup ÷ ideal = {statistics.median(r['ratio'] for r in rs):.2f} "
                     f"(pattern_conv2d op), {statistics.median(r['kernel_ratio'] for r in rs):.2f} (kernel called "
                     f"directly); median speedup {statistics.median(r['speedup'] for r in rs):.2f}x; "
                     f"median existing-engine speedup {statistics.median(r['existing_speedup'] for r in rs):.2f}x")
        lines.append(f"batch {batch}: AutoSculpt's NHWC kernel vs oneDNN in its native layout, median speedup ÷ ideal = "
                     f"{statistics.median(r['nhwc_ratio_native'] for r in rs):.2f}; median GFLOP/s: native dense "
                     f"{statistics.median(r['native_gflops'] for r in rs):.0f}, ours (kept MACs) "
                     f"{statistics.median(r['nhwc_gflops_kept'] for r in rs):.0f}")
        lines.append(f"batch {batch}, best-of-repeats instead of medians (less sensitive to other processes): "
                     f"median speedup ÷ ideal = {statistics.median(r['ratio_best'] for r in rs):.2f} (op), "
                     f"{statistics.median(r['kernel_ratio_best'] for r in rs):.2f} (kernel)")
    worst = min(rows, key=lambda r: r["layer_speedup"])
    slow = sum(r["layer_speedup"] < 0.95 for r in rows)
    lines.append(f"worst layer-with-fallback speedup = {worst['layer_speedup']:.2f}x ({worst['shape']}, batch "
                 f"{worst['batch']}, {worst['mask']}, path {worst['layer_path']}); {slow} of {len(rows)} rows below 0.95x")
    wb = min(rows, key=lambda r: r["layer_speedup_best"])
    lines.append(f"worst layer-with-fallback speedup, best-of-repeats = {wb['layer_speedup_best']:.2f}x ({wb['shape']}, "
                 f"batch {wb['batch']}, {wb['mask']})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 shapes, fewer repeats (about a minute)")
    ap.add_argument("--out", default="bench/results/cpu-conv.md", help="markdown file to write ('' = none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all, or the quick set)")
    ap.add_argument("--masks", default="", help="comma-separated mask-name prefixes, e.g. 50,11")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds of timing per row (default 0.5, quick 0.2)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the calling thread's CPU time (only with --threads 1: then torch and the kernel "
                         "run in that thread), which other processes on a shared machine barely disturb")
    args = ap.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1 (other threads' CPU time would not be counted)")
    clock = time.thread_time if args.cpu_time else time.perf_counter

    set_threads(args.threads)
    shapes = SHAPES
    if args.shapes:
        names = args.shapes.split(",")
        shapes = [s for s in SHAPES if s.name in names]
    elif args.quick:
        shapes = [s for s in SHAPES if s.name in QUICK_SHAPES]
    mixes = [m for m in MASK_MIXES if not args.masks or any(m.startswith(p) for p in args.masks.split(","))]
    batches = [int(b) for b in args.batches.split(",")]
    budget = args.budget or (0.2 if args.quick else 0.5)
    lo, hi = (3, 15) if args.quick else (5, 40)
    ext = _ext.require()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "threads": f"{args.threads} (torch.set_num_threads and the kernel's num_threads)",
        "kernel SIMD": ext.simd_level(),
        "timing": ("median of interleaved repeats, after 2 warm-up calls per provider; outputs checked against dense first; "
                   + ("clock: CPU time of the calling thread" if args.cpu_time else "clock: wall time (perf_counter)")),
        "load average at start (1/5/15 min)": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "command": "python -m bench.bench_conv " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    from .fma_peak import fma_peak

    peak = fma_peak([args.threads], log=lambda *_: None)
    meta["FMA peak"] = f"{peak['gflops'][args.threads]:.1f} GFLOP/s at {args.threads} thread(s) ({peak['method']})"
    meta["_peak"] = peak["gflops"][args.threads]
    rows = []
    t_start = time.time()
    total = len(shapes) * len(batches) * len(mixes)
    for shape in shapes:
        for batch in batches:
            reps = reps_for(shape, batch, budget, lo, hi)
            for mix in mixes:
                r = bench_one(shape, batch, mix, args.threads, reps, clock=clock)
                rows.append(r)
                print(f"[{len(rows)}/{total} {time.time() - t_start:5.0f}s] {shape.name:20s} b{batch} "
                      f"{mix.split(':')[0]:>4s} dense {r['dense_ms']:8.3f}ms sparse {r['sparse_ms']:8.3f}ms "
                      f"speedup {r['speedup']:5.2f} / ideal {r['ideal']:4.2f} = {r['ratio']:4.2f} "
                      f"(kernel {r['kernel_ratio']:4.2f}) layer {r['layer_speedup']:4.2f} "
                      f"existing {r['existing_speedup']:4.2f} | nhwc {r['nhwc_ms']:.3f}ms vs native "
                      f"{min(r['native_ms'], r['dense_nhwc_ms']):.3f}ms: {r['nhwc_ratio_native']:4.2f} of ideal", flush=True)
    meta["wall time"] = f"{time.time() - t_start:.0f} s"
    meta["load average at end (1/5/15 min)"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    for line in summary_lines(rows):
        print(line)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_markdown(rows, meta))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
