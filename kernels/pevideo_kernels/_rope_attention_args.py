"""rope_attention's arguments, checked and resolved once into one record.

Two steps, so that a caller that attends many times with the same options (the model: every block of
the frame encoder, every temporal layer) checks and resolves them once per batch:

* :func:`attn_args` checks everything but q, k, v and returns an :class:`AttnArgs`. This is where
  ``cu_seqlens``' values are read, when that costs no device sync (see :func:`attn_args`).
* :func:`bind` checks q, k, v against the record (shapes, dtypes, devices: metadata only, never a
  sync) and resolves what depends on them -- the scale, how K is rotated (``rope_k``) -- into an
  :class:`AttnCall`, the one record the kernels, the autograd context and the backward take.

Torch only (no Triton): the public module, the host side and the backward all import it.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch

__all__ = ["AttnArgs", "AttnCall", "attn_args", "bind", "ROPE_K_MODES", "default_rope_k", "rope_k_mode",
           "debug_checks", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "MAX_TOKEN_STRIDE"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYOUTS = ("interleaved", "half")
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
# Kernels keep offsets inside one tile (at most 256 rows) in 32 bits and fold every block start into a
# 64-bit base pointer; a token stride below 2^23 elements keeps 256 rows' offsets under 2^31.
MAX_TOKEN_STRIDE = 1 << 23

# How the kernel rotates K (its ROPE_K flag); Q is always rotated once per program, in its prologue.
#   loop       K tiles rotated in the inner loop, cos/sin recomputed per tile (for every query block);
#   prerotate  one small pass writes rotated K to a scratch buffer; the loop is plain attention;
#   table      one small pass writes per-token float32 cos/sin; the loop rotates K tiles with FMAs.
ROPE_K_MODES = {"loop": 0, "prerotate": 1, "table": 2}
# Per shape, chosen by reading the sm_90 SASS (kernels/README.md), not yet by a GPU measurement: when a
# sequence spans several 128-row query blocks, every K tile is rotated once per query block in "loop";
# "prerotate" rotates it once and leaves a plain cp.async -> wgmma loop that fits 2 CTAs per SM. Shorter
# sequences (temporal clips, one query block each) rotate each K tile once anyway: "loop", no extra launch.
PREROTATE_MIN_SEQLEN = 129
_FORCED: list = [None]  # rope_k_mode's override; read where torch.compile traces, so it guards on it
_DEBUG = [os.environ.get("PEVIDEO_KERNELS_DEBUG", "0").strip().lower() not in ("", "0", "false", "no", "off")]


def default_rope_k(seqlen_q: int) -> str:
    """The ROPE_K mode a call with query sequences (segments) up to ``seqlen_q`` long uses by default."""
    return "prerotate" if seqlen_q >= PREROTATE_MIN_SEQLEN else "loop"


@contextmanager
def rope_k_mode(mode: Optional[str]) -> Iterator[None]:
    """Calls inside rotate K with ``mode`` (a ROPE_K_MODES key; None: the per-shape default), unless a call
    names its own ``rope_k``. Restores the previous setting on exit. Read where ``torch.compile`` traces,
    so a compiled function recompiles when it changes."""
    if mode is not None and mode not in ROPE_K_MODES:
        raise ValueError(f"rope_k mode must be one of {tuple(ROPE_K_MODES)}, got {mode!r}")
    before = _FORCED[0]
    _FORCED[0] = mode
    try:
        yield
    finally:
        _FORCED[0] = before


@contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Check ``cu_seqlens`` / ``max_seqlen`` values on every call, also on the GPU where that costs a host
    sync (by default they are checked only where they can be read without one). Also on with the
    environment variable ``PEVIDEO_KERNELS_DEBUG=1``."""
    before = _DEBUG[0]
    _DEBUG[0] = bool(enabled)
    try:
        yield
    finally:
        _DEBUG[0] = before


