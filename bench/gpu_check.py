"""GPU benchmark of pattern_conv2d (cuda, triton, auto) against cuDNN ``F.conv2d``.

    python -m bench.gpu_check OUTDIR                 # on a GPU machine (bench/gpu_check.sh builds first)
    python -m bench.gpu_check OUTDIR --dry-run       # the whole script logic on CPU, tiny shapes

Layers and tap masks come from ``bench/conv_shapes.py`` (shared with the CPU benchmark); the ResNet-50
and VGG-16 3x3 layers are run at batch 1, 32 and 128 in fp16 and bf16 (channels_last), and fp32 with
TF32 off and on (NCHW). Every kernel output is checked against an fp32 reference before it is timed;
times are medians of ``triton.testing.do_bench`` (CUDA events otherwise). Writes
``OUTDIR/gpu-<card>.md`` (table + summary) and ``OUTDIR/gpu-<card>.json`` (raw rows), and prints a
short table. A time budget (``--budget-s``) stops measuring early, marking what was skipped, so the
whole check fits its slot; rows are ordered most important first (fp16, batch 32/128).

Speedup = dense time / kernel time; ideal = dense MACs / kept MACs; "auto" is ``backend="auto"``, i.e.
the measured per-layer choice among cuda/triton/dense — the speed a model gets with the fallback on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autosculpt.timing import time_fn  # noqa: E402

# The CPU benchmark's layers and masks: both benchmarks measure the same things.
from bench.conv_shapes import MASK_MIXES, SHAPES, ConvShape, make_tap_mask  # noqa: E402

GPU_SHAPE_PREFIXES = ("resnet50", "vgg16")
BATCHES = (32, 128, 1)  # most important first: the budget may stop the sweep
DTYPES = ("fp16-cl", "bf16-cl", "fp32-tf32", "fp32")
TARGET_RATIO = 0.7
TARGET_FALLBACK = 0.95


@dataclass
class Row:
    shape: str
    batch: int
    dtype: str
    mask: str
    kept: float
    ideal: float
    dense_ms: float
    ms: Dict[str, Optional[float]] = field(default_factory=dict)
    err: Dict[str, Optional[float]] = field(default_factory=dict)
    wrong: List[str] = field(default_factory=list)
    note: str = ""

    def speedup(self, provider: str) -> Optional[float]:
        t = self.ms.get(provider)
        return None if t is None or provider in self.wrong else self.dense_ms / t

    def best(self) -> Optional[float]:
        s = [v for v in (self.speedup("cuda"), self.speedup("triton")) if v is not None]
        return max(s) if s else None


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _set_tf32(enabled: bool) -> None:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = enabled


def _timer(device: str, quick: bool) -> Callable[[Callable[[], object]], float]:
    if device == "cpu":
        return lambda fn: time_fn(fn, 3 if quick else 10, warmup=1).median_ms
    try:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")
    except ImportError:
        from autosculpt.ops.gpu_choice import time_ms

        return lambda fn: time_ms(fn, torch.device("cuda"), warmup=3, reps=20)


def _tolerance(dtype: torch.dtype, tf32: bool) -> float:
    """Max error relative to the output's scale that a correct kernel stays under (loose: it only
    catches broken kernels; the tests hold the tight, cuDNN-relative bounds)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2 if dtype == torch.bfloat16 else 5e-3
    return 5e-3 if tf32 else 1e-4


