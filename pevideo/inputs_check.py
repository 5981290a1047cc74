"""The model's input checks: what ``forward``, ``get_video_features(_uint8)`` and ``get_text_features``
refuse with a clear error before any work (wrong shapes or dtypes, empty clips, a mask that is not 0/1,
token ids outside the vocabulary)."""
from __future__ import annotations

import torch

from .normalization import Normalization

__all__ = ["check_frame_size", "check_pixels", "check_uint8_videos", "resolve_normalization", "check_mask", "check_text"]

def check_frame_size(h: int, w: int, img_size) -> None:
    if (h, w) != tuple(img_size):
        raise ValueError(
            f"frames are {h}x{w} but this checkpoint's frame encoder takes {img_size[0]}x{img_size[1]}; "
            "resize them (the processor does)"
        )


def check_pixels(pv, img_size) -> None:
    if not isinstance(pv, torch.Tensor):
        raise TypeError(f"pixel_values_videos must be a tensor, got {type(pv).__name__}")
    if pv.dim() != 5 or pv.shape[2] != 3:
        raise ValueError(f"pixel_values_videos must be (batch, frames, 3, height, width), got {tuple(pv.shape)}")
    if not pv.is_floating_point():
        raise ValueError(
            f"pixel_values_videos must be a float tensor (normalized pixels, as the processor returns), got {pv.dtype}"
        )
    if pv.shape[0] == 0 or pv.shape[1] == 0:
        raise ValueError(f"pixel_values_videos is empty: {tuple(pv.shape)}")
    check_frame_size(pv.shape[3], pv.shape[4], img_size)


def check_uint8_videos(videos, img_size) -> None:
    if not isinstance(videos, torch.Tensor) or videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        what = f"{videos.dtype} {tuple(videos.shape)}" if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos must be a uint8 tensor (batch, frames, height, width, 3), got {what}")
    if videos.shape[0] == 0 or videos.shape[1] == 0:
        raise ValueError(f"videos is empty: {tuple(videos.shape)}")
    check_frame_size(videos.shape[2], videos.shape[3], img_size)


def resolve_normalization(normalization, image_mean, image_std, rescale_factor) -> Normalization:
    """One checked :class:`Normalization` from the record or the three settings (PE's for those not given)."""
    loose = {k: v for k, v in (("mean", image_mean), ("std", image_std), ("rescale", rescale_factor)) if v is not None}
    if normalization is None:
        return Normalization(**loose)
    if loose:
        raise ValueError("give normalization or image_mean / image_std / rescale_factor, not both")
    if not isinstance(normalization, Normalization):
        raise TypeError(f"normalization must be a pevideo Normalization (processor.normalization), "
                        f"got {type(normalization).__name__}")
    return normalization


def check_mask(m, b: int, t: int, device):
    """Validate ``padding_mask_videos``; return (bool mask on ``device`` or None, flat real-frame indices on
    ``device`` or None).

    Checked once per batch on the host-side mask (as the processor returns it; a mask on the GPU is
    copied to the host once), so the model's launches that follow make no host sync."""
    if m is None:
        return None, None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"padding_mask_videos must be a tensor, got {type(m).__name__}")
    if tuple(m.shape) != (b, t):
        raise ValueError(f"padding_mask_videos must have shape (batch, frames) = {(b, t)}, got {tuple(m.shape)}")
    if m.dtype != torch.bool and (m.is_floating_point() or m.is_complex()):
        raise ValueError(f"padding_mask_videos must be bool or integer 0/1, got {m.dtype}")
    host = m.cpu()  # (a no-op for a CPU mask)
    if host.dtype != torch.bool:
        if ((host != 0) & (host != 1)).any():
            raise ValueError("padding_mask_videos must hold only 0 (padding) and 1 (real frame)")
        host = host != 0
    empty = (~host.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"clip(s) {empty} of the batch have no real frame (padding_mask_videos is all 0 there)")
    real = host.flatten().nonzero().flatten()
    return host.to(device), real.to(device)


def check_text(input_ids, attention_mask, vocab_size: int) -> None:
    """Token ids the text tower can embed, and at least one token per text (ModernBERT fails deep inside,
    with a bare IndexError or a reshape error, otherwise)."""
    n, length = input_ids.shape
    if n == 0 or length == 0:
        raise ValueError(f"input_ids is empty: {tuple(input_ids.shape)}; each text needs at least one token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = ((input_ids < 0) | (input_ids >= vocab_size)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"input_ids must lie in [0, {vocab_size}) (the text model's vocab_size), got values from {lo} to {hi} "
            f"in text(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}; was it tokenized with this checkpoint's tokenizer?"
        )
    if attention_mask is not None:
        empty = (~(attention_mask != 0).any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"text(s) {empty[:10]} have no token (attention_mask is all 0 there)")