class AttnArgs(NamedTuple):
    """Everything of a :func:`rope_attention` call but q, k, v (see there for their meaning), checked.

    ``key_ranges`` (made by :func:`attn_args` from the mask) is each batch row's (first real key, last
    real key + 1, whether every key in between is real), int32 on the mask's device. ``n_tokens`` is
    ``cu_seqlens[-1]`` when its values were read on the host, else None.
    """

    coords: Optional[torch.Tensor] = None
    freqs: Optional[torch.Tensor] = None
    rope_layout: str = "interleaved"
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None
    key_padding_mask: Optional[torch.Tensor] = None
    scale: Optional[float] = None
    skip_padded_queries: bool = False
    rope_k: Optional[str] = None
    key_ranges: Optional[torch.Tensor] = None
    n_tokens: Optional[int] = None  # host-only: not passed to the registered ops

    def op_args(self) -> tuple:
        """The fields the registered ops take, in their order (all but ``n_tokens``)."""
        return tuple(self)[:-1]

    def options(self) -> dict:
        """The public keyword arguments these came from (what the reference takes)."""
        return dict(coords=self.coords, freqs=self.freqs, rope_layout=self.rope_layout, cu_seqlens=self.cu_seqlens,
                    max_seqlen=self.max_seqlen, key_padding_mask=self.key_padding_mask, scale=self.scale,
                    skip_padded_queries=self.skip_padded_queries)

    def tensors(self) -> tuple:
        """The record's tensors (None where absent), for ``save_for_backward``; see :meth:`with_tensors`."""
        return self.coords, self.freqs, self.cu_seqlens, self.key_padding_mask, self.key_ranges

    def with_tensors(self, coords, freqs, cu_seqlens, key_padding_mask, key_ranges) -> "AttnArgs":
        return self._replace(coords=coords, freqs=freqs, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask,
                             key_ranges=key_ranges)


class AttnCall(NamedTuple):
    """One checked call: q, k, v and its resolved :class:`AttnArgs` (``scale`` a float, ``rope_k`` a mode
    name, ``max_seqlen`` an int when packed). ``qkv``: the packed tensor q, k, v are ``unbind(-3)`` views
    of (:func:`rope_attention_qkvpacked`), else None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    args: AttnArgs
    qkv: Optional[torch.Tensor] = None


def key_ranges(mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool -> (batch, 3) int32: first real key, last real key + 1, 1 if all keys in between
    are real. On the mask's device, no host sync."""
    n = mask.shape[1]
    pos = torch.arange(1, n + 1, device=mask.device, dtype=torch.int32)
    m = mask.to(torch.int32)
    hi = (m * pos).amax(1) if n else m.sum(1, dtype=torch.int32)
    lo = (torch.where(mask, pos, n + 1).amin(1) - 1) if n else hi
    count = m.sum(1, dtype=torch.int32)
    contiguous = (count == hi - lo).to(torch.int32)
    return torch.stack((lo.to(torch.int32), hi.to(torch.int32), contiguous), 1).contiguous()


