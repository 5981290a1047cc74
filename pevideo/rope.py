"""RoPE coordinates and frequencies for the model's attention ops, as ``(coords, freqs)`` pairs.

The attention op (``Ops.attention``, the ``rope_attention`` kernel) turns pair j of a token at
(t, h, w) by ``t·freqs[0, j] + h·freqs[1, j] + w·freqs[2, j]``; these build the tables for PE-Core's
axial 2D frames (timm) and the temporal encoder's 1D RoPE (transformers).
"""
from __future__ import annotations

import torch

__all__ = ["pe_core_rope_2d", "rope_1d"]


def pe_core_rope_2d(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    *,
    ref_feat_shape: tuple[int, int] | None = None,
    grid_offset: float = 1.0,
    temperature: float = 10000.0,
    num_prefix_tokens: int = 1,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PE-Core's axial 2D RoPE (timm ``RotaryEmbeddingCat``, 'xy' grid) as ``(coords, freqs)``.

    Returns ``coords`` (num_prefix_tokens + grid_h * grid_w, 3) float32, prefix tokens at (0, 0, 0)
    (left unrotated) then patches in row-major order at (0, y, x), and ``freqs`` (3, head_dim // 2)
    float32: the first head_dim / 4 pairs turn with the column x, the rest with the row y.
    Coordinates are computed exactly as timm does, so angles match it bit for bit in float32.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    nb = head_dim // 4
    # timm: bands = 1 / temperature ** (arange(nb) / nb), float32
    exp = torch.arange(0, nb, 1, dtype=torch.int64).to(torch.float32) / nb
    bands = 1.0 / (temperature**exp)
    xs = torch.arange(grid_w, dtype=torch.int64).to(torch.float32) + grid_offset
    ys = torch.arange(grid_h, dtype=torch.int64).to(torch.float32) + grid_offset
    if ref_feat_shape is not None:
        ref_h, ref_w = ref_feat_shape
        xs = xs / grid_w * ref_w
        ys = ys / grid_h * ref_h
    patch = torch.zeros(grid_h, grid_w, 3, dtype=torch.float32)
    patch[..., 1] = ys[:, None]
    patch[..., 2] = xs[None, :]
    coords = torch.cat([torch.zeros(num_prefix_tokens, 3), patch.reshape(-1, 3)], 0)
    freqs = torch.zeros(3, head_dim // 2, dtype=torch.float32)
    freqs[2, :nb] = bands
    freqs[1, nb:] = bands
    return coords.to(device), freqs.to(device)


def rope_1d(
    positions: torch.Tensor | int,
    head_dim: int,
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard 1D RoPE on the t axis as ``(coords, freqs)``.

    ``positions`` is an int n (positions 0..n-1) or a tensor of positions of any shape; coords has that
    shape plus a trailing 3 (t, 0, 0). ``freqs[0, j] = theta ** (-2j / head_dim)`` as transformers
    computes ``inv_freq``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if isinstance(positions, int):
        positions = torch.arange(positions)
    pos = positions.to(torch.float32)
    coords = torch.zeros(*pos.shape, 3, dtype=torch.float32, device=pos.device)
    coords[..., 0] = pos
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.zeros(3, head_dim // 2, dtype=torch.float32)
    freqs[0] = inv_freq
    return coords.to(device), freqs.to(device)