def run(outdir: Path, device: str, quick: bool, budget_s: float, providers: List[str], log=print,
        requested_batches: Optional[List[int]] = None, max_shapes: Optional[int] = None) -> Path:
    """Runs the sweep and writes the report; returns the markdown path."""
    import autosculpt as asc

    t_start = time.monotonic()
    deadline = t_start + budget_s
    outdir.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        card = torch.cuda.get_device_name()
        shapes = [s for s in SHAPES if s.name.startswith(GPU_SHAPE_PREFIXES)]
        batches, dtypes = BATCHES, DTYPES
    else:
        card = "cpu-dryrun"
        shapes = [ConvShape("tiny-8to12x6", 8, 12, 6), ConvShape("tiny-8to12x7-s2", 8, 12, 7, stride=2)]
        batches, dtypes = (2, 1), ("fp32",)
    if quick and device == "cuda":
        shapes, batches = shapes[:2], (32,)
    if requested_batches:
        batches = tuple(requested_batches)
    shapes = shapes[:max_shapes] if max_shapes else shapes
    bench_ms = _timer(device, quick)
    info = asc.runtime.build_info()
    usable = asc.runtime.available_backends()
    log(f"[gpu_check] card={card} torch={torch.__version__} build={info} usable={usable}")
    providers = [p for p in providers if p == "auto" or usable.get(p)]
    log(f"[gpu_check] providers={providers} shapes={[s.name for s in shapes]} batches={batches} dtypes={dtypes}")

    rows: List[Row] = []
    skipped = 0
    slug = card_slug(card)
    md_path = outdir / f"gpu-{slug}.md"

    def write_reports() -> Dict[str, object]:
        # Rewritten after every layer, so a run stopped from outside still leaves its rows.
        summary = summarize(rows)
        elapsed = time.monotonic() - t_start
        md_path.write_text(render_markdown(card, rows, summary, skipped, elapsed, info, providers))
        (outdir / f"gpu-{slug}.json").write_text(json.dumps(
            {"card": card, "elapsed_s": elapsed, "skipped": skipped, "summary": summary,
             "rows": [asdict(r) for r in rows]}, indent=1, default=str))
        return summary

    for dname in dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dname.split("-")[0]]
        channels_last = dname.endswith("-cl")
        tf32 = dname == "fp32-tf32"
        if device == "cuda":
            _set_tf32(tf32)
            from autosculpt.ops import gpu_choice

            gpu_choice.clear()  # decisions depend on the TF32 setting
        for batch in batches:
            for shape in shapes:
                if time.monotonic() > deadline:
                    skipped += len(MASK_MIXES)
                    continue
                g = torch.Generator().manual_seed(batch * 1000 + shape.c_in)
                x = torch.randn(batch, shape.c_in, shape.size, shape.size, generator=g)
                w = torch.randn(shape.c_out, shape.c_in, 3, 3, generator=g) / math.sqrt(9 * shape.c_in)
                b = torch.randn(shape.c_out, generator=g)
                x, w, b = (t.to(device, dtype) for t in (x, w, b))
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                stride, pad = shape.stride, shape.padding
                dense_w = w.to(memory_format=torch.channels_last) if channels_last else w
                dense_ms = bench_ms(lambda: F.conv2d(x, dense_w, b, stride, pad))  # noqa: F821 - `del` below is later
                for mix in MASK_MIXES:
                    if time.monotonic() > deadline:
                        skipped += 1
                        continue
                    m = make_tap_mask(mix, shape.c_out, seed=0, device=x.device)
                    kept = float(m.float().mean())
                    ideal = math.inf if kept == 0 else 1.0 / kept
                    row = Row(shape.name, batch, dname, mix, kept, ideal, dense_ms)
                    ref = F.conv2d(x.float(), (w * m[:, None].to(w.dtype)).float(), b.float(), stride, pad)
                    scale = ref.abs().max().item() + 1e-12
                    key = asc.ops.conv.new_cache_key()  # a layer: packed weights cached like PatternConv2d
                    for prov in providers:
                        def call(prov=prov):
                            return asc.ops.pattern_conv2d(x, w, m, b, stride, pad, backend=prov, _cache_key=key)  # noqa: F821
                        try:
                            y = call()  # first call: autotuning / auto's measurement, outside the timing
                            err = (y.float() - ref).abs().max().item() / scale
                            row.err[prov] = err
                            if not err <= _tolerance(dtype, tf32):
                                row.wrong.append(prov)
                            row.ms[prov] = bench_ms(call)
                        except Exception as exc:  # noqa: BLE001 - recorded in the report, never hidden
                            row.ms[prov] = None
                            row.note += f"{prov}: {type(exc).__name__}: {str(exc)[:120]} "
                            log(f"[gpu_check] {prov} failed on {shape.name} b{batch} {dname} {mix}: {exc}")
                    asc.ops.conv.release_cache(key)
                    rows.append(row)
                    log(_row_line(row))
                del x, w, b, dense_w
                if device == "cuda":
                    torch.cuda.empty_cache()
                write_reports()

    summary = write_reports()
    log(short_table(card, rows, summary, skipped))
    log(f"[gpu_check] wrote {md_path} ({len(rows)} rows, {skipped} skipped, {time.monotonic() - t_start:.0f}s)")
    return md_path


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _row_line(r: Row) -> str:
    parts = [f"{p}={_fmt(r.ms.get(p), 3)}ms" + ("(WRONG)" if p in r.wrong else "") for p in r.ms]
    return f"  {r.shape:22s} b{r.batch:<4d} {r.dtype:9s} {r.mask:24s} dense={r.dense_ms:.3f}ms " + " ".join(parts)