def _check_cu_values(b: list, max_seqlen: Optional[int]) -> int:
    """Check host-side cu_seqlens values; returns the longest segment."""
    if b[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {b[0]}")
    if any(y < x for x, y in zip(b[:-1], b[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {b}")
    longest = max(y - x for x, y in zip(b[:-1], b[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is below the longest segment ({longest})")
    return longest


def attn_args(
    *, coords=None, freqs=None, rope_layout="interleaved", cu_seqlens=None, max_seqlen=None, key_padding_mask=None,
    scale=None, skip_padded_queries=False, rope_k=None,
) -> AttnArgs:
    """Check :func:`rope_attention`'s options (everything but q, k, v) into an :class:`AttnArgs`.

    ``cu_seqlens`` values (start at 0, non-decreasing, ``max_seqlen`` at least the longest segment; the
    end is checked against q in :func:`bind`) are read on the host when that costs no device sync: when
    ``cu_seqlens`` is on the CPU, when ``max_seqlen`` is None (it is computed from them, one sync), or
    under :func:`debug_checks`. Otherwise (on a GPU with ``max_seqlen`` given, the hot path) they are the
    caller's contract, as in flash-attn's varlen functions: a wrong value leaves output rows unwritten.
    """
    if (coords is None) != (freqs is None):
        raise ValueError("coords and freqs go together: give both for RoPE, or neither")
    if coords is not None:
        if not isinstance(coords, torch.Tensor) or coords.dtype not in (torch.int32, torch.int64, torch.float32):
            raise ValueError(f"coords must be an int32, int64 or float32 tensor, got {getattr(coords, 'dtype', coords)}")
        if not isinstance(freqs, torch.Tensor) or freqs.dtype != torch.float32 or freqs.dim() != 2 or freqs.shape[0] != 3:
            raise ValueError("freqs must be a float32 tensor of shape (3, head_dim // 2)")
    if rope_layout not in _LAYOUTS:
        raise ValueError(f"rope_layout must be one of {_LAYOUTS}, got {rope_layout!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not isinstance(skip_padded_queries, bool):
        raise ValueError(f"skip_padded_queries must be a bool, got {skip_padded_queries!r}")
    if skip_padded_queries and key_padding_mask is None:
        raise ValueError("skip_padded_queries needs a key_padding_mask and self-attention (q and k of one length)")
    if rope_k is not None and rope_k not in ROPE_K_MODES:
        raise ValueError(f"rope_k must be one of {tuple(ROPE_K_MODES)} or None, got {rope_k!r}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt))
                                   or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    n_tokens = None
    ranges = None
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("give cu_seqlens (packed) or key_padding_mask (padded), not both")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor of segment boundaries (segments + 1,)")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens needs at least two entries (one segment)")
        if cu_seqlens.device.type == "cpu" or max_seqlen is None or _DEBUG[0]:
            b = cu_seqlens.tolist()  # (a host sync only on a GPU, where max_seqlen is missing or debugging)
            longest = _check_cu_values(b, max_seqlen)
            n_tokens = b[-1]
            max_seqlen = longest if max_seqlen is None else max_seqlen
    elif key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
            raise ValueError("key_padding_mask must be a (batch, seq) bool tensor (True = real key)")
        ranges = key_ranges(key_padding_mask)
    return AttnArgs(coords, freqs, rope_layout, cu_seqlens, None if cu_seqlens is None else max_seqlen,
                    key_padding_mask, None if scale is None else float(scale), skip_padded_queries, rope_k, ranges,
                    n_tokens)


def _check_qkv(q, k, v) -> None:
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


def _same_device(name, t, q) -> None:
    if t is not None and t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def bind(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttnArgs, qkv=None) -> AttnCall:
    """Check q, k, v against ``args`` (ValueError) and resolve the call: metadata only, no host sync."""
    _check_qkv(q, k, v)
    a = args
    d = q.shape[-1]
    if a.cu_seqlens is not None:
        if q.dim() != 3:
            raise ValueError(f"packed mode takes q, k, v of shape (tokens, heads, head_dim); q is {tuple(q.shape)}")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"packed q and k must have the same tokens, got {q.shape[0]} and {k.shape[0]}")
        if a.n_tokens is not None and a.n_tokens != q.shape[0]:
            raise ValueError(f"cu_seqlens must end at the number of tokens ({q.shape[0]}), got {a.n_tokens}")
        if a.coords is not None and tuple(a.coords.shape) != (q.shape[0], 3):
            raise ValueError(f"packed coords must have shape ({q.shape[0]}, 3), got {tuple(a.coords.shape)}")
        _same_device("cu_seqlens", a.cu_seqlens, q)
        if a.max_seqlen is None:
            raise ValueError("packed options need max_seqlen: build them with attn_args(), which computes it")
        seqlen_q = a.max_seqlen
    else:
        if q.dim() != 4:
            raise ValueError(
                f"q, k, v must be (batch, seq, heads, head_dim) (or (tokens, heads, head_dim) with cu_seqlens); q is {tuple(q.shape)}"
            )
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
        if k.shape[1] != q.shape[1] and a.coords is not None:
            raise ValueError("RoPE needs q and k of the same length (self-attention); got different lengths")
        if a.key_padding_mask is not None:
            if tuple(a.key_padding_mask.shape) != (k.shape[0], k.shape[1]):
                raise ValueError(f"key_padding_mask must have shape (batch, seq) = {(k.shape[0], k.shape[1])}, "
                                 f"got {tuple(a.key_padding_mask.shape)}")
            _same_device("key_padding_mask", a.key_padding_mask, q)
        if a.skip_padded_queries and q.shape[1] != k.shape[1]:
            raise ValueError("skip_padded_queries needs a key_padding_mask and self-attention (q and k of one length)")
        if a.coords is not None and tuple(a.coords.shape) != (q.shape[0], q.shape[1], 3):
            raise ValueError(f"coords must have shape {(q.shape[0], q.shape[1], 3)}, got {tuple(a.coords.shape)}")
        seqlen_q = q.shape[1]
    if a.coords is not None:
        if d % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {d}")
        if tuple(a.freqs.shape) != (3, d // 2):
            raise ValueError(f"freqs must be a float32 tensor of shape (3, {d // 2})")
        _same_device("coords", a.coords, q)
        _same_device("freqs", a.freqs, q)
        rope_k = a.rope_k or _FORCED[0] or default_rope_k(seqlen_q)
    else:
        rope_k = "loop"  # (nothing to rotate: the flag is unused)
    scale = d ** -0.5 if a.scale is None else a.scale
    return AttnCall(q, k, v, a._replace(scale=scale, rope_k=rope_k), qkv)
