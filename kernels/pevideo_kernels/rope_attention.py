"""Attention with rotary position embedding applied to q and k inside the kernel.

One op, three modes (see :func:`rope_attention`): packed variable-length segments (``cu_seqlens``),
padded clips with a key-padding mask, or plain full attention. RoPE angles come from per-token
coordinates (t, h, w) and a (3, head_dim // 2) frequency table, so axial 2D (PE-Core frames), 1D
(temporal) and sectioned 3D RoPE are all the same kernel with different ``freqs`` (the model builds
them: ``pevideo.rope``). :func:`rope_attention_qkvpacked` takes q, k, v as one packed tensor, as
flash-attn's ``*_qkvpacked_func`` do (then its gradient is one qkv-shaped buffer).

Layers, each importing only downward: this public module (the references, the public functions, the
op's :class:`KernelOp` records) over :mod:`._rope_attention_args` (the options checked and resolved
once into :class:`AttnArgs` / :class:`AttnCall`, torch only) and, behind one guarded import, the host
entry :mod:`._rope_attention_autograd` (registered ops, autograd) over :mod:`._rope_attention_launch`
(launch arguments, launchers) over the Triton kernels (:mod:`._rope_attention_triton`,
:mod:`._rope_attention_bwd_triton`) and their tiles (:mod:`._rope_attention_tuning`).

The op's interface, :data:`ROPE_ATTENTION` (arguments ``q, k, v, args``) and
:data:`ROPE_ATTENTION_QKVPACKED` (``qkv, args``), ``args`` an :class:`AttnArgs` from :func:`attn_args`:
``resolve`` (ValueError on bad arguments; the resolved :class:`AttnCall`), ``unsupported_reason`` (None
if the kernel can serve the call), ``fused`` (the Triton kernels) and ``ref`` (the plain PyTorch
definition: the fallback, and what the kernel is tested against).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._choose import KernelOp, run
from ._rope_attention_args import (
    MAX_TOKEN_STRIDE,
    ROPE_K_MODES,
    AttnArgs,
    AttnCall,
    attn_args,
    bind,
    debug_checks,
    default_rope_k,
    rope_k_mode,
)
from ._triton import runtime_reason

try:  # the one guarded import of the Triton side: without Triton every call runs the reference
    from . import _rope_attention_autograd as _host
    KERNEL_MISSING: str | None = None
except Exception as exc:  # noqa: BLE001  ImportError, or a Triton these kernels can't be defined with
    _host = None
    KERNEL_MISSING = f"{type(exc).__name__}: {exc}"
# Why the fused backward can't serve inputs requiring grad (None: it can); the same import serves both.
BWD_KERNEL_MISSING: str | None = KERNEL_MISSING

__all__ = [
    "rope_attention",
    "rope_attention_qkvpacked",
    "rope_attention_ref",
    "rope_attention_fused",
    "rope_attention_check_args",
    "rope_attention_unsupported_reason",
    "apply_rope_ref",
    "ROPE_ATTENTION",
    "ROPE_ATTENTION_QKVPACKED",
    "KERNEL_MISSING",
    "AttnArgs",
    "AttnCall",
    "attn_args",
    "ROPE_K_MODES",
    "default_rope_k",
    "rope_k_mode",
    "debug_checks",
]


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def apply_rope_ref(x: torch.Tensor, coords: torch.Tensor, freqs: torch.Tensor, rope_layout: str = "interleaved") -> torch.Tensor:
    """Rotate ``x`` (..., heads, head_dim) by angles from ``coords`` (..., 3); float32 math, x's dtype out."""
    c = coords.to(torch.float32)
    f = freqs.to(device=x.device, dtype=torch.float32)
    # Summed term by term (not a matmul) so that zero frequencies add exact zeros, as the kernel does.
    ang = c[..., 0, None] * f[0] + c[..., 1, None] * f[1] + c[..., 2, None] * f[2]  # (..., D/2)
    cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]  # broadcast over heads
    xf = x.to(torch.float32)
    if rope_layout == "interleaved":
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    elif rope_layout == "half":
        half = xf.shape[-1] // 2
        x0, x1 = xf[..., :half], xf[..., half:]
        out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        raise ValueError(f"rope_layout must be one of {_LAYOUTS}, got {rope_layout!r}")
    return out.to(x.dtype)


