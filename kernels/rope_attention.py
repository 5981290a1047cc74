"""Attention with rotary position embedding applied to q and k inside the kernel.

One op, three modes (see :func:`rope_attention`): packed variable-length segments (``cu_seqlens``),
padded clips with a key-padding mask, or plain full attention. RoPE angles come from per-token
coordinates (t, h, w) and a (3, head_dim // 2) frequency table, so axial 2D (PE-Core frames), 1D
(temporal) and sectioned 3D RoPE are all the same kernel with different ``freqs``.

``rope_attention_ref`` is the plain PyTorch definition: the fallback, and what the kernel is tested
against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, device_reason, grad_reason

__all__ = [
    "rope_attention",
    "rope_attention_ref",
    "rope_attention_unsupported_reason",
    "apply_rope_ref",
    "pe_core_rope_2d",
    "rope_1d",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYOUTS = ("interleaved", "half")
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


# --------------------------------------------------------------------------------------------------
# Frequency / coordinate helpers
# --------------------------------------------------------------------------------------------------
def pe_core_rope_2d(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    *,
    ref_feat_shape: tuple[int, int] | None = None,
    grid_offset: float = 1.0,
    temperature: float = 10000.0,
    num_prefix_tokens: int = 1,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PE-Core's axial 2D RoPE (timm ``RotaryEmbeddingCat``, 'xy' grid) as ``(coords, freqs)``.

    Returns ``coords`` (num_prefix_tokens + grid_h * grid_w, 3) float32, prefix tokens at (0, 0, 0)
    (left unrotated) then patches in row-major order at (0, y, x), and ``freqs`` (3, head_dim // 2)
    float32: the first head_dim / 4 pairs turn with the column x, the rest with the row y.
    Coordinates are computed exactly as timm does, so angles match it bit for bit in float32.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    nb = head_dim // 4
    # timm: bands = 1 / temperature ** (arange(nb) / nb), float32
    exp = torch.arange(0, nb, 1, dtype=torch.int64).to(torch.float32) / nb
    bands = 1.0 / (temperature**exp)
    xs = torch.arange(grid_w, dtype=torch.int64).to(torch.float32) + grid_offset
    ys = torch.arange(grid_h, dtype=torch.int64).to(torch.float32) + grid_offset
    if ref_feat_shape is not None:
        ref_h, ref_w = ref_feat_shape
        xs = xs / grid_w * ref_w
        ys = ys / grid_h * ref_h
    patch = torch.zeros(grid_h, grid_w, 3, dtype=torch.float32)
    patch[..., 1] = ys[:, None]
    patch[..., 2] = xs[None, :]
    coords = torch.cat([torch.zeros(num_prefix_tokens, 3), patch.reshape(-1, 3)], 0)
    freqs = torch.zeros(3, head_dim // 2, dtype=torch.float32)
    freqs[2, :nb] = bands
    freqs[1, nb:] = bands
    return coords.to(device), freqs.to(device)


def rope_1d(
    positions: torch.Tensor | int,
    head_dim: int,
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard 1D RoPE on the t axis as ``(coords, freqs)``.

    ``positions`` is an int n (positions 0..n-1) or a tensor of positions of any shape; coords has that
    shape plus a trailing 3 (t, 0, 0). ``freqs[0, j] = theta ** (-2j / head_dim)`` as transformers
    computes ``inv_freq``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if isinstance(positions, int):
        positions = torch.arange(positions)
    pos = positions.to(torch.float32)
    coords = torch.zeros(*pos.shape, 3, dtype=torch.float32, device=pos.device)
    coords[..., 0] = pos
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.zeros(3, head_dim // 2, dtype=torch.float32)
    freqs[0] = inv_freq
    return coords.to(device), freqs.to(device)


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
def _check_args(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale,
                skip_padded_queries=False):
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


def rope_attention_unsupported_reason(q, k, v, *, coords=None, freqs=None, key_padding_mask=None, cu_seqlens=None):
    """None if the Triton kernel can serve these (already checked) arguments, else a readable reason."""
    reason = device_reason(q, k, v, coords, freqs, key_padding_mask, cu_seqlens)
    if reason is None:
        reason = grad_reason(q, k, v)
    if reason is None and not _HAS_KERNEL:
        reason = "the Triton kernel is not built in this version"
    return reason


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
# Layout of the work: one program per (query block, segment or batch row) on grid axis 0 -- query
# blocks of one segment are neighbours, so they share its K/V tiles in L2 -- and one per query head on
# axis 1. Each program keeps its rotated Q tile in registers and streams K/V tiles of its segment
# through an online softmax (FlashAttention-2). RoPE never materializes: angles come from the token
# coordinates and the frequency table, cos/sin are computed in registers, and the rotated pair halves
# a, b give scores = a_q·a_kᵀ + b_q·b_kᵀ (two dots; no re-interleaving).

_HAS_KERNEL = False  # set True once the Triton kernel below is defined

# Block sizes under TRITON_INTERPRET (autotuning there is far too slow); tests shrink them to reach
# more code paths with small inputs.
_INTERPRET_BLOCKS = (64, 64)
# Tests set this to fill the output with NaN before the launch, so rows the kernel skips show up.
_POISON_OUTPUT = False

if HAS_TRITON:
    from ._triton import interpreting, tl, triton

    @triton.jit
    def _cos_sin(x, FAST_TRIG: tl.constexpr):
        if FAST_TRIG:
            # The SFU's cos/sin.approx are accurate to ~2^-21 absolute on [-pi, pi]: reduce there first
            # (two-constant Cody-Waite, n * 6.28125 is exact for |n| < 2^16). Libdevice's sinf/cosf
            # take ~20 FP32 instructions each: for a K tile that is as much issue time as its matmuls.
            n = tl.math.floor(x * 0.15915494309189535 + 0.5)
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
    def _attn_tile(
        acc, l_i, m_i, qa, qb, f0, f1, f2,
        Kh, Vh, Ch, Mrow,
        start_n, hi, qk_scale,
        stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, MASK_N: tl.constexpr, LOAD_MASK: tl.constexpr,
        FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
    ):
        """One K/V tile [start_n, start_n + BLOCK_N) folded into the running (acc, l_i, m_i).

        MASK_N: the tile may run past ``hi`` (the last one). LOAD_MASK: also read the key-padding mask
        (masks that are not one run of real keys); a tile may then hold no real key at all.
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
        dt = Kh.dtype.element_ty

        if HAS_ROPE:
            # Key angles, (BLOCK_N, BLOCK_H): keys on rows, as K is stored.
            cp = Ch + n64 * stride_ct + offs_n * stride_ct
            if MASK_N:
                ct = tl.load(cp, mask=n_ok, other=0).to(tl.float32)
                ch = tl.load(cp + stride_cd, mask=n_ok, other=0).to(tl.float32)
                cw = tl.load(cp + 2 * stride_cd, mask=n_ok, other=0).to(tl.float32)
                n_in = n_ok
            else:
                ct = tl.load(cp).to(tl.float32)
                ch = tl.load(cp + stride_cd).to(tl.float32)
                cw = tl.load(cp + 2 * stride_cd).to(tl.float32)
                n_in = offs_n < BLOCK_N
            ang = ct[:, None] * f0[None, :] + ch[:, None] * f1[None, :] + cw[:, None] * f2[None, :]
            c, s = _cos_sin(ang, FAST_TRIG)
            ka, kb = _load_pairs(kp + offs_n[:, None] * stride_kt, n_in, HEAD_DIM, BLOCK_H, INTERLEAVED)
            # Rotate in float32, round to the input dtype, as the reference does before its matmul.
            kra = (ka * c - kb * s).to(dt)
            krb = (ka * s + kb * c).to(dt)
            qk = _dot(qa, tl.trans(kra), None, IEEE_DOT)
            qk = _dot(qb, tl.trans(krb), qk, IEEE_DOT)
        else:
            d_ok = offs_d < HEAD_DIM
            if MASK_N:
                kmask = d_ok[:, None] & n_ok[None, :]
            else:
                kmask = d_ok[:, None] & (offs_n < BLOCK_N)[None, :]
            kt = tl.load(kp + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask, other=0.0)
            qk = _dot(qa, kt, None, IEEE_DOT)

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
        if MASK_N:
            vmask = n_ok[:, None] & d_ok_v[None, :]
        else:
            vmask = (offs_n < BLOCK_N)[:, None] & d_ok_v[None, :]
        # Masked-out rows load as zeros: padding tokens may hold anything (even NaN).
        v = tl.load(vp + offs_n[:, None] * stride_vt + offs_d[None, :], mask=vmask, other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(dt), v, acc, IEEE_DOT)
        return acc, l_i, m_new

    @triton.jit
    def _attn_span(
        acc, l_i, m_i, qa, qb, f0, f1, f2,
        Kh, Vh, Ch, Mrow,
        lo, hi, qk_scale,
        stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, LOAD_MASK: tl.constexpr,
        FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr,
    ):
        """Keys [lo, hi): whole tiles without any masking, then the ragged last one."""
        if LOAD_MASK:
            for start_n in range(lo, hi, BLOCK_N):
                acc, l_i, m_i = _attn_tile(
                    acc, l_i, m_i, qa, qb, f0, f1, f2, Kh, Vh, Ch, Mrow, start_n, hi, qk_scale,
                    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, True, True, FAST_TRIG, IEEE_DOT,
                )
        else:
            n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
            for start_n in range(lo, n_full, BLOCK_N):
                acc, l_i, m_i = _attn_tile(
                    acc, l_i, m_i, qa, qb, f0, f1, f2, Kh, Vh, Ch, Mrow, start_n, hi, qk_scale,
                    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, False, False, FAST_TRIG, IEEE_DOT,
                )
            if n_full < hi:
                acc, l_i, m_i = _attn_tile(
                    acc, l_i, m_i, qa, qb, f0, f1, f2, Kh, Vh, Ch, Mrow, n_full, hi, qk_scale,
                    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, True, False, FAST_TRIG, IEEE_DOT,
                )
        return acc, l_i, m_i

    @triton.jit
    def _rope_attn_fwd(
        Q, K, V, O, C, FREQ, CU, MASK, KV_RANGE,
        seqlen_q, seqlen_k, heads_per_kv, qk_scale,
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh,
        stride_cb, stride_ct, stride_cd,
        stride_mb, stride_mt,
        bucket_q, bucket_k,  # autotuning keys only
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
        b64 = bid.to(tl.int64)

        if IS_PACKED:
            tok0 = tl.load(CU + bid)
            len_q = tl.load(CU + bid + 1) - tok0
            if start_m >= len_q:  # past this segment's end (or an empty segment): nothing to do
                return
            len_k = len_q
            t64 = tok0.to(tl.int64)
            Qh = Q + t64 * stride_qt + head * stride_qh
            Kh = K + t64 * stride_kt + kv_head * stride_kh
            Vh = V + t64 * stride_vt + kv_head * stride_vh
            Oh = O + t64 * stride_ot + head * stride_oh
            Ch = C + t64 * stride_ct
        else:
            len_q = seqlen_q
            len_k = seqlen_k
            Qh = Q + b64 * stride_qb + head * stride_qh
            Kh = K + b64 * stride_kb + kv_head * stride_kh
            Vh = V + b64 * stride_vb + kv_head * stride_vh
            Oh = O + b64 * stride_ob + head * stride_oh
            Ch = C + b64 * stride_cb
        Mrow = MASK + b64 * stride_mb

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
            HALF = HEAD_DIM // 2
            offs_h = tl.arange(0, BLOCK_H)
            h_ok = offs_h < HALF
            # Angles do not depend on the head: f0..f2 hold each pair's frequency per axis.
            f0 = tl.load(FREQ + offs_h, mask=h_ok, other=0.0)
            f1 = tl.load(FREQ + HALF + offs_h, mask=h_ok, other=0.0)
            f2 = tl.load(FREQ + 2 * HALF + offs_h, mask=h_ok, other=0.0)
            cp = Ch + offs_m * stride_ct
            ct = tl.load(cp, mask=m_ok, other=0).to(tl.float32)
            ch = tl.load(cp + stride_cd, mask=m_ok, other=0).to(tl.float32)
            cw = tl.load(cp + 2 * stride_cd, mask=m_ok, other=0).to(tl.float32)
            ang = ct[:, None] * f0[None, :] + ch[:, None] * f1[None, :] + cw[:, None] * f2[None, :]
            c, s = _cos_sin(ang, FAST_TRIG)
            xa, xb = _load_pairs(q_rows, q_ok, HEAD_DIM, BLOCK_H, INTERLEAVED)
            qa = (xa * c - xb * s).to(dt)
            qb = (xa * s + xb * c).to(dt)
        else:
            qa = tl.load(q_rows + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            qb = qa
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
                    acc, l_i, m_i, qa, qb, f0, f1, f2, Kh, Vh, Ch, Mrow, lo, hi, qk_scale,
                    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, False, FAST_TRIG, IEEE_DOT,
                )
            else:
                acc, l_i, m_i = _attn_span(
                    acc, l_i, m_i, qa, qb, f0, f1, f2, Kh, Vh, Ch, Mrow, lo, hi, qk_scale,
                    stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, True, FAST_TRIG, IEEE_DOT,
                )
        else:
            acc, l_i, m_i = _attn_span(
                acc, l_i, m_i, qa, qb, f0, f1, f2, Kh, Vh, Ch, Mrow, 0, len_k, qk_scale,
                stride_kt, stride_vt, stride_ct, stride_cd, stride_mt,
                HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_H, HAS_ROPE, INTERLEAVED, False, FAST_TRIG, IEEE_DOT,
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

    # Autotuning (CUDA only): one small config set per class of problem, picked on the host (no
    # prune hook, which torch.compile's handling of user kernels may not honour). Configs were checked
    # for register spills with ptxas for sm_90. Large BLOCK_M first where it fits: each program
    # recomputes its K tiles' cos/sin, so taller query blocks amortize that over more rows.
    _CONFIG_SETS = {
        # one or a few queries per row (attention pooling; short temporal clips)
        "q16": [(16, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 3), (16, 64, 8, 3)],
        "q32": [(32, 32, 4, 3), (16, 32, 4, 3), (64, 32, 8, 3), (32, 64, 4, 3)],
        "d64": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
        # head_dim 96/128: the K tile's rotation temporaries (4 fp32 (BLOCK_N, head_dim/2) arrays)
        # dominate registers, so narrow K tiles and 8 warps
        "d128": [(128, 32, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 8, 3)],
        "d256": [(64, 32, 8, 2), (64, 16, 8, 2), (64, 16, 4, 2), (32, 16, 4, 2)],
        # float32 inputs use full-precision (non tensor-core) dots: small tiles only
        "f32": [(32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2), (64, 16, 4, 2)],
    }
    _TUNED = {}

    def _tuned_kernel(config_set):
        if config_set not in _TUNED:
            _TUNED[config_set] = triton.autotune(
                configs=[
                    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                    for bm, bn, w, st in _CONFIG_SETS[config_set]
                ],
                key=["HEAD_DIM", "bucket_q", "bucket_k", "HAS_ROPE", "IS_PACKED", "HAS_MASK"],
            )(_rope_attn_fwd)
        return _TUNED[config_set]

    def _config_set(bucket_q, block_d, fp32):
        if fp32:
            return "f32"
        if bucket_q <= 16:
            return "q16"
        if bucket_q <= 32:
            return "q32"
        return "d64" if block_d <= 64 else "d128" if block_d <= 128 else "d256"

    _HAS_KERNEL = True


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


def _kernel_args(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, out,
                 skip_padded_queries=False):
    """The kernel's arguments for these (checked) inputs: (args, flags, nbatch, seqlen_q, seqlen_k, hq).

    Shared by the launcher and by the ahead-of-time build check (tests/_build_for_gpu.py), so the latter
    compiles exactly what a launch would.
    """
    packed = cu_seqlens is not None
    d = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    if packed:
        nbatch = cu_seqlens.numel() - 1
        seqlen_q = seqlen_k = int(max_seqlen)
        sq, sk, sv, so = ((0, *t.stride()[:2]) for t in (q, k, v, out))
    else:
        nbatch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        sq, sk, sv, so = (t.stride()[:3] for t in (q, k, v, out))

    has_rope = coords is not None
    has_mask = key_padding_mask is not None
    dummy = q  # stands in for absent pointers; never read (the matching flag is off)
    if has_rope:
        c = coords
        sc = (0, *c.stride()) if packed else tuple(c.stride())
        f = freqs.contiguous()
    else:
        c, f, sc = dummy, dummy, (0, 0, 0)
    if has_mask:
        m = key_padding_mask.view(torch.uint8)
        sm = tuple(m.stride())
        ranges = _key_ranges(key_padding_mask)
    else:
        m, ranges, sm = dummy, dummy, (0, 0)
    cu = cu_seqlens.contiguous() if packed else dummy  # read as a flat array

    block_d = max(16, _next_pow2(d))
    block_h = max(16, _next_pow2(d // 2)) if has_rope else 16
    qk_scale = float(scale) * 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
    bucket_q, bucket_k = _next_pow2(max(seqlen_q, 16)), _next_pow2(max(seqlen_k, 16))
    args = (
        q, k, v, out, c, f, cu, m, ranges,
        seqlen_q, seqlen_k, hq // hkv, qk_scale,
        *sq, *sk, *sv, *so, *sc, *sm,
        bucket_q, bucket_k,
    )
    flags = dict(
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_H=block_h,
        HAS_ROPE=has_rope, INTERLEAVED=rope_layout == "interleaved", IS_PACKED=packed,
        HAS_MASK=has_mask, ZERO_PAD_Q=has_mask and seqlen_q == seqlen_k and bool(skip_padded_queries),
        FAST_TRIG=q.device.type == "cuda" and torch.version.hip is None,
        IEEE_DOT=q.dtype == torch.float32,
    )
    return args, flags, nbatch, seqlen_q, seqlen_k, hq


def _launch(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries, out):
    """Launch the kernel into ``out`` (q's leading shape, contiguous). Arguments already checked."""
    packed = cu_seqlens is not None
    if out.numel() == 0 or (int(max_seqlen) if packed else q.shape[1]) == 0:
        return out
    if not packed and k.shape[1] == 0:
        return out.zero_()
    args, flags, nbatch, seqlen_q, seqlen_k, hq = _kernel_args(
        q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, out, skip_padded_queries
    )

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * nbatch, hq)

    if interpreting() and q.device.type == "cpu":
        # Called as is: the interpreter's kernels cannot be traced (the op is opaque there, see below).
        bm, bn = _INTERPRET_BLOCKS
        _rope_attn_fwd[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
    else:
        bucket_q, block_d = args[-2], flags["BLOCK_D"]
        kernel = _tuned_kernel(_config_set(bucket_q, block_d, q.dtype == torch.float32))
        wrap = getattr(torch.library, "wrap_triton", None)  # lets torch.compile trace the launch
        with torch.cuda.device(q.device):
            (wrap(kernel) if wrap is not None else kernel)[grid](*args, **flags)
    return out


def _rope_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: Optional[torch.Tensor],
    freqs: Optional[torch.Tensor],
    rope_layout: str,
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
    skip_padded_queries: bool = False,
) -> torch.Tensor:
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    if _POISON_OUTPUT:
        out.fill_(float("nan"))
    return _launch(
        q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries, out
    )


def _register_op():
    if not interpreting():
        # A custom op whose body torch.compile traces through: Inductor sees the kernel launch itself.
        return torch.library.triton_op("pevideo::rope_attention", _rope_attention_impl, mutates_args=())
    # Interpreted kernels cannot be traced (wrap_triton passes them through and they would run on fake
    # tensors), so under TRITON_INTERPRET the op is opaque, with a shape-only fake.
    op = torch.library.custom_op("pevideo::rope_attention", _rope_attention_impl, mutates_args=())

    @op.register_fake
    def _(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries=False):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    return op


_rope_attention_op = None
if _HAS_KERNEL and hasattr(torch.library, "triton_op"):
    try:
        _rope_attention_op = _register_op()
    except Exception:  # noqa: BLE001  (e.g. registered twice by a second copy of this module): launch directly
        _rope_attention_op = None


def _rope_attention_fused(
    q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries=False
):
    """The Triton path of :func:`rope_attention` (arguments already checked by ``_check_args``).

    Packed mode: ``max_seqlen`` None costs a host sync; when given it must be at least the longest
    segment (``_check_args`` verifies that only for CPU tensors or when it has to sync anyway).
    Padded mode adds a few small device ops (each row's range of real keys) and no host sync.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is not None and max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync; pass max_seqlen to avoid it
    max_seqlen = 0 if max_seqlen is None else int(max_seqlen)
    if _rope_attention_op is not None:
        return torch.ops.pevideo.rope_attention(
            q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries
        )
    return _rope_attention_impl(
        q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries
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
    """
    _check_args(q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries)
    reason = rope_attention_unsupported_reason(
        q, k, v, coords=coords, freqs=freqs, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens
    )
    if reason is None:
        return _rope_attention_fused(
            q, k, v, coords, freqs, rope_layout, cu_seqlens, max_seqlen, key_padding_mask, scale, skip_padded_queries
        )
    return rope_attention_ref(
        q, k, v, coords=coords, freqs=freqs, rope_layout=rope_layout, cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen, key_padding_mask=key_padding_mask, scale=scale, skip_padded_queries=skip_padded_queries,
    )
