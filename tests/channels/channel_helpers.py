"""Shared pieces of the channel tests: an INDEPENDENT reference for channel removal, small models of
each coupling kind, and torchvision definitions through the benchmark shim.

The reference for removing channels of an exact group: the original model with the removed channels'
input weights zeroed in every consumer (conv / linear columns, an attention's q/k/v input columns) and,
for heads, the head's output-projection columns zeroed. Whatever the producer computes (bias, BN, ReLU),
a zero column makes its contribution exactly zero, so this equals the shrunk model exactly.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]


def tv_models():
    """torchvision.models through bench/tv.py (stubs torchvision._meta_registrations)."""
    import pytest

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import tv

    try:
        return tv.models()
    except ImportError as e:  # importorskip would import torchvision without the shim's stub
        pytest.skip(f"torchvision is not installed: {e}")


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and biases (fresh BatchNorms are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model.eval()


def masked_reference(model: nn.Module, analysis, keep) -> nn.Module:
    """A copy of ``model`` with the removed channels' consumer input weights (and removed heads' output
    columns) zeroed: the independent reference for ``remove_channels(model, x, keep)``."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for gid, kept in keep.items():
            g = analysis.groups[gid]
            for k in range(g.channels):
                if k in set(kept):
                    continue
                for mem in g.members:
                    if mem.dim not in ("in", "key_in", "value_in", "heads"):
                        continue
                    mod = ref.get_submodule(mem.module)
                    for i in mem.indices[k]:
                        if isinstance(mod, nn.MultiheadAttention):
                            e, d = mod.embed_dim, mod.head_dim
                            if mem.dim == "heads":
                                mod.out_proj.weight[:, i * d:(i + 1) * d] = 0
                            else:
                                part = {"in": 0, "key_in": 1, "value_in": 2}[mem.dim]
                                mod.in_proj_weight[part * e:(part + 1) * e, i] = 0
                        elif hasattr(mod, "qkv"):  # timm-style
                            d = mod.qkv.out_features // 3 // mod.num_heads
                            if mem.dim == "heads":
                                mod.proj.weight[:, i * d:(i + 1) * d] = 0
                            else:
                                mod.qkv.weight[:, i] = 0
                        else:
                            mod.weight[:, i] = 0
    return ref


def random_keep(analysis, fraction: float = 0.5, seed: int = 0, exact_only: bool = True):
    """{group id: kept channels}: a random ``fraction`` (at least one) of every prunable (exact) group."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in analysis.groups:
        if g.prunable and (g.exact or not exact_only) and g.channels > 1:
            n = max(1, int(round(g.channels * fraction)))
            keep[g.id] = sorted(torch.randperm(g.channels, generator=gen)[:n].tolist())
    return keep


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)


# --------------------------------------------------------------------------- small models


class PlainCNN(nn.Module):
    """conv-BN-ReLU x2, adaptive pool to 2x2, flatten, linear: the flatten maps channel c to 4 features."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 2 * 2, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


class TinyDenseNet(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier feature maps."""

    def __init__(self, c0: int = 6, growth: int = 4, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.norms, self.convs = nn.ModuleList(), nn.ModuleList()
        c = c0
        for _ in range(layers):
            self.norms.append(nn.BatchNorm2d(c))
            self.convs.append(nn.Conv2d(c, growth, 3, padding=1))
            c += growth
        self.head_norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        feats = [self.stem(x)]
        for norm, conv in zip(self.norms, self.convs):
            feats.append(conv(F.relu(norm(torch.cat(feats, 1)))))
        x = F.relu(self.head_norm(torch.cat(feats, 1)))
        return self.fc(x.mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (stride 1): split the channels in two, transform one half, concatenate, shuffle."""

    def __init__(self, c: int):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)


class TinyShuffleNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(c), ShuffleUnit(c))
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


class SEBlock(nn.Module):
    """conv-BN-ReLU, then squeeze-excitation: x * sigmoid(fc2(relu(fc1(mean(x)))))."""

    def __init__(self, c: int = 8, r: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)
        self.out = nn.Conv2d(c, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = self.out(x * s)
        return self.fc(x.mean((2, 3)))


def opaque_channel_op(x: torch.Tensor) -> torch.Tensor:
    """A free function fx keeps as one call it cannot see into (it mixes channels)."""
    return x + x.roll(1, dims=1)


torch.fx.wrap("opaque_channel_op")


class WithOpaqueOp(nn.Module):
    """c1's channels go through an op the analysis cannot follow; c2's do not."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = opaque_channel_op(F.relu(self.c1(x)))
        x = self.c3(F.relu(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class TimmAttentionNet(nn.Module):
    """Linear -> timm-style self-attention (``autosculpt.models.vit.Attention``: 3 heads of 4) -> Linear."""

    def __init__(self):
        super().__init__()
        from autosculpt.models.vit import Attention

        self.inp = nn.Linear(5, 12)
        self.attn = Attention(12, 3)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.c(x)
        return self.c(-x)


def group_of(groups, module: str, dim: str):
    """The one group with a member ``module``.``dim``."""
    found = [g for g in groups if any(m.module == module and m.dim == dim for m in g.members)]
    assert len(found) == 1, f"{module}.{dim} is in {len(found)} groups"
    return found[0]
