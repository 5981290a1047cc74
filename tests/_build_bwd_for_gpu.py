"""The training side of the ahead-of-time GPU build check (tests/_build_for_gpu.py): build jobs for
rope_attention's backward kernels (dQ and dK/dV) and for the forward storing the log-sum-exp, for the
model's training shapes, with exactly the arguments a launch would pass (``bwd_kernel_args``,
``kernel_args``), real CPU tensors of the launch's shapes and strides. ``backward_jobs(arch, launch_spec)``
returns jobs in _build_for_gpu's format; ``BWD_KERNELS`` maps their kernel names to the kernels.
"""
from __future__ import annotations

import torch

from pevideo.rope import pe_core_rope_2d, rope_1d
from pevideo_kernels import ROPE_ATTENTION, attn_args
from pevideo_kernels import _rope_attention_bwd_triton as kt
from pevideo_kernels import _rope_attention_launch as ra
from pevideo_kernels import _rope_attention_tuning as rtune

__all__ = ["BWD_KERNELS", "backward_jobs", "backward_cases"]

BWD_KERNELS = {"rope_attn_bwd_dq": kt.rope_attn_bwd_dq, "rope_attn_bwd_dkdv": kt.rope_attn_bwd_dkdv}


def backward_cases():
    """(label, q, k, v, AttnArgs)."""
    bf, fp32 = torch.bfloat16, torch.float32
    cases = []
    n, L = 8, 577  # PE-L frames: q/k/v views of one (tokens, 3, 16, 64) qkv output, 2D RoPE
    coords, freqs = pe_core_rope_2d(24, 24, 64, ref_feat_shape=(24, 24))
    frames = attn_args(coords=coords.repeat(n, 1), freqs=freqs, cu_seqlens=torch.arange(n + 1, dtype=torch.int32) * L,
                       max_seqlen=L)
    for dt in (bf, fp32):  # (fp16 takes bf16's tiles)
        qkv = torch.empty(n * L, 3, 16, 64, dtype=dt)
        cases.append((f"frames {dt}", *qkv.unbind(1), frames))
    # temporal (padded, 1D RoPE) and the other head_dim classes of the tile configs, GQA
    for d, layout in ((128, "interleaved"), (80, "half"), (256, "half"), (12, "interleaved")):
        q = torch.empty(4, 33, 4, d, dtype=bf)
        kv = torch.empty(4, 33, 2, d, dtype=bf)
        coords, freqs = rope_1d(33, d)
        cases.append((f"padded d{d} {layout} skip", q, kv, kv, attn_args(
            coords=coords.expand(4, 33, 3), freqs=freqs, rope_layout=layout,
            key_padding_mask=torch.ones(4, 33, dtype=torch.bool), skip_padded_queries=True)))
    # attention pooling: one latent query over a frame's keys, no RoPE
    q = torch.empty(16, 1, 8, 128, dtype=torch.float16)
    kv = torch.empty(16, 577, 2, 8, 128, dtype=torch.float16)
    cases.append(("pool fp16 no rope", q, kv[:, :, 0], kv[:, :, 1],
                  attn_args(key_padding_mask=torch.ones(16, 577, dtype=torch.bool))))
    return cases


def backward_jobs(arch: int, launch_spec) -> list:
    """(kernel name, launch spec, arch, label) build jobs of the training kernels, in _build_for_gpu's
    format; ``launch_spec`` is _build_for_gpu's (Triton's binder: the signature a launch would compile)."""
    out = []
    for label, q, k, v, args in backward_cases():
        a = ROPE_ATTENTION.resolve(q, k, v, args).args  # (resolved as a call is: scale, the default mode)
        o = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
        lse = ra.lse_buffer(q)
        # The forward storing the log-sum-exp (STORE_LSE), in the shape's default RoPE mode: only its
        # epilogue differs from the inference kernel (built over every config by _build_for_gpu), so the
        # first config of its set. (Its per-forward pass is the inference one, built there.)
        k2, c2, _ = ra.rope_prepass(a.rope_k, k, a.coords, a.freqs, a.rope_layout, a.cu_seqlens)
        fargs, flags, *_ = ra.kernel_args(q, k2, v, a._replace(coords=c2), o, lse)
        assert flags["STORE_LSE"]
        flags["FAST_TRIG"] = True  # what a CUDA launch sets
        cset = rtune.config_set(fargs[-3], flags["BLOCK_D"], q.dtype == torch.float32, a.rope_k)
        for bm, bn, warps, stages in rtune.CONFIG_SETS[cset][:1]:
            kw = {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            out.append(("rope_attention", launch_spec("rope_attention", fargs, kw, arch), arch,
                        f"rope_attention+lse {label} [{cset} {bm}x{bn} w{warps} s{stages}]"
                        f"{f' rope_k={a.rope_k}*' if a.coords is not None else ''} sm_{arch}"))
        # the two backward kernels, with the tiles a CUDA launch picks
        delta = torch.empty(lse.shape, dtype=torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _passes, dq_launch, dkdv = ra.bwd_kernel_args(o, q, k, v, o, lse, dq, dk, dv, delta, a)  # (passes: the
        launches = [("rope_attn_bwd_dq", dq_launch)] + [("rope_attn_bwd_dkdv", x) for x in dkdv]  # forward's)
        for name, (kargs, (flags, opts), _grid) in launches:
            kw = {**flags, "FAST_TRIG": True, **opts}
            part = {1: " dV", 2: " dK"}.get(flags.get("PART", 0), "")
            out.append((name, launch_spec(name, kargs, kw, arch), arch,
                        f"{name} {label} [{flags['BLOCK_M']}x{flags['BLOCK_N']} w{opts['num_warps']} "
                        f"s{opts['num_stages']}{part}] sm_{arch}"))
    return out
