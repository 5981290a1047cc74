"""Attention with rotary position embedding applied to q and k inside the kernel.

One op, three modes (see :func:`rope_attention`): packed variable-length segments (``cu_seqlens``),
padded clips with a key-padding mask, or plain full attention. RoPE angles come from per-token
coordinates (t, h, w) and a (3, head_dim // 2) frequency table, so axial 2D (PE-Core frames), 1D
(temporal) and sectioned 3D RoPE are all the same kernel with different ``freqs`` (the model builds
them: ``pevideo.rope``).

The op's interface (:data:`ROPE_ATTENTION`, all taking :func:`rope_attention`'s arguments):
``rope_attention_check_args`` (ValueError on bad arguments), ``rope_attention_unsupported_reason``
(None if the kernel can serve them), ``rope_attention_fused`` (the Triton kernel, in
``_rope_attention_triton``, launched from ``_rope_attention_launch``) and ``rope_attention_ref`` (the plain PyTorch definition: the fallback,
and what the kernel is tested against).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._choose import KernelOp, run
from ._triton import runtime_reason

try:  # the one guarded import of the Triton side: without Triton every call runs the reference
    from ._rope_attention_launch import rope_attention_fused as _fused_inference
    KERNEL_MISSING: str | None = None
except Exception as exc:  # noqa: BLE001  ImportError, or a Triton this kernel can't be defined with
    KERNEL_MISSING = f"{type(exc).__name__}: {exc}"

    def _fused_inference(*args, **kwargs):
        raise RuntimeError(f"the rope_attention Triton kernel is not available ({KERNEL_MISSING})")

# The autograd side (forward storing the log-sum-exp, fused backward) is imported at the end of this
# module: it uses this module's reference and checks. None of it until then.
BWD_KERNEL_MISSING: str | None = "not imported"
_train = None


def rope_attention_fused(q, k, v, **kwargs) -> torch.Tensor:
    """The Triton kernel path (arguments already checked). Without autograd: the forward-only op
    (``torch.ops.pevideo.rope_attention``). With inputs requiring grad: the autograd op, whose forward
    also stores each row's log-sum-exp and whose backward is the fused Triton backward."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if _train is None:
            raise RuntimeError(f"the rope_attention backward kernel is not available ({BWD_KERNEL_MISSING})")
        return _train(q, k, v, **kwargs)
    return _fused_inference(q, k, v, **kwargs)


