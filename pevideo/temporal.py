"""The temporal encoder's small pieces (names as in transformers' modeling_pe_video): RMSNorm, the masked
GroupNorm and the 1D ResNet block over time, and the patch embedder that prepends the class token.

Padded frames: the masked GroupNorm takes its statistics over real positions only and outputs zeros at
padded ones, so real outputs never depend on what sits at a padded position (see modeling.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RMSNorm", "MaskedGroupNorm", "ConvBlock1d", "ResnetBlock1d", "PatchEmbedder"]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dt)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover real positions only; padded positions come out as zeros."""

    def forward(self, x, mask=None):  # x (B, C, S), mask (B, S) bool
        if mask is None:
            return super().forward(x)
        b, c, s = x.shape
        g = self.num_groups
        xg = x.view(b, g, c // g, s)
        m = mask.view(b, 1, 1, s).to(x.dtype)
        count = m.sum(dim=(2, 3), keepdim=True) * (c // g)
        mean = (xg * m).sum(dim=(2, 3), keepdim=True) / count
        var = (((xg - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / count
        y = ((xg - mean) / torch.sqrt(var + self.eps)).view(b, c, s)
        if self.affine:
            y = y * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)
        return y * mask.view(b, 1, s).to(y.dtype)


class ConvBlock1d(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.groupnorm = MaskedGroupNorm(num_groups=1, num_channels=hidden)
        self.activation = nn.SiLU()
        self.project = nn.Conv1d(hidden, hidden, kernel_size=3, padding="same")

    def forward(self, x, mask=None):
        return self.project(self.activation(self.groupnorm(x, mask)))


class ResnetBlock1d(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.block1 = ConvBlock1d(hidden)
        self.block2 = ConvBlock1d(hidden)

    def forward(self, x, mask=None):  # x (B, S, C)
        h = x.transpose(1, 2)
        h = h + self.block2(self.block1(h, mask), mask)
        return h.transpose(1, 2)


class PatchEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.resnet_block = ResnetBlock1d(hidden)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, hidden) * hidden**-0.5 * 0.02)

    def forward(self, embeds, mask=None):
        x = torch.cat([self.class_embedding.expand(embeds.shape[0], -1, -1).to(embeds.dtype), embeds], dim=1)
        if mask is not None:
            mask = torch.cat([mask[:, :1], mask], dim=1)  # the class token takes the first frame's mask, as upstream
        return self.resnet_block(x, mask), mask
