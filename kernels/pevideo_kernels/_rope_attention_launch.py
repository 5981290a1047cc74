"""The host side of :mod:`pevideo_kernels.rope_attention`'s kernels: arguments, the per-forward RoPE
pass, the launchers and their registration (``torch.ops.pevideo.rope_attention`` and
``rope_attention_lse``, ``torch.library.triton_op``, so ``torch.compile`` traces the launches).

``kernel_args`` is shared by the launchers and the ahead-of-time build check
(``tests/_build_for_gpu.py``), so the latter compiles exactly what a launch would. Imports Triton (through
:mod:`._rope_attention_triton`) unconditionally; :mod:`.rope_attention` imports it behind a guard.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import triton

from ._rope_attention_triton import CONFIG_SETS, TUNING_KEY, config_set, rope_attn_fwd, rope_rotate, rope_table, tuned_kernel
from ._triton import LAUNCH, interpreting, register_op

__all__ = ["rope_attention_fused", "rope_attention_fused_lse", "rope_attention_fwd", "rope_attention_fwd_lse",
           "kernel_args", "rope_prepass", "rope_k_mode", "ROPE_K_MODES", "DEFAULT_ROPE_K",
           # the kernels and their tuning, re-exported for the build check
           "rope_attn_fwd", "rope_rotate", "rope_table", "tuned_kernel", "config_set", "CONFIG_SETS", "TUNING_KEY"]


# --------------------------------------------------------------------------------------------------
# Host side: arguments, the launcher, its registration
# --------------------------------------------------------------------------------------------------
def _key_ranges(mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool -> (batch, 3) int32: first real key, last real key + 1, 1 if all keys in between
    are real. On the mask's device, no host sync."""
    n = mask.shape[1]
    pos = torch.arange(1, n + 1, device=mask.device, dtype=torch.int32)
    m = mask.to(torch.int32)
    hi = (m * pos).amax(1)
    lo = torch.where(mask, pos, n + 1).amin(1) - 1
    count = m.sum(1, dtype=torch.int32)
    contiguous = (count == hi - lo).to(torch.int32)
    return torch.stack((lo.to(torch.int32), hi.to(torch.int32), contiguous), 1).contiguous()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _fast_trig(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.version.hip is None


# How K gets rotated (the kernel's ROPE_K), one host switch so that the candidates can be timed against
# each other (bench/, on a GPU) and all stay tested (tests/test_rope_attention.py):
#   loop       K tiles rotated in the inner loop, cos/sin recomputed per tile (for every query block);
#   prerotate  one small pass (rope_rotate) writes rotated K to a scratch buffer, the loop is plain
#              attention (K tiles can stream into shared memory with cp.async/TMA, no register work);
#   table      one small pass (rope_table) writes per-token cos/sin in float32; the loop rotates K
#              tiles with FMAs only.
# Q is always rotated once per program, in its prologue; RoPE never leaves the op.
ROPE_K_MODES = {"loop": 0, "prerotate": 1, "table": 2}
# Default, chosen by reasoning (not yet measured): at head_dim 64 the loop is bound by the SFU (softmax's
# exp2, ~MMA time per tile) and "loop" adds 2 SFU ops (cos, sin) per K pair per tile, ~+50% SFU work.
# "table" moves that to ~6 FP32 FMAs per pair on the FP32 pipe, which has slack, and its pass writes only
# 256 bytes per token (L2-friendly reads). "prerotate" empties the loop but its pass reads and writes all
# of K once more (~2 x 1.2 MB per 577-token frame, ~15% of the frame's attention time at the goal rate).
# The GPU run must time all three on the frame shape (pass included) and keep the fastest.
DEFAULT_ROPE_K = "table"
_ROPE_K = [DEFAULT_ROPE_K]


@contextmanager
def rope_k_mode(mode: str) -> Iterator[None]:
    """Launches inside use ``mode`` (one of ROPE_K_MODES) to rotate K; restores the previous one on exit."""
    if mode not in ROPE_K_MODES:
        raise ValueError(f"rope_k mode must be one of {tuple(ROPE_K_MODES)}, got {mode!r}")
    before = _ROPE_K[0]
    _ROPE_K[0] = mode
    try:
        yield
    finally:
        _ROPE_K[0] = before


def rope_prepass(mode, k, coords, freqs, rope_layout, cu_seqlens):
    """What ROPE_K ``mode`` runs before the attention kernel: (k, coords, launch) for ``kernel_args``.

    ``launch`` is None ("loop", or no RoPE) or (kernel, grid, args, flags): the pass that fills the
    returned scratch buffer -- rotated K for "prerotate" (k then points at it), the cos/sin table for
    "table" (coords then points at it). Allocates only; the caller launches (or compiles) it.
    """
    if coords is None or mode == "loop":
        return k, coords, None
    packed = cu_seqlens is not None
    d = k.shape[-1]
    block_h = max(16, _next_pow2(d // 2))
    kb = k[None] if packed else k  # (batch, seq, heads, head_dim); packed = one row of all tokens
    cb = coords[None] if packed else coords
    nb, seq = kb.shape[0], kb.shape[1]
    f = freqs.contiguous()
    fast = _fast_trig(k)
    block_t = 32
    if mode == "prerotate":
        out = torch.empty((*kb.shape[:-1], 2 * block_h), dtype=k.dtype, device=k.device)
        args = (kb, cb, f, out, seq, kb.shape[2], *kb.stride()[:3], *cb.stride(), *out.stride()[:3])
        flags = dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_H=block_h, INTERLEAVED=rope_layout == "interleaved",
                     FAST_TRIG=fast)
        launch = (rope_rotate, (triton.cdiv(seq, block_t), nb), args, flags)
        return (out[0] if packed else out), coords, launch
    # "table": one row of coordinates serves every batch row when coords were expanded over the batch
    nrows = 1 if cb.stride(0) == 0 else nb
    out = torch.empty((nrows, seq, 2, block_h), dtype=torch.float32, device=k.device)
    args = (cb, f, out, seq, *cb.stride(), *out.stride()[:3])
    flags = dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_H=block_h, FAST_TRIG=fast)
    launch = (rope_table, (triton.cdiv(seq, block_t), nrows), args, flags)
    return k, (out[0] if packed else out.expand(nb, seq, 2, block_h)), launch


def _shared_args(q, coords, freqs, rope_layout, cu_seqlens, key_padding_mask, seqlen_q, seqlen_k,
                skip_padded_queries):
    """What the forward kernel and both backward kernels take alike, for checked inputs:
    ``(strides, (c, f, cu, m, ranges), (*sc, *sm), flags)``.

    ``strides(t)``: t's (batch, token, head) strides as the kernels take them; packed tensors have no
    batch dim, so their token stride stands in (the kernels' row0 is then a token, see ``_row_start``).
    ``c``: coords (or the cos/sin table "table" mode made of them), ``sc`` its (batch, token, axis)
    strides; ``m``, ``sm``, ``ranges``: the key-padding mask as bytes, its strides, each row's real-key
    span (``_key_ranges``); ``cu``: cu_seqlens. ``flags``: the constexpr flags the kernels share.
    """
    packed = cu_seqlens is not None
    d = q.shape[-1]

    def strides(t):
        return (t.stride(0), *t.stride()[:2]) if packed else tuple(t.stride()[:3])

    has_rope = coords is not None
    has_mask = key_padding_mask is not None
    dummy = q  # stands in for absent pointers; never read (the matching flag is off)
    if has_rope:
        c, f, sc = coords, freqs.contiguous(), strides(coords)  # (coords, or cos/sin table rows)
    else:
        c, f, sc = dummy, dummy, (0, 0, 0)
    if has_mask:
        m = key_padding_mask.view(torch.uint8)
        sm = tuple(m.stride())
        ranges = _key_ranges(key_padding_mask)
    else:
        m, ranges, sm = dummy, dummy, (0, 0)
    cu = cu_seqlens.contiguous() if packed else dummy  # read as a flat array
    flags = dict(
        HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)), BLOCK_H=max(16, _next_pow2(d // 2)) if has_rope else 16,
        HAS_ROPE=has_rope, INTERLEAVED=rope_layout == "interleaved", IS_PACKED=packed,
        HAS_MASK=has_mask, ZERO_PAD_Q=has_mask and seqlen_q == seqlen_k and bool(skip_padded_queries),
        FAST_TRIG=_fast_trig(q),
        IEEE_DOT=q.dtype == torch.float32,
    )
    return strides, (c, f, cu, m, ranges), (*sc, *sm), flags


def kernel_args(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, out,
                 skip_padded_queries=False, rope_k="loop", lse=None):
    """The kernel's arguments for these (checked) inputs: (args, flags, nbatch, seqlen_q, seqlen_k, hq).

    ``rope_k``: a ROPE_K_MODES key; for "prerotate" / "table", ``k`` / ``coords`` are what
    :func:`rope_prepass` returned. ``lse``: where to store the float32 log-sum-exp per (row, head) for
    the backward (shape ``q.shape[:-1]``, any strides); None (inference) compiles the store out.

    Shared by the launcher and by the ahead-of-time build check (tests/_build_for_gpu.py), so the latter
    compiles exactly what a launch would.
    """
    packed = cu_seqlens is not None
    hq, hkv = q.shape[-2], k.shape[-2]
    if packed:
        nbatch = cu_seqlens.numel() - 1
        seqlen_q = seqlen_k = int(max_seqlen)
    else:
        nbatch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    strides, (c, f, cu, m, ranges), sc_sm, flags = _shared_args(
        q, coords, freqs, rope_layout, cu_seqlens, key_padding_mask, seqlen_q, seqlen_k, skip_padded_queries)
    sl = strides(lse) if lse is not None else (0, 0, 0)
    qk_scale = float(scale) * 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
    bucket_q, bucket_k = _next_pow2(max(seqlen_q, 16)), _next_pow2(max(seqlen_k, 16))
    args = (
        q, k, v, out, out if lse is None else lse, c, f, cu, m, ranges,
        seqlen_q, seqlen_k, hq // hkv, qk_scale,
        *strides(q), *strides(k), *strides(v), *strides(out), *sl, *sc_sm,
        bucket_q, bucket_k,
    )
    flags.update(ROPE_K=ROPE_K_MODES[rope_k] if flags["HAS_ROPE"] else 0, BLOCK_N_TAIL=16,
                 STORE_LSE=lse is not None)
    return args, flags, nbatch, seqlen_q, seqlen_k, hq


def rope_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: Optional[torch.Tensor] = None,
    freqs: Optional[torch.Tensor] = None,
    rope_layout: str = "interleaved",
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    skip_padded_queries: bool = False,
) -> torch.Tensor:
    """The kernel path of :func:`pevideo_kernels.rope_attention` (same arguments, already checked).

    Allocates ``out`` (q's leading shape, v's head_dim, contiguous) and launches the kernel into it.
    Packed mode: ``max_seqlen`` None costs a host sync (pass it under ``torch.compile``); when given it
    must be at least the longest segment. Padded mode adds a few small device ops (each row's range of
    real keys) and no host sync.
    """
    return _launch_fwd(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale,
                       skip_padded_queries, False)[0]


