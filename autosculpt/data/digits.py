"""scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10 classes) as torch datasets.

No download: the data ships inside scikit-learn. Splits are stratified and fixed by ``seed``;
pixel values (0..16) are standardised with the TRAINING split's mean and std only.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["load_digits_splits", "DIGITS_SHAPE", "DIGITS_CLASSES"]

DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


def load_digits_splits(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> Tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, val, test) TensorDatasets of float32 images (N, 1, 8, 8) and long labels.

    Args:
        seed: fixes the stratified split.
        val_fraction: share of all images in the validation split (used by the search).
        test_fraction: share of all images in the test split (touched once, at the end).
    """
    from .._optional import require

    load_digits = require("sklearn.datasets", what="the digits data set").load_digits
    from sklearn.model_selection import train_test_split

    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"{name}: expected a fraction in (0, 1), got {v!r}")
    if val_fraction + test_fraction >= 0.9:
        raise ValueError(f"val_fraction + test_fraction must leave a training split, got {val_fraction + test_fraction}")
    bunch = load_digits()
    x = bunch.images.astype(np.float32)
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=y[rest]
    )
    mean, std = float(x[train].mean()), float(x[train].std())

    def make(ids):
        images = torch.from_numpy((x[ids] - mean) / std).unsqueeze(1).contiguous()
        return TensorDataset(images, torch.from_numpy(y[ids]))

    return make(train), make(val), make(test)
