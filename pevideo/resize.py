"""torchvision's resize and center crop on uint8 frames, computed with plain ``torch.nn.functional`` (no
torchvision needed), and :class:`FramePlan`, the frozen record of both that a processor resolves once
and a decoder applies to each frame as it comes out.

A leaf module: it imports nothing of pevideo.
"""
from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_uint8", "center_crop", "size_hw", "FramePlan", "RESAMPLE_MODES"]

RESAMPLE_MODES = ("bilinear", "bicubic")


def _native_uint8_resize(mode: str, device: torch.device) -> bool:
    """Whether torchvision resizes uint8 directly (else via float32 and rounding), as it decides."""
    if device.type != "cpu":
        return False
    if mode == "bilinear":  # torchvision's rule: the uint8 kernel is only faster with these
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return True


def resize_uint8(frames: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize uint8 frames (T, C, H, W) to ``size`` = (h, w) exactly as torchvision's ``resize`` does.

    Antialiased bilinear (or bicubic), align_corners=False. On CPU with AVX2/AVX512 (or ARM) the uint8
    kernel runs directly; elsewhere (other CPUs, GPUs) in float32, rounded back to uint8. Same device,
    same result as upstream. Returns uint8 (T, C, h, w); the input itself when the size already matches.
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if _native_uint8_resize(mode, frames.device):
        return F.interpolate(frames, size=list(size), mode=mode, align_corners=False, antialias=True)
    x = F.interpolate(frames.to(torch.float32), size=list(size), mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic":
        x = x.clamp_(0, 255)  # bicubic overshoots; bilinear's weights are all positive
    return x.round_().to(torch.uint8)


def center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers' center crop on (..., H, W): zero-pad if smaller, then crop at int((H − h)/2)."""
    ch, cw = size
    h, w = frames.shape[-2:]
    if ch > h or cw > w:
        pad_w = (cw - w) if cw > w else 0
        pad_h = (ch - h) if ch > h else 0
        frames = F.pad(frames, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = frames.shape[-2:]
        if (ch, cw) == (h, w):
            return frames
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return frames[..., top : top + ch, left : left + cw]


def size_hw(size, default_to_square: bool = True, name: str = "size") -> tuple[int, int]:
    """(height, width) from an int (square), a pair, or ``{"height", "width"}`` as processor configs give
    it; ValueError for sizes that are not positive, NotImplementedError for other kinds."""
    if size is None:
        raise ValueError(f"{name} is needed, e.g. {{'height': 336, 'width': 336}}")
    if isinstance(size, int) and not isinstance(size, bool):
        if not default_to_square:
            raise NotImplementedError(f"{name} as a shortest edge (default_to_square=False) is not supported")
        h = w = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = size
    elif isinstance(size, Mapping) and "height" in size and "width" in size:
        h, w = size["height"], size["width"]
    else:
        raise NotImplementedError(f"{name}={size!r}: only a fixed height and width (PE Video's) is supported")
    try:
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {h}x{w}")
    return h, w


@dataclass(frozen=True)
class FramePlan:
    """What happens to each frame between decoding and the model: resize to ``size`` (None: keep)
    with ``mode``, then center crop to ``crop`` (None: none). Resolved once (a processor's
    :attr:`~pevideo.PeVideoVideoProcessor.frame_plan`), applied per frame by the decoder."""

    size: tuple[int, int] | None = None
    mode: str = "bilinear"
    crop: tuple[int, int] | None = None

    def __post_init__(self):
        if self.mode not in RESAMPLE_MODES:
            raise ValueError(f"resample must be 'bilinear' or 'bicubic', got {self.mode!r}")
        if self.size is not None:
            object.__setattr__(self, "size", size_hw(self.size))
        if self.crop is not None:
            object.__setattr__(self, "crop", size_hw(self.crop, name="crop_size"))

    @property
    def identity(self) -> bool:
        return self.size is None and self.crop is None

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of a frame of ``height × width`` after this plan."""
        return self.crop or self.size or (int(height), int(width))

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (T, C, H, W) frames (any strides) resized then cropped: a view when nothing changes."""
        if self.size is not None:
            frames = resize_uint8(frames, self.size, self.mode)
        if self.crop is not None:
            frames = center_crop(frames, self.crop)
        return frames

    def apply_hwc(self, frame: np.ndarray) -> np.ndarray:
        """One decoded (H, W, 3) uint8 frame through :meth:`apply` (as a channels-first view, which is
        how the processor sees clips, so the values are the processor's)."""
        if self.identity:
            return frame
        x = torch.from_numpy(frame).permute(2, 0, 1)[None]
        return self.apply(x)[0].permute(1, 2, 0).numpy()
