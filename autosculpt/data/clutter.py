"""``digits-clutter``: scikit-learn's real handwritten digits on larger, cluttered, noisy canvases.

A benchmark that is not saturated (dense ResNet-20 tops out well below 100%, so pruning visibly
costs accuracy), built offline from the 1,797 bundled 8×8 digits (no download, nothing written).

**Split by source image first.** The 1,797 source images are split (stratified by class, seeded)
into train / val / test *sources*; each split's canvases are then generated from that split's
sources only: the placed digit *and* every clutter fragment. So no source image — not even a piece
of one — appears in two splits, and the test accuracy measures generalisation to unseen
handwriting, not recognition of a re-rendered training image. Each split exposes its sources
(:attr:`ClutterDataset.source_indices`) and, per canvas, the placed digit's source
(:attr:`ClutterDataset.canvas_sources`) and the fragments' sources
(:attr:`ClutterDataset.fragment_sources`, ``-1`` where a canvas has fewer fragments).

**One canvas** (``canvas`` × ``canvas`` pixels, 1 channel, label = the placed digit's class):

1. the *target*: one source digit drawn at a random size (``scale`` pixels per side of its 8×8
   frame), rotation (± ``rotation`` degrees), slight shear/aspect change, intensity and position
   (its 8×8 frame centred at least half a side inside the canvas);
2. *clutter*: ``fragments`` pieces of OTHER source digits of the same split (never the target's
   own source image), each a random rectangular crop (``fragment_size`` source pixels per side) of
   one digit, drawn at the same range of sizes and rotations, with its own intensity, anywhere on
   the canvas; the layers are composited with a pixel-wise maximum (strokes occlude like ink);
3. Gaussian pixel noise (std ``noise``), then clipping to [0, 1].

Every random number comes from one ``numpy.random.Generator`` per split, seeded from ``(seed,
split)``, all drawn up front (the placed digits' first), so a given seed gives the same canvases bit
for bit, and switching clutter or noise off (``fragments=(0, 0)``, ``noise=0``) leaves the placed
digits exactly where they were (the tests rely on it). Rendering is one batched bilinear
``grid_sample`` per chunk of canvases (~10k 32×32 canvases in a few seconds on one core).
The splits are cached in memory (per seed and settings); nothing is written to disk.

Pixels are standardised with the TRAINING split's mean and std, like ``digits``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["ClutterConfig", "ClutterDataset", "load_clutter_splits", "render_canvases", "split_sources",
           "CLUTTER_CLASSES", "DEFAULT_CONFIG"]

CLUTTER_CLASSES = 10
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClutterConfig:
    """Sizes and difficulty of ``digits-clutter`` (the defaults are the benchmark; see
    bench/results/digits-clutter.md for how they were measured)."""

    canvas: int = 32
    """Side of the square canvas in pixels."""
    n_train: int = 6000
    n_val: int = 1000
    n_test: int = 2000
    """Canvases per split."""
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    """Shares of the 1,797 SOURCE images in the val and test splits (stratified)."""
    scale: Tuple[float, float] = (12.0, 20.0)
    """Drawn side of a digit's 8×8 frame, pixels (uniform)."""
    rotation: float = 30.0
    """Maximum rotation, degrees (uniform in ±rotation)."""
    fragments: Tuple[int, int] = (2, 4)
    """Clutter fragments per canvas (uniform integer, inclusive)."""
    fragment_size: Tuple[int, int] = (3, 5)
    """Side of a fragment's crop in source pixels (uniform integer per side, inclusive)."""
    noise: float = 0.10
    """Std of the Gaussian pixel noise (intensities are in [0, 1])."""

    def check(self) -> "ClutterConfig":
        if not isinstance(self.canvas, int) or self.canvas < 8:
            raise ValueError(f"canvas: expected an int >= 8, got {self.canvas!r}")
        for name in ("n_train", "n_val", "n_test"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 0.9):
            raise ValueError(f"val_fraction, test_fraction: expected fractions leaving a training split, got "
                             f"{self.val_fraction!r}, {self.test_fraction!r}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale: expected 0 < low <= high, got {self.scale!r}")
        if not 0 <= self.rotation <= 180:
            raise ValueError(f"rotation: expected degrees in [0, 180], got {self.rotation!r}")
        lo, hi = self.fragments
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            raise ValueError(f"fragments: expected ints 0 <= low <= high, got {self.fragments!r}")
        lo, hi = self.fragment_size
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 8):
            raise ValueError(f"fragment_size: expected ints 1 <= low <= high <= 8, got {self.fragment_size!r}")
        if not self.noise >= 0:
            raise ValueError(f"noise: expected a non-negative std, got {self.noise!r}")
        return self


DEFAULT_CONFIG = ClutterConfig()


