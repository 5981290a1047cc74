"""The forward Triton kernels of :mod:`pevideo_kernels.rope_attention` (and the per-forward RoPE passes).

Imports Triton unconditionally; only the host side (:mod:`._rope_attention_launch`) imports it, and the
public module reaches that through one guarded import. ``tests/_build_for_gpu.py`` compiles these
kernels ahead of time with the arguments a launch passes.

Layout of the work: one program per (query block, segment or batch row) on grid axis 0 -- query
blocks of one segment are neighbours, so they share its K/V tiles in L2 -- and one per query head on
axis 1. Each program keeps its rotated Q tile in registers and streams K/V tiles of its segment
through an online softmax (FlashAttention-2). RoPE stays inside the op: angles come from the token
coordinates and the frequency table in float32; Q is rotated in each program's prologue, K as
``ROPE_K_MODES`` says (in the loop, from a per-forward scratch copy, or from a per-forward cos/sin
table). Rotated q and k tiles hold their pairs interleaved, so QKᵀ is one dot with K = head_dim. A
ragged last stretch of keys runs in narrow BLOCK_N_TAIL tiles.

64-bit offsets: a product of a token index and a stride passes 2^31 at ~700K packed tokens of a fused
qkv (stride 3072). Every block start (segment, query block, key tile, batch row, head) is folded into
a 64-bit base pointer; only offsets inside one tile (< 256 rows, the host keeps token strides below
``MAX_TOKEN_STRIDE``) stay 32-bit, so the inner loop's address math is not widened.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rope_attn_fwd", "rope_rotate", "rope_table"]


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
            real = tl.load(Mrow + n64 * stride_mt + offs_n * stride_mt, mask=n_ok, other=0)
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
    bucket_q, bucket_k, bucket_b,  # autotuning keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, IS_PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr, ZERO_PAD_Q: tl.constexpr, FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
    ROPE_K: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, STORE_LSE: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    bid = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    kv_head = head // heads_per_kv

    row0, len_q, len_k = _row_start(CU, bid, seqlen_q, seqlen_k, IS_PACKED)
    if IS_PACKED:
        if start_m >= len_q:  # past this segment's end (or an empty segment): nothing to do
            return
    m64 = start_m.to(tl.int64)
    # Bases at this program's first query row (64-bit); offsets inside the block stay 32-bit.
    Qh = Q + row0 * stride_qb + m64 * stride_qt + head * stride_qh
    Kh = K + row0 * stride_kb + kv_head * stride_kh
    Vh = V + row0 * stride_vb + kv_head * stride_vh
    Oh = O + row0 * stride_ob + m64 * stride_ot + head * stride_oh
    Lh = LSE + row0 * stride_lb + m64 * stride_lt + head * stride_lh
    Ch = C + row0 * stride_cb  # (K tiles' coordinates; the block's own: Cq)
    Cq = Ch + m64 * stride_ct
    Mrow = MASK + bid.to(tl.int64) * stride_mb

    offs_r = tl.arange(0, BLOCK_M)  # rows of the block
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = (start_m + offs_r) < len_q
    d_ok = offs_d < HEAD_DIM
    if ZERO_PAD_Q:
        # Self-attention with padding: padded query rows give zeros; a block of them exits here.
        q_real = tl.load(Mrow + m64 * stride_mt + offs_r * stride_mt, mask=m_ok, other=0) != 0
        if tl.max(q_real.to(tl.int32), 0) == 0:
            tl.store(
                Oh + offs_r[:, None] * stride_ot + offs_d[None, :],
                tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty),
                mask=m_ok[:, None] & d_ok[None, :],
            )
            return

    dt = Q.dtype.element_ty
    q_rows = Qh + offs_r[:, None] * stride_qt
    q_ok = m_ok
    if ZERO_PAD_Q:
        q_ok = q_ok & q_real  # padded rows are zeroed at the end; do not even read them
    if HAS_ROPE:
        # Angles do not depend on the head: f0..f2 hold each pair's frequency per axis.
        f0, f1, f2 = _freqs(FREQ, HEAD_DIM, BLOCK_H)
        # Q is rotated once, here (with ROPE_K 2 from the same cos/sin table as K).
        q = _rope_tile(q_rows, q_ok, Cq + offs_r * stride_ct, f0, f1, f2, stride_cd,
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
        Oh + offs_r[:, None] * stride_ot + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    if STORE_LSE:
        # For the backward: natural-log log-sum-exp of the scaled scores (m_i, l_i are base 2). Rows
        # with no real key store -inf; the backward never reads them (nor skipped padded rows).
        has_key = l_i > 0.0
        lse = (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453
        tl.store(Lh + offs_r * stride_lt, tl.where(has_key, lse, float("-inf")), mask=m_ok)


@triton.jit
def _pass_cs(C, FREQ, seqlen, stride_cb, stride_ct, stride_cd,
             HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, FAST_TRIG: tl.constexpr):
    """The per-forward passes' common prologue, for the program (BLOCK_T tokens, batch row): (batch row,
    first token -- both int64: packed, the token index runs over all tokens --, offsets of the block's
    tokens from it, which are in range, cos, sin) of those tokens' angles."""
    b64 = tl.program_id(1).to(tl.int64)
    t64 = tl.program_id(0).to(tl.int64) * BLOCK_T
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = (t64 + offs_t) < seqlen
    f0, f1, f2 = _freqs(FREQ, HEAD_DIM, BLOCK_H)
    c, s = _angles_cs(C + b64 * stride_cb + t64 * stride_ct + offs_t * stride_ct, t_ok, f0, f1, f2, stride_cd,
                      FAST_TRIG)
    return b64, t64, offs_t, t_ok, c, s


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
    b64, t64, offs_t, t_ok, c, s = _pass_cs(C, FREQ, seqlen, stride_cb, stride_ct, stride_cd,
                                            HEAD_DIM, BLOCK_T, BLOCK_H, FAST_TRIG)
    offs_r = tl.arange(0, 2 * BLOCK_H)
    dt = OUT.dtype.element_ty
    Xb = X + b64 * stride_xb + t64 * stride_xt
    Ob = OUT + b64 * stride_ob + t64 * stride_ot
    for h in range(nheads):
        h64 = tl.cast(h, tl.int64)
        xa, xb = _load_pairs(Xb + h64 * stride_xh + offs_t[:, None] * stride_xt, t_ok, HEAD_DIM, BLOCK_H, INTERLEAVED)
        r = tl.reshape(tl.join((xa * c - xb * s).to(dt), (xa * s + xb * c).to(dt)), (BLOCK_T, 2 * BLOCK_H))
        tl.store(Ob + h64 * stride_oh + offs_t[:, None] * stride_ot + offs_r[None, :], r, mask=t_ok[:, None])


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
    b64, t64, offs_t, t_ok, c, s = _pass_cs(C, FREQ, seqlen, stride_cb, stride_ct, stride_cd,
                                            HEAD_DIM, BLOCK_T, BLOCK_H, FAST_TRIG)
    offs_h = tl.arange(0, BLOCK_H)
    op = OUT + b64 * stride_ob + t64 * stride_ot + offs_t[:, None] * stride_ot + offs_h[None, :]
    tl.store(op, c, mask=t_ok[:, None])
    tl.store(op + stride_os, s, mask=t_ok[:, None])
