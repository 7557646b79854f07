"""CIFAR-style ResNets (He et al. 2016, §4.2): 3 stages of BasicBlocks, 16/32/64 channels."""
from __future__ import annotations

from torch import nn

__all__ = ["resnet20", "resnet56", "resnet110", "CifarResNet"]


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual add; a 1×1 conv-BN shortcut (option B) when the
    shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth: expected 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], 16
        for i, c in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, c, 2 if (i > 0 and j == 0) else 1))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-20 (19 3×3 convs)."""
    return CifarResNet(20, num_classes, in_chans)


def resnet56(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-56 (55 3×3 convs)."""
    return CifarResNet(56, num_classes, in_chans)


def resnet110(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-110 (109 3×3 convs)."""
    return CifarResNet(110, num_classes, in_chans)
