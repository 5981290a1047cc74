"""RoPE + attention: pevideo's fused Triton kernel against the usual PyTorch ways of doing the same.

Providers, side by side on the same inputs:
  pevideo      rope_attention (RoPE applied as q/k tiles are loaded; packed or padded)
  torch        PyTorch RoPE (apply_rope_ref, eager) + F.scaled_dot_product_attention
  torch_comp   the same function under torch.compile
  flex         RoPE (compiled) + FlexAttention (compiled): a block mask for key padding; equal-length
               packed frames run as a plain batch (no mask needed)
  flash_attn   flash-attn's rotary (cos/sin tables per position) + flash_attn_varlen_func, if importable

Shapes (bf16):
  frames       PE-L frame encoder: N frames x 577 tokens (CLS + 24x24), 16 heads, head_dim 64, packed,
               PE-Core 2D RoPE (interleaved pairs); q, k, v are views of one (tokens, 3, heads, 64) tensor
  temporal     64 clips of 1..17 tokens (unequal), 14 heads, head_dim 128, padded, 1D RoPE ("half")
  joint3d      4 clips of up to 16 frames x 24 x 24 patches, 32 of the 64 frames padding, 16 heads,
               head_dim 64, padded, sectioned 3D (t, h, w) RoPE

Reported per provider: milliseconds (median, min and max over rounds that time the providers
interleaved, each round one triton.testing.do_bench burst per provider; pevideo.benchtools), useful TFLOP/s (4·n²·head_dim per
head per sequence, real tokens only), GB/s of the minimum traffic (q, k, v read and out written for real
tokens), the speed-up over `torch`, and the bf16 error (max abs, RMS) against a float32 reference on the
same rounded inputs. Floors measured in the same run: FLOPs / (bf16 GEMM rate) and bytes / (copy rate).

    python bench/bench_rope_attention.py                      # print a table
    python bench/bench_rope_attention.py --quick              # fewer shapes and repetitions
    python bench/bench_rope_attention.py --out auto           # also write bench/results/<gpu>-rope_attention.json
    python bench/bench_rope_attention.py --backward           # forward + backward (training), see below

--backward: forward + backward per provider (bench_rope_attention_backward.py): time, TFLOP/s, gradient
error, memory saved for the backward and peak memory.

Without CUDA there is nothing to time: the script says so and exits 0 (``--smoke`` instead checks the
providers' plumbing and correctness on tiny CPU shapes, under Triton's interpreter for pevideo).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

GOAL_TFLOPS = 330.0
GOAL_SPEEDUP = 1.3


# --------------------------------------------------------------------------------------------------
# machine and floors
# --------------------------------------------------------------------------------------------------
def _failure(exc: Exception) -> str:
    """A provider's status when it could not run: missing (an ImportError) or failed (BENCH_DEBUG=1 adds
    the traceback)."""
    if isinstance(exc, ImportError):
        return f"unavailable: {exc}"
    if os.environ.get("BENCH_DEBUG"):
        traceback.print_exc()
    return f"failed: {type(exc).__name__}: {str(exc)[:300]}"


def machine_info() -> dict:
    from pevideo.benchtools import machine_info as harness_machine_info

    try:
        import flash_attn

        fa = flash_attn.__version__
    except Exception:  # noqa: BLE001
        fa = None
    return harness_machine_info("cuda" if torch.cuda.is_available() else "cpu", flash_attn=fa)


def sampler(quick: bool):
    """One timed sample per provider and round: a CUDA-event burst on a GPU, the wall clock on CPU (where
    only a smoke run times, to check the plumbing)."""
    from pevideo.benchtools import cuda_events, wall_clock

    return cuda_events(rep_ms=15.0 if quick else 30.0) if torch.cuda.is_available() else wall_clock()


def time_providers(fns: dict, quick: bool) -> dict:
    """Providers timed in interleaved rounds (pevideo.benchtools): each round one CUDA-event burst per
    provider, in rotating order, so a GPU that clocks down mid-run slows all alike. name -> Timing."""
    from pevideo.benchtools import time_interleaved

    with torch.no_grad():
        return time_interleaved(fns, warmup=1, repeats=3 if quick else 7, min_repeats=3, sampler=sampler(quick))


def measure_floors(quick: bool) -> dict:
    """bf16 GEMM rate and device copy bandwidth, measured now on this GPU (pevideo.benchtools.ceilings)."""
    from pevideo.benchtools import ceilings

    c = ceilings("cuda", gemm_n=4096 if quick else 8192, copy_bytes=(1 if quick else 2) * 2**30,
                 rep_ms=40 if quick else 100)
    return {"matmul_bf16_tflops": round(c["matmul_tflops"], 1), "copy_gbps": round(c["copy_gbps"], 1),
            "gemm_n": c["gemm_n"], "copy_bytes": c["copy_bytes"]}


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
class Case:
    """Inputs in the layout rope_attention takes, plus what the other providers need."""

    def __init__(self, name, q, k, v, kw, lens, packed, desc, qkv=None):
        self.name, self.q, self.k, self.v, self.kw = name, q, k, v, kw
        self.qkv = qkv  # the packed tensor q, k, v are unbind(1) views of (frames), else None
        self.lens = list(lens)  # real tokens per sequence
        self.packed = packed
        self.desc = desc
        self.heads, self.head_dim = q.shape[-2], q.shape[-1]
        self.mask = kw.get("key_padding_mask")

    @property
    def flops(self) -> float:
        return float(sum(4 * n * n * self.head_dim * self.heads for n in self.lens))

    @property
    def bytes(self) -> float:
        n = sum(self.lens)
        return float(4 * n * self.heads * self.head_dim * self.q.element_size())  # q, k, v in, out

    def real(self, out):
        """Output rows of real tokens, packed (tokens, heads, head_dim), in sequence order."""
        return out if self.packed else out[self.mask]


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def rope3d_freqs(head_dim, sections=(0.25, 0.375, 0.375), theta=10000.0):
    """Sectioned 3D RoPE: the first pairs turn with t, then h, then w (each its own 1D band)."""
    half = head_dim // 2
    sizes = [int(round(s * half)) for s in sections]
    sizes[-1] = half - sum(sizes[:-1])
    f = torch.zeros(3, half)
    start = 0
    for axis, n in enumerate(sizes):
        f[axis, start:start + n] = 1.0 / theta ** (torch.arange(n, dtype=torch.float32) / max(n, 1))
        start += n
    return f


def case_frames(n_frames, device, dtype, grid=24, heads=16, head_dim=64):
    from pevideo.rope import pe_core_rope_2d

    coords, freqs = pe_core_rope_2d(grid, grid, head_dim, device=device)
    per = coords.shape[0]
    t = n_frames * per
    qkv = torch.randn(t, 3, heads, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)
    kw = dict(coords=coords.repeat(n_frames, 1), freqs=freqs, rope_layout="interleaved",
              cu_seqlens=_cu([per] * n_frames, device), max_seqlen=per)
    return Case(f"frames{n_frames}", q, k, v, kw, [per] * n_frames, True,
                f"{n_frames} frames x {per} tokens, {heads} heads, d={head_dim}, packed, 2D RoPE", qkv)


def case_temporal(device, dtype, clips=64, max_len=17, heads=14, head_dim=128):
    from pevideo.rope import rope_1d

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, max_len + 1, (clips,), generator=g)
    lens[0] = max_len
    coords, freqs = rope_1d(max_len, head_dim, device=device)
    mask = (torch.arange(max_len)[None] < lens[:, None]).to(device)
    q, k, v = (torch.randn(clips, max_len, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    kw = dict(coords=coords.expand(clips, max_len, 3), freqs=freqs, rope_layout="half", key_padding_mask=mask)
    return Case("temporal", q, k, v, kw, lens.tolist(), False,
                f"{clips} clips of 1..{max_len} tokens, {heads} heads, d={head_dim}, padded, 1D RoPE")


def case_joint3d(device, dtype, real_frames=(16, 8, 6, 2), max_frames=16, grid=24, heads=16, head_dim=64):
    per = grid * grid
    length = max_frames * per
    t, h, w = torch.meshgrid(torch.arange(max_frames), torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([t, h, w], -1).reshape(length, 3).to(torch.int32).to(device)
    freqs = rope3d_freqs(head_dim).to(device)
    b = len(real_frames)
    lens = [f * per for f in real_frames]
    mask = (torch.arange(length)[None] < torch.tensor(lens)[:, None]).to(device)
    q, k, v = (torch.randn(b, length, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    kw = dict(coords=coords.expand(b, length, 3), freqs=freqs, rope_layout="interleaved", key_padding_mask=mask)
    return Case("joint3d", q, k, v, kw, lens, False,
                f"{b} clips of {list(real_frames)}/{max_frames} frames x {grid}x{grid}, {heads} heads, "
                f"d={head_dim}, padded, 3D RoPE")


# --------------------------------------------------------------------------------------------------
# providers: each returns a zero-argument callable computing the output (setup done outside it)
# --------------------------------------------------------------------------------------------------
def prov_pevideo(c: Case):
    from pevideo_kernels import rope_attention, rope_attention_unsupported_reason

    reason = rope_attention_unsupported_reason(
        c.q, c.k, c.v, coords=c.kw.get("coords"), freqs=c.kw.get("freqs"),
        key_padding_mask=c.kw.get("key_padding_mask"), cu_seqlens=c.kw.get("cu_seqlens"),
    )
    if reason is not None and c.q.is_cuda:
        raise RuntimeError(f"the fused kernel would not run: {reason}")
    return lambda: rope_attention(c.q, c.k, c.v, **c.kw)


def _torch_fn(c: Case, rope=None, sdpa=None):
    """PyTorch RoPE + SDPA as a function of (q, k, v). ``rope(x)`` (default: apply_rope_ref with the
    case's coordinates, eager) and ``sdpa`` (default F.scaled_dot_product_attention) can be swapped, e.g.
    for a compiled RoPE and SDPA with one backend forced."""
    from pevideo_kernels import apply_rope_ref

    coords, freqs, layout = c.kw["coords"], c.kw["freqs"], c.kw["rope_layout"]
    rope = rope or (lambda x: apply_rope_ref(x, coords, freqs, layout))
    sdpa = sdpa or F.scaled_dot_product_attention
    if c.packed:
        n = c.lens[0]
        if any(x != n for x in c.lens):
            raise NotImplementedError("unequal packed segments")
        nseg = len(c.lens)

        def fn(q, k, v):
            q, k = rope(q), rope(k)
            q, k, v = (x.unflatten(0, (nseg, n)).transpose(1, 2) for x in (q, k, v))
            return sdpa(q, k, v).transpose(1, 2).flatten(0, 1)
    else:
        attn_mask = c.mask[:, None, None, :]

        def fn(q, k, v):
            q, k = rope(q), rope(k)
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            return sdpa(q, k, v, attn_mask=attn_mask).transpose(1, 2)
    return fn


def prov_torch(c: Case):
    fn = _torch_fn(c)
    return lambda: fn(c.q, c.k, c.v)


def prov_torch_comp(c: Case):
    fn = torch.compile(_torch_fn(c), dynamic=False)
    return lambda: fn(c.q, c.k, c.v)


def _sibling(filename: str):
    """A module of this file's folder, loaded by path (bench/ is no package; works under PYTHONSAFEPATH)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
    spec = importlib.util.spec_from_file_location(filename[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_others = _sibling("rope_attention_providers.py")  # FlexAttention and flash-attn, the compiled competitors
prov_flex, prov_flash_attn = _others.prov_flex, _others.prov_flash_attn
PROVIDERS = {
    "pevideo": prov_pevideo,
    "torch": prov_torch,
    "torch_comp": prov_torch_comp,
    "flex": prov_flex,
    "flash_attn": prov_flash_attn,
}


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------
def reference_real(c: Case):
    from pevideo_kernels import rope_attention_ref

    with torch.no_grad():
        ref = rope_attention_ref(c.q.float(), c.k.float(), c.v.float(), **c.kw)
    return c.real(ref)


def run_case(c: Case, providers, floors, quick, time_it=True, ref=None):
    """Each provider's error against ``ref`` and its time. ``providers``: names in PROVIDERS, or a
    mapping name -> factory(c) returning the zero-argument callable to time."""
    factories = providers if isinstance(providers, dict) else {name: PROVIDERS[name] for name in providers}
    res = {"case": c.name, "desc": c.desc, "flops": c.flops, "bytes": c.bytes, "providers": {}}
    if floors:
        res["floor_ms"] = {
            "compute": c.flops / (floors["matmul_bf16_tflops"] * 1e12) * 1e3,
            "memory": c.bytes / (floors["copy_gbps"] * 1e9) * 1e3,
        }
    fns = {}
    for name, factory in factories.items():
        entry = {}
        try:
            fn = factory(c)
            with torch.no_grad():
                out = fn()  # first call: compiles / autotunes
                real = getattr(fn, "real", c.real)(out)
            if ref is not None:
                diff = (real.float() - ref).abs()
                entry["err_max"] = diff.max().item()
                entry["err_rms"] = diff.pow(2).mean().sqrt().item()
            del out, real
            entry["status"] = "ok"
            fns[name] = fn
        except Exception as exc:  # noqa: BLE001  (one provider failing must not end the run)
            entry["status"] = _failure(exc)
        res["providers"][name] = entry
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if time_it and fns:
        try:
            timings = time_providers(fns, quick)
        except Exception:  # noqa: BLE001  (one provider failing mid-timing: time the others one by one)
            timings = {}
            for name, fn in fns.items():
                try:
                    timings[name] = time_providers({name: fn}, quick)[name]
                except Exception as exc:  # noqa: BLE001
                    res["providers"][name]["status"] = f"failed while timed: {type(exc).__name__}: {str(exc)[:300]}"
        for name, t in timings.items():
            entry = res["providers"][name]
            ms = 1e3 * t.median_s
            entry.update(ms=ms, ms_min=1e3 * t.min_s, ms_max=1e3 * t.max_s, rounds=len(t.times_s))
            entry["tflops"] = c.flops / (ms * 1e-3) / 1e12
            entry["gbps"] = c.bytes / (ms * 1e-3) / 1e9
    base = res["providers"].get("torch", {}).get("ms")
    for entry in res["providers"].values():
        if base and "ms" in entry:
            entry["speedup_vs_torch"] = base / entry["ms"]
    return res


def print_case(res):
    print(f"\n== {res['case']}: {res['desc']}")
    print(f"   {res['flops'] / 1e9:.1f} GFLOP useful, {res['bytes'] / 1e6:.1f} MB minimum traffic", end="")
    if "floor_ms" in res:
        fl = res["floor_ms"]
        print(f"; floors: compute {fl['compute']:.3f} ms, memory {fl['memory']:.3f} ms")
    else:
        print()
    print(f"   {'provider':<11} {'ms':>9} {'(min-max)':>15} {'TFLOP/s':>8} {'GB/s':>8} {'vs torch':>8} {'err max':>9} "
          f"{'err rms':>9}  status")
    for name, e in res["providers"].items():
        def f(key, width, fmt, suffix=""):
            return (format(e[key], fmt) + suffix if key in e else "-").rjust(width)
        rng = f"({e['ms_min']:.3f}-{e['ms_max']:.3f})" if "ms_min" in e else "-"
        print(f"   {name:<11} {f('ms', 9, '.3f')} {rng:>15} {f('tflops', 8, '.1f')} {f('gbps', 8, '.0f')} "
              f"{f('speedup_vs_torch', 8, '.2f', 'x')} {f('err_max', 9, '.2e')} {f('err_rms', 9, '.2e')}"
              f"  {e['status']}")


# --------------------------------------------------------------------------------------------------
# --backward (bench_rope_attention_backward.py), bound to this module
# --------------------------------------------------------------------------------------------------
BWD_PROVIDERS = ("pevideo", "torch", "flex")
_BWD = []


class _ThisModule:
    """This module's names as attributes (it may be loaded without a sys.modules entry)."""

    def __getattr__(self, name):
        return globals()[name]


def _backward():
    if not _BWD:
        _BWD.append(_sibling("bench_rope_attention_backward.py"))
    return _BWD[0]


def _bwd_forward(c: Case, name: str):
    return _backward()._bwd_forward(c, name, _ThisModule())


def run_case_backward(c: Case, providers, quick, time_it=True):
    return _backward().run_case_backward(c, providers, quick, _ThisModule(), time_it)


def print_case_backward(res):
    return _backward().print_case_backward(res)


def tower_step_memory(device: str = "cpu", frames: int = 3) -> dict:
    return _backward().tower_step_memory(device, frames)


def build_cases(quick, device, dtype, smoke=False):
    if smoke:  # tiny shapes for a CPU plumbing check
        return [
            case_frames(2, device, dtype, grid=4, heads=2, head_dim=16),
            case_temporal(device, dtype, clips=4, max_len=5, heads=2, head_dim=16),
            case_joint3d(device, dtype, real_frames=(2, 1), max_frames=2, grid=3, heads=2, head_dim=16),
        ]
    frames = (64,) if quick else (64, 128, 256)
    return [*(case_frames(n, device, dtype) for n in frames), case_temporal(device, dtype), case_joint3d(device, dtype)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes (64 frames only) and repetitions")
    p.add_argument("--out", default=None,
                   help="write JSON here; 'auto' = bench/results/<gpu>-rope_attention.json")
    p.add_argument("--providers", default=None, help=f"comma-separated subset of {list(PROVIDERS)} (default: all)")
    p.add_argument("--cases", default=None, help="comma-separated case names to keep (e.g. frames64,temporal)")
    p.add_argument("--no-error-check", action="store_true", help="skip the float32 reference (saves memory/time)")
    p.add_argument("--smoke", action="store_true",
                   help="without CUDA: check the providers on tiny CPU shapes (no timing, nothing written)")
    p.add_argument("--backward", action="store_true",
                   help=f"forward + backward (training): pevideo's fused backward against {list(BWD_PROVIDERS[1:])}, "
                        "time, TFLOP/s, memory saved for the backward and peak memory")
    args = p.parse_args(argv)
    if args.backward:
        return _backward().main_backward(args, _ThisModule())
    providers = [x for x in (args.providers or ",".join(PROVIDERS)).split(",") if x]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown providers {sorted(unknown)}")

    if not torch.cuda.is_available():
        if not args.smoke:
            print("bench_rope_attention: no CUDA device here; nothing to time. Run it on a GPU machine "
                  "(or pass --smoke for a CPU correctness check of the providers).")
            return 0
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before pevideo_kernels is imported
        ok = True
        for c in build_cases(True, "cpu", torch.float32, smoke=True):
            res = run_case(c, providers if args.providers else ["pevideo", "torch"], None, True,
                           time_it=False, ref=reference_real(c))
            print_case(res)
            ok &= all((e["status"] == "ok" and e["err_max"] < 1e-4) or e["status"].startswith("unavailable")
                      for e in res["providers"].values())
        print("\nsmoke:", "ok" if ok else "FAILED")
        return 0 if ok else 1

    info = machine_info()
    print("machine:", json.dumps(info))
    floors = measure_floors(args.quick)
    print(f"floors: bf16 GEMM {floors['matmul_bf16_tflops']} TFLOP/s, copy {floors['copy_gbps']} GB/s")
    results = []
    cases = build_cases(args.quick, "cuda", torch.bfloat16)
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.name in keep]
    for c in cases:
        ref = None if args.no_error_check else reference_real(c)
        res = run_case(c, providers, floors, args.quick, ref=ref)
        del ref
        print_case(res)
        results.append(res)
        torch.cuda.empty_cache()

    goals = []
    for res in results:
        if res["case"].startswith("frames"):
            pv = res["providers"].get("pevideo", {})
            if "tflops" in pv:
                goals.append({"case": res["case"], "tflops": pv["tflops"], "tflops_goal": GOAL_TFLOPS,
                              "speedup_vs_torch": pv.get("speedup_vs_torch"), "speedup_goal": GOAL_SPEEDUP,
                              "met": pv["tflops"] >= GOAL_TFLOPS and (pv.get("speedup_vs_torch") or 0) >= GOAL_SPEEDUP})
    for g in goals:
        print(f"goal {g['case']}: {g['tflops']:.0f} TFLOP/s (goal {GOAL_TFLOPS:.0f}), "
              f"{(g['speedup_vs_torch'] or 0):.2f}x torch (goal {GOAL_SPEEDUP}x): {'met' if g['met'] else 'NOT met'}")

    if args.out:
        from pevideo.benchtools import machine_slug, write_json

        path = args.out
        if path == "auto":
            path = os.path.join("bench", "results", f"{machine_slug(info)}-rope_attention.json")
        report = {"machine": info, "floors": floors, "quick": args.quick, "results": results, "goals": goals}
        print("wrote", write_json(path, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

