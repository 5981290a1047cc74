"""Triton kernels of the backward of :func:`pevideo_kernels.rope_attention` (FlashAttention-2 style).

Imports Triton unconditionally; only the host side (:mod:`._rope_attention_launch`) imports it.
Two kernels, launched in this order:

* ``rope_attn_bwd_dq``: one program per (query block, segment or batch row) x query head. Computes
  ``delta = rowsum(dO * O)`` for its rows (stored for the second kernel: FlashAttention-2's
  "preprocess", fused here since the program reads dO anyway), then streams the K/V tiles of its
  segment and accumulates ``dQ``.
* ``rope_attn_bwd_dkdv``: one program per (key block, segment or batch row) x kv head. Keeps its
  rotated K tile and V tile and streams the query blocks of every query head of its group (GQA: dK/dV
  sum over the group without atomics), accumulating ``dK`` and ``dV``.

With RoPE both read q and k rotated by one pass before them (the forward's ``rope_rotate``: the very
angles and rounding the forward multiplied, pairs interleaved so that every product is one dot over the
whole head_dim) from scratch buffers that live only during the backward; their loops are then plain
attention backward loops (rotating tiles inside them held ~100 registers more per thread: spills from
head_dim 80 up). They take the probabilities from the saved log-sum-exp, work in the rotated frame, and
rotate dQ and dK back (the transpose of the rotation, cos/sin from the coordinates) as they write them.
Nothing rotated is saved between forward and backward.

Tiles (host side, ``_rope_attention_tuning.bwd_configs``): the score tile has 128 rows (queries for dQ,
keys for dK/dV) on 8 warps -- two warpgroups of 64 rows -- or 64 rows on 4 warps, so that no score is
held (and exponentiated) twice; the build check counts the exp2 per score in the SASS.

Masking mirrors the forward: packed segments never read past their segment; in padded mode a
program reads keys only in the row's [first real key, last real key] span (and the mask inside it
when the real keys are not one run), so tiles of padding are never loaded; with ZERO_PAD_Q padded
query rows are neither read nor given any gradient. Rows that see no real key get zero gradients.
64-bit offsets as in the forward: block starts in 64-bit bases, offsets inside a tile 32-bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The forward's own rotation (the backward must rotate by the very angles the forward used), angles,
# dot, and per-(segment or batch row) start.
from ._rope_attention_triton import _angles_cs, _dot, _freqs, _row_start

__all__ = ["rope_attn_bwd_dq", "rope_attn_bwd_dkdv"]


@triton.jit
def _load_tile(rows, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
               HAS_ROPE: tl.constexpr):
    """A q or k tile (row pointers ``rows``, rows ``ok``): with RoPE from the rotated scratch buffer,
    (rows, 2 * BLOCK_H) with pairs interleaved (zeros past head_dim); without, (rows, BLOCK_D)."""
    if HAS_ROPE:
        ow = tl.arange(0, 2 * BLOCK_H)
        x = tl.load(rows + ow[None, :], mask=ok[:, None], other=0.0)
    else:
        od = tl.arange(0, BLOCK_D)
        x = tl.load(rows + od[None, :], mask=ok[:, None] & (od < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_grad(
    rows, c_rows, ok, c_ok, g, FREQ, stride_cd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """Write a float32 gradient tile ``g`` (row pointers ``rows``, rows ``ok``), rotating it back first:
    ``g`` holds the gradients of the rotated pair halves interleaved, R^T turns them into the gradient of
    x. Only rows ``c_ok`` (the real ones; the others hold zeros) read their coordinates."""
    ty = rows.dtype.element_ty
    if HAS_ROPE:
        ga, gb = tl.split(tl.reshape(g, (g.shape[0], BLOCK_H, 2)))
        f0, f1, f2 = _freqs(FREQ, HEAD_DIM, BLOCK_H)  # (loaded here: nothing kept live across the loop)
        c, s = _angles_cs(c_rows, c_ok, f0, f1, f2, stride_cd, FAST_TRIG)
        xa = ga * c + gb * s
        xb = gb * c - ga * s
        if INTERLEAVED:
            o2 = tl.arange(0, 2 * BLOCK_H)
            x = tl.reshape(tl.join(xa, xb), (xa.shape[0], 2 * BLOCK_H))
            tl.store(rows + o2[None, :], x.to(ty), mask=ok[:, None] & (o2 < HEAD_DIM)[None, :])
        else:
            oh = tl.arange(0, BLOCK_H)
            m = ok[:, None] & (oh < HEAD_DIM // 2)[None, :]
            tl.store(rows + oh[None, :], xa.to(ty), mask=m)
            tl.store(rows + HEAD_DIM // 2 + oh[None, :], xb.to(ty), mask=m)
    else:
        od = tl.arange(0, BLOCK_D)
        tl.store(rows + od[None, :], g.to(ty), mask=ok[:, None] & (od < HEAD_DIM)[None, :])


@triton.jit
def _store_zeros(rows, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    od = tl.arange(0, BLOCK_D)
    tl.store(rows + od[None, :], tl.zeros([rows.shape[0], BLOCK_D], dtype=rows.dtype.element_ty),
             mask=ok[:, None] & (od < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------
# dQ (and delta)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, q_ok,
    Kh, Vh, Mrow, start_n, hi, qk2,
    stride_kt, stride_vt, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, LOAD_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """Keys [start_n, start_n + BLOCK_N) ∩ [.., hi) (and the mask's real keys with LOAD_MASK)."""
    dt = Kh.dtype.element_ty
    n64 = tl.cast(start_n, tl.int64)  # (a plain int when the interpreter runs the loop)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = (start_n + offs_n) < hi
    if LOAD_MASK:
        real = tl.load(Mrow + n64 * stride_mt + offs_n * stride_mt, mask=n_ok, other=0)
        n_ok = n_ok & (real != 0)
    k = _load_tile(Kh + n64 * stride_kt + offs_n[:, None] * stride_kt, n_ok, HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE)
    qk = _dot(q, tl.trans(k), None, IEEE_DOT)
    p = tl.where(q_ok[:, None] & n_ok[None, :], tl.math.exp2(qk * qk2 - lse2[:, None]), 0.0)
    od = tl.arange(0, BLOCK_D)
    v = tl.load(Vh + n64 * stride_vt + offs_n[:, None] * stride_vt + od[None, :],
                mask=n_ok[:, None] & (od < HEAD_DIM)[None, :], other=0.0)
    dp = _dot(do, tl.trans(v), None, IEEE_DOT)
    ds = (p * (dp - delta[:, None])).to(dt)
    return _dot(ds, k, dq, IEEE_DOT)


@triton.jit
def rope_attn_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, C, FREQ, CU, MASK, KV_RANGE,  # (with RoPE, Q and K: the rotated scratch)
    seqlen_q, seqlen_k, heads_per_kv, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lt, stride_lh,
    stride_eb, stride_et, stride_eh,
    stride_gb, stride_gt, stride_gh,
    stride_cb, stride_ct, stride_cd,
    stride_mb, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, IS_PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr, ZERO_PAD_Q: tl.constexpr, FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    bid = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    kv_head = head // heads_per_kv
    # (packed: the host passes token strides as the *b strides, row0 is the segment's first token)
    row0, len_q, len_k = _row_start(CU, bid, seqlen_q, seqlen_k, IS_PACKED)
    if IS_PACKED:
        if start_m >= len_q:  # past this segment's end: those rows belong to another program
            return
    m64 = start_m.to(tl.int64)
    Qh = Q + row0 * stride_qb + m64 * stride_qt + head * stride_qh
    Kh = K + row0 * stride_kb + kv_head * stride_kh
    Vh = V + row0 * stride_vb + kv_head * stride_vh
    Oh = O + row0 * stride_ob + m64 * stride_ot + head * stride_oh
    DOh = DO + row0 * stride_dob + m64 * stride_dot + head * stride_doh
    Lh = LSE + row0 * stride_lb + m64 * stride_lt + head * stride_lh
    Eh = DELTA + row0 * stride_eb + m64 * stride_et + head * stride_eh
    Gh = DQ + row0 * stride_gb + m64 * stride_gt + head * stride_gh
    Ch = C + row0 * stride_cb
    Cq = Ch + m64 * stride_ct
    Mrow = MASK + bid.to(tl.int64) * stride_mb

    offs_r = tl.arange(0, BLOCK_M)
    g_rows = Gh + offs_r[:, None] * stride_gt
    m_ok = (start_m + offs_r) < len_q
    q_ok = m_ok
    if ZERO_PAD_Q:
        q_ok = q_ok & (tl.load(Mrow + m64 * stride_mt + offs_r * stride_mt, mask=m_ok, other=0) != 0)
        if tl.max(q_ok.to(tl.int32), 0) == 0:  # a block of padded queries: zero gradient, no reads
            _store_zeros(g_rows, m_ok, HEAD_DIM, BLOCK_D)
            return
    if HAS_MASK:
        lo = tl.load(KV_RANGE + bid * 3)
        hi = tl.load(KV_RANGE + bid * 3 + 1)
        contiguous = tl.load(KV_RANGE + bid * 3 + 2)
    else:
        lo = 0
        hi = len_k
        contiguous = 1
    if hi <= lo:  # no real key: zero gradient (the output was zeros, independent of q)
        _store_zeros(g_rows, m_ok, HEAD_DIM, BLOCK_D)
        return

    # delta = rowsum(dO * O) in float32; stored for the dK/dV kernel.
    od = tl.arange(0, BLOCK_D)
    dmask = q_ok[:, None] & (od < HEAD_DIM)[None, :]
    do = tl.load(DOh + offs_r[:, None] * stride_dot + od[None, :], mask=dmask, other=0.0)
    o = tl.load(Oh + offs_r[:, None] * stride_ot + od[None, :], mask=dmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Eh + offs_r * stride_et, delta, mask=q_ok)
    lse2 = tl.load(Lh + offs_r * stride_lt, mask=q_ok, other=0.0) * 1.4426950408889634
    qk2 = sm_scale * 1.4426950408889634

    if HAS_ROPE:
        dq = tl.zeros([BLOCK_M, 2 * BLOCK_H], dtype=tl.float32)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q = _load_tile(Qh + offs_r[:, None] * stride_qt, q_ok, HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE)
    if contiguous != 0:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, lse2, delta, q_ok, Kh, Vh, Mrow, start_n, hi, qk2, stride_kt, stride_vt, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, False, IEEE_DOT,
            )
    else:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, lse2, delta, q_ok, Kh, Vh, Mrow, start_n, hi, qk2, stride_kt, stride_vt, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, True, IEEE_DOT,
            )
    # Padded query rows (ZERO_PAD_Q) have p == 0 throughout, so their dq is 0.
    _store_grad(g_rows, Cq + offs_r * stride_ct, m_ok, q_ok, dq * sm_scale, FREQ, stride_cd,
                HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)


