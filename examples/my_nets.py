"""Example user model for the README tour: `autosculpt prune --model my_nets:make` (run from examples/)."""
import torch.nn as nn


class TwoBranch(nn.Module):
    """A small CNN with two parallel 3x3 branches that are summed."""

    def __init__(self, num_classes=10, in_chans=3, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.pool(self.left(x) + self.right(x)))


def make(num_classes=10, in_chans=3, width=32):
    return TwoBranch(num_classes, in_chans, width)
