"""Data sets for the product: ``get_dataset(spec, seed)`` -> (train, val, test).

Specs (no downloads; real data from local folders):

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (:mod:`autosculpt.data.digits`);
- ``digits-clutter``: those digits at random size, rotation and position on 32×32 canvases with
  fragments of other digits and noise, split by source image (:mod:`autosculpt.data.clutter`; a
  benchmark that is not saturated);
- ``cifar10:PATH`` / ``cifar100:PATH``: the unpacked python-pickle CIFAR folder;
- ``imagefolder:PATH``: ``PATH/<class>/<image>`` (or ``PATH/{train,val,test}/<class>/<image>``).

The validation split is carved from the training data by a stratified, seeded draw; the test split is
the data set's own test set (or, for a single image pool, a seeded stratified share of it).
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np

__all__ = ["DATA_KINDS", "DataSplits", "get_dataset", "parse_data_spec", "stratified_split"]

DATA_KINDS = ("digits", "digits-clutter", "cifar10", "cifar100", "imagefolder")
_BUILT_IN = ("digits", "digits-clutter")  # kinds that take no path


class DataSplits(tuple):
    """``(train, val, test)`` — unpacks as a 3-tuple — plus ``num_classes``, ``input_shape`` (C, H, W)
    and ``spec`` attributes that the CLI uses to build a matching model."""

    def __new__(cls, train, val, test, num_classes: int, input_shape: Tuple[int, int, int], spec: str):
        self = super().__new__(cls, (train, val, test))
        self.num_classes, self.input_shape, self.spec = int(num_classes), tuple(input_shape), spec
        return self

    train = property(lambda self: self[0])
    val = property(lambda self: self[1])
    test = property(lambda self: self[2])


def parse_data_spec(spec: str) -> Tuple[str, str]:
    """``"cifar10:/data/c10"`` -> ``("cifar10", "/data/c10")``; ``"digits"`` -> ``("digits", "")``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data: expected a spec such as 'digits' or 'cifar10:PATH', got {spec!r}")
    kind, sep, path = spec.partition(":")
    kind = kind.lower()
    if kind not in DATA_KINDS:
        raise ValueError(f"data: unknown kind {kind!r} in {spec!r}; expected one of {', '.join(DATA_KINDS)} (e.g. cifar10:PATH)")
    if kind in _BUILT_IN:
        if path:
            raise ValueError(f"data: {kind!r} is built in and takes no path, got {spec!r}")
        return kind, ""
    if not path:
        raise ValueError(f"data: {kind} needs a folder, e.g. '{kind}:/path/to/folder'")
    return kind, os.path.expanduser(path)


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Splits indices into (rest, held_out) with ``fraction`` of every class held out, seeded.

    Every class with at least two samples keeps at least one on each side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: expected a value in (0, 1), got {fraction!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def get_dataset(spec: str, seed: int = 0, *, val_fraction: float = 0.1, test_fraction: float = 0.2,
                image_size: int = 32, augment: bool = True) -> DataSplits:
    """Loads a data set by spec and returns its (train, val, test) splits (see the module docstring).

    Args:
        spec: ``digits``, ``digits-clutter``, ``cifar10:PATH``, ``cifar100:PATH`` or ``imagefolder:PATH``.
        seed: fixes the validation split (and the test split of a single image pool; for
            ``digits-clutter`` the source split and every canvas).
        val_fraction: share of the training data held out for validation.
        test_fraction: share held out for test when an image folder has no ``test/``.
        image_size: side length image-folder images are resized to.
        augment: standard light augmentation on the training split (CIFAR crop+flip, folder flip).
    """
    kind, path = parse_data_spec(spec)
    if kind == "digits":
        from .digits import load_digits_splits

        train, val, test = load_digits_splits(seed)
        return DataSplits(train, val, test, 10, tuple(train[0][0].shape), spec)
    if kind == "digits-clutter":
        from .clutter import CLUTTER_CLASSES, load_clutter_splits

        train, val, test = load_clutter_splits(seed)
        return DataSplits(train, val, test, CLUTTER_CLASSES, tuple(train.tensors[0].shape[1:]), spec)
    if kind in ("cifar10", "cifar100"):
        from .cifar import CifarDataset, load_cifar_arrays

        xtr, ytr, xte, yte, classes = load_cifar_arrays(kind, path)
        tr_idx, va_idx = stratified_split(ytr, val_fraction, seed)
        train = CifarDataset(xtr, ytr, tr_idx, augment=augment, num_classes=classes)
        val = CifarDataset(xtr, ytr, va_idx, augment=False, num_classes=classes)
        test = CifarDataset(xte, yte, None, augment=False, num_classes=classes)
        return DataSplits(train, val, test, classes, (3, 32, 32), spec)
    return _image_folder_splits(path, seed, val_fraction, test_fraction, image_size, augment, spec)


def _image_folder_splits(root, seed, val_fraction, test_fraction, image_size, augment, spec) -> DataSplits:
    from .imagefolder import ImageFolderDataset, channel_stats, check_images, scan_image_folder

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data: image folder {root!r} does not exist")
    has = {s: os.path.isdir(os.path.join(root, s)) for s in ("train", "val", "test")}
    if has["train"] and has["test"]:
        tr_paths, tr_labels, classes = scan_image_folder(os.path.join(root, "train"))
        te_paths, te_labels, _ = scan_image_folder(os.path.join(root, "test"), classes)
        if has["val"]:
            va_paths, va_labels, _ = scan_image_folder(os.path.join(root, "val"), classes)
        else:
            rest, held = stratified_split(tr_labels, val_fraction, seed)
            va_paths, va_labels = [tr_paths[i] for i in held], [tr_labels[i] for i in held]
            tr_paths, tr_labels = [tr_paths[i] for i in rest], [tr_labels[i] for i in rest]
    elif has["train"] or has["test"]:
        raise ValueError(f"data: {root!r} has a {'train' if has['train'] else 'test'}/ folder but no "
                         f"{'test' if has['train'] else 'train'}/ folder; give both, or one folder per class")
    else:
        paths, labels, classes = scan_image_folder(root)
        rest, test_idx = stratified_split(labels, test_fraction, seed)
        sub_rest, sub_val = stratified_split([labels[i] for i in rest], val_fraction / (1 - test_fraction), seed + 1)
        pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        tr_paths, tr_labels = pick(rest[sub_rest])
        va_paths, va_labels = pick(rest[sub_val])
        te_paths, te_labels = pick(test_idx)
    check_images(tr_paths + va_paths + te_paths)
    mean, std = channel_stats(tr_paths, image_size)
    make = lambda p, l, aug: ImageFolderDataset(p, l, classes, image_size, mean, std, augment=aug)  # noqa: E731
    return DataSplits(make(tr_paths, tr_labels, augment), make(va_paths, va_labels, False), make(te_paths, te_labels, False),
                      len(classes), (3, image_size, image_size), spec)
