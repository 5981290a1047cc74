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

It prints one line per build -- ``ok``/``FAILED``, the label (``rope_k=<mode>*``: the mode the shape
uses by default), then registers per thread, spill stores / loads (STL / LDL instructions in the
SASS), stack bytes, shared memory (Triton's allocation), whether the MMAs are Hopper's wgmma (HGMMA),
FRND instructions, MUFU.EX2 instructions and, for the backward kernels, exp2 per score (MUFU.EX2 per
thread over the score tile's elements per thread: 1.0 when no score is held twice) -- and exits
non-zero if any build fails. Run without TRITON_INTERPRET (tests/test_gpu_build.py runs it so), from
any directory and however Python is started (``PYTHONSAFEPATH=1`` included).

    python tests/_build_for_gpu.py [--arch 90] [--workers N] [--only SUBSTRING] [--list]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
# The sibling module (_build_bwd_for_gpu) from this folder, however Python was started: PYTHONSAFEPATH=1
# (or -P) leaves the script's folder off sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from pevideo.rope import pe_core_rope_2d, rope_1d  # noqa: E402
from pevideo_kernels import ROPE_ATTENTION, ROPE_K_MODES, attn_args  # noqa: E402
from pevideo_kernels import _patchify_triton as pz  # noqa: E402  (the kernels themselves, to compile)
from pevideo_kernels import _rope_attention_launch as ra  # noqa: E402
from pevideo_kernels import _rope_attention_triton as rt  # noqa: E402
from pevideo_kernels import _rope_attention_tuning as rtune  # noqa: E402

from _build_bwd_for_gpu import BWD_KERNELS, backward_jobs  # noqa: E402  (tests/: the training kernels' jobs)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_KERNELS = {
    "rope_attention": rt.rope_attn_fwd,
    "rope_rotate": rt.rope_rotate,
    "rope_table": rt.rope_table,
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


def _usage(compiled, scores_per_thread=None) -> dict:
    """Resource usage of a compiled kernel, read from its cubin and PTX. ``scores_per_thread``: score-tile
    elements per thread of one loop iteration (backward kernels), for exp2 per score."""
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
        "ex2": sass.count("MUFU.EX2"),
        "ex2_per_score": round(sass.count("MUFU.EX2") / scores_per_thread, 2) if scores_per_thread else "-",
    }


def _scores_per_thread(name, constexprs, options):
    """Score-tile elements per thread in one loop iteration of a backward kernel (else None)."""
    if not name.startswith("rope_attn_bwd"):
        return None
    named = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
    blocks = [v for k, v in named.items() if k in ("BLOCK_M", "BLOCK_N")]
    if len(blocks) != 2:  # (constexprs keyed by argument position in some Triton versions)
        params = _KERNELS[name].arg_names
        blocks = [v for k, v in constexprs.items() if params[k[0] if isinstance(k, tuple) else k] in ("BLOCK_M", "BLOCK_N")]
    return blocks[0] * blocks[1] / (32 * options["num_warps"])


def _build(job):
    """Compile one job; returns (label, error or None, usage dict)."""
    name, (signature, constexprs, attrs, options), arch, label = job
    try:
        src = ASTSource(fn=_KERNELS[name], signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        return label, None, _usage(compiled, _scores_per_thread(name, constexprs, options))
    except Exception as exc:  # noqa: BLE001  reported, and the run fails
        return label, f"{type(exc).__name__}: {exc}", {}


def attention_cases():
    """(label, q, k, v, AttnArgs): the model's shapes and more."""
    bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = []
    # PE-L frames: 8 frames x 577 tokens, q/k/v views of one (tokens, 3, 16, 64) qkv output, 2D RoPE
    n, L = 8, 577
    coords, freqs = pe_core_rope_2d(24, 24, 64, ref_feat_shape=(24, 24))
    frames = attn_args(coords=coords.repeat(n, 1), freqs=freqs, cu_seqlens=torch.arange(n + 1, dtype=torch.int32) * L,
                       max_seqlen=L)
    for dt in (bf, fp16, fp32):
        qkv = torch.empty(n * L, 3, 16, 64, dtype=dt)
        cases.append((f"frames {str(dt)[6:]}", *qkv.unbind(1), frames))
    # temporal: 8 clips x 17 tokens, 14 heads of 128, padded, 1D RoPE (and 33 tokens: the next bucket)
    for s in (17, 33):
        q = torch.empty(8, s, 14, 128, dtype=bf)
        coords, freqs = rope_1d(s, 128, theta=20000.0)
        args = attn_args(coords=coords.expand(8, s, 3).contiguous(), freqs=freqs,
                         key_padding_mask=torch.ones(8, s, dtype=torch.bool))
        cases.append((f"temporal s={s}", q, q, q, args))
    # attention pooling: 1 latent query per frame over 577 keys, 8 heads of 128, no RoPE
    kv = torch.empty(16, L, 2, 8, 128, dtype=bf)
    cases.append(("pool", torch.empty(1, 1, 8, 128, dtype=bf).expand(16, 1, 8, 128), kv[:, :, 0], kv[:, :, 1],
                  attn_args()))
    # joint 3D RoPE, half layout, head_dim 80 and 256, GQA
    q = torch.empty(2, 300, 4, 80, dtype=fp16)
    cases.append(("3d half d80", q, q, q, attn_args(coords=torch.zeros(2, 300, 3), freqs=torch.zeros(3, 40),
                                                    rope_layout="half",
                                                    key_padding_mask=torch.ones(2, 300, dtype=torch.bool))))
    q = torch.empty(2, 200, 4, 256, dtype=bf)
    k = torch.empty(2, 200, 2, 256, dtype=bf)
    cases.append(("d256 gqa", q, k, k, attn_args()))
    return cases


def _modes(label, default):
    """RoPE candidates to build for a case: every candidate for the bf16 frame and short temporal shapes
    (the ones the GPU run times them on; each build takes seconds), else the shape's default."""
    return list(ROPE_K_MODES) if label in ("frames bfloat16", "temporal s=17") else [default]


def jobs(arch: int) -> list:
    out, seen = [], set()
    for label, q, k, v, args in attention_cases():
        call = ROPE_ATTENTION.resolve(q, k, v, args)  # (as a call resolves: scale, the shape's default mode)
        default = call.args.rope_k
        o = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
        for mode in _modes(label, default) if args.coords is not None else [default]:
            a = call.args._replace(rope_k=mode)
            k2, c2, launch = ra.rope_prepass(mode, k, a.coords, a.freqs, a.rope_layout, a.cu_seqlens)
            mark = f" rope_k={mode}{'*' if mode == default else ''}" if args.coords is not None else ""
            if launch is not None:  # the per-forward pass: default launch options
                kernel, _, pargs, pflags = launch
                pflags = {**pflags, "FAST_TRIG": True}  # what a CUDA launch sets
                name = kernel.fn.__name__
                spec = launch_spec(name, pargs, pflags, arch)
                key = (name, repr(spec))
                if key not in seen:
                    seen.add(key)
                    out.append((name, spec, arch, f"{name} {label} [{mode}] sm_{arch}"))
            kargs, flags, *_ = ra.kernel_args(q, k2, v, a._replace(coords=c2), o)
            flags["FAST_TRIG"] = True  # what a CUDA launch sets
            config_set = rtune.config_set(kargs[-3], flags["BLOCK_D"], q.dtype == torch.float32, mode)
            for bm, bn, warps, stages in rtune.CONFIG_SETS[config_set]:
                kw = {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                out.append(("rope_attention", launch_spec("rope_attention", kargs, kw, arch), arch,
                            f"rope_attention {label} [{config_set} {bm}x{bn} w{warps} s{stages}]{mark} sm_{arch}"))
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
    ap.add_argument("--only", default=None, help="build only jobs whose label contains this substring")
    ap.add_argument("--list", action="store_true", help="print the jobs' labels, build nothing")
    args = ap.parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor

    todo = [j for j in jobs(args.arch) if args.only is None or args.only in j[-1]]
    if args.list:
        print("\n".join(j[-1] for j in todo))
        return 0
    width = max(len(j[-1]) for j in todo)
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for label, err, u in pool.map(_build, todo):
            if err:
                print(f"FAILED {label}: {err}", flush=True)
                failed += 1
            else:
                print(f"ok {label:<{width}} | regs={u['regs']:<3} spill_st={u['spill_st']:<3} spill_ld={u['spill_ld']:<3} "
                      f"stack={u['stack']:<4} smem={u['smem']:<6} wgmma={u['wgmma']:<3} frnd={u['frnd']} "
                      f"ex2={u['ex2']:<4} ex2_per_score={u['ex2_per_score']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