def _sdpa_bhld(q, k, v, mask, scale, skip_padded_queries=False):
    """SDPA on (B, L, H, D) views; mask (B, Lk) bool or None. Rows with no real key give zeros, and so
    do padded query rows (self-attention) with ``skip_padded_queries``."""
    hq, hk = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hk != hq:  # grouped-query attention: head h reads kv head h // (hq // hk)
        kt = kt.repeat_interleave(hq // hk, dim=1)
        vt = vt.repeat_interleave(hq // hk, dim=1)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=scale)
    out = out.transpose(1, 2)
    if mask is not None:
        # Rows with no real key give zeros (SDPA would give NaN); with skip_padded_queries, so do the
        # padded query rows of self-attention.
        if skip_padded_queries and q.shape[1] == k.shape[1]:
            keep = mask[:, :, None, None]
        else:
            keep = mask.any(dim=1)[:, None, None, None]
        out = torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def rope_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coords: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    rope_layout: str = "interleaved",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    skip_padded_queries: bool = False,
    rope_k: str | None = None,
) -> torch.Tensor:
    """Plain PyTorch :func:`rope_attention`: rotate q and k in float32, cast back, then attention.

    Same arguments, shapes and results as :func:`rope_attention` (``rope_k``, how the kernel rotates K,
    changes nothing here); differentiable.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if coords is not None:
        q = apply_rope_ref(q, coords, freqs, rope_layout)
        k = apply_rope_ref(k, coords, freqs, rope_layout)

    if cu_seqlens is None:
        return _sdpa_bhld(q, k, v, key_padding_mask, scale, skip_padded_queries).contiguous()

    # Packed: gather segments into a padded batch; equal lengths (frames) need no mask.
    bounds = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    nonempty = [i for i, n in enumerate(lens) if n > 0]
    if not nonempty:
        return out
    lmax = max(lens)
    if all(lens[i] == lmax for i in nonempty):  # empty segments hold no tokens, so this is a plain batch
        n = len(nonempty)
        res = _sdpa_bhld(q.unflatten(0, (n, lmax)), k.unflatten(0, (n, lmax)), v.unflatten(0, (n, lmax)), None, scale)
        return res.flatten(0, 1).contiguous()
    dev = q.device
    starts = torch.tensor([bounds[i] for i in nonempty], device=dev)
    seg_lens = torch.tensor([lens[i] for i in nonempty], device=dev)
    pos = torch.arange(lmax, device=dev)
    valid = pos[None, :] < seg_lens[:, None]  # (S, Lmax)
    idx = (starts[:, None] + pos[None, :]).clamp(max=q.shape[0] - 1)
    res = _sdpa_bhld(q[idx], k[idx], v[idx], valid, scale, True)  # (S, Lmax, H, D); padded rows unused
    out[idx[valid]] = res[valid]
    return out




# --------------------------------------------------------------------------------------------------
# The op's interface
# --------------------------------------------------------------------------------------------------
def _bind_packed(qkv, args: AttnArgs) -> AttnCall:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() not in (4, 5) or qkv.shape[-3] != 3:
        what = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be (tokens, 3, heads, head_dim) or (batch, seq, 3, heads, head_dim), got {what}")
    return bind(*qkv.unbind(-3), args, qkv=qkv)


def _unsupported(call: AttnCall) -> str | None:
    q, k, v, a, qkv = call
    reason = runtime_reason(KERNEL_MISSING, (q, k, v, a.coords, a.freqs, a.key_padding_mask, a.cu_seqlens), ())
    if reason is not None:
        return reason
    for name, t, dim in (("q", q, -3), ("k", k, -3), ("v", v, -3), ("coords", a.coords, -2),
                         ("key_padding_mask", a.key_padding_mask, -1)):
        if t is not None and t.dim() >= -dim and abs(t.stride(dim)) >= MAX_TOKEN_STRIDE:
            return (f"{name} has a token stride of {t.stride(dim)} elements; the kernels take strides below "
                    f"{MAX_TOKEN_STRIDE} (2^23: offsets inside a tile are 32-bit)")
    if not torch.is_grad_enabled():
        return None
    if any(t is not None and t.requires_grad for t in (a.coords, a.freqs)):
        return "coords or freqs require grad and the fused backward gives them none (autograd runs through the reference)"
    if any(t.requires_grad for t in ((qkv,) if qkv is not None else (q, k, v))) and BWD_KERNEL_MISSING is not None:
        return f"inputs require grad and the backward kernel could not be built ({BWD_KERNEL_MISSING})"
    return None


def _fused(call: AttnCall) -> torch.Tensor:
    if _host is None:
        raise RuntimeError(f"the rope_attention Triton kernel is not available ({KERNEL_MISSING})")
    return _host.run(call)


ROPE_ATTENTION = KernelOp(
    "rope_attention", bind, _unsupported, _fused,
    lambda q, k, v, args: rope_attention_ref(q, k, v, **args.options()),
)
ROPE_ATTENTION_QKVPACKED = KernelOp(
    "rope_attention_qkvpacked", _bind_packed, _unsupported, _fused,
    lambda qkv, args: rope_attention_ref(*qkv.unbind(-3), **args.options()),
)


def rope_attention_check_args(q, k, v, **options) -> None:
    """Raise ValueError for arguments :func:`rope_attention` (kernel or reference) does not take."""
    bind(q, k, v, attn_args(**options))


def rope_attention_unsupported_reason(q, k, v, **options) -> str | None:
    """None if the Triton kernel can serve these (checked) arguments, else a readable reason.

    Takes :func:`rope_attention`'s arguments. What matters: the tensors' devices, token strides below
    2^23 elements, whether the kernels were built, and autograd: inputs requiring grad are served (the
    fused backward) unless ``coords`` or ``freqs`` require grad (the kernel path gives them none).
    """
    return _unsupported(bind(q, k, v, attn_args(**options)))


def rope_attention_fused(q, k, v, **options) -> torch.Tensor:
    """The Triton kernel path of :func:`rope_attention` (same arguments), whatever the reason says;
    with inputs requiring grad, the autograd op with its fused backward."""
    return _fused(bind(q, k, v, attn_args(**options)))


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coords: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    rope_layout: str = "interleaved",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    skip_padded_queries: bool = False,
    rope_k: str | None = None,
) -> torch.Tensor:
    """Softmax attention with RoPE applied to q and k as they are loaded.

    Modes:
      * packed: ``q, k, v: (tokens, heads, head_dim)`` and ``cu_seqlens: (segments + 1,)`` int32;
        tokens attend within their segment; empty segments are allowed.
      * padded: ``q, k, v: (batch, seq, heads, head_dim)`` and ``key_padding_mask: (batch, seq)`` bool
        (True = real); padded keys are ignored and every query row is computed over the real keys, as
        SDPA with a key mask does; a row with no real key gives zeros, never NaN. With
        ``skip_padded_queries=True`` (self-attention only) padded query rows are not computed at all
        and give zeros: for callers that discard them, it skips their work.
      * full: ``(batch, seq, heads, head_dim)`` with neither.
    In the batched modes k and v may be longer or shorter than q when there is no RoPE (cross
    attention, e.g. a latent query pooling a sequence). k and v may have fewer heads than q
    (grouped-query attention: head h reads kv head h // (heads_q // heads_kv)).

    Packed contract (as flash-attn's varlen functions): ``cu_seqlens`` starts at 0, never decreases and
    ends at the number of tokens; ``max_seqlen`` is at least the longest segment (None: computed from
    ``cu_seqlens``, a host sync on a GPU). The values are checked when that costs no sync (``cu_seqlens``
    on the CPU, or ``max_seqlen`` None) and always under ``pevideo_kernels.debug_checks()`` /
    ``PEVIDEO_KERNELS_DEBUG=1``; on a GPU with ``max_seqlen`` given they are the caller's promise (wrong
    values leave output rows unwritten).

    Any strides on the token and head dims (views of a fused qkv output work; token strides below 2^23
    elements for the kernel); head_dim contiguous.

    RoPE: ``coords`` (tokens, 3) or (batch, seq, 3), int32 or float32, give each token's (t, h, w);
    ``freqs`` (3, head_dim // 2) float32. Pair j turns by t·freqs[0, j] + h·freqs[1, j] + w·freqs[2, j]
    (float32). ``rope_layout`` "interleaved" pairs dims (2j, 2j+1), "half" pairs (j, j + head_dim/2).
    A token at (0, 0, 0) is left as it is. ``rope_k``: how the kernel rotates K (``ROPE_K_MODES``; same
    results): None takes ``rope_k_mode()``'s setting, else the per-shape default (``default_rope_k``).

    Returns ``out`` with q's leading shape, contiguous, q's dtype. ``scale`` defaults to head_dim**-0.5.
    Runs the Triton kernel on CUDA tensors (and on CPU under TRITON_INTERPRET=1), the reference
    otherwise; bad arguments raise ValueError before anything runs.

    Autograd: differentiable in q, k, v. On the kernel path the forward also stores each row's
    log-sum-exp and the backward is a fused Triton kernel pair (FlashAttention-2 style, RoPE recomputed
    and undone inside; no rotated q/k or N x N tensor is saved). ``coords`` and ``freqs`` get no
    gradient from the kernel path: when either requires grad, the reference runs instead.
    """
    args = attn_args(coords=coords, freqs=freqs, rope_layout=rope_layout, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                     key_padding_mask=key_padding_mask, scale=scale, skip_padded_queries=skip_padded_queries,
                     rope_k=rope_k)
    return run(ROPE_ATTENTION, q, k, v, args)


def rope_attention_qkvpacked(qkv: torch.Tensor, **options) -> torch.Tensor:
    """:func:`rope_attention` on q, k, v packed in one tensor: ``qkv`` (tokens, 3, heads, head_dim)
    with ``cu_seqlens``, or (batch, seq, 3, heads, head_dim); q, k, v are ``qkv.unbind(-3)`` (read in
    place, through their strides). Same keyword options and result. With autograd, the gradient is one
    buffer of qkv's shape (e.g. straight into a fused qkv projection's output)."""
    return run(ROPE_ATTENTION_QKVPACKED, qkv, attn_args(**options))
