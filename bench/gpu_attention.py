"""GPU block-sparse attention check: the Triton kernel vs dense SDPA vs FlexAttention on the same mask.

Run on a machine with a CUDA GPU: ``python -m bench.gpu_attention [--quick] [--out bench/results/gpu-attention.md]``
(``--quick``: fp16, two shapes, fits a few minutes; FlexAttention compiles once per shape and dtype).
Targets: at every sparsity, ours >= 1.0x FlexAttention (same block mask); with the dense pattern,
ours >= 0.85x SDPA. Exit status 1 when a target or a correctness check fails.

``--dry-run`` runs the same code on CPU tensors under ``TRITON_INTERPRET=1`` (fp32, tiny shapes, no
Flex, no targets) so the script itself is tested without a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from autosculpt.ops import block_sparse_attention
from autosculpt.reference import block_sparse_attention_ref
from autosculpt.timing import time_fn

from .bench_attention import random_block_mask

GPU_CASES = [  # (B, H, L, D, block)
    (1, 12, 1024, 64, 64),
    (4, 12, 1024, 64, 64),
    (1, 12, 4096, 64, 64),
    (1, 12, 4096, 64, 128),
    (1, 12, 4096, 128, 64),
]
QUICK_CASES = [(1, 12, 1024, 64, 64), (1, 12, 4096, 64, 64)]
DRY_CASES = [(1, 2, 96, 32, 32)]
_FLEX = None
SPARSITIES = (0.0, 0.5, 0.75, 0.9)


def _timer(device: str) -> Callable[[Callable[[], object], int], float]:
    """Median seconds of ``reps`` calls of a warmed-up function: CUDA events on the GPU, wall time on the CPU."""
    def median_s(fn, reps):
        return time_fn(fn, reps, warmup=0, device=device, cuda_events=device == "cuda").median_ms / 1e3
    return median_s


def _flex(q, k, v, mask: torch.Tensor, bs: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, length, _ = q.shape
    m = mask.clone()
    blk = create_block_mask(lambda bb, hh, qi, ki: m[hh, qi // bs, ki // bs], None, h, length, length,
                            device=q.device, BLOCK_SIZE=bs)
    global _FLEX
    if _FLEX is None:  # one compiled function: it recompiles per shape/dtype only, not per mask
        _FLEX = torch.compile(flex_attention, dynamic=False)
    compiled = _FLEX
    return lambda: compiled(q, k, v, block_mask=blk)


def run(dry_run: bool, reps: int, quick: bool = False, progress=print) -> List[dict]:
    device = "cpu" if dry_run else "cuda"
    dtypes = [torch.float32] if dry_run else ([torch.float16] if quick else [torch.float16, torch.bfloat16])
    cases = DRY_CASES if dry_run else (QUICK_CASES if quick else GPU_CASES)
    timer = _timer(device)
    rows = []
    for dtype in dtypes:
        for b, h, length, d, bs in cases:
            g = torch.Generator().manual_seed(length + d + bs)
            q, k, v = (torch.randn(b, h, length, d, generator=g).to(device, dtype) for _ in range(3))
            nb = -(-length // bs)
            for sp in SPARSITIES:
                mask = (torch.ones(h, nb, nb, dtype=torch.bool) if sp == 0 else
                        random_block_mask(h, nb, sp, seed=int(sp * 100))).to(device)
                kept = float(mask.float().mean())
                fns: Dict[str, Callable[[], torch.Tensor]] = {
                    "ours": lambda: block_sparse_attention(q, k, v, mask, bs, backend="triton"),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                }
                if not dry_run:
                    fns["flex"] = _flex(q, k, v, mask, bs)
                ref_len = min(length, 1024)  # correctness on a prefix-sized problem keeps the reference cheap
                ref = block_sparse_attention_ref(q[..., :ref_len, :], k[..., :ref_len, :], v[..., :ref_len, :],
                                                 mask[:, : -(-ref_len // bs), : -(-ref_len // bs)], bs)
                got = block_sparse_attention(q[..., :ref_len, :], k[..., :ref_len, :], v[..., :ref_len, :],
                                             mask[:, : -(-ref_len // bs), : -(-ref_len // bs)], bs, backend="triton")
                err = float((got.float() - ref.float()).abs().max())
                for fn in fns.values():  # warm-up (and compile)
                    fn()
                t = {n: timer(fn, reps) for n, fn in fns.items()}
                row = {"dtype": str(dtype).replace("torch.", ""), "B": b, "H": h, "L": length, "D": d, "block": bs,
                       "sparsity": sp, "kept": kept, "max_err": err,
                       **{f"{n}_ms": s * 1e3 for n, s in t.items()}}
                row["vs_sdpa"] = t["sdpa"] / t["ours"]
                row["vs_flex"] = t["flex"] / t["ours"] if "flex" in t else float("nan")
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                row["ok_err"] = err <= tol
                row["ok_target"] = dry_run or (row["vs_flex"] >= 1.0 and (sp != 0 or row["vs_sdpa"] >= 0.85))
                rows.append(row)
                progress(f"{row['dtype']} B={b} H={h} L={length} D={d} bs={bs} sp={sp:.0%}: ours {row['ours_ms']:.3f} ms, "
                         f"x{row['vs_sdpa']:.2f} vs SDPA, x{row['vs_flex']:.2f} vs Flex, err {err:.1e}")
    return rows


def to_markdown(rows: List[dict], dry_run: bool) -> str:
    device = "CPU (dry run, TRITON_INTERPRET=1)" if dry_run else torch.cuda.get_device_name()
    lines = [f"# GPU block-sparse attention: Triton kernel vs SDPA vs FlexAttention ({device})", "",
             "Targets: ours/Flex >= 1.0 on the same mask; dense pattern (sparsity 0%) ours/SDPA >= 0.85.", "",
             "| dtype | B | H | L | D | block | sparsity | ours ms | SDPA ms | Flex ms | SDPA/ours | Flex/ours | max err | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['B']} | {r['H']} | {r['L']} | {r['D']} | {r['block']} | {r['sparsity']:.0%} | "
            f"{r['ours_ms']:.3f} | {r['sdpa_ms']:.3f} | {r.get('flex_ms', float('nan')):.3f} | {r['vs_sdpa']:.2f} | "
            f"{r['vs_flex']:.2f} | {r['max_err']:.1e} | {'yes' if r['ok_err'] and r['ok_target'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU tensors under TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--quick", action="store_true", help="fp16 only, L=1024 and 4096 at H=12, D=64, block 64")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        ap.error("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA GPU here; use --dry-run (with TRITON_INTERPRET=1) to exercise the script on CPU")
    rows = run(args.dry_run, args.reps or (2 if args.dry_run else 50), quick=args.quick)
    text = to_markdown(rows, args.dry_run)
    out = args.out or Path(__file__).resolve().parent / "results" / ("gpu-attention-dryrun.md" if args.dry_run else "gpu-attention.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    failed = [r for r in rows if not (r["ok_err"] and r["ok_target"])]
    if failed:
        print(f"{len(failed)} case(s) missed a target or the correctness check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
