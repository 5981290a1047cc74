"""Backward of :func:`pevideo_kernels.rope_attention`: the launcher of the Triton kernels in
``_rope_attention_bwd_triton`` and the log-sum-exp the forward must save for them.

The backward needs only what a FlashAttention forward keeps: ``out`` and the per-row log-sum-exp
``lse``. Its convention (what the forward has to store):

* ``lse`` is float32 with shape ``q.shape[:-1]`` -- (tokens, heads) packed, (batch, seq_q, heads)
  padded or full -- any strides;
* natural log: ``lse[row, h] = log(sum_j exp(scale * <rope(q)[row, h], rope(k)[j, h // group]>))`` over
  the row's real keys (its segment; the mask's True keys), with rope(q), rope(k) the rotated vectors
  rounded to q's dtype, as the kernel multiplies them. In the forward's base-2 online softmax (scores
  scaled by ``scale * log2(e)``, running max ``m_i``, sum ``l_i``) that is
  ``lse = (m_i + log2(l_i)) * ln(2)``.
* Rows the forward does not compute are never read, so they may hold anything (-inf, NaN): rows with no
  real key, and padded query rows under ``skip_padded_queries``.

``coords`` and ``freqs`` get no gradient.
"""
from __future__ import annotations

import torch

from ._triton import LAUNCH, interpreting, runtime_reason
from .rope_attention import apply_rope_ref, rope_attention_check_args

try:  # the guarded import of the Triton side (as rope_attention's)
    from ._rope_attention_bwd_triton import rope_attn_bwd_dkdv, rope_attn_bwd_dq
    from ._rope_attention_launch import _shared_args
    BWD_KERNEL_MISSING: str | None = None
except Exception as exc:  # noqa: BLE001  ImportError, or a Triton these kernels can't be defined with
    BWD_KERNEL_MISSING = f"{type(exc).__name__}: {exc}"

__all__ = ["rope_attention_bwd", "rope_attention_lse_ref", "BWD_KERNEL_MISSING"]