# ----------------------------------------------------------------------------------------------
# dK, dV
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_tile(
    dk, dv, k, v, n_ok,
    Qh, DOh, Lh, Eh, Mrow, start_m, len_q, qk2,
    stride_qt, stride_dot, stride_lt, stride_et, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, ZERO_PAD_Q: tl.constexpr, IEEE_DOT: tl.constexpr, PART: tl.constexpr,
):
    """Queries [start_m, start_m + BLOCK_M) of one head against this program's K/V tile; scores are
    computed transposed (keys on rows) so that dK and dV accumulate without transposing p. PART: 0
    both, 1 dV only, 2 dK only."""
    dt = Qh.dtype.element_ty
    m64 = tl.cast(start_m, tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    q_ok = (start_m + offs_r) < len_q
    run = True
    if ZERO_PAD_Q:
        q_ok = q_ok & (tl.load(Mrow + m64 * stride_mt + offs_r * stride_mt, mask=q_ok, other=0) != 0)
        run = tl.max(q_ok.to(tl.int32), 0) > 0  # a block of padded queries only is not read
    if run:
        q = _load_tile(Qh + m64 * stride_qt + offs_r[:, None] * stride_qt, q_ok, HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE)
        od = tl.arange(0, BLOCK_D)
        do = tl.load(DOh + m64 * stride_dot + offs_r[:, None] * stride_dot + od[None, :],
                     mask=q_ok[:, None] & (od < HEAD_DIM)[None, :], other=0.0)
        lse2 = tl.load(Lh + m64 * stride_lt + offs_r * stride_lt, mask=q_ok, other=0.0) * 1.4426950408889634
        kq = _dot(k, tl.trans(q), None, IEEE_DOT)  # (BLOCK_N, BLOCK_M)
        pt = tl.where(n_ok[:, None] & q_ok[None, :], tl.math.exp2(kq * qk2 - lse2[None, :]), 0.0)
        if PART != 2:
            dv = _dot(pt.to(dt), do, dv, IEEE_DOT)
        if PART != 1:
            delta = tl.load(Eh + m64 * stride_et + offs_r * stride_et, mask=q_ok, other=0.0)
            dpt = _dot(v, tl.trans(do), None, IEEE_DOT)
            dst = (pt * (dpt - delta[None, :])).to(dt)
            dk = _dot(dst, q, dk, IEEE_DOT)
    return dk, dv


@triton.jit
def rope_attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, C, FREQ, CU, MASK, KV_RANGE,  # (with RoPE, Q and K: the rotated scratch)
    seqlen_q, seqlen_k, heads_per_kv, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lt, stride_lh,
    stride_eb, stride_et, stride_eh,
    stride_gkb, stride_gkt, stride_gkh,
    stride_gvb, stride_gvt, stride_gvh,
    stride_cb, stride_ct, stride_cd,
    stride_mb, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, IS_PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr, ZERO_PAD_Q: tl.constexpr, FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
    PART: tl.constexpr,
):
    # PART 0: dK and dV; 1: dV only, 2: dK only -- large head_dims run the two halves as two launches, so
    # that one program's accumulators (BLOCK_N x head_dim in float32 each) fit in registers.
    pid = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    bid = pid // num_n
    start_n = (pid % num_n) * BLOCK_N
    row0, len_q, len_k = _row_start(CU, bid, seqlen_q, seqlen_k, IS_PACKED)  # (as in the dQ kernel)
    if IS_PACKED:
        if start_n >= len_k:
            return
    n64 = start_n.to(tl.int64)
    Qb = Q + row0 * stride_qb
    Kh = K + row0 * stride_kb + n64 * stride_kt + kv_head * stride_kh
    Vh = V + row0 * stride_vb + n64 * stride_vt + kv_head * stride_vh
    DOb = DO + row0 * stride_dob
    Lb = LSE + row0 * stride_lb
    Eb = DELTA + row0 * stride_eb
    GKh = DK + row0 * stride_gkb + n64 * stride_gkt + kv_head * stride_gkh
    GVh = DV + row0 * stride_gvb + n64 * stride_gvt + kv_head * stride_gvh
    Ch = C + row0 * stride_cb
    Ck = Ch + n64 * stride_ct
    Mrow = MASK + bid.to(tl.int64) * stride_mb

    offs_c = tl.arange(0, BLOCK_N)  # this program's keys, from start_n
    gk_rows = GKh + offs_c[:, None] * stride_gkt
    gv_rows = GVh + offs_c[:, None] * stride_gvt
    offs_n = start_n + offs_c
    in_seq = offs_n < len_k
    n_ok = in_seq
    q_lo = 0
    q_hi = len_q
    if HAS_MASK:
        lo = tl.load(KV_RANGE + bid * 3)
        hi = tl.load(KV_RANGE + bid * 3 + 1)
        contiguous = tl.load(KV_RANGE + bid * 3 + 2)
        n_ok = n_ok & (offs_n >= lo) & (offs_n < hi)
        if contiguous == 0:
            n_ok = n_ok & (tl.load(Mrow + n64 * stride_mt + offs_c * stride_mt, mask=n_ok, other=0) != 0)
        if ZERO_PAD_Q:  # the same mask marks the real queries: all of them lie in [lo, hi)
            q_lo = (lo // BLOCK_M) * BLOCK_M
            q_hi = hi
    if tl.max(n_ok.to(tl.int32), 0) == 0:  # padding keys only: zero gradient, nothing read
        if PART != 1:
            _store_zeros(gk_rows, in_seq, HEAD_DIM, BLOCK_D)
        if PART != 2:
            _store_zeros(gv_rows, in_seq, HEAD_DIM, BLOCK_D)
        return

    if PART == 1:
        dk = tl.zeros([16, 16], dtype=tl.float32)  # (unused)
    elif HAS_ROPE:
        dk = tl.zeros([BLOCK_N, 2 * BLOCK_H], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if PART == 2:
        dv = tl.zeros([16, 16], dtype=tl.float32)  # (unused)
    else:
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    k = _load_tile(Kh + offs_c[:, None] * stride_kt, n_ok, HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE)
    od = tl.arange(0, BLOCK_D)
    v = tl.load(Vh + offs_c[:, None] * stride_vt + od[None, :], mask=n_ok[:, None] & (od < HEAD_DIM)[None, :],
                other=0.0)
    qk2 = sm_scale * 1.4426950408889634
    # GQA: the query heads of this kv head's group, one after the other (no atomics).
    for g in range(0, heads_per_kv):
        head = kv_head * heads_per_kv + g
        Qh = Qb + head * stride_qh
        DOh = DOb + head * stride_doh
        Lh = Lb + head * stride_lh
        Eh = Eb + head * stride_eh
        for start_m in range(q_lo, q_hi, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, n_ok, Qh, DOh, Lh, Eh, Mrow, start_m, len_q, qk2,
                stride_qt, stride_dot, stride_lt, stride_et, stride_mt,
                HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_H, HAS_ROPE, ZERO_PAD_Q, IEEE_DOT, PART,
            )
    if PART != 2:
        tl.store(gv_rows + od[None, :], dv.to(DV.dtype.element_ty), mask=in_seq[:, None] & (od < HEAD_DIM)[None, :])
    if PART != 1:
        _store_grad(gk_rows, Ck + offs_c * stride_ct, in_seq, n_ok, dk * sm_scale, FREQ, stride_cd,
                    HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)
