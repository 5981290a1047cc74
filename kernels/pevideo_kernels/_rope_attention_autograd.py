"""Autograd for :func:`pevideo_kernels.rope_attention`'s kernel path: one ``autograd.Function`` whose
forward is the registered training op (``torch.ops.pevideo.rope_attention_lse``: the forward kernel
storing the per-row log-sum-exp) and whose backward is the registered backward op
(``torch.ops.pevideo.rope_attention_bwd``: the two Triton backward kernels). Both are
``torch.library.triton_op`` on CUDA, so ``torch.compile`` (and AOTAutograd's traced backward) sees
one forward op and one backward op.

Saved for the backward: q, k, v (or the one fused qkv tensor they are views of), ``out``, the float32
``lse`` and the small coordinate/mask tensors -- no rotated q/k and nothing of size N x N.
``coords`` and ``freqs`` get no gradient (the public function's reasons send inputs whose coords or
freqs require grad to the reference instead).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._rope_attention_launch import rope_attention_fused_lse
from ._triton import register_op
from .rope_attention_bwd import rope_attention_bwd

__all__ = ["rope_attention_train", "fused_qkv_view"]


def _dense_strides(shape) -> tuple:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def fused_qkv_view(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``(qkv, dim)`` when q, k, v are ``qkv.select(dim, 0 / 1 / 2)`` of one contiguous tensor covering
    their whole base (e.g. the model's ``qkv.view(T, 3, H, D)[:, i]``), else None.

    Then the backward writes one qkv-shaped gradient, and autograd hands it to the projection as it is
    (a view), instead of three zero-filled base-sized gradients summed (``select``) or stacked (``unbind``).
    """
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    if not (base.requires_grad and q.requires_grad and k.requires_grad and v.requires_grad):
        return None
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()):
        return None
    s = k.storage_offset() - q.storage_offset()
    if s <= 0 or v.storage_offset() - k.storage_offset() != s or q.storage_offset() != base.storage_offset():
        return None
    for dim in range(q.dim() + 1):
        shape = (*q.shape[:dim], 3, *q.shape[dim:])
        stride = (*q.stride()[:dim], s, *q.stride()[dim:])
        dense = _dense_strides(shape)
        if all(n == 1 or a == b for n, a, b in zip(shape, stride, dense)):
            n = 1
            for x in shape:
                n *= x
            if n == base.numel():
                return base.view(shape), dim
    return None


# --------------------------------------------------------------------------------------------------
# The backward as a registered op (so torch.compile traces its launches)
# --------------------------------------------------------------------------------------------------
def _bwd_launcher(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    coords: Optional[torch.Tensor] = None,
    freqs: Optional[torch.Tensor] = None,
    rope_layout: str = "interleaved",
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    skip_padded_queries: bool = False,
    fused_dim: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); with ``fused_dim >= 0`` q is the fused qkv tensor (k, v unused) and the result is
    (dqkv, empty, empty), dqkv one buffer of qkv's shape."""
    kw = dict(coords=coords, freqs=freqs, rope_layout=rope_layout, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
              key_padding_mask=key_padding_mask, scale=scale, skip_padded_queries=skip_padded_queries)
    if fused_dim >= 0:
        qkv = q
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        rope_attention_bwd(dout, *qkv.unbind(fused_dim), out, lse, dq=dqkv.select(fused_dim, 0),
                           dk=dqkv.select(fused_dim, 1), dv=dqkv.select(fused_dim, 2), **kw)
        empty = qkv.new_empty(0)
        return dqkv, empty, empty.clone()
    dq, dk, dv = rope_attention_bwd(dout, q, k, v, out, lse, **kw)
    return dq, dk, dv


def _bwd_fake(dout, q, k, v, out, lse, coords=None, freqs=None, rope_layout="interleaved", cu_seqlens=None,
              max_seqlen=None, key_padding_mask=None, scale=None, skip_padded_queries=False, fused_dim=-1):
    if fused_dim >= 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(0), q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


rope_attention_bwd_op = register_op("pevideo::rope_attention_bwd", _bwd_launcher, _bwd_fake)


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
_KEYS = ("coords", "freqs", "rope_layout", "cu_seqlens", "max_seqlen", "key_padding_mask", "scale",
         "skip_padded_queries")


class _RopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fused_dim, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask,
                scale, skip_padded_queries):
        if fused_dim >= 0:  # q is the fused qkv tensor
            qq, kk, vv = q.unbind(fused_dim)
        else:
            qq, kk, vv = q, k, v
        out, lse = rope_attention_fused_lse(qq, kk, vv, coords, freqs, rope_layout, cu_seqlens, max_seqlen,
                                            key_padding_mask, scale, skip_padded_queries)
        if fused_dim >= 0:
            ctx.save_for_backward(q, out, lse, coords, freqs, cu_seqlens, key_padding_mask)
        else:
            ctx.save_for_backward(q, k, v, out, lse, coords, freqs, cu_seqlens, key_padding_mask)
        ctx.fused_dim = fused_dim
        ctx.args = (rope_layout, max_seqlen, scale, skip_padded_queries)
        return out

    @staticmethod
    @once_differentiable  # (no double backward: create_graph=True through it raises, never silently wrong)
    def backward(ctx, dout):
        rope_layout, max_seqlen, scale, skip_padded_queries = ctx.args
        if ctx.fused_dim >= 0:
            qkv, out, lse, coords, freqs, cu_seqlens, mask = ctx.saved_tensors
            q = k = v = qkv
        else:
            q, k, v, out, lse, coords, freqs, cu_seqlens, mask = ctx.saved_tensors
        if dout.stride(-1) != 1 or 0 in dout.stride():  # e.g. the expanded gradient of out.sum()
            dout = dout.contiguous()
        dq, dk, dv = rope_attention_bwd_op(dout, q, k, v, out, lse, coords, freqs, rope_layout, cu_seqlens,
                                           max_seqlen, mask, scale, skip_padded_queries, ctx.fused_dim)
        if ctx.fused_dim >= 0:
            dk = dv = None
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def rope_attention_train(q, k, v, *, coords=None, freqs=None, rope_layout="interleaved", cu_seqlens=None,
                         max_seqlen=None, key_padding_mask=None, scale=None, skip_padded_queries=False):
    """The kernel path of :func:`pevideo_kernels.rope_attention` with autograd (already checked arguments):
    gradients for q, k, v from the fused backward; none for ``coords`` or ``freqs``."""
    fused = None
    if not torch.compiler.is_compiling():  # (reading ._base is for eager autograd graphs)
        fused = fused_qkv_view(q, k, v)
    if fused is not None:
        qkv, dim = fused
        return _RopeAttention.apply(qkv, None, None, dim, coords, freqs, rope_layout, cu_seqlens, max_seqlen,
                                    key_padding_mask, scale, skip_padded_queries)
    return _RopeAttention.apply(q, k, v, -1, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask,
                                scale, skip_padded_queries)
