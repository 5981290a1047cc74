"""The host side of rope_attention's kernels: the per-forward RoPE pass, the kernels' launch arguments
(forward and backward), and the launchers, all taking one resolved :class:`AttnArgs`.

Imports Triton; inside the package only :mod:`._rope_attention_autograd` (the host entry, which the
public module imports behind one guard) imports this module. ``kernel_args`` and ``bwd_kernel_args``
are shared with the ahead-of-time build check (``tests/_build_for_gpu.py``), so that it compiles
exactly what a launch would.
"""
from __future__ import annotations

import torch
import triton

from ._rope_attention_args import ROPE_K_MODES, AttnArgs, key_ranges
from ._rope_attention_bwd_triton import rope_attn_bwd_dkdv, rope_attn_bwd_dq
from ._rope_attention_triton import rope_attn_fwd, rope_rotate, rope_table
from ._rope_attention_tuning import FWD_LAUNCH, batch_bucket, bwd_configs, capturing, config_set, tracing, tuning_key
from ._triton import LAUNCH, interpreting

__all__ = ["launch_fwd", "launch_bwd", "kernel_args", "bwd_kernel_args", "rope_prepass", "lse_buffer",
           "with_defaults"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _fast_trig(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.version.hip is None


def _on_cpu(q: torch.Tensor) -> bool:
    return interpreting() and q.device.type == "cpu"


def with_defaults(q: torch.Tensor, args: AttnArgs) -> AttnArgs:
    """``args`` with what a direct call of the registered ops may leave out filled in (``bind`` resolves all
    of it already): the scale, ``max_seqlen`` (a host sync), the mode, the mask's key ranges."""
    if args.scale is None:
        args = args._replace(scale=q.shape[-1] ** -0.5)
    if args.cu_seqlens is not None and args.max_seqlen is None:
        args = args._replace(max_seqlen=int((args.cu_seqlens[1:] - args.cu_seqlens[:-1]).max()))  # host sync
    if args.rope_k is None:
        args = args._replace(rope_k="loop")
    if args.key_padding_mask is not None and args.key_ranges is None:
        args = args._replace(key_ranges=key_ranges(args.key_padding_mask))
    return args


def rope_prepass(mode, k, coords, freqs, rope_layout, cu_seqlens):
    """What ROPE_K ``mode`` runs before the attention kernel: (k, coords, launch) for ``kernel_args``.

    ``launch`` is None ("loop", or no RoPE) or (kernel, grid, args, flags): the pass that fills the
    returned scratch buffer -- rotated K for "prerotate" (k then points at it), the cos/sin table for
    "table" (coords then points at it). Allocates only; the caller launches (or compiles) it.
    """
    if coords is None or mode == "loop":
        return k, coords, None
    packed = cu_seqlens is not None
    d = k.shape[-1]
    block_h = max(16, _next_pow2(d // 2))
    kb = k[None] if packed else k  # (batch, seq, heads, head_dim); packed = one row of all tokens
    cb = coords[None] if packed else coords
    nb, seq = kb.shape[0], kb.shape[1]
    f = freqs.contiguous()
    fast = _fast_trig(k)
    block_t = 32
    if mode == "prerotate":
        out = torch.empty((*kb.shape[:-1], 2 * block_h), dtype=k.dtype, device=k.device)
        args = (kb, cb, f, out, seq, kb.shape[2], *kb.stride()[:3], *cb.stride(), *out.stride()[:3])
        flags = dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_H=block_h, INTERLEAVED=rope_layout == "interleaved",
                     FAST_TRIG=fast)
        launch = (rope_rotate, (triton.cdiv(seq, block_t), nb), args, flags)
        return (out[0] if packed else out), coords, launch
    # "table": one row of coordinates serves every batch row when coords were expanded over the batch
    nrows = 1 if cb.stride(0) == 0 else nb
    out = torch.empty((nrows, seq, 2, block_h), dtype=torch.float32, device=k.device)
    args = (cb, f, out, seq, *cb.stride(), *out.stride()[:3])
    flags = dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_H=block_h, FAST_TRIG=fast)
    launch = (rope_table, (triton.cdiv(seq, block_t), nrows), args, flags)
    return k, (out[0] if packed else out.expand(nb, seq, 2, block_h)), launch


def _shared_args(q, args: AttnArgs, seqlen_q, seqlen_k):
    """What the forward kernel and both backward kernels take alike: ``(strides, (c, f, cu, m, ranges),
    (*sc, *sm), flags)``.

    ``strides(t)``: t's (batch, token, head) strides as the kernels take them; packed tensors have no
    batch dim, so their token stride stands in (the kernels' row0 is then a token, see ``_row_start``).
    ``c``: coords (or the cos/sin table "table" mode made of them), ``sc`` its (batch, token, axis)
    strides; ``m``, ``sm``, ``ranges``: the key-padding mask as bytes, its strides, each row's real-key
    span; ``cu``: cu_seqlens. ``flags``: the constexpr flags the kernels share.
    """
    packed = args.cu_seqlens is not None
    d = q.shape[-1]

    def strides(t):
        return (t.stride(0), *t.stride()[:2]) if packed else tuple(t.stride()[:3])

    has_rope = args.coords is not None
    has_mask = args.key_padding_mask is not None
    dummy = q  # stands in for absent pointers; never read (the matching flag is off)
    if has_rope:
        c, f, sc = args.coords, args.freqs.contiguous(), strides(args.coords)  # (coords, or cos/sin table rows)
    else:
        c, f, sc = dummy, dummy, (0, 0, 0)
    if has_mask:
        m = args.key_padding_mask.view(torch.uint8)
        sm = tuple(m.stride())
        ranges = args.key_ranges
    else:
        m, ranges, sm = dummy, dummy, (0, 0)
    cu = args.cu_seqlens.contiguous() if packed else dummy  # read as a flat array
    flags = dict(
        HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)), BLOCK_H=max(16, _next_pow2(d // 2)) if has_rope else 16,
        HAS_ROPE=has_rope, INTERLEAVED=args.rope_layout == "interleaved", IS_PACKED=packed,
        HAS_MASK=has_mask, ZERO_PAD_Q=has_mask and seqlen_q == seqlen_k and bool(args.skip_padded_queries),
        FAST_TRIG=_fast_trig(q),
        IEEE_DOT=q.dtype == torch.float32,
    )
    return strides, (c, f, cu, m, ranges), (*sc, *sm), flags


def _sizes(q, k, args: AttnArgs):
    """(nbatch, seqlen_q, seqlen_k): segments and the longest one packed, else the batched shape."""
    if args.cu_seqlens is not None:
        return args.cu_seqlens.numel() - 1, int(args.max_seqlen), int(args.max_seqlen)
    return q.shape[0], q.shape[1], k.shape[1]


def kernel_args(q, k, v, args: AttnArgs, out, lse=None):
    """The forward kernel's arguments: (args, flags, nbatch, seqlen_q, seqlen_k, hq), for a resolved
    ``args`` (``with_defaults``) whose k / coords are what :func:`rope_prepass` returned for its mode.
    ``lse``: where to store the float32 log-sum-exp per (row, head) for the backward (shape
    ``q.shape[:-1]``, any strides); None (inference) compiles the store out."""
    hq, hkv = q.shape[-2], k.shape[-2]
    nbatch, seqlen_q, seqlen_k = _sizes(q, k, args)
    strides, (c, f, cu, m, ranges), sc_sm, flags = _shared_args(q, args, seqlen_q, seqlen_k)
    sl = strides(lse) if lse is not None else (0, 0, 0)
    qk_scale = float(args.scale) * 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
    kargs = (
        q, k, v, out, out if lse is None else lse, c, f, cu, m, ranges,
        seqlen_q, seqlen_k, hq // hkv, qk_scale,
        *strides(q), *strides(k), *strides(v), *strides(out), *sl, *sc_sm,
        _next_pow2(max(seqlen_q, 16)), _next_pow2(max(seqlen_k, 16)), batch_bucket(nbatch),
    )
    flags.update(ROPE_K=ROPE_K_MODES[args.rope_k] if flags["HAS_ROPE"] else 0, BLOCK_N_TAIL=16,
                 STORE_LSE=lse is not None)
    return kargs, flags, nbatch, seqlen_q, seqlen_k, hq


def lse_buffer(q: torch.Tensor) -> torch.Tensor:
    """A float32 ``q.shape[:-1]`` view of a head-major buffer (the kernel's stores are then contiguous)."""
    if q.dim() == 3:
        return torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device).t()
    return torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device).permute(0, 2, 1)