def summarize(rows: List[Row]) -> Dict[str, object]:
    """Median speedup÷ideal at batch >= 32 for masks keeping <= 50%, and the worst row with fallback."""
    out: Dict[str, object] = {}
    target_rows = [r for r in rows if r.batch >= 32 and r.kept <= 0.5 + 1e-9 and math.isfinite(r.ideal)]
    for prov in ("cuda", "triton", "best", "auto"):
        ratios = []
        for r in target_rows:
            s = r.best() if prov == "best" else r.speedup(prov)
            if s is not None:
                ratios.append(s / r.ideal)
        out[f"median_ratio_{prov}"] = statistics.median(ratios) if ratios else None
        out[f"n_{prov}"] = len(ratios)
    by_dtype = {}
    for d in sorted({r.dtype for r in target_rows}):
        ratios = [r.best() / r.ideal for r in target_rows if r.dtype == d and r.best() is not None]
        by_dtype[d] = statistics.median(ratios) if ratios else None
    out["median_ratio_best_by_dtype"] = by_dtype
    worst = None
    for r in rows:
        s = r.speedup("auto")
        if s is not None and (worst is None or s < worst[0]):
            worst = (s, f"{r.shape} b{r.batch} {r.dtype} {r.mask}")
    out["worst_auto_speedup"] = worst[0] if worst else None
    out["worst_auto_row"] = worst[1] if worst else None
    wrong = [f"{r.shape} b{r.batch} {r.dtype} {r.mask}: {','.join(r.wrong)}" for r in rows if r.wrong]
    out["wrong"] = wrong
    return out