__all__ = [
    "rope_attention",
    "rope_attention_ref",
    "rope_attention_fused",
    "rope_attention_check_args",
    "rope_attention_unsupported_reason",
    "apply_rope_ref",
    "ROPE_ATTENTION",
    "KERNEL_MISSING",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYOUTS = ("interleaved", "half")
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


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
) -> torch.Tensor:
    """Plain PyTorch :func:`rope_attention`: rotate q and k in float32, cast back, then attention.

    Same arguments, shapes and results as :func:`rope_attention`; differentiable.
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
# Argument checks, shared by the kernel and the reference
# --------------------------------------------------------------------------------------------------
def rope_attention_check_args(
    q, k, v, *, coords=None, freqs=None, rope_layout="interleaved", cu_seqlens=None, max_seqlen=None,
    key_padding_mask=None, scale=None, skip_padded_queries=False,
) -> None:
    """Raise ValueError for arguments :func:`rope_attention` (kernel or reference) does not take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; rope_attention takes float16, bfloat16 or float32")
        if t.dim() == 0 or t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension; got strides {tuple(t.stride())}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"q, k, v must have the same number of dims, got {q.dim()}, {k.dim()}, {v.dim()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    d = q.shape[-1]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM):
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"q, k, v must share head_dim, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk < 1 or hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk})")

    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("give cu_seqlens (packed) or key_padding_mask (padded), not both")
        if q.dim() != 3:
            raise ValueError(f"packed mode takes q, k, v of shape (tokens, heads, head_dim); q is {tuple(q.shape)}")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"packed q and k must have the same tokens, got {q.shape[0]} and {k.shape[0]}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor of segment boundaries (segments + 1,)")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens needs at least two entries (one segment)")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        # Checking values needs the host; skip it on GPU when the caller already gives max_seqlen.
        if cu_seqlens.device.type == "cpu" or max_seqlen is None:
            b = cu_seqlens.tolist()
            if b[0] != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {b[0]}")
            if any(y < x for x, y in zip(b[:-1], b[1:])):
                raise ValueError(f"cu_seqlens must be non-decreasing, got {b}")
            if b[-1] != q.shape[0]:
                raise ValueError(f"cu_seqlens must end at the number of tokens ({q.shape[0]}), got {b[-1]}")
            longest = max(y - x for x, y in zip(b[:-1], b[1:]))
            if max_seqlen is not None and max_seqlen < longest:
                raise ValueError(f"max_seqlen={max_seqlen} is below the longest segment ({longest})")
        if coords is not None and tuple(coords.shape) != (q.shape[0], 3):
            raise ValueError(f"packed coords must have shape ({q.shape[0]}, 3), got {tuple(coords.shape)}")
    else:
        if q.dim() != 4:
            raise ValueError(
                f"q, k, v must be (batch, seq, heads, head_dim) (or (tokens, heads, head_dim) with cu_seqlens); q is {tuple(q.shape)}"
            )
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
        if k.shape[1] != q.shape[1] and coords is not None:
            raise ValueError("RoPE needs q and k of the same length (self-attention); got different lengths")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise ValueError("key_padding_mask must be a bool tensor (True = real key)")
            if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[1]):
                raise ValueError(
                    f"key_padding_mask must have shape (batch, seq) = {(k.shape[0], k.shape[1])}, got {tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.device != q.device:
                raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if coords is not None and tuple(coords.shape) != (q.shape[0], q.shape[1], 3):
            raise ValueError(f"coords must have shape {(q.shape[0], q.shape[1], 3)}, got {tuple(coords.shape)}")

    if (coords is None) != (freqs is None):
        raise ValueError("coords and freqs go together: give both for RoPE, or neither")
    if coords is not None:
        if coords.dtype not in (torch.int32, torch.int64, torch.float32):
            raise ValueError(f"coords must be int32, int64 or float32, got {coords.dtype}")
        if coords.device != q.device:
            raise ValueError(f"coords is on {coords.device} but q is on {q.device}")
        if d % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {d}")
        if not isinstance(freqs, torch.Tensor) or freqs.dtype != torch.float32 or tuple(freqs.shape) != (3, d // 2):
            raise ValueError(f"freqs must be a float32 tensor of shape (3, {d // 2})")
        if freqs.device != q.device:
            raise ValueError(f"freqs is on {freqs.device} but q is on {q.device}")
    if rope_layout not in _LAYOUTS:
        raise ValueError(f"rope_layout must be one of {_LAYOUTS}, got {rope_layout!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not isinstance(skip_padded_queries, bool):
        raise ValueError(f"skip_padded_queries must be a bool, got {skip_padded_queries!r}")
    if skip_padded_queries and (key_padding_mask is None or q.shape[1] != k.shape[1]):
        raise ValueError("skip_padded_queries needs a key_padding_mask and self-attention (q and k of one length)")


def rope_attention_unsupported_reason(
    q, k, v, *, coords=None, freqs=None, rope_layout="interleaved", cu_seqlens=None, max_seqlen=None,
    key_padding_mask=None, scale=None, skip_padded_queries=False,
) -> str | None:
    """None if the Triton kernel can serve these (already checked) arguments, else a readable reason.

    Takes :func:`rope_attention`'s arguments; only the tensors' devices, autograd and whether the
    kernels were built matter. Inputs requiring grad are served (the fused backward) unless ``coords``
    or ``freqs`` require grad: the kernel path gives them none, so those run the reference.
    """
    reason = runtime_reason(KERNEL_MISSING, (q, k, v, coords, freqs, key_padding_mask, cu_seqlens), ())
    if reason is not None or not torch.is_grad_enabled():
        return reason
    if any(t is not None and t.requires_grad for t in (coords, freqs)):
        return "coords or freqs require grad and the fused backward gives them none (autograd runs through the reference)"
    if any(t.requires_grad for t in (q, k, v)) and _train is None:
        return f"inputs require grad and the backward kernel could not be built ({BWD_KERNEL_MISSING})"
    return None


ROPE_ATTENTION = KernelOp(
    "rope_attention",
    rope_attention_check_args,
    rope_attention_unsupported_reason,
    rope_attention_fused,
    rope_attention_ref,
)


# --------------------------------------------------------------------------------------------------
# Public entry point
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

    Any strides on the token and head dims (views of a fused qkv output work); head_dim contiguous.

    RoPE: ``coords`` (tokens, 3) or (batch, seq, 3), int32 or float32, give each token's (t, h, w);
    ``freqs`` (3, head_dim // 2) float32. Pair j turns by t·freqs[0, j] + h·freqs[1, j] + w·freqs[2, j]
    (float32). ``rope_layout`` "interleaved" pairs dims (2j, 2j+1), "half" pairs (j, j + head_dim/2).
    A token at (0, 0, 0) is left as it is.

    Returns ``out`` with q's leading shape, contiguous, q's dtype. ``scale`` defaults to head_dim**-0.5.
    Runs the Triton kernel on CUDA tensors (and on CPU under TRITON_INTERPRET=1), the reference
    otherwise; bad arguments raise ValueError before anything runs.

    Autograd: differentiable in q, k, v. On the kernel path the forward also stores each row's
    log-sum-exp and the backward is a fused Triton kernel pair (FlashAttention-2 style, RoPE recomputed
    and undone inside; no rotated q/k or N x N tensor is saved). Gradients for q, k, v views of one
    fused qkv tensor arrive as one qkv-shaped buffer. ``coords`` and ``freqs`` get no gradient from the
    kernel path: when either requires grad, the reference runs instead (and gives them theirs).
    """
    return run(
        ROPE_ATTENTION, q, k, v, coords=coords, freqs=freqs, rope_layout=rope_layout, cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen, key_padding_mask=key_padding_mask, scale=scale,
        skip_padded_queries=skip_padded_queries,
    )


try:  # (after everything above: the autograd side imports this module's reference and checks)
    from ._rope_attention_autograd import rope_attention_train as _train
    BWD_KERNEL_MISSING = None
except Exception as exc:  # noqa: BLE001  no Triton, or backward kernels this Triton can't define
    BWD_KERNEL_MISSING = f"{type(exc).__name__}: {exc}"
