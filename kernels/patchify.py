"""Frames to normalized patch rows, ready for the patch-embedding GEMM.

One memory-bound pass: read uint8 (or float) frames in any layout, rescale and normalize per channel,
write (frame, patch, (c, kh, kw)) rows in the model's dtype. ``patchify_normalize_ref`` is the plain
PyTorch definition beside the kernel; the op is registered as ``torch.ops.pevideo.patchify_normalize``
(``torch.library.triton_op``) so ``torch.compile`` sees it as one opaque kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._triton import HAS_TRITON, device_reason, grad_reason, interpreting

__all__ = ["patchify_normalize", "patchify_normalize_ref", "patchify_unsupported_reason"]

_FLOAT_IN = (torch.float16, torch.bfloat16, torch.float32)
_OUT = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(frames, patch_size, mean, std, rescale, out_dtype, frame_index):
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
    is_u8 = x.dtype == torch.uint8
    scale, shift, div, normalize = _affine(x, mean, std, rescale)
    if is_u8:
        x = x.permute(0, 3, 1, 2)
    x = x.to(torch.float32)
    if normalize:
        x = (x - shift.to(x.device)[:, None, None]) / div.to(x.device)[:, None, None]
    elif scale != 1.0:
        x = x * scale
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p).to(out_dtype or torch.float32)


def patchify_unsupported_reason(frames, frame_index=None):
    """None if the Triton kernel can serve these (already checked) arguments, else a readable reason."""
    reason = device_reason(frames, frame_index)
    if reason is None:
        reason = grad_reason(frames)
    if reason is None and not _HAS_KERNEL:
        reason = "the Triton kernel is not built in this version"
    return reason


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
_HAS_KERNEL = False

if HAS_TRITON and hasattr(torch.library, "triton_op"):
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    # (BLOCK, num_warps) autotuned on CUDA; tests/_build_for_gpu.py compiles each for Hopper.
    _CUDA_CONFIGS = [(block, warps) for block in (1024, 2048, 4096) for warps in (4, 8)]
    if interpreting():
        # One fixed config: the interpreter runs programs one by one on the CPU, and BLOCK below the
        # 28x42 / p=14 test row (1764 elements) makes the tests cover the chunk mask.
        _CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)]
    else:
        _CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in _CUDA_CONFIGS]

    @triton.autotune(configs=_CONFIGS, key=["P", "ROW"])
    @triton.jit
    def _patchify_kernel(
        x_ptr, idx_ptr, out_ptr,
        s_n, s_c, s_h, s_w,  # element strides of the (frame, channel, row, column) axes
        ROW, GH,  # output elements per patch row (GW·3·P·P); patch rows per frame
        scale, sh0, sh1, sh2, dv0, dv1, dv2,
        P: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program writes BLOCK consecutive outputs of one (frame, patch row). A patch row's output is
        # one contiguous run of ROW elements, so stores are wide and coalesced; the loads gather from
        # the input (a few rows of it, which stay in cache) in whatever layout it has.
        row = tl.program_id(0)
        f = row // GH
        gh = row - f * GH
        if HAS_INDEX:
            src = tl.load(idx_ptr + f).to(tl.int64)
        else:
            src = f.to(tl.int64)
        o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = o < ROW
        PP: tl.constexpr = P * P
        gw = o // (3 * PP)  # features of a patch are ordered (c, kh, kw), patches along the row by gw
        r = o - gw * (3 * PP)
        c = r // PP
        r = r - c * PP
        kh = r // P
        kw = r - kh * P
        offs = c * s_c + (gh * P + kh) * s_h + (gw * P + kw) * s_w
        x = tl.load(x_ptr + src * s_n + offs, mask=mask, other=0).to(tl.float32)
        if NORMALIZE:
            shift = tl.where(c == 0, sh0, tl.where(c == 1, sh1, sh2))
            div = tl.where(c == 0, dv0, tl.where(c == 1, dv1, dv2))
            # IEEE division (not the approximate one '/' compiles to) so values match PyTorch bit for bit.
            y = tl.math.div_rn(x - shift, div)
        else:
            y = x * scale
        tl.store(out_ptr + row.to(tl.int64) * ROW + o, y.to(out_ptr.dtype.element_ty), mask=mask)

    def _launch(frames, frame_index, patch_size, scale, shift, div, normalize, out):
        """Run the kernel into ``out`` (F, L, 3·p·p), which it overwrites completely. Used by the op and tests."""
        p = patch_size
        if frames.dtype == torch.uint8:  # (N, H, W, 3)
            s_n, s_h, s_w, s_c = frames.stride()
            h, w = frames.shape[1], frames.shape[2]
        else:  # (N, 3, H, W)
            s_n, s_c, s_h, s_w = frames.stride()
            h, w = frames.shape[2], frames.shape[3]
        gh, gw = h // p, w // p
        n_out = out.shape[0]
        row = gw * 3 * p * p
        if n_out == 0 or row == 0 or gh == 0:
            return out
        idx = frame_index if frame_index is not None else frames  # any pointer; unused without an index
        sh = shift if normalize else (0.0, 0.0, 0.0)
        dv = div if normalize else (1.0, 1.0, 1.0)

        def grid(meta):
            return (n_out * gh, triton.cdiv(row, meta["BLOCK"]))

        wrap_triton(_patchify_kernel)[grid](
            frames, idx, out,
            s_n, s_c, s_h, s_w,
            row, gh,
            float(scale), float(sh[0]), float(sh[1]), float(sh[2]), float(dv[0]), float(dv[1]), float(dv[2]),
            P=p, HAS_INDEX=frame_index is not None, NORMALIZE=bool(normalize),
        )
        return out

    @triton_op("pevideo::patchify_normalize", mutates_args=())
    def _patchify_op(
        frames: torch.Tensor,
        frame_index: Optional[torch.Tensor],
        patch_size: int,
        scale: float,
        shift: list[float],
        div: list[float],
        normalize: bool,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        p = patch_size
        h, w = (frames.shape[1], frames.shape[2]) if frames.dtype == torch.uint8 else (frames.shape[2], frames.shape[3])
        n_out = frames.shape[0] if frame_index is None else frame_index.shape[0]
        out = torch.empty((n_out, (h // p) * (w // p), 3 * p * p), dtype=out_dtype, device=frames.device)
        return _launch(frames, frame_index, p, scale, shift, div, normalize, out)

    _HAS_KERNEL = True


def _kernel_args(frames, mean, std, rescale):
    scale, shift, div, normalize = _affine(frames, mean, std, rescale)
    if normalize:
        return scale, shift.tolist(), div.tolist(), True
    return scale, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], False


def _check_index_values(frames, frame_index):
    n = frames.shape[0]
    if frame_index.numel() == 0:
        return
    if frame_index.device.type == "cpu":
        lo, hi = int(frame_index.min()), int(frame_index.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"frame_index values must be in [0, {n}); got values in [{lo}, {hi}]")
    else:  # no host sync on the GPU: a device-side assert instead of reading out of bounds
        torch._assert_async(((frame_index >= 0) & (frame_index < n)).all(), f"frame_index values must be in [0, {n})")


def _patchify_fused(frames, patch_size, mean, std, rescale, out_dtype, frame_index):
    """The Triton path of :func:`patchify_normalize`, for callers that checked the arguments (the model)."""
    if frame_index is not None:
        frame_index = frame_index.contiguous()
    scale, shift, div, normalize = _kernel_args(frames, mean, std, rescale)
    return torch.ops.pevideo.patchify_normalize(
        frames, frame_index, patch_size, scale, shift, div, normalize, out_dtype or torch.float32
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
    _check_args(frames, patch_size, mean, std, rescale, out_dtype, frame_index)
    if frame_index is not None:
        _check_index_values(frames, frame_index)
    if patchify_unsupported_reason(frames, frame_index) is None:
        return _patchify_fused(frames, patch_size, mean, std, rescale, out_dtype, frame_index)
    return patchify_normalize_ref(frames, patch_size, mean, std, rescale, out_dtype, frame_index)