def _gpu_configs(d: int, fp32: bool):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dQ kernel, the same of the dK/dV kernel) on CUDA.

    Picked without a GPU, as the largest tiles that ptxas (sm_90) compiles with no or few register
    spills; still to be tuned on a GPU. dQ programs own BLOCK_M queries, dK/dV programs BLOCK_N keys.
    """
    if fp32:
        return (64, 32, 8, 2), (32, 64, 8, 2)
    if d <= 64:
        return (64, 64, 8, 2), (64, 64, 8, 2)
    if d <= 128:
        return (32, 64, 8, 2), (64, 32, 8, 2)
    return (32, 32, 8, 2), (32, 32, 8, 2)


def _check_bwd_args(dout, q, k, v, out, lse, dq, dk, dv):
    lead = tuple(q.shape[:-1])
    for name, t, like in (("out", out, q), ("dout", dout, q)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != (*lead, v.shape[-1]):
            raise ValueError(f"{name} must have shape {(*lead, v.shape[-1])}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension; got strides {tuple(t.stride())}")
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != lead:
        raise ValueError(f"lse must be a float32 tensor of shape {lead} (q's shape without head_dim)")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(like.shape) or g.dtype != like.dtype:
            raise ValueError(f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)}")
        if g.device != q.device:
            raise ValueError(f"{name} is on {g.device} but q is on {q.device}")
        if g.numel() and g.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension; got strides {tuple(g.stride())}")


def rope_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    coords: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    rope_layout: str = "interleaved",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    skip_padded_queries: bool = False,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`rope_attention` for the incoming gradient ``dout``.

    ``q, k, v`` and every keyword up to ``skip_padded_queries`` are the forward's arguments, unchanged
    (any strides on the token and head dims). ``out`` is the forward's output and ``dout`` its
    gradient, both ``(*q.shape[:-1], head_dim)`` in q's dtype with a contiguous last dim; ``lse`` the
    forward's float32 natural-log log-sum-exp per (row, head), shape ``q.shape[:-1]`` (see the module
    docstring; :func:`rope_attention_lse_ref` computes it).

    ``dq, dk, dv``: optional preallocated outputs of q's, k's, v's shape and dtype, any strides with a
    contiguous last dim -- e.g. views of one qkv-shaped buffer when q, k, v are views of a fused qkv
    tensor, so the gradient lands in that layout directly. Every element of them is written. Otherwise
    they are allocated (contiguous). Returns ``(dq, dk, dv)``.

    Padded query rows under ``skip_padded_queries`` and rows with no real key get zero gradients.
    ``coords`` and ``freqs`` get none. Runs the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
    raises RuntimeError where they cannot run. ``block_m`` / ``block_n`` override the tile sizes
    (under the interpreter the default is ``pevideo_kernels.testing.interpreter_blocks``'s).
    """
    rope_attention_check_args(
        q, k, v, coords=coords, freqs=freqs, rope_layout=rope_layout, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        key_padding_mask=key_padding_mask, scale=scale, skip_padded_queries=skip_padded_queries,
    )
    _check_bwd_args(dout, q, k, v, out, lse, dq, dk, dv)
    reason = runtime_reason(
        BWD_KERNEL_MISSING, (q, k, v, coords, freqs, key_padding_mask, cu_seqlens, out, dout, lse, dq, dk, dv), ()
    )
    if reason is not None:
        raise RuntimeError(f"rope_attention_bwd cannot run the kernel: {reason}")

    dq, dk, dv = (torch.empty_like(x) if g is None else g for x, g in ((q, dq), (k, dk), (v, dv)))
    if LAUNCH.poison:  # (pevideo_kernels.testing.poison_outputs) so that unwritten elements show up
        for g in (dq, dk, dv):
            g.fill_(float("nan"))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    packed = cu_seqlens is not None
    if packed and max_seqlen is None and cu_seqlens.numel() > 1:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync; pass max_seqlen to avoid it
    if packed:
        nbatch, seqlen_q, seqlen_k = cu_seqlens.numel() - 1, int(max_seqlen), int(max_seqlen)
    else:
        nbatch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    if q.numel() == 0 and k.numel() == 0:
        return dq, dk, dv
    if seqlen_k == 0 or seqlen_q == 0:  # nothing attends (an empty key or query side): all gradients 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, coords, freqs, rope_layout, cu_seqlens, key_padding_mask,
                scale, skip_padded_queries, nbatch, seqlen_q, seqlen_k, block_m, block_n)
    return dq, dk, dv


