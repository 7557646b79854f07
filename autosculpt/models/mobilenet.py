"""CIFAR-style MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise 3×3 convs;
first conv stride 1 and the first two stages without downsampling, as usual for 32×32 inputs."""
from __future__ import annotations

from torch import nn

__all__ = ["mobilenetv2"]

# (expansion t, out channels c, repeats n, first stride s)
_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1×1 expand → depthwise 3×3 → 1×1 project, residual add when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0):
        super().__init__()
        c_in = int(32 * width_mult)
        layers = [nn.Conv2d(in_chans, c_in, 3, 1, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6(inplace=True)]
        for t, c, n, s in _CFG:
            c_out = int(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        last = max(1280, int(1280 * width_mult))
        layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenetv2(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> nn.Module:
    """CIFAR-style MobileNetV2 (depthwise 3×3 convs, inverted residuals)."""
    return MobileNetV2(num_classes, in_chans, width_mult)
