"""Image folders (one sub-folder per class), read with PIL — no torchvision needed.

Accepted layouts:

- ``ROOT/<class>/<image>``: one pool, split into train / validation / test by the seed;
- ``ROOT/train/<class>/<image>`` and ``ROOT/test/<class>/<image>`` (``val/`` optional): the given
  splits are kept; without ``val/`` the validation split is carved from ``train/``.

Images are converted to RGB, resized to ``image_size``×``image_size`` and normalised per channel with
statistics of (up to 256) training images.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "scan_image_folder", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def scan_image_folder(root: str, classes: Sequence[str] = None) -> Tuple[List[str], List[int], List[str]]:
    """Lists ``root/<class>/<image>`` files. Returns (paths, labels, class names), sorted.

    ``classes`` fixes the class list (so train and test folders share label ids). Raises
    FileNotFoundError for a missing folder and ValueError for a folder without class images.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data: image folder {root!r} does not exist")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise ValueError(f"data: image folder {root!r} has no class sub-folders (expected ROOT/<class>/<image>)")
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise ValueError(f"data: {root!r} has classes {extra} that the training folder lacks")
    index: Dict[str, int] = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in found:
        folder = os.path.join(root, c)
        for dirpath, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(index[c])
    if not paths:
        raise ValueError(f"data: image folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, list(classes)


def _load_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"data: cannot read image {path!r} ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def check_images(paths: Sequence[str]) -> None:
    """Opens every file's header, so a corrupt or non-image file fails up front, by name."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"data: {p!r} is not a readable image ({type(e).__name__}: {e})") from None


def channel_stats(paths: Sequence[str], size: int, limit: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over (an evenly spaced sample of up to ``limit`` of) ``paths``."""
    step = max(1, len(paths) // limit)
    imgs = torch.stack([_load_image(p, size) for p in list(paths)[::step][:limit]])
    mean = imgs.mean(dim=(0, 2, 3))
    std = imgs.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean, std


class ImageFolderDataset(Dataset):
    """Images from a list of files with labels, loaded lazily, resized and normalised.

    ``augment`` adds a random horizontal flip (torch's global RNG, seeded by the trainer).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], image_size: int,
                 mean: torch.Tensor, std: torch.Tensor, augment: bool = False):
        if len(paths) != len(labels):
            raise ValueError("paths and labels must have the same length")
        self.paths, self.labels = list(paths), torch.as_tensor(list(labels), dtype=torch.long)
        self.classes, self.num_classes = list(classes), len(classes)
        self.image_size, self.augment = int(image_size), augment
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        x = _load_image(self.paths[i], self.image_size)
        if self.augment and bool(torch.randint(0, 2, ()) == 1):
            x = x.flip(2)
        return (x - self.mean) / self.std, self.labels[i]