class ClutterDataset(TensorDataset):
    """A split of ``digits-clutter``: ``(image (1, H, W) float32, label long)`` pairs, plus where
    each canvas came from (source indices into ``sklearn.datasets.load_digits()``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, source_indices: np.ndarray,
                 canvas_sources: np.ndarray, fragment_sources: np.ndarray):
        super().__init__(images, labels)
        self.source_indices = source_indices
        """The split's source images (sorted); no index is in two splits."""
        self.canvas_sources = canvas_sources
        """(N,): the source image of each canvas's placed digit."""
        self.fragment_sources = fragment_sources
        """(N, max fragments): the source image of each clutter fragment, -1 where there is none."""


def split_sources(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded (train, val, test) split of the source-image indices (sorted, disjoint)."""
    from . import stratified_split

    labels = np.asarray(labels)
    rest, test = stratified_split(labels, test_fraction, seed)
    sub_rest, sub_val = stratified_split(labels[rest], val_fraction / (1 - test_fraction), seed + 1)
    return rest[sub_rest], rest[sub_val], test


def _draw(rng: np.random.Generator, n: int, n_sources: int, cfg: ClutterConfig) -> dict:
    """Every random number of ``n`` canvases: the placed digits' first, so the clutter and noise
    settings never move them."""
    kmax = cfg.fragments[1]
    d = {}
    # Targets: every source once per cycle (in a fresh random order each cycle), so all of a
    # split's handwriting is used and the classes are as balanced as the sources.
    cycles = -(-n // n_sources)
    d["target"] = np.concatenate([rng.permutation(n_sources) for _ in range(cycles)])[:n]
    d["t_scale"] = rng.uniform(*cfg.scale, size=n)
    d["t_aspect"] = rng.uniform(-0.1, 0.1, size=n)
    d["t_shear"] = rng.uniform(-0.15, 0.15, size=n)
    d["t_angle"] = rng.uniform(-1, 1, size=n) * math.radians(cfg.rotation)
    d["t_pos"] = rng.uniform(0, 1, size=(n, 2))
    d["t_gain"] = rng.uniform(0.7, 1.0, size=n)
    d["count"] = rng.integers(cfg.fragments[0], kmax + 1, size=n)
    # A fragment's source: any source of the split but the target's own (offset 1..n_sources-1).
    d["f_offset"] = rng.integers(1, max(n_sources, 2), size=(n, kmax))
    d["f_size"] = rng.integers(cfg.fragment_size[0], cfg.fragment_size[1] + 1, size=(n, kmax, 2))
    d["f_corner"] = rng.uniform(0, 1, size=(n, kmax, 2))
    d["f_scale"] = rng.uniform(*cfg.scale, size=(n, kmax))
    d["f_angle"] = rng.uniform(-1, 1, size=(n, kmax)) * math.radians(cfg.rotation)
    d["f_pos"] = rng.uniform(0, 1, size=(n, kmax, 2))
    d["f_gain"] = rng.uniform(0.5, 1.0, size=(n, kmax))
    d["noise"] = rng.standard_normal(size=(n, cfg.canvas, cfg.canvas)).astype(np.float32)
    return d


def _theta(scale, angle, center_px, anchor, canvas, aspect=None, shear=None) -> np.ndarray:
    """``affine_grid`` matrices (M, 2, 3) that draw an 8×8 source with its normalised point
    ``anchor`` at canvas pixel ``center_px``, ``scale`` pixels per frame side, rotated by ``angle``.

    A canvas point u (normalised, [-1, 1]) maps to the source point A⁻¹ (u·H/s + (H - 2c)/s) + anchor.
    """
    m = len(scale)
    cos, sin = np.cos(angle), np.sin(angle)
    inv = np.empty((m, 2, 2))
    inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 0], inv[:, 1, 1] = cos, sin, -sin, cos  # R(angle)⁻¹
    if aspect is not None:
        stretch = np.zeros((m, 2, 2))
        stretch[:, 0, 0], stretch[:, 1, 1] = np.exp(aspect), np.exp(-aspect)
        stretch[:, 0, 1] = shear
        inv = stretch @ inv
    k = canvas / scale
    theta = np.empty((m, 2, 3))
    theta[:, :, :2] = inv * k[:, None, None]
    offset = (canvas - 2 * center_px) / scale[:, None]
    theta[:, :, 2] = np.einsum("mij,mj->mi", inv, offset) + anchor
    return theta


def render_canvases(images: np.ndarray, sources: np.ndarray, n: int, rng: np.random.Generator,
                    cfg: ClutterConfig = DEFAULT_CONFIG, chunk: int = 2048):
    """``n`` canvases from the source images ``images[sources]`` (float, 0..1, (S, 8, 8)).

    Returns ``(canvases (n, H, W) float32 in [0, 1], target (n,), fragments (n, kmax))``: the
    positions in ``sources`` of each canvas's digit and of its fragments (-1 where none).
    """
    cfg.check()
    sources = np.asarray(sources)
    s, hw, kmax = len(sources), cfg.canvas, cfg.fragments[1]
    if s < 2 and kmax > 0:
        raise ValueError("render_canvases: clutter needs at least 2 source images")
    d = _draw(rng, n, s, cfg)
    target = d["target"]
    frag = (target[:, None] + d["f_offset"]) % s
    present = np.arange(kmax)[None, :] < d["count"][:, None]
    frag = np.where(present, frag, -1)

    # Target: its 8×8 frame centred at least half a side inside the canvas.
    half = d["t_scale"][:, None] / 2
    t_center = half + d["t_pos"] * np.maximum(hw - 2 * half, 0)
    t_theta = _theta(d["t_scale"], d["t_angle"], t_center, np.zeros((n, 2)), hw, d["t_aspect"], d["t_shear"])
    # Fragments: a crop of (h, w) source pixels; the crop's centre is placed anywhere on the canvas.
    size = d["f_size"]
    corner = np.floor(d["f_corner"] * (8 - size + 1)).astype(np.int64)  # crop's top-left (x, y)
    crop_center = corner + size / 2  # source pixels, in [0, 8]
    anchor = crop_center / 4 - 1  # normalised source coordinates (align_corners=False)
    f_center = d["f_pos"] * hw
    f_theta = _theta(d["f_scale"].ravel(), d["f_angle"].ravel(), f_center.reshape(-1, 2), anchor.reshape(-1, 2), hw)
    f_theta = f_theta.reshape(n, kmax, 2, 3)
    ys = np.arange(8)
    inside = ((ys[None, None, None, :] >= corner[..., 0:1, None]) & (ys[None, None, None, :] < (corner + size)[..., 0:1, None])
              )  # x within the crop: (n, kmax, 1, 8)
    inside_y = ((ys[None, None, :, None] >= corner[..., 1:2, None]) & (ys[None, None, :, None] < (corner + size)[..., 1:2, None]))

    src = torch.from_numpy(np.ascontiguousarray(images[sources], dtype=np.float32))
    out = np.empty((n, hw, hw), np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        m = b - a
        layers = [src[torch.from_numpy(target[a:b])] * torch.from_numpy(d["t_gain"][a:b, None, None].astype(np.float32))]
        thetas = [t_theta[a:b]]
        if kmax:
            mask = torch.from_numpy((inside[a:b] & inside_y[a:b]).astype(np.float32))  # (m, kmax, 8, 8)
            gain = torch.from_numpy((d["f_gain"][a:b] * present[a:b]).astype(np.float32))
            pieces = src[torch.from_numpy(np.maximum(frag[a:b], 0))] * mask * gain[..., None, None]
            layers.append(pieces.reshape(m * kmax, 8, 8))
            thetas.append(f_theta[a:b].reshape(m * kmax, 2, 3))
        inp = torch.cat(layers).unsqueeze(1)
        theta = torch.from_numpy(np.concatenate(thetas).astype(np.float32))
        grid = torch.nn.functional.affine_grid(theta, [len(theta), 1, hw, hw], align_corners=False)
        drawn = torch.nn.functional.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        canvas = drawn[:m, 0]
        if kmax:
            canvas = torch.maximum(canvas, drawn[m:, 0].reshape(m, kmax, hw, hw).amax(1))
        out[a:b] = canvas.numpy()
    if cfg.noise:
        out += np.float32(cfg.noise) * d["noise"]
    np.clip(out, 0.0, 1.0, out=out)
    return out, target, frag


def _source_digits():
    from .._optional import require

    bunch = require("sklearn.datasets", what="the digits data set").load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _cached_splits(seed: int, cfg: ClutterConfig):
    images, labels = _source_digits()
    parts = split_sources(labels, seed, cfg.val_fraction, cfg.test_fraction)
    raw = []
    for i, (name, src) in enumerate(zip(_SPLITS, parts)):
        rng = np.random.default_rng([int(seed), i])
        canv, target, frag = render_canvases(images, src, getattr(cfg, f"n_{name}"), rng, cfg)
        raw.append((canv, src, src[target], np.where(frag >= 0, src[np.maximum(frag, 0)], -1)))
    mean, std = float(raw[0][0].mean()), float(raw[0][0].std())
    out = []
    for canv, src, tsrc, fsrc in raw:
        x = torch.from_numpy((canv - mean) / std).unsqueeze(1).contiguous()
        out.append((x, torch.from_numpy(labels[tsrc]), src, tsrc, fsrc))
    return tuple(out)


def load_clutter_splits(seed: int = 0, config: Optional[ClutterConfig] = None, **overrides
                        ) -> Tuple[ClutterDataset, ClutterDataset, ClutterDataset]:
    """(train, val, test) :class:`ClutterDataset` s of ``digits-clutter`` for ``seed`` (see the module
    docstring). ``config`` / keyword ``overrides`` (e.g. ``n_train=500``) change the sizes or the
    difficulty; the result is cached in memory per (seed, settings)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    cfg = dataclasses.replace(config or DEFAULT_CONFIG, **overrides).check()
    parts = _cached_splits(int(seed), cfg)
    return tuple(ClutterDataset(x, y, src, tsrc, fsrc.copy()) for x, y, src, tsrc, fsrc in parts)