def _bwd_kernel_args(dout, q, k, v, out, lse, dq, dk, dv, delta, coords, freqs, rope_layout, cu_seqlens,
                     key_padding_mask, scale, skip_padded_queries, nbatch, seqlen_q, seqlen_k, block_m, block_n,
                     on_cpu):
    """Both kernels' launches: ((args, (constexpr flags, launch options), grid) of the dQ kernel, the same of
    the dK/dV kernel).

    Shared by the launcher and by ahead-of-time build checks, so that these compile what a launch would.
    """
    d = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    # the forward's own host-side set-up (strides, absent pointers, shared flags)
    strides, (c, f, cu, m, ranges), sc_sm, flags = _shared_args(
        q, coords, freqs, rope_layout, cu_seqlens, key_padding_mask, seqlen_q, seqlen_k, skip_padded_queries)
    if on_cpu:  # (pevideo_kernels.testing.interpreter_blocks)
        cfg_q = cfg_k = (*LAUNCH.interpret_blocks, None, None)
    else:
        cfg_q, cfg_k = _gpu_configs(d, q.dtype == torch.float32)
    if block_m or block_n:
        cfg_q = (block_m or cfg_q[0], block_n or cfg_q[1], *cfg_q[2:])
        cfg_k = (block_m or cfg_k[0], block_n or cfg_k[1], *cfg_k[2:])
    for bm, bn, _, _ in (cfg_q, cfg_k):
        if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got ({bm}, {bn})")
    # (flags, launch options) of each kernel
    conf_q = (dict(flags, BLOCK_M=cfg_q[0], BLOCK_N=cfg_q[1]),
              {} if on_cpu else dict(num_warps=cfg_q[2], num_stages=cfg_q[3]))
    conf_k = (dict(flags, BLOCK_M=cfg_k[0], BLOCK_N=cfg_k[1]),
              {} if on_cpu else dict(num_warps=cfg_k[2], num_stages=cfg_k[3]))

    common = (seqlen_q, seqlen_k, hq // hkv, float(scale))
    dq_args = (
        q, k, v, out, dout, lse, delta, dq, c, f, cu, m, ranges, *common,
        *strides(q), *strides(k), *strides(v), *strides(out), *strides(dout), *strides(lse), *strides(delta),
        *strides(dq), *sc_sm,
    )
    dkdv_args = (
        q, k, v, dout, lse, delta, dk, dv, c, f, cu, m, ranges, *common,
        *strides(q), *strides(k), *strides(v), *strides(dout), *strides(lse), *strides(delta),
        *strides(dk), *strides(dv), *sc_sm,
    )
    # dQ programs own BLOCK_M queries and stream keys; dK/dV programs own BLOCK_N keys and stream queries.
    grid_q = (_cdiv(seqlen_q, cfg_q[0]) * nbatch, hq)
    grid_k = (_cdiv(seqlen_k, cfg_k[1]) * nbatch, hkv)
    return (dq_args, conf_q, grid_q), (dkdv_args, conf_k, grid_k)


def _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, coords, freqs, rope_layout, cu_seqlens, key_padding_mask,
                scale, skip_padded_queries, nbatch, seqlen_q, seqlen_k, block_m, block_n):
    on_cpu = interpreting() and q.device.type == "cpu"
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # rowsum(dO * O), from the dQ kernel
    (dq_args, (dq_flags, dq_opts), grid_q), (dkdv_args, (dkdv_flags, dkdv_opts), grid_k) = _bwd_kernel_args(
        dout, q, k, v, out, lse, dq, dk, dv, delta, coords, freqs, rope_layout, cu_seqlens, key_padding_mask,
        scale, skip_padded_queries, nbatch, seqlen_q, seqlen_k, block_m, block_n, on_cpu,
    )
    if on_cpu:
        rope_attn_bwd_dq[grid_q](*dq_args, **dq_flags)
        rope_attn_bwd_dkdv[grid_k](*dkdv_args, **dkdv_flags)  # reads the dQ kernel's delta
    else:
        with torch.cuda.device(q.device):  # wrap_triton: torch.compile traces the launches (registered op)
            torch.library.wrap_triton(rope_attn_bwd_dq)[grid_q](*dq_args, **dq_flags, **dq_opts)
            torch.library.wrap_triton(rope_attn_bwd_dkdv)[grid_k](*dkdv_args, **dkdv_flags, **dkdv_opts)


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# --------------------------------------------------------------------------------------------------
# Reference log-sum-exp (what the forward must save; tests use it)
# --------------------------------------------------------------------------------------------------
def rope_attention_lse_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    coords: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    rope_layout: str = "interleaved",
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """float32 natural-log log-sum-exp of the scaled scores per (row, head), shape ``q.shape[:-1]``.

    q and k are rotated as :func:`rope_attention_ref` does (float32, rounded back to their dtype), the
    scores computed in float32. Rows with no real key give -inf.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if coords is not None:
        q = apply_rope_ref(q, coords, freqs, rope_layout)
        k = apply_rope_ref(k, coords, freqs, rope_layout)
    q, k = q.float(), k.float()
    group = q.shape[-2] // k.shape[-2]
    k = k.repeat_interleave(group, dim=-2)
    if cu_seqlens is not None:
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        b = cu_seqlens.tolist()
        for s, e in zip(b[:-1], b[1:]):
            if e > s:
                sc = torch.einsum("lhd,mhd->hlm", q[s:e], k[s:e]) * scale
                lse[s:e] = torch.logsumexp(sc, -1).transpose(0, 1)
        return lse
    sc = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    if key_padding_mask is not None:
        sc = sc.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if sc.shape[-1] == 0:
        return torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return torch.logsumexp(sc, -1).permute(0, 2, 1).contiguous()
