"""Triton kernels of the backward of :func:`pevideo_kernels.rope_attention` (FlashAttention-2 style).

Imports Triton unconditionally; :mod:`.rope_attention_bwd` imports it inside a guarded try.
Two kernels, launched in this order by :func:`pevideo_kernels.rope_attention_bwd.rope_attention_bwd`:

* ``rope_attn_bwd_dq``: one program per (query block, segment or batch row) x query head. Computes
  ``delta = rowsum(dO * O)`` for its rows (stored for the second kernel: this is FlashAttention-2's
  "preprocess", fused here since the program reads dO anyway), then streams the K/V tiles of its
  segment and accumulates ``dQ``.
* ``rope_attn_bwd_dkdv``: one program per (key block, segment or batch row) x kv head. Keeps its
  rotated K tile and V tile in registers and streams the query blocks of every query head of its
  group (GQA: dK/dV sum over the group without atomics), accumulating ``dK`` and ``dV``.

Both recompute the rotated q/k tiles from coords x freqs exactly as the forward does (float32 angles
summed term by term, rotated in float32, rounded to the input dtype), take the probabilities from the
saved log-sum-exp, work in the rotated frame, and rotate dQ and dK back (the transpose of the
rotation) before writing them: no rotated q/k tensor exists anywhere.

Masking mirrors the forward: packed segments never read past their segment; in padded mode a
program reads keys only in the row's [first real key, last real key] span (and the mask inside it
when the real keys are not one run), so tiles of padding are never loaded; with ZERO_PAD_Q padded
query rows are neither read nor given any gradient. Rows that see no real key get zero gradients.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The forward's own angles and cos/sin (the backward must rotate by the very angles the forward used),
# dot, and per-(segment or batch row) start.
from ._rope_attention_triton import _angles_cs, _dot, _freqs, _row_start

__all__ = ["rope_attn_bwd_dq", "rope_attn_bwd_dkdv"]


@triton.jit
def _load_tile(
    Xh, Ch, offs, ok, f0, f1, f2, stride_xt, stride_ct, stride_cd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """Rows ``offs`` of a q or k tile, rotated, in the input dtype, as two halves (a, b) of the RoPE
    pairs, (rows, BLOCK_H) each. Without RoPE: the plain (rows, BLOCK_D) tile, twice."""
    dt = Xh.dtype.element_ty
    rows = Xh + offs[:, None] * stride_xt
    if HAS_ROPE:
        c, s = _angles_cs(Ch + offs * stride_ct, ok, f0, f1, f2, stride_cd, FAST_TRIG)
        if INTERLEAVED:
            o2 = tl.arange(0, 2 * BLOCK_H)
            x = tl.load(rows + o2[None, :], mask=ok[:, None] & (o2 < HEAD_DIM)[None, :], other=0.0)
            xa, xb = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], BLOCK_H, 2)))
        else:
            oh = tl.arange(0, BLOCK_H)
            m = ok[:, None] & (oh < HEAD_DIM // 2)[None, :]
            xa = tl.load(rows + oh[None, :], mask=m, other=0.0).to(tl.float32)
            xb = tl.load(rows + HEAD_DIM // 2 + oh[None, :], mask=m, other=0.0).to(tl.float32)
        # Rotate in float32, round to the input dtype: what the forward multiplied.
        ra = (xa * c - xb * s).to(dt)
        rb = (xa * s + xb * c).to(dt)
    else:
        od = tl.arange(0, BLOCK_D)
        ra = tl.load(rows + od[None, :], mask=ok[:, None] & (od < HEAD_DIM)[None, :], other=0.0)
        rb = ra
    return ra, rb


@triton.jit
def _store_grad(
    Gh, Ch, offs, ok, c_ok, ga, gb, f0, f1, f2, stride_gt, stride_ct, stride_cd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """Write a gradient tile of rows ``offs`` (mask ``ok``), rotating it back first: (ga, gb) are the
    float32 gradients of the rotated pair halves, R^T turns them into the gradient of x. Only rows
    ``c_ok`` (the real ones; the others hold zeros) read their coordinates."""
    ty = Gh.dtype.element_ty
    rows = Gh + offs[:, None] * stride_gt
    if HAS_ROPE:
        c, s = _angles_cs(Ch + offs * stride_ct, c_ok, f0, f1, f2, stride_cd, FAST_TRIG)
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
        tl.store(rows + od[None, :], ga.to(ty), mask=ok[:, None] & (od < HEAD_DIM)[None, :])


@triton.jit
def _store_zeros(Gh, offs, ok, stride_gt, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    od = tl.arange(0, BLOCK_D)
    tl.store(
        Gh + offs[:, None] * stride_gt + od[None, :],
        tl.zeros([offs.shape[0], BLOCK_D], dtype=Gh.dtype.element_ty),
        mask=ok[:, None] & (od < HEAD_DIM)[None, :],
    )


# ----------------------------------------------------------------------------------------------
# dQ (and delta)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_tile(
    dqa, dqb, qa, qb, do, lse2, delta, q_ok, f0, f1, f2,
    Kh, Vh, Ch, Mrow, start_n, hi, qk2,
    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, LOAD_MASK: tl.constexpr,
    FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """Keys [start_n, start_n + BLOCK_N) ∩ [.., hi) (and the mask's real keys with LOAD_MASK)."""
    dt = Kh.dtype.element_ty
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    if LOAD_MASK:
        real = tl.load(Mrow + offs_n * stride_mt, mask=n_ok, other=0)
        n_ok = n_ok & (real != 0)
    ka, kb = _load_tile(Kh, Ch, offs_n, n_ok, f0, f1, f2, stride_kt, stride_ct, stride_cd,
                        HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)
    qk = _dot(qa, tl.trans(ka), None, IEEE_DOT)
    if HAS_ROPE:
        qk = _dot(qb, tl.trans(kb), qk, IEEE_DOT)
    ok = q_ok[:, None] & n_ok[None, :]
    p = tl.where(ok, tl.math.exp2(qk * qk2 - lse2[:, None]), 0.0)
    od = tl.arange(0, BLOCK_D)
    v = tl.load(Vh + offs_n[:, None] * stride_vt + od[None, :],
                mask=n_ok[:, None] & (od < HEAD_DIM)[None, :], other=0.0)
    dp = _dot(do, tl.trans(v), None, IEEE_DOT)
    ds = (p * (dp - delta[:, None])).to(dt)
    dqa = _dot(ds, ka, dqa, IEEE_DOT)
    if HAS_ROPE:
        dqb = _dot(ds, kb, dqb, IEEE_DOT)
    return dqa, dqb


@triton.jit
def rope_attn_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, C, FREQ, CU, MASK, KV_RANGE,
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
    head = tl.program_id(1)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    bid = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    kv_head = head // heads_per_kv
    # (packed: the host passes token strides as the *b strides, row0 is the segment's first token)
    row0, len_q, len_k = _row_start(CU, bid, seqlen_q, seqlen_k, IS_PACKED)
    if IS_PACKED:
        if start_m >= len_q:  # past this segment's end: those rows belong to another program
            return
    Qh = Q + row0 * stride_qb + head * stride_qh
    Kh = K + row0 * stride_kb + kv_head * stride_kh
    Vh = V + row0 * stride_vb + kv_head * stride_vh
    Oh = O + row0 * stride_ob + head * stride_oh
    DOh = DO + row0 * stride_dob + head * stride_doh
    Lh = LSE + row0 * stride_lb + head * stride_lh
    Eh = DELTA + row0 * stride_eb + head * stride_eh
    Gh = DQ + row0 * stride_gb + head * stride_gh
    Ch = C + row0 * stride_cb
    Mrow = MASK + bid.to(tl.int64) * stride_mb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < len_q
    q_ok = m_ok
    if ZERO_PAD_Q:
        q_ok = q_ok & (tl.load(Mrow + offs_m * stride_mt, mask=m_ok, other=0) != 0)
        if tl.max(q_ok.to(tl.int32), 0) == 0:  # a block of padded queries: zero gradient, no reads
            _store_zeros(Gh, offs_m, m_ok, stride_gt, HEAD_DIM, BLOCK_D)
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
        _store_zeros(Gh, offs_m, m_ok, stride_gt, HEAD_DIM, BLOCK_D)
        return

    # delta = rowsum(dO * O) in float32; stored for the dK/dV kernel.
    od = tl.arange(0, BLOCK_D)
    dmask = q_ok[:, None] & (od < HEAD_DIM)[None, :]
    do = tl.load(DOh + offs_m[:, None] * stride_dot + od[None, :], mask=dmask, other=0.0)
    o = tl.load(Oh + offs_m[:, None] * stride_ot + od[None, :], mask=dmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Eh + offs_m * stride_et, delta, mask=q_ok)
    lse2 = tl.load(Lh + offs_m * stride_lt, mask=q_ok, other=0.0) * 1.4426950408889634
    qk2 = sm_scale * 1.4426950408889634

    if HAS_ROPE:
        f0, f1, f2 = _freqs(FREQ, HEAD_DIM, BLOCK_H)
        dqa = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    else:
        f0 = tl.zeros([BLOCK_H], dtype=tl.float32)
        f1 = f0
        f2 = f0
        dqa = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dqb = dqa
    qa, qb = _load_tile(Qh, Ch, offs_m, q_ok, f0, f1, f2, stride_qt, stride_ct, stride_cd,
                        HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)
    if contiguous != 0:
        for start_n in range(lo, hi, BLOCK_N):
            dqa, dqb = _dq_tile(
                dqa, dqb, qa, qb, do, lse2, delta, q_ok, f0, f1, f2, Kh, Vh, Ch, Mrow, start_n, hi, qk2,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, False, FAST_TRIG, IEEE_DOT,
            )
    else:
        for start_n in range(lo, hi, BLOCK_N):
            dqa, dqb = _dq_tile(
                dqa, dqb, qa, qb, do, lse2, delta, q_ok, f0, f1, f2, Kh, Vh, Ch, Mrow, start_n, hi, qk2,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, True, FAST_TRIG, IEEE_DOT,
            )
    # Padded query rows (ZERO_PAD_Q) have p == 0 throughout, so their dq is 0.
    _store_grad(Gh, Ch, offs_m, m_ok, q_ok, dqa * sm_scale, dqb * sm_scale, f0, f1, f2,
                stride_gt, stride_ct, stride_cd, HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)


# ----------------------------------------------------------------------------------------------
# dK, dV
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_tile(
    dka, dkb, dv, ka, kb, v, n_ok, f0, f1, f2,
    Qh, DOh, Lh, Eh, Ch, Mrow, start_m, len_q, qk2,
    stride_qt, stride_dot, stride_lt, stride_et, stride_ct, stride_cd, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, ZERO_PAD_Q: tl.constexpr,
    FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """Queries [start_m, start_m + BLOCK_M) of one head against this program's K/V tile; scores are
    computed transposed (keys on rows) so that dK and dV accumulate without transposing p."""
    dt = Qh.dtype.element_ty
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_ok = offs_m < len_q
    run = True
    if ZERO_PAD_Q:
        q_ok = q_ok & (tl.load(Mrow + offs_m * stride_mt, mask=q_ok, other=0) != 0)
        run = tl.max(q_ok.to(tl.int32), 0) > 0  # a block of padded queries only is not read
    if run:
        qa, qb = _load_tile(Qh, Ch, offs_m, q_ok, f0, f1, f2, stride_qt, stride_ct, stride_cd,
                            HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)
        od = tl.arange(0, BLOCK_D)
        do = tl.load(DOh + offs_m[:, None] * stride_dot + od[None, :],
                     mask=q_ok[:, None] & (od < HEAD_DIM)[None, :], other=0.0)
        lse2 = tl.load(Lh + offs_m * stride_lt, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Eh + offs_m * stride_et, mask=q_ok, other=0.0)
        kq = _dot(ka, tl.trans(qa), None, IEEE_DOT)  # (BLOCK_N, BLOCK_M)
        if HAS_ROPE:
            kq = _dot(kb, tl.trans(qb), kq, IEEE_DOT)
        ok = n_ok[:, None] & q_ok[None, :]
        pt = tl.where(ok, tl.math.exp2(kq * qk2 - lse2[None, :]), 0.0)
        dv = _dot(pt.to(dt), do, dv, IEEE_DOT)
        dpt = _dot(v, tl.trans(do), None, IEEE_DOT)
        dst = (pt * (dpt - delta[None, :])).to(dt)
        dka = _dot(dst, qa, dka, IEEE_DOT)
        if HAS_ROPE:
            dkb = _dot(dst, qb, dkb, IEEE_DOT)
    return dka, dkb, dv


@triton.jit
def rope_attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, C, FREQ, CU, MASK, KV_RANGE,
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
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    bid = pid // num_n
    start_n = (pid % num_n) * BLOCK_N
    row0, len_q, len_k = _row_start(CU, bid, seqlen_q, seqlen_k, IS_PACKED)  # (as in the dQ kernel)
    if IS_PACKED:
        if start_n >= len_k:
            return
    Qb = Q + row0 * stride_qb
    Kh = K + row0 * stride_kb + kv_head * stride_kh
    Vh = V + row0 * stride_vb + kv_head * stride_vh
    DOb = DO + row0 * stride_dob
    Lb = LSE + row0 * stride_lb
    Eb = DELTA + row0 * stride_eb
    GKh = DK + row0 * stride_gkb + kv_head * stride_gkh
    GVh = DV + row0 * stride_gvb + kv_head * stride_gvh
    Ch = C + row0 * stride_cb
    Mrow = MASK + bid.to(tl.int64) * stride_mb

    offs_n = start_n + tl.arange(0, BLOCK_N)
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
            n_ok = n_ok & (tl.load(Mrow + offs_n * stride_mt, mask=n_ok, other=0) != 0)
        if ZERO_PAD_Q:  # the same mask marks the real queries: all of them lie in [lo, hi)
            q_lo = (lo // BLOCK_M) * BLOCK_M
            q_hi = hi
    if tl.max(n_ok.to(tl.int32), 0) == 0:  # padding keys only: zero gradient, nothing read
        _store_zeros(GKh, offs_n, in_seq, stride_gkt, HEAD_DIM, BLOCK_D)
        _store_zeros(GVh, offs_n, in_seq, stride_gvt, HEAD_DIM, BLOCK_D)
        return

    if HAS_ROPE:
        f0, f1, f2 = _freqs(FREQ, HEAD_DIM, BLOCK_H)
        dka = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    else:
        f0 = tl.zeros([BLOCK_H], dtype=tl.float32)
        f1 = f0
        f2 = f0
        dka = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dkb = dka
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ka, kb = _load_tile(Kh, Ch, offs_n, n_ok, f0, f1, f2, stride_kt, stride_ct, stride_cd,
                        HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)
    od = tl.arange(0, BLOCK_D)
    v = tl.load(Vh + offs_n[:, None] * stride_vt + od[None, :],
                mask=n_ok[:, None] & (od < HEAD_DIM)[None, :], other=0.0)
    qk2 = sm_scale * 1.4426950408889634
    # GQA: the query heads of this kv head's group, one after the other (no atomics).
    for g in range(0, heads_per_kv):
        head = kv_head * heads_per_kv + g
        Qh = Qb + head * stride_qh
        DOh = DOb + head * stride_doh
        Lh = Lb + head * stride_lh
        Eh = Eb + head * stride_eh
        for start_m in range(q_lo, q_hi, BLOCK_M):
            dka, dkb, dv = _dkdv_tile(
                dka, dkb, dv, ka, kb, v, n_ok, f0, f1, f2,
                Qh, DOh, Lh, Eh, Ch, Mrow, start_m, len_q, qk2,
                stride_qt, stride_dot, stride_lt, stride_et, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, ZERO_PAD_Q, FAST_TRIG, IEEE_DOT,
            )
    od = tl.arange(0, BLOCK_D)
    tl.store(GVh + offs_n[:, None] * stride_gvt + od[None, :], dv.to(DV.dtype.element_ty),
             mask=in_seq[:, None] & (od < HEAD_DIM)[None, :])
    _store_grad(GKh, Ch, offs_n, in_seq, n_ok, dka * sm_scale, dkb * sm_scale, f0, f1, f2,
                stride_gkt, stride_ct, stride_cd, HEAD_DIM, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, FAST_TRIG)
