"""Compile pevideo's Triton kernels ahead of time for a GPU architecture, without a GPU.

Triton's interpreter (how the CPU tests run the kernels) never runs the GPU compiler, so a kernel can pass
every CPU test and still fail to build for a real GPU. This compiles, for Hopper (sm_90), every autotune
config the attention launcher can pick for the model's real shapes, with exactly the arguments a launch
would pass (``kernel_args``), and the patchify kernel's configs; it prints one line per build and exits
non-zero on the first failure. Run without TRITON_INTERPRET (tests/test_gpu_build.py runs it so).

    python tests/_build_for_gpu.py [--arch 90]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pevideo.rope import pe_core_rope_2d, rope_1d  # noqa: E402
from pevideo_kernels import _patchify_triton as pz  # noqa: E402  (the kernels themselves, to compile)
from pevideo_kernels import _rope_attention_triton as ra  # noqa: E402

from _build_bwd_for_gpu import BWD_KERNELS, backward_jobs  # noqa: E402  (tests/: the training kernels' jobs)

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}


def _signature(kernel, args, constexprs):
    names = [p.name for p in kernel.params]
    runtime = [n for n in names if n not in constexprs]
    if len(runtime) != len(args):
        raise SystemExit(f"{kernel.fn.__name__}: {len(args)} arguments for {len(runtime)} parameters")
    sig = {}
    for name, value in zip(runtime, args):
        if isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    return sig


def _kernel(name):
    if name in BWD_KERNELS:
        return BWD_KERNELS[name]
    return ra.rope_attn_fwd if name == "rope_attention" else pz.patchify_kernel.fn


def _build(job):
    """Compile one (kernel name, args, constexprs, options, arch, label) job; returns (label, error or None)."""
    name, args, constexprs, options, arch, label = job
    kernel = _kernel(name)
    src = ASTSource(fn=kernel, signature=_signature(kernel, args, constexprs), constexprs=constexprs)
    try:
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:
        return label, f"{type(exc).__name__}: {exc}"
    return label, None


def attention_cases():
    """(label, q, k, v, coords, freqs, layout, cu_seqlens, max_seqlen, mask): the model's shapes and more."""
    bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = []
    # PE-L frames: 8 frames x 577 tokens, q/k/v views of one (tokens, 3, 16, 64) qkv output, 2D RoPE
    n, L = 8, 577
    for dt in (bf, fp16, fp32):
        qkv = torch.empty(n * L, 3, 16, 64, dtype=dt)
        coords, freqs = pe_core_rope_2d(24, 24, 64, ref_feat_shape=(24, 24))
        cu = torch.arange(n + 1, dtype=torch.int32) * L
        cases.append((f"frames {dt}", qkv[:, 0], qkv[:, 1], qkv[:, 2], coords.repeat(n, 1), freqs, "interleaved", cu, L, None))
    # temporal: 8 clips x 17 tokens, 14 heads of 128, padded, 1D RoPE (and 33 tokens: the next bucket)
    for s in (17, 33):
        q = torch.empty(8, s, 14, 128, dtype=bf)
        coords, freqs = rope_1d(s, 128, theta=20000.0)
        mask = torch.ones(8, s, dtype=torch.bool)
        cases.append((f"temporal s={s}", q, q, q, coords.expand(8, s, 3).contiguous(), freqs, "interleaved", None, None, mask))
    # attention pooling: 1 latent query per frame over 577 keys, 8 heads of 128, no RoPE
    kv = torch.empty(16, L, 2, 8, 128, dtype=bf)
    cases.append(("pool", torch.empty(1, 1, 8, 128, dtype=bf).expand(16, 1, 8, 128), kv[:, :, 0], kv[:, :, 1],
                  None, None, "interleaved", None, None, None))
    # joint 3D RoPE, half layout, head_dim 80 and 256, GQA
    q = torch.empty(2, 300, 4, 80, dtype=fp16)
    coords = torch.zeros(2, 300, 3)
    cases.append(("3d half d80", q, q, q, coords, torch.zeros(3, 40), "half", None, None, torch.ones(2, 300, dtype=torch.bool)))
    q = torch.empty(2, 200, 4, 256, dtype=bf)
    k = torch.empty(2, 200, 2, 256, dtype=bf)
    cases.append(("d256 gqa", q, k, k, None, None, "interleaved", None, None, None))
    return cases


def jobs(arch: int) -> list:
    out = []
    for label, q, k, v, coords, freqs, layout, cu, max_seqlen, mask in attention_cases():
        o = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
        kargs, flags, *_ = ra.kernel_args(q, k, v, coords, freqs, layout, cu, max_seqlen, mask, q.shape[-1] ** -0.5, o)
        flags["FAST_TRIG"] = True  # what a CUDA launch sets
        # tensors travel to the worker processes as small stand-ins of the same dtype (only dtypes matter)
        kargs = tuple(torch.empty(1, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in kargs)
        config_set = ra.config_set(kargs[-2], flags["BLOCK_D"], q.dtype == torch.float32)
        for bm, bn, warps, stages in ra.CONFIG_SETS[config_set]:
            out.append(("rope_attention", kargs, {**flags, "BLOCK_M": bm, "BLOCK_N": bn},
                        {"num_warps": warps, "num_stages": stages}, arch,
                        f"rope_attention {label} [{config_set} {bm}x{bn} w{warps} s{stages}] sm_{arch}"))
    frames, idx, rows = torch.empty(1, dtype=torch.uint8), torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.bfloat16)
    s_n, s_h, s_w, s_c = 336 * 336 * 3, 336 * 3, 3, 1
    for block, warps in pz.CUDA_CONFIGS:
        for normalize in (True, False):
            pargs = (frames, idx, rows, s_n, s_c, s_h, s_w, 24 * 3 * 14 * 14, 24, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
            out.append(("patchify", pargs, {"P": 14, "HAS_INDEX": True, "NORMALIZE": normalize, "BLOCK": block},
                        {"num_warps": warps}, arch, f"patchify [BLOCK {block} w{warps} normalize={normalize}] sm_{arch}"))
    out.extend(backward_jobs(arch))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor

    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for label, err in pool.map(_build, jobs(args.arch)):
            print(f"{'FAILED' if err else 'ok'} {label}" + (f": {err}" if err else ""), flush=True)
            failed += err is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
