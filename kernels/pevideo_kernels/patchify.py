"""Frames to normalized patch rows, ready for the patch-embedding GEMM.

One memory-bound pass: read uint8 (or float) frames in any layout, rescale and normalize per channel,
write (frame, patch, (c, kh, kw)) rows in the model's dtype.

The op's interface (:data:`PATCHIFY`, a :class:`KernelOp`): its ``resolve`` checks
:func:`patchify_normalize`'s arguments (``patchify_check_args``: ValueError on bad arguments,
frame_index values included) into a :class:`PatchifyCall`; ``patchify_unsupported_reason`` (None if
the kernel can serve them), ``patchify_normalize_fused`` (the Triton kernel, in ``_patchify_triton``,
registered as ``torch.ops.pevideo.patchify_normalize``) and ``patchify_normalize_ref`` (the plain
PyTorch definition beside it).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._choose import KernelOp, run
from ._triton import runtime_reason

try:  # the one guarded import of the Triton side: without Triton every call runs the reference
    from ._patchify_triton import patchify_normalize_op
    KERNEL_MISSING: str | None = None
except Exception as exc:  # noqa: BLE001  ImportError, or a Triton/torch this kernel can't be defined with
    patchify_normalize_op = None
    KERNEL_MISSING = f"{type(exc).__name__}: {exc}"

__all__ = [
    "patchify_normalize",
    "patchify_normalize_ref",
    "patchify_normalize_fused",
    "normalize_uint8",
    "patchify_check_args",
    "patchify_unsupported_reason",
    "PATCHIFY",
    "PatchifyCall",
    "KERNEL_MISSING",
]

_FLOAT_IN = (torch.float16, torch.bfloat16, torch.float32)
_OUT = (torch.float16, torch.bfloat16, torch.float32)
_HAS_KERNEL = KERNEL_MISSING is None  # (read by bench/bench_video_input.py; use KERNEL_MISSING)


def patchify_check_args(
    frames, patch_size, mean=None, std=None, rescale=1 / 255, out_dtype=None, frame_index=None
) -> None:
    """Raise ValueError for arguments :func:`patchify_normalize` (kernel or reference) does not take."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames must be a tensor, got {type(frames).__name__}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if frames.dtype == torch.uint8:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (N, H, W, 3), got {tuple(frames.shape)}")
        h, w = frames.shape[1], frames.shape[2]
    elif frames.dtype in _FLOAT_IN:
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"float frames must be (N, 3, H, W), got {tuple(frames.shape)}")
        h, w = frames.shape[2], frames.shape[3]
    else:
        raise ValueError(f"frames must be uint8 (N, H, W, 3) or float (N, 3, H, W), got dtype {frames.dtype}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"frame size {h}x{w} is not divisible by patch_size {patch_size}")
    for name, t in (("mean", mean), ("std", std)):
        if t is not None and len(t) != 3:
            raise ValueError(f"{name} needs 3 values (one per channel), got {len(t)}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together")
    if std is not None and any(float(s) == 0 for s in std):
        raise ValueError(f"std must be non-zero, got {list(std)}")
    _check_rescale(rescale)
    if out_dtype is not None and out_dtype not in _OUT:
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if frame_index is not None:
        if not isinstance(frame_index, torch.Tensor) or frame_index.dim() != 1 or frame_index.dtype not in (torch.int32, torch.int64):
            raise ValueError("frame_index must be a 1-D int32/int64 tensor of frame indices")
        if frame_index.device != frames.device:
            raise ValueError(f"frame_index is on {frame_index.device} but frames are on {frames.device}")
        _check_index_values(frames, frame_index)


def _channel_values(vals):
    """Per-channel values (tuple, list or tensor) as a float32 CPU tensor of 3."""
    if vals is None:
        return None
    if isinstance(vals, torch.Tensor):
        return vals.detach().to(device="cpu", dtype=torch.float32).reshape(3)
    return torch.tensor([float(x) for x in vals], dtype=torch.float32)


def _affine(frames, mean, std, rescale):
    """(scale, shift, div, normalize): out = (x - shift_c) / div_c if normalize else x * scale, in float32.

    uint8 with mean/std follows transformers' fused rescale+normalize: shift = mean·(1/rescale) and
    div = std·(1/rescale), computed in float32 as it does, then (x − shift) / div. So frames normalized
    here are bit-identical to upstream's ``pixel_values_videos`` (and to :class:`pevideo.PeVideoVideoProcessor`).
    """
    is_u8 = frames.dtype == torch.uint8
    m, s = _channel_values(mean), _channel_values(std)
    if m is None:
        return (float(rescale) if is_u8 else 1.0), None, None, False
    if is_u8:
        inv = 1.0 / float(rescale)
        m, s = m * inv, s * inv  # float32 tensor times a Python float: the ops upstream runs
    return 1.0, m, s, True


def _check_rescale(rescale):
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not math.isfinite(rescale) or rescale == 0:
        raise ValueError(f"rescale must be a finite non-zero number, got {rescale!r}")


def _check_index_values(frames, frame_index):
    """Indices in range, checked without reading them on the host: an assert on the tensor's device
    (on a GPU, a device-side assert instead of reading out of bounds; no sync on the launch path)."""
    n = frames.shape[0]
    if frame_index.numel() == 0:
        return
    msg = f"frame_index values must be in [0, {n})"
    ok = ((frame_index >= 0) & (frame_index < n)).all()
    if frame_index.device.type != "cpu":
        torch._assert_async(ok, msg)
        return
    try:  # (on the CPU the assert is immediate)
        torch._assert_async(ok, msg)
    except RuntimeError:
        lo, hi = int(frame_index.min()), int(frame_index.max())
        raise ValueError(f"{msg}; got values in [{lo}, {hi}]") from None


def normalize_uint8(frames: torch.Tensor, mean=None, std=None, rescale: float = 1 / 255,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 frames, channels first (..., 3, H, W), to float32 as transformers' fused rescale+normalize
    computes them: ``(x − mean_c/rescale) / (std_c/rescale)`` with mean/std, else ``x·rescale``. The one
    definition of the uint8 normalization: the reference below and pevideo's processor both call it
    (the kernel takes the same constants from :func:`_affine`). ``out``: float32, same shape, written."""
    scale, shift, div, normalize = _affine(frames, mean, std, rescale)
    if out is None:
        out = torch.empty(frames.shape, dtype=torch.float32, device=frames.device)
    if normalize:
        torch.sub(frames, shift.to(frames.device)[:, None, None], out=out)
        return out.div_(div.to(frames.device)[:, None, None])
    out.copy_(frames)
    return out.mul_(scale) if scale != 1.0 else out


def patchify_normalize_ref(
    frames: torch.Tensor,
    patch_size: int,
    mean=None,
    std=None,
    rescale: float = 1 / 255,
    out_dtype: torch.dtype | None = None,
    frame_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch :func:`patchify_normalize` (same arguments and result)."""
    x = frames if frame_index is None else frames.index_select(0, frame_index.to(torch.long))
    if x.dtype == torch.uint8:
        x = normalize_uint8(x.permute(0, 3, 1, 2), mean, std, rescale)
    else:
        _, shift, div, normalize = _affine(x, mean, std, rescale)
        x = x.to(torch.float32)
        if normalize:
            x = (x - shift.to(x.device)[:, None, None]) / div.to(x.device)[:, None, None]
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p).to(out_dtype or torch.float32)


def patchify_unsupported_reason(frames, frame_index=None) -> str | None:
    """None if the Triton kernel can serve these (already checked) arguments, else a readable reason."""
    return runtime_reason(KERNEL_MISSING, (frames, frame_index), (frames,))


def patchify_normalize_fused(
    frames, patch_size, mean=None, std=None, rescale=1 / 255, out_dtype=None, frame_index=None
) -> torch.Tensor:
    """The Triton path of :func:`patchify_normalize` (same arguments, already checked)."""
    if frame_index is not None:
        frame_index = frame_index.contiguous()
    scale, shift, div, normalize = _affine(frames, mean, std, rescale)
    if normalize:
        shift, div = shift.tolist(), div.tolist()
    else:
        shift, div = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return patchify_normalize_op(frames, frame_index, patch_size, scale, shift, div, normalize, out_dtype or torch.float32)


class PatchifyCall(NamedTuple):
    """:func:`patchify_normalize`'s arguments, checked (what the op's ``fused`` takes)."""

    frames: torch.Tensor
    patch_size: int
    mean: object = None
    std: object = None
    rescale: float = 1 / 255
    out_dtype: Optional[torch.dtype] = None
    frame_index: Optional[torch.Tensor] = None


def _resolve(*args, **kwargs) -> PatchifyCall:
    call = PatchifyCall(*args, **kwargs)
    patchify_check_args(*call)
    return call


PATCHIFY = KernelOp(
    "patchify_normalize", _resolve, lambda c: patchify_unsupported_reason(c.frames, c.frame_index),
    lambda c: patchify_normalize_fused(*c), patchify_normalize_ref,
)


def patchify_normalize(
    frames: torch.Tensor,
    patch_size: int,
    mean=None,
    std=None,
    rescale: float = 1 / 255,
    out_dtype: torch.dtype | None = None,
    frame_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cut frames into patch rows, normalizing on the way.

    ``frames``: uint8 (N, H, W, 3) as decoded, or float16/bfloat16/float32 (N, 3, H, W) as a processor
    returns; any strides (a (B, T, 3, S, S) batch viewed as (B·T, 3, S, S), a channels-last or cropped
    view, ...). ``patch_size`` p must divide H and W.

    Returns a contiguous (F, (H/p)·(W/p), 3·p·p) tensor: patches in row-major grid order, features
    ordered (c, kh, kw) like a flattened Conv2d weight, in ``out_dtype`` (float32 by default). Values:

      * uint8 with mean/std: (x·rescale − mean_c) / std_c, computed as transformers' fused
        rescale+normalize does it, (x − mean_c/rescale) / (std_c/rescale) in float32, so the result is
        bit-identical to upstream's ``pixel_values_videos`` patchified;
      * uint8 without: x·rescale;
      * float input: (x − mean_c) / std_c with mean/std (``rescale`` unused), else x, only cut and cast.

    ``frame_index`` (F,) int32/int64 picks which frames to read, in that order (default: all); frames
    not named are never read, so the real frames of a padded batch come out packed in one call.
    Runs the Triton kernel on CUDA tensors (and on CPU under TRITON_INTERPRET=1), the reference
    otherwise. Bad shapes, dtypes or arguments raise ValueError.
    """
    return run(PATCHIFY, frames, patch_size, mean, std, rescale, out_dtype, frame_index)
