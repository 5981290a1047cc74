"""The training side of the ahead-of-time GPU build check (tests/_build_for_gpu.py): build jobs for
rope_attention's backward kernels (dQ and dK/dV) and for the forward storing the log-sum-exp, for the
model's training shapes, with exactly the arguments a launch would pass (``_bwd_kernel_args``,
``kernel_args``), real CPU tensors of the launch's shapes and strides. ``backward_jobs(arch, launch_spec)``
returns jobs in _build_for_gpu's format; ``BWD_KERNELS`` maps their kernel names to the kernels.
"""
from __future__ import annotations

import importlib

import torch

from pevideo.rope import pe_core_rope_2d, rope_1d
from pevideo_kernels import _rope_attention_bwd_triton as kt
from pevideo_kernels import _rope_attention_launch as ra

rb = importlib.import_module("pevideo_kernels.rope_attention_bwd")  # (the module; the package exports the function)

__all__ = ["BWD_KERNELS", "backward_jobs", "backward_cases"]

BWD_KERNELS = {"rope_attn_bwd_dq": kt.rope_attn_bwd_dq, "rope_attn_bwd_dkdv": kt.rope_attn_bwd_dkdv}


def backward_cases():
    """(label, q, k, v, coords, freqs, layout, cu_seqlens, max_seqlen, mask, skip_padded_queries)."""
    bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = []
    n, L = 8, 577  # PE-L frames: q/k/v views of one (tokens, 3, 16, 64) qkv output, 2D RoPE
    for dt in (bf, fp32):  # (fp16 takes bf16's tiles)
        qkv = torch.empty(n * L, 3, 16, 64, dtype=dt)
        coords, freqs = pe_core_rope_2d(24, 24, 64, ref_feat_shape=(24, 24))
        cu = torch.arange(n + 1, dtype=torch.int32) * L
        cases.append((f"frames {dt}", qkv[:, 0], qkv[:, 1], qkv[:, 2], coords.repeat(n, 1), freqs, "interleaved",
                      cu, L, None, False))
    # temporal (padded, 1D RoPE) and the other head_dim classes of the tile configs, GQA
    for d, layout in ((128, "interleaved"), (80, "half"), (256, "half"), (12, "interleaved")):
        q = torch.empty(4, 33, 4, d, dtype=bf)
        kv = torch.empty(4, 33, 2, d, dtype=bf)
        coords, freqs = rope_1d(33, d)
        cases.append((f"padded d{d} {layout} skip", q, kv, kv, coords.expand(4, 33, 3), freqs, layout, None, None,
                      torch.ones(4, 33, dtype=torch.bool), True))
    # attention pooling: one latent query over a frame's keys, no RoPE
    q = torch.empty(16, 1, 8, 128, dtype=fp16)
    kv = torch.empty(16, 577, 2, 8, 128, dtype=fp16)
    cases.append(("pool fp16 no rope", q, kv[:, :, 0], kv[:, :, 1], None, None, "interleaved", None, None,
                  torch.ones(16, 577, dtype=torch.bool), False))
    return cases


def backward_jobs(arch: int, launch_spec) -> list:
    """(kernel name, launch spec, arch, label) build jobs of the training kernels, in _build_for_gpu's
    format; ``launch_spec`` is _build_for_gpu's (Triton's binder: the signature a launch would compile)."""
    out = []
    for label, q, k, v, coords, freqs, layout, cu, max_seqlen, mask, skip in backward_cases():
        o = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
        lse = ra._lse_buffer(q)
        scale = q.shape[-1] ** -0.5
        # The forward storing the log-sum-exp (STORE_LSE), in the default RoPE mode: only its epilogue
        # differs from the inference kernel (built over every config by _build_for_gpu), so the first
        # config of its set. (Its per-forward pass is the inference one, built there.)
        mode = ra.DEFAULT_ROPE_K if coords is not None else "loop"
        k2, c2, _ = ra.rope_prepass(mode, k, coords, freqs, layout, cu)
        fargs, flags, *_ = ra.kernel_args(q, k2, v, c2, freqs, layout, cu, max_seqlen, mask, scale, o, skip,
                                          rope_k=mode, lse=lse)
        assert flags["STORE_LSE"]
        flags["FAST_TRIG"] = True  # what a CUDA launch sets
        cset = ra.config_set(fargs[-2], flags["BLOCK_D"], q.dtype == torch.float32)
        for bm, bn, warps, stages in ra.CONFIG_SETS[cset][:1]:
            kw = {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            out.append(("rope_attention", launch_spec("rope_attention", fargs, kw, arch), arch,
                        f"rope_attention+lse {label} [{cset} {bm}x{bn} w{warps} s{stages}]"
                        f"{f' rope_k={mode}' if coords is not None else ''} sm_{arch}"))
        # the two backward kernels, with the tiles a CUDA launch picks
        if cu is not None:
            nb, sq, sk = cu.numel() - 1, max_seqlen, max_seqlen
        else:
            nb, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        delta = torch.empty(lse.shape, dtype=torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        launches = rb._bwd_kernel_args(o, q, k, v, o, lse, dq, dk, dv, delta, coords, freqs, layout, cu, mask, scale,
                                       skip, nb, sq, sk, None, None, False)
        for name, (args, (flags, opts), _grid) in zip(BWD_KERNELS, launches):
            kw = {**flags, "FAST_TRIG": True, **opts}
            out.append((name, launch_spec(name, args, kw, arch), arch,
                        f"{name} {label} [{flags['BLOCK_M']}x{flags['BLOCK_N']} w{opts['num_warps']} "
                        f"s{opts['num_stages']}] sm_{arch}"))
    return out