def render_markdown(card, rows, summary, skipped, elapsed, info, providers) -> str:
    lines = [
        f"# Pattern conv on {card}",
        "",
        f"torch {torch.__version__}; autosculpt {info['version']}; CUDA kernels built: {info['cuda_built']} "
        f"(archs {info['cuda_archs'] or '—'}); triton: {info['triton_available']}; providers: {', '.join(providers)}.",
        f"Dense = cuDNN `F.conv2d` with pre-masked weights, same dtype and layout. Times: median "
        f"(triton.testing.do_bench / CUDA events). ideal = dense MACs / kept MACs. "
        f"{len(rows)} rows in {elapsed:.0f} s; {skipped} rows skipped by the time budget.",
        "",
        "## Summary",
        "",
        f"- median speedup÷ideal at batch ≥ 32, masks keeping ≤ 50% (target ≥ {TARGET_RATIO}): "
        + ", ".join(f"{p} {_fmt(summary[f'median_ratio_{p}'])} (n={summary[f'n_{p}']})"
                    for p in ("best", "cuda", "triton", "auto")),
        "- by dtype (best of cuda/triton): "
        + ", ".join(f"{d} {_fmt(v)}" for d, v in summary["median_ratio_best_by_dtype"].items()),
        f"- worst shape with the fallback (`auto` vs dense, target ≥ {TARGET_FALLBACK}): "
        f"{_fmt(summary['worst_auto_speedup'])} ({summary['worst_auto_row'] or '—'})",
        f"- outputs outside tolerance (excluded from speedups): {len(summary['wrong'])}"
        + ("" if not summary["wrong"] else " — " + "; ".join(summary["wrong"][:10])),
        "",
        "## Rows",
        "",
        "| layer | batch | dtype | mask | kept | ideal | dense ms | cuda ms | triton ms | auto ms "
        "| cuda × | triton × | auto × | best ÷ ideal | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = r.best()
        note = (f"WRONG: {','.join(r.wrong)} " if r.wrong else "") + r.note.strip()
        lines.append(
            f"| {r.shape} | {r.batch} | {r.dtype} | {r.mask} | {r.kept:.2f} | {_fmt(r.ideal)} | {r.dense_ms:.3f} "
            f"| {_fmt(r.ms.get('cuda'), 3)} | {_fmt(r.ms.get('triton'), 3)} | {_fmt(r.ms.get('auto'), 3)} "
            f"| {_fmt(r.speedup('cuda'))} | {_fmt(r.speedup('triton'))} | {_fmt(r.speedup('auto'))} "
            f"| {_fmt(None if best is None else best / r.ideal)} | {note} |"
        )
    return "\n".join(lines) + "\n"


def short_table(card, rows, summary, skipped) -> str:
    """A compact per-(dtype, batch) digest for the console."""
    lines = [f"== {card}: median speedup÷ideal (best of cuda/triton) by dtype × batch, masks ≤ 50% ==",
             f"{'dtype':10s} " + " ".join(f"b{b:<6d}" for b in sorted({r.batch for r in rows}))]
    for d in sorted({r.dtype for r in rows}):
        cells = []
        for b in sorted({r.batch for r in rows}):
            v = [r.best() / r.ideal for r in rows
                 if r.dtype == d and r.batch == b and r.kept <= 0.5 + 1e-9 and r.best() is not None
                 and math.isfinite(r.ideal)]
            cells.append(f"{_fmt(statistics.median(v) if v else None):7s}")
        lines.append(f"{d:10s} " + " ".join(cells))
    lines.append(f"target median (b>=32) {_fmt(summary['median_ratio_best'])} (>= {TARGET_RATIO}); "
                 f"worst with fallback {_fmt(summary['worst_auto_speedup'])} (>= {TARGET_FALLBACK}); "
                 f"wrong outputs {len(summary['wrong'])}; skipped {skipped}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="a couple of shapes only")
    ap.add_argument("--dry-run", action="store_true", help="= --device cpu --quick: exercise the logic on CPU")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop measuring after this many seconds")
    ap.add_argument("--providers", default="cuda,triton,auto")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes instead of the default sweep")
    ap.add_argument("--max-shapes", type=int, default=0, help="only the first N layer shapes")
    ap.add_argument("--with-models", action="store_true",
                    help="afterwards, whole pruned models vs dense (bench/bench_models.py) -> OUTDIR/models-<card>.md")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    providers = [p for p in args.providers.split(",") if p]
    if args.device == "cpu":
        # CPU tensors run the Triton kernel in the interpreter; backend="triton" accepts them only so.
        os.environ["TRITON_INTERPRET"] = "1"
        providers = [{"cuda": "torch"}.get(p, p) for p in providers]  # no CUDA kernel on a CPU
    elif not torch.cuda.is_available():
        print("[gpu_check] no CUDA device visible to torch: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",") if b]
    run(args.outdir, args.device, args.quick, args.budget_s, providers, requested_batches=batches,
        max_shapes=args.max_shapes or None)
    if args.with_models:  # optional section: the end-to-end model benchmark on the same device
        from bench.bench_models import MODELS
        from bench.bench_models import run as run_models

        card = card_slug(torch.cuda.get_device_name()) if args.device == "cuda" else "cpu-dryrun"
        run_models(MODELS if not args.quick else MODELS[:1], [1, 8] if not args.quick else [1],
                   10 if not args.quick else 2, args.outdir / f"models-{card}.md", device=args.device,
                   compile_dense=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
