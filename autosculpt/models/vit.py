"""A small Vision Transformer that AutoSculpt can prune (attention heads/patterns and MLP hidden units).

``vit_tiny`` works on 8×8 digits (1 channel, patch 2 -> 16 patches + CLS = 17 tokens) and on 32×32
images (3 channels, patch 4 -> 65 tokens). It is torch.fx-traceable; each block's attention is an
``nn.MultiheadAttention`` (batch_first), a leaf for torch.fx, which an ``"attention"`` layer plan
replaces with :class:`autosculpt.nn.PatternAttention`; each MLP is ``fc1 -> GELU -> fc2``, which an
``mlp_pair_plan`` prunes in blocks of hidden units.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisionTransformer", "Attention", "Block", "Mlp", "vit_tiny", "vit_attention_names", "vit_mlp_pairs"]


class Attention(nn.Module):
    """timm-style self-attention (``qkv`` and ``proj`` linears); PatternAttention.from_dense accepts it too."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide dim={dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a CLS token and learned position embeddings; classifies from the CLS token."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, depth: int = 4, num_heads: int = 3, mlp_ratio: float = 2.0, drop: float = 0.0):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("image_size", image_size), ("patch_size", patch_size),
                            ("in_chans", in_chans), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"patch_size: {patch_size} must divide image_size={image_size}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide embed_dim={embed_dim}")
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def seq_len(self) -> int:
        """Tokens per image (patches + CLS)."""
        return self.num_patches + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, E)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int = 10, image_size: int = 32, patch_size: int = 4, in_chans: int = 3,
             embed_dim: int = 96, depth: int = 4, num_heads: int = 3, mlp_ratio: float = 2.0,
             drop: float = 0.0) -> VisionTransformer:
    """A small ViT: defaults fit 32×32 RGB; use ``image_size=8, patch_size=2, in_chans=1`` for digits."""
    return VisionTransformer(num_classes, image_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, drop)


def vit_attention_names(model: VisionTransformer) -> List[str]:
    """Module names of the attention layers (targets of ``"attention"`` layer plans)."""
    return [f"blocks.{i}.attn" for i in range(len(model.blocks))]


def vit_mlp_pairs(model: VisionTransformer) -> List[Sequence[str]]:
    """(fc1, fc2) module-name pairs of the MLPs (targets of ``mlp_pair_plan``)."""
    return [(f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2") for i in range(len(model.blocks))]
