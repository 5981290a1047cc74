"""The Triton side of :mod:`pevideo_kernels.rope_attention`: the kernel and its one launcher.

Imports Triton unconditionally; :mod:`.rope_attention` imports this module once, inside a guarded try,
so ``import pevideo_kernels`` never fails without Triton. ``rope_attention_fwd`` is the launcher,
registered as ``torch.ops.pevideo.rope_attention`` (``torch.library.triton_op``, so ``torch.compile``
traces the launch); ``rope_attn_fwd``, ``kernel_args``, ``config_set`` and ``CONFIG_SETS`` are what
``tests/_build_for_gpu.py`` compiles ahead of time.

Layout of the work: one program per (query block, segment or batch row) on grid axis 0 -- query
blocks of one segment are neighbours, so they share its K/V tiles in L2 -- and one per query head on
axis 1. Each program keeps its rotated Q tile in registers and streams K/V tiles of its segment
through an online softmax (FlashAttention-2). RoPE stays inside the op: angles come from the token
coordinates and the frequency table in float32; Q is rotated in each program's prologue, K as
``ROPE_K_MODES`` says (in the loop, from a per-forward scratch copy, or from a per-forward cos/sin
table). Rotated q and k tiles hold their pairs interleaved, so QKᵀ is one dot with K = head_dim. A
ragged last stretch of keys runs in narrow BLOCK_N_TAIL tiles.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from ._triton import LAUNCH, interpreting, register_op

__all__ = ["rope_attention_fused", "rope_attention_fused_lse", "rope_attention_fwd", "rope_attention_fwd_lse", "rope_attn_fwd",
           "kernel_args", "config_set", "tuned_kernel", "CONFIG_SETS",
           "rope_rotate", "rope_table", "rope_prepass", "rope_k_mode", "ROPE_K_MODES", "DEFAULT_ROPE_K"]


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _cos_sin(x, FAST_TRIG: tl.constexpr):
    if FAST_TRIG:
        # The SFU's cos/sin.approx are accurate to ~2^-21 absolute on [-pi, pi]: reduce there first
        # (two-constant Cody-Waite, n * 6.28125 is exact for |n| < 2^16). Libdevice's sinf/cosf
        # take ~20 FP32 instructions each: for a K tile that is as much issue time as its matmuls.
        # n = x / 2pi rounded to nearest without FRND (which issues on the SFU pipe, beside cos/sin):
        # adding and subtracting 1.5 * 2^23 leaves a float32's integer part, exact for |x / 2pi| < 2^22.
        # Accurate (|r| <= pi + tiny) for |x| < 2^16 * pi ~ 2.06e5, where n * 6.28125 is exact; angles
        # here are coordinates (< a few thousand) times frequencies (<= 1).
        n = (x * 0.15915494309189535 + 12582912.0) - 12582912.0
        r = x - n * 6.28125
        r = r - n * 1.9353071795864769e-03
        c = tl.inline_asm_elementwise(
            "cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1
        )
        s = tl.inline_asm_elementwise(
            "sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        c = tl.cos(x)
        s = tl.sin(x)
    return c, s


@triton.jit
def _row_start(CU, bid, seqlen_q, seqlen_k, IS_PACKED: tl.constexpr):
    """(row0, len_q, len_k) of segment or batch row ``bid``: the pointer bases of its tensors are
    ``P + row0 * stride_b``. Packed: row0 is the segment's first token (the host passes the token stride
    as stride_b, see ``_shared_args``), both lengths the segment's, from CU. Padded: row0 is the batch
    index, the lengths seqlen_q and seqlen_k. row0 is int64, so that row0 * stride cannot overflow 32
    bits on large token counts."""
    if IS_PACKED:
        tok0 = tl.load(CU + bid)
        row0 = tok0.to(tl.int64)
        len_q = tl.load(CU + bid + 1) - tok0
        len_k = len_q
    else:
        row0 = bid.to(tl.int64)
        len_q = seqlen_q
        len_k = seqlen_k
    return row0, len_q, len_k


@triton.jit
def _freqs(FREQ, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Each RoPE pair's frequency per axis (t, h, w): three (BLOCK_H,) float32 rows, 0 past HEAD_DIM / 2."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    f0 = tl.load(FREQ + offs_h, mask=h_ok, other=0.0)
    f1 = tl.load(FREQ + HALF + offs_h, mask=h_ok, other=0.0)
    f2 = tl.load(FREQ + 2 * HALF + offs_h, mask=h_ok, other=0.0)
    return f0, f1, f2


@triton.jit
def _angles_cs(cp, ok, f0, f1, f2, stride_cd, FAST_TRIG: tl.constexpr):
    """cos/sin (rows, BLOCK_H) of the tokens whose coordinates (t, h, w at ``stride_cd``) start at ``cp``
    (a column of pointers): t*f0 + h*f1 + w*f2 summed in float32, term by term (the backward must
    rotate by the very angles the forward used, so both call this)."""
    ct = tl.load(cp, mask=ok, other=0).to(tl.float32)
    ch = tl.load(cp + stride_cd, mask=ok, other=0).to(tl.float32)
    cw = tl.load(cp + 2 * stride_cd, mask=ok, other=0).to(tl.float32)
    ang = ct[:, None] * f0[None, :] + ch[:, None] * f1[None, :] + cw[:, None] * f2[None, :]
    return _cos_sin(ang, FAST_TRIG)


@triton.jit
def _load_pairs(rows, row_ok, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The two members of each RoPE pair of a (rows, head_dim) tile, as float32 (rows, BLOCK_H) each.

    ``rows`` are the tile's row start pointers (a column), ``row_ok`` which rows to read.
    Interleaved pairs (2j, 2j+1): one contiguous (vectorized) load, then a register-level split;
    half pairs (j, j + head_dim/2): two contiguous loads.
    """
    if INTERLEAVED:
        offs = tl.arange(0, 2 * BLOCK_H)
        x = tl.load(rows + offs[None, :], mask=row_ok[:, None] & (offs < HEAD_DIM)[None, :], other=0.0)
        a, b = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], BLOCK_H, 2)))
    else:
        offs = tl.arange(0, BLOCK_H)
        m = row_ok[:, None] & (offs < HEAD_DIM // 2)[None, :]
        a = tl.load(rows + offs[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(rows + HEAD_DIM // 2 + offs[None, :], mask=m, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _dot(a, b, acc, IEEE_DOT: tl.constexpr):
    # float32 inputs: full-precision products (Triton's default would be TF32).
    if IEEE_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _rope_tile(x_rows, row_ok, t_rows, f0, f1, f2, stride_cd,
               HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
               TABLE: tl.constexpr, FAST_TRIG: tl.constexpr, dt: tl.constexpr):
    """Rows of x rotated: (rows, 2 * BLOCK_H) in ``dt``, pairs interleaved [a0 b0 a1 b1 ...], whatever
    the input layout (q and k tiles only have to agree with each other for their dot).

    ``t_rows`` point at each row's coordinates (t, h, w at ``stride_cd``), or with TABLE at its
    precomputed cos row (sin ``stride_cd`` further; see ``rope_table``): then FMAs only.
    Rotation in float32, rounded to ``dt``, as the reference does before its matmul.
    """
    if TABLE:
        offs_h = tl.arange(0, BLOCK_H)
        tp = t_rows[:, None] + offs_h[None, :]
        c = tl.load(tp, mask=row_ok[:, None], other=0.0)
        s = tl.load(tp + stride_cd, mask=row_ok[:, None], other=0.0)
    else:
        c, s = _angles_cs(t_rows, row_ok, f0, f1, f2, stride_cd, FAST_TRIG)
    xa, xb = _load_pairs(x_rows, row_ok, HEAD_DIM, BLOCK_H, INTERLEAVED)
    ra = (xa * c - xb * s).to(dt)
    rb = (xa * s + xb * c).to(dt)
    # One tile, so that QK^T is one dot with K = 2 * BLOCK_H (not one per pair half).
    return tl.reshape(tl.join(ra, rb), (ra.shape[0], 2 * BLOCK_H))


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, f0, f1, f2,
    Kh, Vh, Ch, Mrow,
    start_n, hi, qk_scale,
    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, MASK_N: tl.constexpr, LOAD_MASK: tl.constexpr,
    FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr, ROPE_K: tl.constexpr,
):
    """One K/V tile [start_n, start_n + BLOCK_N) folded into the running (acc, l_i, m_i).

    MASK_N: the tile may run past ``hi`` (the last one). LOAD_MASK: also read the key-padding mask
    (masks that are not one run of real keys); a tile may then hold no real key at all.
    ROPE_K (with HAS_ROPE): how K gets rotated, see ``ROPE_K_MODES``.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n64 = tl.cast(start_n, tl.int64)  # (a plain int when the interpreter runs the loop)
    kp = Kh + n64 * stride_kt
    vp = Vh + n64 * stride_vt
    if MASK_N:
        n_ok = (start_n + offs_n) < hi
        if LOAD_MASK:
            real = tl.load(Mrow + (start_n + offs_n) * stride_mt, mask=n_ok, other=0)
            n_ok = n_ok & (real != 0)
        n_in = n_ok
    else:
        n_in = offs_n < BLOCK_N
    dt = Kh.dtype.element_ty

    if HAS_ROPE and ROPE_K == 1:
        # K was rotated by ``rope_rotate`` into a scratch buffer laid out as the rotated q tile.
        offs_r = tl.arange(0, 2 * BLOCK_H)
        kt = tl.load(kp + offs_n[None, :] * stride_kt + offs_r[:, None], mask=n_in[None, :], other=0.0)
        qk = _dot(q, kt, None, IEEE_DOT)
    elif HAS_ROPE:
        # Keys on rows, as K is stored; angles from coordinates (ROPE_K 0) or the cos/sin table (2).
        kr = _rope_tile(kp + offs_n[:, None] * stride_kt, n_in, Ch + n64 * stride_ct + offs_n * stride_ct,
                        f0, f1, f2, stride_cd, HEAD_DIM, BLOCK_H, INTERLEAVED, ROPE_K == 2, FAST_TRIG, dt)
        qk = _dot(q, tl.trans(kr), None, IEEE_DOT)
    else:
        d_ok = offs_d < HEAD_DIM
        kt = tl.load(kp + offs_n[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None] & n_in[None, :], other=0.0)
        qk = _dot(q, kt, None, IEEE_DOT)

    if MASK_N:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if LOAD_MASK:
        # A tile of padding only: m_new may still be -inf; keep exp2's arguments finite (p = 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new  # every tile read here holds a real key, so m_new is finite
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)

    d_ok_v = offs_d < HEAD_DIM
    # Masked-out rows load as zeros: padding tokens may hold anything (even NaN).
    v = tl.load(vp + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_in[:, None] & d_ok_v[None, :], other=0.0)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(dt), v, acc, IEEE_DOT)
    return acc, l_i, m_new


@triton.jit
def _attn_span(
    acc, l_i, m_i, q, f0, f1, f2,
    Kh, Vh, Ch, Mrow,
    lo, hi, qk_scale,
    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, LOAD_MASK: tl.constexpr,
    FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr, ROPE_K: tl.constexpr, BLOCK_N_TAIL: tl.constexpr,
):
    """Keys [lo, hi): whole tiles without any masking, then the ragged rest in narrow BLOCK_N_TAIL
    tiles (577 = 9 * 64 + 1: the odd token costs a 16-wide tile, not a 64-wide one)."""
    if LOAD_MASK:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, f0, f1, f2, Kh, Vh, Ch, Mrow, start_n, hi, qk_scale,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, True, True, FAST_TRIG, IEEE_DOT, ROPE_K,
            )
    else:
        n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
        for start_n in range(lo, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, f0, f1, f2, Kh, Vh, Ch, Mrow, start_n, hi, qk_scale,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, False, False, FAST_TRIG, IEEE_DOT, ROPE_K,
            )
        for start_n in range(n_full, hi, BLOCK_N_TAIL):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, f0, f1, f2, Kh, Vh, Ch, Mrow, start_n, hi, qk_scale,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N_TAIL, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, True, False, FAST_TRIG, IEEE_DOT,
                ROPE_K,
            )
    return acc, l_i, m_i


@triton.jit
def rope_attn_fwd(
    Q, K, V, O, LSE, C, FREQ, CU, MASK, KV_RANGE,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt, stride_lh,
    stride_cb, stride_ct, stride_cd,
    stride_mb, stride_mt,
    bucket_q, bucket_k,  # autotuning keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, IS_PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr, ZERO_PAD_Q: tl.constexpr, FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
    ROPE_K: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, STORE_LSE: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    bid = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    kv_head = head // heads_per_kv

    row0, len_q, len_k = _row_start(CU, bid, seqlen_q, seqlen_k, IS_PACKED)
    if IS_PACKED:
        if start_m >= len_q:  # past this segment's end (or an empty segment): nothing to do
            return
    Qh = Q + row0 * stride_qb + head * stride_qh
    Kh = K + row0 * stride_kb + kv_head * stride_kh
    Vh = V + row0 * stride_vb + kv_head * stride_vh
    Oh = O + row0 * stride_ob + head * stride_oh
    Lh = LSE + row0 * stride_lb + head * stride_lh
    Ch = C + row0 * stride_cb
    Mrow = MASK + bid.to(tl.int64) * stride_mb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    d_ok = offs_d < HEAD_DIM
    if ZERO_PAD_Q:
        # Self-attention with padding: padded query rows give zeros; a block of them exits here.
        q_real = tl.load(Mrow + offs_m * stride_mt, mask=m_ok, other=0) != 0
        if tl.max(q_real.to(tl.int32), 0) == 0:
            tl.store(
                Oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty),
                mask=m_ok[:, None] & d_ok[None, :],
            )
            return

    dt = Q.dtype.element_ty
    q_rows = Qh + offs_m[:, None] * stride_qt
    q_ok = m_ok
    if ZERO_PAD_Q:
        q_ok = q_ok & q_real  # padded rows are zeroed at the end; do not even read them
    if HAS_ROPE:
        # Angles do not depend on the head: f0..f2 hold each pair's frequency per axis.
        f0, f1, f2 = _freqs(FREQ, HEAD_DIM, BLOCK_H)
        # Q is rotated once, here (with ROPE_K 2 from the same cos/sin table as K).
        q = _rope_tile(q_rows, q_ok, Ch + offs_m * stride_ct, f0, f1, f2, stride_cd,
                       HEAD_DIM, BLOCK_H, INTERLEAVED, ROPE_K == 2, FAST_TRIG, dt)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        f0 = tl.zeros([BLOCK_H], dtype=tl.float32)
        f1 = f0
        f2 = f0

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_MASK:
        # [lo, hi): first real key to last real key + 1; contiguous: every key in between is real.
        lo = tl.load(KV_RANGE + bid * 3)
        hi = tl.load(KV_RANGE + bid * 3 + 1)
        contiguous = tl.load(KV_RANGE + bid * 3 + 2)
        if contiguous != 0:
            acc, l_i, m_i = _attn_span(
                acc, l_i, m_i, q, f0, f1, f2, Kh, Vh, Ch, Mrow, lo, hi, qk_scale,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, False, FAST_TRIG, IEEE_DOT,
                ROPE_K, BLOCK_N_TAIL,
            )
        else:
            acc, l_i, m_i = _attn_span(
                acc, l_i, m_i, q, f0, f1, f2, Kh, Vh, Ch, Mrow, lo, hi, qk_scale,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, True, FAST_TRIG, IEEE_DOT,
                ROPE_K, BLOCK_N_TAIL,
            )
    else:
        acc, l_i, m_i = _attn_span(
            acc, l_i, m_i, q, f0, f1, f2, Kh, Vh, Ch, Mrow, 0, len_k, qk_scale,
            stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
            HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, False, FAST_TRIG, IEEE_DOT,
            ROPE_K, BLOCK_N_TAIL,
        )

    # Rows that saw no real key have l_i == 0 and acc == 0: they come out as zeros, not NaN.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if ZERO_PAD_Q:
        out = tl.where(q_real[:, None], out, 0.0)
    # Output pointers are built only now: a (BLOCK_M, BLOCK_D) block of 64-bit addresses kept live
    # across the loop would cost ~128 registers per thread.
    tl.store(
        Oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    if STORE_LSE:
        # For the backward: natural-log log-sum-exp of the scaled scores (m_i, l_i are base 2). Rows
        # with no real key store -inf; the backward never reads them (nor skipped padded rows).
        has_key = l_i > 0.0
        lse = (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453
        tl.store(Lh + offs_m * stride_lt, tl.where(has_key, lse, float("-inf")), mask=m_ok)


@triton.jit
def _pass_cs(C, FREQ, seqlen, stride_cb, stride_ct, stride_cd,
             HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, FAST_TRIG: tl.constexpr):
    """The per-forward passes' common prologue, for the program (BLOCK_T tokens, batch row):
    (batch row as int64, token offsets, which are in range, cos, sin) of those tokens' angles."""
    b64 = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < seqlen
    f0, f1, f2 = _freqs(FREQ, HEAD_DIM, BLOCK_H)
    c, s = _angles_cs(C + b64 * stride_cb + offs_t * stride_ct, t_ok, f0, f1, f2, stride_cd, FAST_TRIG)
    return b64, offs_t, t_ok, c, s


@triton.jit
def rope_rotate(
    X, C, FREQ, OUT,
    seqlen, nheads,
    stride_xb, stride_xt, stride_xh,
    stride_cb, stride_ct, stride_cd,
    stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """ROPE_K 1's per-forward pass: X (batch, seqlen, heads, HEAD_DIM) rotated into OUT (batch, seqlen,
    heads, 2 * BLOCK_H), laid out as ``_rope_tile`` returns it. One program per (BLOCK_T tokens, batch
    row); cos/sin computed once for all heads."""
    b64, offs_t, t_ok, c, s = _pass_cs(C, FREQ, seqlen, stride_cb, stride_ct, stride_cd,
                                       HEAD_DIM, BLOCK_T, BLOCK_H, FAST_TRIG)
    offs_r = tl.arange(0, 2 * BLOCK_H)
    dt = OUT.dtype.element_ty
    for h in range(nheads):
        xa, xb = _load_pairs(X + b64 * stride_xb + h * stride_xh + offs_t[:, None] * stride_xt, t_ok,
                             HEAD_DIM, BLOCK_H, INTERLEAVED)
        r = tl.reshape(tl.join((xa * c - xb * s).to(dt), (xa * s + xb * c).to(dt)), (BLOCK_T, 2 * BLOCK_H))
        tl.store(OUT + b64 * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_r[None, :], r,
                 mask=t_ok[:, None])


@triton.jit
def rope_table(
    C, FREQ, OUT,
    seqlen,
    stride_cb, stride_ct, stride_cd,
    stride_ob, stride_ot, stride_os,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """ROPE_K 2's per-forward pass: OUT[b, t, 0, :] = cos, OUT[b, t, 1, :] = sin (float32, BLOCK_H wide;
    pairs past HEAD_DIM / 2 get cos 1, sin 0) of each token's angles. One program per (BLOCK_T tokens,
    batch row of distinct coordinates)."""
    b64, offs_t, t_ok, c, s = _pass_cs(C, FREQ, seqlen, stride_cb, stride_ct, stride_cd,
                                       HEAD_DIM, BLOCK_T, BLOCK_H, FAST_TRIG)
    offs_h = tl.arange(0, BLOCK_H)
    op = OUT + b64 * stride_ob + offs_t[:, None] * stride_ot + offs_h[None, :]
    tl.store(op, c, mask=t_ok[:, None])
    tl.store(op + stride_os, s, mask=t_ok[:, None])


# Autotuning (CUDA only): one small config set per class of problem, picked on the host (no
# prune hook, which torch.compile's handling of user kernels may not honour). Configs are checked
# for register spills, built as a launch builds them, by tests/_build_for_gpu.py (sm_90, every ROPE_K
# candidate on the frame and temporal shapes). Large BLOCK_M first where it fits: each program
# rotates (or reads cos/sin for) its K tiles, so taller query blocks amortize that over more rows.
CONFIG_SETS = {
    # one or a few queries per row (attention pooling; short temporal clips)
    "q16": [(16, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 3), (16, 64, 8, 3)],
    "q32": [(32, 32, 4, 3), (16, 32, 4, 3), (64, 32, 8, 3)],
    "d64": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
    # head_dim 96/128: the K tile's rotation temporaries (4 fp32 (BLOCK_N, head_dim/2) arrays)
    # dominate registers, so narrow K tiles and 8 warps
    "d128": [(128, 32, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
    "d256": [(64, 32, 8, 2), (64, 16, 8, 2), (64, 16, 4, 2), (32, 16, 8, 2)],
    # float32 inputs use full-precision (non tensor-core) dots: small tiles only
    "f32": [(32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2), (64, 16, 8, 2)],
}
_TUNED = {}
# The autotuning key: per-segment lengths bucketed to powers of two (not the token count), so 64 and
# 256 frames of 577 tokens share one tuning; dtypes are added by Triton.
TUNING_KEY = ["HEAD_DIM", "bucket_q", "bucket_k", "HAS_ROPE", "IS_PACKED", "HAS_MASK", "ROPE_K"]


def tuned_kernel(name: str):
    """The kernel autotuned over config set ``name`` (built once per set)."""
    if name not in _TUNED:
        _TUNED[name] = triton.autotune(
            configs=[
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in CONFIG_SETS[name]
            ],
            key=TUNING_KEY,  # (ROPE_K: the candidates tune apart)
            # Tuned configs persist in Triton's cache dir, keyed by kernel source, key values and configs:
            # a new process (or a new batch size in the same bucket) does not tune again.
            cache_results=True,
        )(rope_attn_fwd)
    return _TUNED[name]


def config_set(bucket_q: int, block_d: int, fp32: bool) -> str:
    """Which of CONFIG_SETS a launch autotunes over."""
    if fp32:
        return "f32"
    if bucket_q <= 16:
        return "q16"
    if bucket_q <= 32:
        return "q32"
    return "d64" if block_d <= 64 else "d128" if block_d <= 128 else "d256"


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
