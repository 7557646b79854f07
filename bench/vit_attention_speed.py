"""End-to-end CPU speed of a sparsified ViT (pruned heads + attention patterns + pruned MLP units).

Run: ``python -m bench.vit_attention_speed [--threads N]``. Prints dense vs sparsified forward time
(median process time of repeats, batch 8) at 32×32 (L=257) and 64×64 (L=1025) images, patch 2.
"""
from __future__ import annotations

import argparse
import time

import torch

import autosculpt as asc
from autosculpt.attention_patterns import ATTN6
from autosculpt.models import vit_tiny
from autosculpt.models.vit import vit_attention_names, vit_mlp_pairs
from autosculpt.nn.attention import attention_layer_plan
from autosculpt.nn.linear import mlp_pair_plan
from autosculpt.timing import set_threads, time_fn


def example_plan(model, embed_dim: int) -> dict:
    """Per block: heads [empty, empty, local1, local1, strided2, dense] at block 64; half the MLP units."""
    layers = {}
    for name in vit_attention_names(model):
        layers[name] = attention_layer_plan(ATTN6, [0, 0, 1, 1, 2, 5], 64)
    for fc1, fc2 in vit_mlp_pairs(model):
        layers.update(mlp_pair_plan(fc1, fc2, range(0, embed_dim * 4 // 32, 2), 32))
    return {"version": 1, "layers": layers}


def _time(model, x, reps: int) -> float:
    """Median process time (s) of ``reps`` forward passes after one warm-up."""
    with torch.no_grad():
        return time_fn(lambda: model(x), reps, warmup=1, clock=time.process_time).median_ms / 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    embed_dim = 192
    for image in (32, 64):
        model = vit_tiny(10, image, 2, 3, embed_dim=embed_dim, depth=4, num_heads=6, mlp_ratio=4).eval()
        x = torch.randn(8, 3, image, image)
        sparse = asc.sparsify(model, example_plan(model, embed_dim))
        with torch.no_grad():
            sparse(x)  # path="auto" calibration
        t_dense, t_sparse = _time(model, x, args.reps), _time(sparse, x, args.reps)
        paths = [blk.attn.active_path() for blk in sparse.blocks]
        print(f"L={model.seq_len}: dense {t_dense * 1e3:.1f} ms, sparsified {t_sparse * 1e3:.1f} ms, "
              f"x{t_dense / t_sparse:.2f}; attention paths {paths}")


if __name__ == "__main__":
    main()
