"""The host entry of rope_attention's kernel path (what the public module imports, behind one guard):
the registered ops and the autograd Function around them.

* ``torch.ops.pevideo.rope_attention``: the inference forward;
* ``torch.ops.pevideo.rope_attention_lse``: the training forward, also storing each row's log-sum-exp;
* ``torch.ops.pevideo.rope_attention_bwd``: the two backward kernels.

All three take q, k, v (and for the backward dout, out, lse) followed by :meth:`AttnArgs.op_args`;
they are ``torch.library.triton_op`` on CUDA, so ``torch.compile`` (and AOTAutograd's traced backward)
sees one forward op and one backward op, and the resolved mode (``rope_k``) is an op argument that
compiled graphs guard on. :func:`run` is the kernel path of one resolved call (:class:`AttnCall`).

Saved for the backward: q, k, v (or the one packed qkv tensor), ``out``, the float32 ``lse`` and the
record's small tensors -- no rotated q/k and nothing of size N x N -- plus the record's resolved
values: the backward checks and resolves nothing again. ``coords`` and ``freqs`` get no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._rope_attention_args import AttnArgs, AttnCall
from ._rope_attention_launch import launch_bwd, launch_fwd, lse_buffer
from ._triton import register_op

__all__ = ["run", "backward", "fwd_op", "fwd_lse_op", "bwd_op"]


def _fwd(q: Tensor, k: Tensor, v: Tensor, coords: Optional[Tensor], freqs: Optional[Tensor], rope_layout: str,
         cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], key_padding_mask: Optional[Tensor],
         scale: Optional[float], skip_padded_queries: bool, rope_k: Optional[str],
         key_ranges: Optional[Tensor]) -> Tensor:
    """rope_attention's inference forward: q, k, v, then the fields of AttnArgs.op_args()."""
    args = AttnArgs(coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries,
                    rope_k, key_ranges)
    return launch_fwd(q, k, v, args, False)[0]


def _fwd_lse(q: Tensor, k: Tensor, v: Tensor, coords: Optional[Tensor], freqs: Optional[Tensor], rope_layout: str,
             cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], key_padding_mask: Optional[Tensor],
             scale: Optional[float], skip_padded_queries: bool, rope_k: Optional[str],
             key_ranges: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The training forward: (out, lse), lse float32 of shape q.shape[:-1] (see rope_attention_bwd)."""
    args = AttnArgs(coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries,
                    rope_k, key_ranges)
    return launch_fwd(q, k, v, args, True)


def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, qkv_dim: int,
         coords: Optional[Tensor], freqs: Optional[Tensor], rope_layout: str, cu_seqlens: Optional[Tensor],
         max_seqlen: Optional[int], key_padding_mask: Optional[Tensor], scale: Optional[float],
         skip_padded_queries: bool, rope_k: Optional[str], key_ranges: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); with ``qkv_dim >= 0`` q is the packed qkv tensor (k, v unused) and the result is
    (dqkv, empty, empty), dqkv one buffer of qkv's shape."""
    args = AttnArgs(coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries,
                    rope_k, key_ranges)
    if qkv_dim >= 0:
        dqkv = torch.empty_like(q, memory_format=torch.contiguous_format)
        launch_bwd(dout, *q.unbind(qkv_dim), out, lse, args, *dqkv.unbind(qkv_dim))
        empty = q.new_empty(0)
        return dqkv, empty, empty.clone()
    return launch_bwd(dout, q, k, v, out, lse, args)


def _fwd_fake(q, k, v, *rest):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _fwd_lse_fake(q, k, v, *rest):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), lse_buffer(q)


def _bwd_fake(dout, q, k, v, out, lse, qkv_dim, *rest):
    if qkv_dim >= 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(0), q.new_empty(0)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# What callers run (opaque custom ops under TRITON_INTERPRET, see register_op).
fwd_op = register_op("pevideo::rope_attention", _fwd, _fwd_fake)
fwd_lse_op = register_op("pevideo::rope_attention_lse", _fwd_lse, _fwd_lse_fake)
bwd_op = register_op("pevideo::rope_attention_bwd", _bwd, _bwd_fake)


class _RopeAttention(torch.autograd.Function):
    """Inputs: q, k, v (or qkv, None, None with ``qkv_dim`` >= 0: q, k, v are its unbind(qkv_dim)), then
    AttnArgs.op_args() of a resolved call."""

    @staticmethod
    def forward(ctx, q, k, v, qkv_dim, *op_args):
        qq, kk, vv = q.unbind(qkv_dim) if qkv_dim >= 0 else (q, k, v)
        out, lse = fwd_lse_op(qq, kk, vv, *op_args)
        args = AttnArgs(*op_args)
        ctx.save_for_backward(q, k, v, out, lse, *args.tensors())
        ctx.qkv_dim = qkv_dim
        ctx.args = args.with_tensors(None, None, None, None, None)  # (its tensors are saved above)
        return out

    @staticmethod
    @once_differentiable  # (no double backward: create_graph=True through it raises, never silently wrong)
    def backward(ctx, dout):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        args = ctx.args.with_tensors(*tensors)
        if dout.stride(-1) != 1 or 0 in dout.stride():  # e.g. the expanded gradient of out.sum()
            dout = dout.contiguous()
        if ctx.qkv_dim >= 0:
            dqkv, _, _ = bwd_op(dout, q, q, q, out, lse, ctx.qkv_dim, *args.op_args())
            grads = (dqkv, None, None)
        else:
            grads = bwd_op(dout, q, k, v, out, lse, -1, *args.op_args())
        return (*grads, None, *(None for _ in args.op_args()))


def run(call: AttnCall) -> Tensor:
    """The kernel path of one resolved call: the inference op, or with inputs requiring grad the autograd
    Function (fused backward). A packed ``qkv`` is the Function's one input, so its gradient is one
    qkv-shaped buffer handed to the projection as it is."""
    q, k, v, args, qkv = call
    inputs = (qkv,) if qkv is not None else (q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        if qkv is not None:
            return _RopeAttention.apply(qkv, None, None, qkv.dim() - 3, *args.op_args())
        return _RopeAttention.apply(q, k, v, -1, *args.op_args())
    return fwd_op(q, k, v, *args.op_args())


def backward(dout, q, k, v, out, lse, args: AttnArgs, dq=None, dk=None, dv=None, block_m=None, block_n=None):
    """The backward launch for :func:`pevideo_kernels.rope_attention_bwd` (into given buffers, if any)."""
    return launch_bwd(dout, q, k, v, out, lse, args, dq, dk, dv, block_m, block_n)
