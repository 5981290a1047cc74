"""The Triton side of :mod:`pevideo_kernels.patchify`: the kernel and its launcher.

Imports Triton unconditionally; :mod:`.patchify` imports this module once, inside a guarded try.
``patchify_normalize_op`` is registered as ``torch.ops.pevideo.patchify_normalize``
(``torch.library.triton_op``), so ``torch.compile`` sees one kernel; ``patchify_kernel`` and
``CUDA_CONFIGS`` are what ``tests/_build_for_gpu.py`` compiles ahead of time.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._triton import LAUNCH, interpreting, register_op

__all__ = ["patchify_normalize_op", "patchify_normalize_launch", "patchify_kernel", "CUDA_CONFIGS"]

# (BLOCK, num_warps) autotuned on CUDA; tests/_build_for_gpu.py compiles each for Hopper.
CUDA_CONFIGS = [(block, warps) for block in (1024, 2048, 4096) for warps in (4, 8)]
if interpreting():
    # One fixed config: the interpreter runs programs one by one on the CPU, and BLOCK below the
    # 28x42 / p=14 test row (1764 elements) makes the tests cover the chunk mask.
    _CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)]
else:
    _CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in CUDA_CONFIGS]


@triton.autotune(configs=_CONFIGS, key=["P", "ROW"], cache_results=True)  # tuned once per machine, not per process
@triton.jit
def patchify_kernel(
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


def patchify_normalize_launch(
    frames: torch.Tensor,
    frame_index: Optional[torch.Tensor],
    patch_size: int,
    scale: float,
    shift: list[float],
    div: list[float],
    normalize: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The launcher, run as ``patchify_normalize_op``: (F, L, 3·p·p) rows of ``frames`` (checked), out = (x − shift_c) / div_c if
    ``normalize`` else x·scale, in float32, written in ``out_dtype``; every element is overwritten."""
    p = patch_size
    if frames.dtype == torch.uint8:  # (N, H, W, 3)
        s_n, s_h, s_w, s_c = frames.stride()
        h, w = frames.shape[1], frames.shape[2]
    else:  # (N, 3, H, W)
        s_n, s_c, s_h, s_w = frames.stride()
        h, w = frames.shape[2], frames.shape[3]
    gh, gw = h // p, w // p
    n_out = frames.shape[0] if frame_index is None else frame_index.shape[0]
    out = torch.empty((n_out, gh * gw, 3 * p * p), dtype=out_dtype, device=frames.device)
    if LAUNCH.poison:
        out.fill_(float("nan"))  # (pevideo_kernels.testing.poison_outputs) unwritten elements show up
    row = gw * 3 * p * p
    if n_out == 0 or row == 0 or gh == 0:
        return out
    idx = frame_index if frame_index is not None else frames  # any pointer; unused without an index

    def grid(meta):
        return (n_out * gh, triton.cdiv(row, meta["BLOCK"]))

    wrap_triton(patchify_kernel)[grid](
        frames, idx, out,
        s_n, s_c, s_h, s_w,
        row, gh,
        float(scale), float(shift[0]), float(shift[1]), float(shift[2]), float(div[0]), float(div[1]), float(div[2]),
        P=p, HAS_INDEX=frame_index is not None, NORMALIZE=bool(normalize),
    )
    return out


# torch.ops.pevideo.patchify_normalize (traceable by torch.compile, also under TRITON_INTERPRET).
patchify_normalize_op = register_op("pevideo::patchify_normalize", patchify_normalize_launch)