def rope_attention_fwd_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: Optional[torch.Tensor] = None,
    freqs: Optional[torch.Tensor] = None,
    rope_layout: str = "interleaved",
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    skip_padded_queries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_attention_fwd` that also returns the log-sum-exp the backward needs: ``(out, lse)``.

    ``lse``: float32, shape ``q.shape[:-1]``, a view of a head-major buffer ((heads, tokens) packed,
    (batch, heads, seq) batched: the kernel's stores are then contiguous). Natural log of the sum of
    exp(scaled scores) over the row's real keys; rows the kernel does not compute hold -inf or garbage.
    """
    return _launch_fwd(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale,
                       skip_padded_queries, True)


def _lse_buffer(q: torch.Tensor) -> torch.Tensor:
    """A float32 ``q.shape[:-1]`` view of a head-major buffer."""
    if q.dim() == 3:
        return torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device).t()
    return torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device).permute(0, 2, 1)


def _launch_fwd(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale,
                skip_padded_queries, with_lse):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    packed = cu_seqlens is not None
    if packed and max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync; pass max_seqlen to avoid it
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    if LAUNCH.poison:
        out.fill_(float("nan"))  # (pevideo_kernels.testing.poison_outputs) rows the kernel skips show up
    lse = _lse_buffer(q) if with_lse else None
    if lse is not None and LAUNCH.poison:
        lse.fill_(float("nan"))  # rows the kernel does not compute are never read by the backward either
    if out.numel() == 0 or (int(max_seqlen) if packed else q.shape[1]) == 0:
        return out, lse
    if not packed and k.shape[1] == 0:
        return out.zero_(), lse
    mode = _ROPE_K[0]
    k, coords, launch = rope_prepass(mode, k, coords, freqs, rope_layout, cu_seqlens)
    args, flags, nbatch, seqlen_q, _, hq = kernel_args(
        q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, out, skip_padded_queries,
        mode, lse,
    )
    if launch is not None:
        pre, pre_grid, pre_args, pre_flags = launch
        if interpreting() and q.device.type == "cpu":
            pre[pre_grid](*pre_args, **pre_flags)
        else:
            with torch.cuda.device(q.device):
                torch.library.wrap_triton(pre)[pre_grid](*pre_args, **pre_flags)

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * nbatch, hq)

    if interpreting() and q.device.type == "cpu":
        # Called as is: the interpreter's kernels cannot be traced (the op is opaque there).
        bm, bn = LAUNCH.interpret_blocks
        rope_attn_fwd[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
    else:
        kernel = tuned_kernel(config_set(args[-2], flags["BLOCK_D"], q.dtype == torch.float32))
        with torch.cuda.device(q.device):
            torch.library.wrap_triton(kernel)[grid](*args, **flags)  # lets torch.compile trace the launch
    return out, lse


def _fake(q, k, v, coords=None, freqs=None, rope_layout="interleaved", cu_seqlens=None, max_seqlen=None,
          key_padding_mask=None, scale=None, skip_padded_queries=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _fake_lse(q, k, v, coords=None, freqs=None, rope_layout="interleaved", cu_seqlens=None, max_seqlen=None,
              key_padding_mask=None, scale=None, skip_padded_queries=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), _lse_buffer(q)


# What callers run: torch.ops.pevideo.rope_attention (opaque under TRITON_INTERPRET, see register_op).
rope_attention_fused = register_op("pevideo::rope_attention", rope_attention_fwd, _fake)
# The training forward (out, lse); the autograd wiring is in ._rope_attention_autograd.
rope_attention_fused_lse = register_op("pevideo::rope_attention_lse", rope_attention_fwd_lse, _fake_lse)
