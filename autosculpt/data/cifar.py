"""CIFAR-10 / CIFAR-100 from a local folder in the standard "python version" pickle format.

The folder is the one the official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` unpack to:

- CIFAR-10: ``data_batch_1`` … ``data_batch_5``, ``test_batch`` (and ``batches.meta``)
- CIFAR-100: ``train``, ``test`` (and ``meta``); labels are the 100 ``fine_labels``

Each file is a pickled dict with ``data`` (N×3072 uint8, channel-major 32×32 RGB) and the labels.
Pickle can run code, so the files are read with a restricted unpickler that only builds plain
containers and numpy arrays: a tampered file fails with a clear error instead of executing anything.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["load_cifar_arrays", "CifarDataset", "CIFAR_MEAN", "CIFAR_STD"]

# Per-channel statistics of the CIFAR training images (the usual constants; both sets are close).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_LAYOUT = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "label": b"labels", "classes": 10},
    "cifar100": {"train": ["train"], "test": ["test"], "label": b"fine_labels", "classes": 100},
}

# The only globals a CIFAR pickle needs: numpy's array reconstruction (old and new module paths).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # protocol-2 pickles store array bytes as latin-1 text
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def _read_batch(path: str, label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"data: {path} is not a valid CIFAR pickle batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"data: {path} is not a valid CIFAR pickle batch (expected a dict, got {type(obj).__name__})")
    # Files written by Python 3 may use str keys; the official ones use bytes.
    obj = {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}
    if b"data" not in obj or label_key not in obj:
        raise ValueError(f"data: {path} lacks the {b'data'!r} or {label_key!r} entry of a CIFAR batch")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"data: {path} has data {data.dtype} {data.shape} and {len(labels)} labels; "
            "expected uint8 (N, 3072) with N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_arrays(kind: str, root: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Reads a CIFAR folder. Returns (train_images, train_labels, test_images, test_labels, classes).

    Images are uint8 (N, 3, 32, 32). Raises FileNotFoundError for a missing folder or file and
    ValueError for a corrupt one, naming the path.
    """
    if kind not in _LAYOUT:
        raise ValueError(f"kind: expected 'cifar10' or 'cifar100', got {kind!r}")
    layout = _LAYOUT[kind]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data: {kind} folder {root!r} does not exist (expected the unpacked '{kind}-python' folder)")
    out: List[np.ndarray] = []
    for split in ("train", "test"):
        images, labels = [], []
        for name in layout[split]:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                found = ", ".join(sorted(os.listdir(root))[:8]) or "nothing"
                raise FileNotFoundError(f"data: {kind} file {path!r} is missing (the folder holds: {found})")
            x, y = _read_batch(path, layout["label"])
            images.append(x)
            labels.append(y)
        x, y = np.concatenate(images), np.concatenate(labels)
        if len(y) and (y.min() < 0 or y.max() >= layout["classes"]):
            raise ValueError(f"data: {kind} labels in {root!r} must lie in [0, {layout['classes']}), got {y.min()}..{y.max()}")
        out += [x, y]
    return out[0], out[1], out[2], out[3], layout["classes"]


class CifarDataset(Dataset):
    """A view of CIFAR images (uint8 N×3×32×32) by index, normalised; optional train augmentation
    (random crop with 4-pixel zero padding and horizontal flip, the standard CIFAR recipe)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices=None, augment: bool = False, num_classes: int = 10):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.indices = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.augment = augment
        self.num_classes = num_classes
        self._mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        x = self.images[j].float().div_(255.0)
        if self.augment:
            # torch's global RNG: seeded by the trainer, saved in its checkpoints.
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            dy, dx = (int(v) for v in torch.randint(0, 9, (2,)))
            x = padded[:, dy:dy + 32, dx:dx + 32]
            if bool(torch.randint(0, 2, ()) == 1):
                x = x.flip(2)
        return (x - self._mean) / self._std, self.labels[j]