def launch_fwd(q, k, v, args: AttnArgs, with_lse: bool):
    """Allocate ``out`` (q's leading shape, v's head_dim, contiguous) and, ``with_lse``, the log-sum-exp;
    launch the forward (and its mode's per-forward pass). Returns (out, lse or None)."""
    args = with_defaults(q, args)
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    if LAUNCH.poison:
        out.fill_(float("nan"))  # (pevideo_kernels.testing.poison_outputs) rows the kernel skips show up
    lse = lse_buffer(q) if with_lse else None
    if lse is not None and LAUNCH.poison:
        lse.fill_(float("nan"))  # rows the kernel does not compute are never read by the backward either
    nbatch, seqlen_q, seqlen_k = _sizes(q, k, args)
    if out.numel() == 0 or seqlen_q == 0:
        return out, lse
    if seqlen_k == 0:
        return out.zero_(), lse
    k2, c2, pre = rope_prepass(args.rope_k, k, args.coords, args.freqs, args.rope_layout, args.cu_seqlens)
    kargs, flags, nbatch, seqlen_q, _, hq = kernel_args(q, k2, v, args._replace(coords=c2), out, lse)

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * nbatch, hq)

    if _on_cpu(q):  # the interpreter's kernels cannot be traced (the registered op is opaque there)
        if pre is not None:
            pre[0][pre[1]](*pre[2], **pre[3])
        bm, bn = LAUNCH.interpret_blocks
        rope_attn_fwd[grid](*kargs, **flags, BLOCK_M=bm, BLOCK_N=bn)
        return out, lse
    name = config_set(kargs[-3], flags["BLOCK_D"], q.dtype == torch.float32, args.rope_k)
    with torch.cuda.device(q.device):  # wrap_triton: torch.compile traces the launches (registered op)
        if pre is not None:
            torch.library.wrap_triton(pre[0])[pre[1]](*pre[2], **pre[3])
        FWD_LAUNCH[name](grid, kargs, flags, tuning_key(name, kargs, flags, q.dtype), capturing=capturing(q),
                         tracing=tracing(q))
    return out, lse


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def bwd_kernel_args(dout, q, k, v, out, lse, dq, dk, dv, delta, args: AttnArgs, block_m=None, block_n=None,
                    on_cpu=False):
    """The backward's launches, for a resolved ``args``: (passes, dQ launch, dK/dV launches). ``passes``:
    with RoPE, the two ``rope_rotate`` launches (kernel, grid, args, flags) that write rotated q and k to
    scratch buffers, which the kernels then read (rotating tiles inside their loops costs ~100 registers
    per thread); each kernel launch is (args, (constexpr flags, launch options), grid). Past head_dim 64
    the dK/dV kernel runs as two launches, dV then dK (its PART flag): one program's two float32
    accumulators would not fit in registers beside the tiles."""
    hq, hkv = q.shape[-2], k.shape[-2]
    nbatch, seqlen_q, seqlen_k = _sizes(q, k, args)
    strides, (c, f, cu, m, ranges), sc_sm, flags = _shared_args(q, args, seqlen_q, seqlen_k)
    passes = []
    if args.coords is not None:  # rotated once, read by both kernels; freed with the launch
        q, _, pre_q = rope_prepass("prerotate", q, args.coords, args.freqs, args.rope_layout, args.cu_seqlens)
        k, _, pre_k = rope_prepass("prerotate", k, args.coords, args.freqs, args.rope_layout, args.cu_seqlens)
        passes = [pre_q, pre_k]
    if on_cpu:  # (pevideo_kernels.testing.interpreter_blocks)
        cfg_q = cfg_k = (*LAUNCH.interpret_blocks, None, None)
    else:
        cfg_q, cfg_k = bwd_configs(v.shape[-1], q.dtype == torch.float32)
    if block_m or block_n:
        cfg_q = (block_m or cfg_q[0], block_n or cfg_q[1], *cfg_q[2:])
        cfg_k = (block_m or cfg_k[0], block_n or cfg_k[1], *cfg_k[2:])
    for bm, bn, _, _ in (cfg_q, cfg_k):
        if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got ({bm}, {bn})")
    conf_q = (dict(flags, BLOCK_M=cfg_q[0], BLOCK_N=cfg_q[1]),
              {} if on_cpu else dict(num_warps=cfg_q[2], num_stages=cfg_q[3]))
    parts = (0,) if v.shape[-1] <= 64 and q.dtype != torch.float32 else (1, 2)
    conf_k = [(dict(flags, BLOCK_M=cfg_k[0], BLOCK_N=cfg_k[1], PART=part),
               {} if on_cpu else dict(num_warps=cfg_k[2], num_stages=cfg_k[3])) for part in parts]
    common = (seqlen_q, seqlen_k, hq // hkv, float(args.scale))
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
    return passes, (dq_args, conf_q, grid_q), [(dkdv_args, conf, grid_k) for conf in conf_k]


def launch_bwd(dout, q, k, v, out, lse, args: AttnArgs, dq=None, dk=None, dv=None, block_m=None, block_n=None):
    """(dq, dk, dv) for checked inputs: allocated where not given, every element written."""
    args = with_defaults(q, args)
    dq, dk, dv = (torch.empty_like(x) if g is None else g for x, g in ((q, dq), (k, dk), (v, dv)))
    if LAUNCH.poison:  # (pevideo_kernels.testing.poison_outputs) so that unwritten elements show up
        for g in (dq, dk, dv):
            g.fill_(float("nan"))
    _, seqlen_q, seqlen_k = _sizes(q, k, args)
    if q.numel() == 0 and k.numel() == 0:
        return dq, dk, dv
    if seqlen_k == 0 or seqlen_q == 0:  # nothing attends (an empty key or query side): all gradients 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    on_cpu = _on_cpu(q)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # rowsum(dO * O), from the dQ kernel
    passes, (dq_args, (dq_flags, dq_opts), grid_q), dkdv = bwd_kernel_args(
        dout, q, k, v, out, lse, dq, dk, dv, delta, args, block_m, block_n, on_cpu)
    if on_cpu:
        for kernel, grid, pargs, pflags in passes:
            kernel[grid](*pargs, **pflags)
        rope_attn_bwd_dq[grid_q](*dq_args, **dq_flags)
        for kargs, (kflags, _), grid_k in dkdv:  # (they read the dQ kernel's delta)
            rope_attn_bwd_dkdv[grid_k](*kargs, **kflags)
    else:
        with torch.cuda.device(q.device):  # wrap_triton: torch.compile traces the launches (registered op)
            for kernel, grid, pargs, pflags in passes:
                torch.library.wrap_triton(kernel)[grid](*pargs, **pflags)
            torch.library.wrap_triton(rope_attn_bwd_dq)[grid_q](*dq_args, **dq_flags, **dq_opts)
            for kargs, (kflags, kopts), grid_k in dkdv:
                torch.library.wrap_triton(rope_attn_bwd_dkdv)[grid_k](*kargs, **kflags, **kopts)
    return dq, dk, dv
