"""Small plain CNNs: the digits CNN (embedded default) and CIFAR-style VGG-16."""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["digits_cnn", "vgg16", "conv_bn_relu"]


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv (no bias, BN follows) + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """A small CNN for 1×8×8 digit images: 3×3 conv-BN-ReLU blocks (the middle one with stride 2),
    global average pooling and a linear classifier.

    The default widths (1→64→128→pool→128→128) are chosen so that the 3×3 convs dominate the run time
    and pattern sparsity pays on the CPU kernel even at 8×8 inputs (see bench/NOTES.md, "Search").
    """

    def __init__(self, num_classes: int = 10, channels: Sequence[int] = (64, 128, 128, 128), in_chans: int = 1):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels: expected at least 2 conv widths, got {channels}")
        layers, c_in = [], in_chans
        half = len(channels) // 2
        for i, c in enumerate(channels):
            # Downsample with a stride-2 conv rather than a max-pool: on the CPU, max_pool2d on NCHW
            # tensors costs ~10 ms at batch 64 (more than all the convs' pattern-sparse time), and a
            # strided 3×3 conv is itself prunable.
            layers.append(conv_bn_relu(c_in, c, stride=2 if i == half else 1))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def digits_cnn(num_classes: int = 10, channels: Sequence[int] = (64, 128, 128, 128), in_chans: int = 1) -> nn.Module:
    """The digits CNN (input 1×8×8): see :class:`DigitsCNN`."""
    return DigitsCNN(num_classes, channels, in_chans)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """CIFAR-style VGG with BN: 3×3 conv blocks, max-pools, one linear classifier."""

    def __init__(self, cfg=_VGG16, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers, c_in = [], in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn_relu(c_in, v))
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg16(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR-style VGG-16 with batch norm (13 3×3 convs, 32×32 inputs)."""
    return VGG(_VGG16, num_classes, in_chans)
