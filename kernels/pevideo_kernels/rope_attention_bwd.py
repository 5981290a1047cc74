"""Backward of :func:`pevideo_kernels.rope_attention` as a public function (the kernels in
``_rope_attention_bwd_triton``, launched by the host side) and the log-sum-exp the forward must save.

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

from ._rope_attention_args import attn_args, bind
from ._triton import runtime_reason
from .rope_attention import KERNEL_MISSING, _host, apply_rope_ref

__all__ = ["rope_attention_bwd", "rope_attention_lse_ref"]


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
    call = bind(q, k, v, attn_args(coords=coords, freqs=freqs, rope_layout=rope_layout, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen, key_padding_mask=key_padding_mask, scale=scale,
                                   skip_padded_queries=skip_padded_queries))
    _check_bwd_args(dout, q, k, v, out, lse, dq, dk, dv)
    a = call.args
    reason = runtime_reason(
        KERNEL_MISSING, (q, k, v, a.coords, a.freqs, a.key_padding_mask, a.cu_seqlens, out, dout, lse, dq, dk, dv), ()
    )
    if reason is not None:
        raise RuntimeError(f"rope_attention_bwd cannot run the kernel: {reason}")
    return _host.backward(dout, q, k, v, out, lse, a, dq, dk, dv, block_m, block_n)


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
