"""Compile pevideo's Triton kernels ahead of time for a GPU architecture, without a GPU, as a launch would.

Triton's interpreter (how the CPU tests run the kernels) never runs the GPU compiler, so a kernel can pass
every CPU test and still fail to build for a real GPU, or build into something slow. This compiles, for
Hopper (sm_90), every autotune config the attention launcher can pick for the model's real shapes (and
each RoPE candidate, ``ROPE_K_MODES``, with its per-forward pass), and the patchify kernel's configs.

Each build is the one a launch makes: the arguments are real (CPU) tensors with the launch's shapes and
strides, built by the launcher's own helpers (``rope_prepass``, ``kernel_args``), and Triton's own binder
(``triton.runtime.jit.create_function_from_signature`` + ``JITFunction._pack_args``, what
``JITFunction.run`` calls) derives the signature and the specialization a launch would: 16-byte aligned
pointers and integers divisible by 16 get ``tt.divisibility`` 16, integers equal to 1 become constants.
(Torch allocations are 16-byte aligned on CPU as on CUDA.)

It prints one line per build -- ``ok``/``FAILED``, the label, then registers per thread, spill stores /
loads (STL / LDL instructions in the SASS), stack bytes, shared memory (Triton's allocation), whether
the MMAs are Hopper's wgmma (HGMMA), and FRND instructions -- and exits non-zero if any build fails.
Run without TRITON_INTERPRET (tests/test_gpu_build.py runs it so).

    python tests/_build_for_gpu.py [--arch 90] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from pevideo.rope import pe_core_rope_2d, rope_1d  # noqa: E402
from pevideo_kernels import _patchify_triton as pz  # noqa: E402  (the kernels themselves, to compile)
from pevideo_kernels import _rope_attention_launch as ra  # noqa: E402

from _build_bwd_for_gpu import BWD_KERNELS, backward_jobs  # noqa: E402  (tests/: the training kernels' jobs)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_KERNELS = {
    "rope_attention": ra.rope_attn_fwd,
    "rope_rotate": ra.rope_rotate,
    "rope_table": ra.rope_table,
    "patchify": pz.patchify_kernel.fn,  # (autotuned: its configs are compiled one by one)
    **BWD_KERNELS,  # the training side: the forward storing the log-sum-exp uses rope_attention's
}


def launch_spec(name, args, kwargs, arch):
    """(signature, constexprs, attrs, options) that ``kernel[grid](*args, **kwargs)`` would compile, from
    Triton's own binder; ``kwargs`` holds the constexpr flags and the config's num_warps/num_stages."""
    kernel = _KERNELS[name]
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _tool(name, *args):
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True, check=True).stdout


def _usage(compiled) -> dict:
    """Resource usage of a compiled kernel, read from its cubin and PTX."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        res = _tool("cuobjdump", "--dump-resource-usage", f.name)
        sass = _tool("cuobjdump", "-sass", f.name)
    finally:
        os.remove(f.name)
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, re.M)
    return {
        "regs": int(regs.group(1)) if regs else -1,
        "spill_st": ops.count("STL"),
        "spill_ld": ops.count("LDL"),
        "stack": int(stack.group(1)) if stack else -1,
        "smem": compiled.metadata.shared,
        "wgmma": "yes" if "HGMMA" in ops else "no",
        "frnd": ops.count("FRND"),
    }


def _build(job):
    """Compile one job; returns (label, error or None, usage dict)."""
    name, (signature, constexprs, attrs, options), arch, label = job
    try:
        src = ASTSource(fn=_KERNELS[name], signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        return label, None, _usage(compiled)
    except Exception as exc:  # noqa: BLE001  reported, and the run fails
        return label, f"{type(exc).__name__}: {exc}", {}


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
        cases.append((f"frames {str(dt)[6:]}", qkv[:, 0], qkv[:, 1], qkv[:, 2], coords.repeat(n, 1), freqs, "interleaved", cu, L, None))
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


def _modes(label, coords):
    """RoPE candidates to build for a case: the default everywhere; every candidate for the bf16 frame
    and short temporal shapes, the ones the GPU run times them on (each build takes seconds)."""
    if coords is None:
        return ["loop"]
    if label in ("frames bfloat16", "temporal s=17"):
        return list(ra.ROPE_K_MODES)
    return [ra.DEFAULT_ROPE_K]


def jobs(arch: int) -> list:
    out, seen = [], set()
    for label, q, k, v, coords, freqs, layout, cu, max_seqlen, mask in attention_cases():
        o = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
        for mode in _modes(label, coords):
            k2, c2, launch = ra.rope_prepass(mode, k, coords, freqs, layout, cu)
            if launch is not None:  # the per-forward pass: default launch options
                kernel, _, pargs, pflags = launch
                pflags = {**pflags, "FAST_TRIG": True}  # what a CUDA launch sets
                name = kernel.fn.__name__
                spec = launch_spec(name, pargs, pflags, arch)
                key = (name, repr(spec))
                if key not in seen:
                    seen.add(key)
                    out.append((name, spec, arch, f"{name} {label} [{mode}] sm_{arch}"))
            kargs, flags, *_ = ra.kernel_args(q, k2, v, c2, freqs, layout, cu, max_seqlen, mask, q.shape[-1] ** -0.5, o,
                                              rope_k=mode)
            flags["FAST_TRIG"] = True  # what a CUDA launch sets
            config_set = ra.config_set(kargs[-2], flags["BLOCK_D"], q.dtype == torch.float32)
            for bm, bn, warps, stages in ra.CONFIG_SETS[config_set]:
                kw = {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                out.append(("rope_attention", launch_spec("rope_attention", kargs, kw, arch), arch,
                            f"rope_attention {label} [{config_set} {bm}x{bn} w{warps} s{stages}]"
                            f"{f' rope_k={mode}' if coords is not None else ''} sm_{arch}"))
    # patchify: uint8 (N, 336, 336, 3) frames, an index, bf16 rows
    frames, idx, rows = torch.empty(1, dtype=torch.uint8), torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.bfloat16)
    s_n, s_h, s_w, s_c = 336 * 336 * 3, 336 * 3, 3, 1
    for block, warps in pz.CUDA_CONFIGS:
        for normalize in (True, False):
            pargs = (frames, idx, rows, s_n, s_c, s_h, s_w, 24 * 3 * 14 * 14, 24, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
            kw = {"P": 14, "HAS_INDEX": True, "NORMALIZE": normalize, "BLOCK": block, "num_warps": warps}
            out.append(("patchify", launch_spec("patchify", pargs, kw, arch), arch,
                        f"patchify [BLOCK {block} w{warps} normalize={normalize}] sm_{arch}"))
    out.extend(backward_jobs(arch, launch_spec))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor

    todo = jobs(args.arch)
    width = max(len(j[-1]) for j in todo)
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for label, err, u in pool.map(_build, todo):
            if err:
                print(f"FAILED {label}: {err}", flush=True)
                failed += 1
            else:
                print(f"ok {label:<{width}} | regs={u['regs']:<3} spill_st={u['spill_st']:<3} spill_ld={u['spill_ld']:<3} "
                      f"stack={u['stack']:<4} smem={u['smem']:<6} wgmma={u['wgmma']:<3} frnd={u['frnd']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
