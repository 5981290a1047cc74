"""The kernel parts of bench/device_run.py: env (machine, versions, the two ceilings), check (bf16
correctness of every kernel, one quick pass), rope_fwd and rope_bwd (rope_attention against what users
would use instead), patchify (against a device-to-device copy).

Built on bench_rope_attention (cases, providers, ``run_case`` / ``run_case_backward``), bench_video_input
(``bench_kernel``) and pevideo.benchtools; each part takes device_run's Context and returns its report.
"""
from __future__ import annotations

import argparse
import importlib.util
import warnings

import torch
import torch.nn.functional as F

GOAL_TFLOPS = 300.0  # useful TFLOP/s of the forward on the frame shape (issue 19)
GOAL_SPEEDUP = 1.15  # over the best other provider, forward and forward + backward, frame shape
GOAL_PATCHIFY = 0.8  # of the device-to-device copy's GB/s, uint8 frames -> bf16 rows
PATCHIFY_GOAL_CASE = "uint8 NHWC -> bfloat16"
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}
CHECK_RULE = "finite, every element written (outputs poisoned first), error vs fp32 <= 2x the PyTorch path's + tol"


def bra():
    import bench_rope_attention

    return bench_rope_attention


# --------------------------------------------------------------------------------------------------
# ROPE_K: the one place that knows how a mode is forced (issue 18 may change the switch: adapt here)
# --------------------------------------------------------------------------------------------------
def rope_k():
    """(modes, force, default): the ROPE_K candidates, a context manager forcing one for the launches
    inside it (a call's own ``rope_k=`` argument also forces it), and the frame shape's default mode (the
    default is per shape: ``pevideo_kernels.default_rope_k(seqlen)``; the temporal shape's is "loop")."""
    from pevideo_kernels import ROPE_K_MODES, default_rope_k, rope_k_mode

    return tuple(ROPE_K_MODES), rope_k_mode, default_rope_k(577)


def forced(mode: str, fn):
    """``fn`` with ROPE_K forced to ``mode`` on every call (timed calls come long after set-up)."""
    _, force, _ = rope_k()

    def run(*args, **kwargs):
        with force(mode):
            return fn(*args, **kwargs)

    return run


def autotune_choices() -> dict:
    """The config each autotuned rope_attention kernel picked, per tuning key (what to trim the
    candidate sets to)."""
    try:
        from pevideo_kernels import _rope_attention_tuning as T

        return {name: {str(key): str(cfg) for key, cfg in launch.chosen.items()}
                for name, launch in T.FWD_LAUNCH.items() if launch.chosen}
    except Exception as exc:  # noqa: BLE001  (a private detail: report, never fail on it)
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------------
def forced_sdpa(backend: str):
    """F.scaled_dot_product_attention with one SDPBackend forced (raises where it cannot serve)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = getattr(SDPBackend, backend)

    def sdpa(*args, **kwargs):
        with sdpa_kernel([b]):
            return F.scaled_dot_product_attention(*args, **kwargs)

    return sdpa


def compiled_rope(c, compile_kw):
    """PyTorch's RoPE for case ``c``, torch.compiled once and shared by the SDPA rows."""
    from pevideo_kernels import apply_rope_ref

    coords, freqs, layout = c.kw["coords"], c.kw["freqs"], c.kw["rope_layout"]
    return torch.compile(lambda x: apply_rope_ref(x, coords, freqs, layout), **{"dynamic": False, **compile_kw})


def pevideo_train(mode: str):
    """Factory: pevideo's forward as a function of (q, k, v), ROPE_K forced, its fused backward checked
    to be the one that runs."""
    def factory(c):
        from pevideo_kernels import rope_attention_unsupported_reason

        leaves = [t.detach().requires_grad_() for t in (c.q, c.k, c.v)]
        reason = rope_attention_unsupported_reason(*leaves, coords=c.kw.get("coords"), freqs=c.kw.get("freqs"),
                                                   key_padding_mask=c.kw.get("key_padding_mask"),
                                                   cu_seqlens=c.kw.get("cu_seqlens"))
        if reason is not None:
            raise RuntimeError(f"the fused backward would not run: {reason}")
        return forced(mode, bra()._bwd_forward(c, "pevideo"))

    return factory


def providers(ctx, c, rope, backward: bool):
    """name -> factory(c), for run_case (forward: a zero-argument callable) or run_case_backward
    (a function of q, k, v); and the rows not run, name -> status."""
    B = bra()
    modes, _, _ = rope_k()
    skipped, out = {}, {}
    for m in modes:
        key = f"rope_attention_bwd[{m}]" if backward else f"rope_attention[{m}]"
        ok, why = ctx.state["verdicts"].get(key, (True, None))
        if not ok:
            skipped[f"pevideo[{m}]"] = {"status": f"not timed: wrong in check ({why})"}
        elif backward:
            out[f"pevideo[{m}]"] = pevideo_train(m)
        else:
            out[f"pevideo[{m}]"] = lambda c, m=m: forced(m, B.prov_pevideo(c))
    for name, backend in SDPA_BACKENDS.items():
        if backward:
            out[name] = lambda c, b=backend: B._torch_fn(c, rope=rope, sdpa=forced_sdpa(b))
        else:
            out[name] = lambda c, b=backend: _bind(B._torch_fn(c, rope=rope, sdpa=forced_sdpa(b)), c)
    out["flex"] = lambda c: B.prov_flex(c, ctx.compile_kw)
    if not backward:
        out["flash_attn"] = B.prov_flash_attn
    elif importlib.util.find_spec("flash_attn") is not None:
        skipped["flash_attn"] = {"status": "not measured: the backward through flash-attn is not wired here"}
    else:
        skipped["flash_attn"] = {"status": "unavailable: flash_attn is not importable"}
    return out, skipped


def _bind(fn, c):
    return lambda: fn(c.q, c.k, c.v)


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
def cases(ctx, which: str):
    """[(name, estimate_s on a GPU, builder)] in priority order: 'check' (the shapes the timing parts
    use, so their compilation and autotuning is paid once), 'timing' or 'timing_bwd'."""
    B = bra()
    dev, dt = ctx.device, ctx.dtype
    if ctx.smoke:  # (the interpreted backward is slow: its timing runs the frame shape only)
        frames = ("frames2", 0, lambda: B.case_frames(2, dev, dt, grid=4, heads=2, head_dim=16))
        temporal = ("temporal", 0, lambda: B.case_temporal(dev, dt, clips=4, max_len=5, heads=2, head_dim=16))
        joint = ("joint3d", 0, lambda: B.case_joint3d(dev, dt, real_frames=(2, 1), max_frames=2, grid=3, heads=2,
                                                      head_dim=16))
        return {"check": [frames, temporal], "timing": [frames, temporal, joint], "timing_bwd": [frames]}[which]
    frames64 = ("frames64", 15, lambda: B.case_frames(64, dev, dt))
    temporal = ("temporal", 15, lambda: B.case_temporal(dev, dt))
    if which == "check":
        return [frames64, temporal]
    if which == "timing_bwd":
        return [("frames256", 35, lambda: B.case_frames(256, dev, dt)), ("temporal", 30, temporal[2])]
    # joint 3D attention over whole clips, half the frames padding (issue 19), last
    return [("frames256", 25, lambda: B.case_frames(256, dev, dt)), temporal, frames64,
            ("joint3d", 25, lambda: B.case_joint3d(dev, dt))]


# --------------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------------
def part_env(ctx) -> dict:
    import os

    import pevideo
    import pevideo_kernels
    from pevideo.benchtools import ceilings, package_versions

    versions = package_versions("torch", "triton", "transformers", "timm", "torchvision", "numpy", "av",
                                "flash-attn", "safetensors", "matplotlib", "nvidia-ml-py", "pytest")
    report = {
        "versions": versions,
        "importable": {m: importlib.util.find_spec(m) is not None for m in ("av", "flash_attn", "timm", "pynvml")},
        "paths": {"pevideo": pevideo.__file__, "pevideo_kernels": pevideo_kernels.__file__},
        "environment": {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                                                      "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")},
        "triton_available": pevideo_kernels.HAS_TRITON,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        modes, _, default = rope_k()
        report["rope_k"] = {"modes": list(modes), "default": default}
        ctx.state["rope_k_default"] = default
    except Exception as exc:  # noqa: BLE001
        report["rope_k"] = {"error": f"{type(exc).__name__}: {exc}"}
    ctx.save(report)
    gpu = ctx.device.type == "cuda"
    c = ceilings(ctx.device, gemm_n=8192 if gpu else 256, copy_bytes=2 * 2**30 if gpu else 16 * 2**20)
    report["ceilings"] = ctx.state["ceilings"] = c
    print(f"ceilings on {ctx.device.type}: copy {c['copy_gbps']:.0f} GB/s (read + write), "
          f"{c['matmul_dtype']} matmul {c['matmul_tflops']:.1f} TFLOP/s")
    return report


def _errors(out, ref) -> dict:
    d = (out.float() - ref.float()).abs()
    return {"max": d.max().item(), "rms": d.pow(2).mean().sqrt().item(), "finite": bool(torch.isfinite(out).all())}


def judge(err: dict, torch_err: dict, tol: float) -> tuple[bool, str | None]:
    if not err["finite"]:
        return False, "non-finite output (an element left unwritten, or overflow)"
    for key in ("rms", "max"):
        if err[key] > 2 * torch_err[key] + tol:
            return False, f"error {key} {err[key]:.3g} > 2 x PyTorch's {torch_err[key]:.3g} + {tol:g}"
    return True, None


def _verdict(kernels: dict, key: str, case: str, ok: bool, why: str | None, **info) -> None:
    entry = kernels.setdefault(key, {"ok": True, "reason": None, "cases": {}})
    entry["cases"][case] = {"ok": ok, "why": why, **info}
    if not ok and entry["ok"]:
        entry["ok"], entry["reason"] = False, f"{case}: {why}"


def part_check(ctx) -> dict:
    from pevideo_kernels import rope_attention_ref
    from pevideo_kernels.testing import poison_outputs

    B = bra()
    modes, _, default = rope_k()
    tol = 1e-4 if ctx.dtype == torch.float32 else 1e-6
    report = {"rule": CHECK_RULE, "tolerance": tol, "dtype": str(ctx.dtype).replace("torch.", ""),
              "rope_k_default": default, "kernels": {}}
    kernels = report["kernels"]
    for name, _, build in cases(ctx, "check"):
        c = build()
        ref = B.reference_real(c)
        with torch.no_grad():
            torch_err = _errors(c.real(rope_attention_ref(c.q, c.k, c.v, **c.kw)), ref)
        for m in modes:
            try:
                fn = forced(m, B.prov_pevideo(c))
                with torch.no_grad(), poison_outputs():
                    err = _errors(c.real(fn()), ref)
                ok, why = judge(err, torch_err, tol)
            except Exception as exc:  # noqa: BLE001  (a kernel that fails is a failed check, not a failed run)
                err, ok, why = None, False, B._failure(exc)
            _verdict(kernels, f"rope_attention[{m}]", name, ok, why, err=err, torch_err=torch_err)
        ctx.save(report)
        P = {f"pevideo[{m}]": pevideo_train(m) for m in modes}
        P["torch"] = lambda c: B._torch_fn(c)
        res = B.run_case_backward(c, P, quick=True, time_it=False)
        t = res["providers"]["torch"].get("grad_err_max")
        for m in modes:
            e = res["providers"][f"pevideo[{m}]"]
            if e["status"] != "ok":
                ok, why = False, e["status"]
            elif t is None:
                ok, why = False, "no PyTorch gradient to compare with: " + res["providers"]["torch"]["status"]
            else:
                ok = e["grad_err_max"] <= 2 * t + tol
                why = None if ok else f"gradient error {e['grad_err_max']:.3g} > 2 x PyTorch's {t:.3g} + {tol:g}"
            _verdict(kernels, f"rope_attention_bwd[{m}]", name, ok, why, grad_err_max=e.get("grad_err_max"),
                     torch_grad_err_max=t)
        ctx.save(report)
        del c, ref, res
    _check_patchify(ctx, kernels)
    ctx.state["verdicts"] = {k: (v["ok"], v["reason"]) for k, v in kernels.items()}
    for k, v in kernels.items():
        print(f"  {k:<28} {'ok' if v['ok'] else 'WRONG: ' + str(v['reason'])}")
    return report


def patchify_shape(ctx) -> dict:
    return dict(size=28, patch=14, batch=1, num_frames=2) if ctx.smoke else dict(size=336, patch=14, batch=8, num_frames=16)


def _check_patchify(ctx, kernels) -> None:
    from pevideo_kernels import patchify_normalize, patchify_normalize_ref, patchify_unsupported_reason
    from pevideo_kernels.testing import poison_outputs

    s = patchify_shape(ctx)
    n, size, p = s["batch"] * s["num_frames"], s["size"], s["patch"]
    x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=ctx.device)
    kw = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), out_dtype=torch.bfloat16)
    try:
        reason = patchify_unsupported_reason(x)
        if reason is not None:
            raise RuntimeError(f"the fused kernel would not run: {reason}")
        with poison_outputs():
            got = patchify_normalize(x, p, **kw)
        want = patchify_normalize_ref(x, p, **kw)
        if ctx.gpu:
            ok = bool(torch.equal(got, want))
            why = None if ok else f"not bit-exact: max |diff| {(got.float() - want.float()).abs().max().item():.3g}"
        else:  # the interpreter truncates to bfloat16 where the GPU rounds
            ok = bool(torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0))
            why = None if ok else "differs from the reference by more than bf16 truncation"
    except Exception as exc:  # noqa: BLE001
        ok, why = False, bra()._failure(exc)
    _verdict(kernels, "patchify", f"{n}x{size}x{size} uint8 -> bf16", ok, why)


def _annotate(res: dict, frames_goal: bool, goal_tflops: float | None) -> None:
    """Speed-ups over the best other provider, the fastest ROPE_K mode, the goal: frames >= GOAL_SPEEDUP
    (and goal_tflops); padded clips (joint3d) faster by at least the padded fraction; else faster."""
    rows = res["providers"]
    others = {n: e["ms"] for n, e in rows.items() if not n.startswith("pevideo") and "ms" in e}
    mine = {n: e["ms"] for n, e in rows.items() if n.startswith("pevideo[") and "ms" in e}
    best_other = min(others, key=others.get) if others else None
    res["best_other"] = best_other
    for n in mine:
        if best_other:
            rows[n]["speedup_vs_best_other"] = others[best_other] / rows[n]["ms"]
    best = min(mine, key=mine.get) if mine else None
    res["rope_k_winner"] = best[len("pevideo["):-1] if best else None
    res["best_pevideo"] = best
    if best is None:
        res["goal_met"] = None
        return
    e = rows[best]
    speedup = e.get("speedup_vs_best_other")
    if frames_goal:
        res["goal"] = {"speedup": GOAL_SPEEDUP, **({"tflops": goal_tflops} if goal_tflops else {})}
        res["goal_met"] = speedup is not None and speedup >= GOAL_SPEEDUP and (
            goal_tflops is None or e["tflops"] >= goal_tflops)
    else:  # temporal: faster than every provider; joint3d: by at least the padded fraction
        joint = res["case"].startswith("joint")
        want = 1.0 + res.get("padded_fraction", 0.0) if joint else 1.0
        res["goal"] = {"speedup": want}
        res["goal_met"] = speedup is not None and (speedup >= want if joint else speedup > want)


def _overall_winner(results: list[dict]) -> dict:
    by_case = {r["case"]: r.get("rope_k_winner") for r in results}
    frames = [r for r in results if r["case"].startswith("frames") and r.get("rope_k_winner")]
    pick = max(frames, key=lambda r: r["flops"]) if frames else None
    return {"mode": pick["rope_k_winner"] if pick else None, "decided_on": pick["case"] if pick else None,
            "by_case": by_case}


def _timing_part(ctx, backward: bool) -> dict:
    from pevideo.benchtools import sync

    B = bra()
    modes, _, default = rope_k()
    c_ = ctx.state.get("ceilings")
    floors = {"matmul_bf16_tflops": c_["matmul_tflops"], "copy_gbps": c_["copy_gbps"]} if c_ else None
    report = {"backward": backward, "rope_k_modes": list(modes), "rope_k_default": default,
              "floors": floors, "cases": [], "skipped_cases": []}
    for name, estimate, build in cases(ctx, "timing_bwd" if backward else "timing"):
        if ctx.left() < estimate:
            report["skipped_cases"].append({"case": name, "reason": f"time: {max(0, ctx.left()):.0f} s left for this "
                                            f"part (its cap or the budget), the case needs ~{estimate} s"})
            print(f"  {name}: skipped (budget)")
            continue
        c = build()
        rope = compiled_rope(c, ctx.compile_kw)
        fns, not_run = providers(ctx, c, rope, backward)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if backward:
                res = B.run_case_backward(c, fns, quick=ctx.smoke)
            else:
                res = B.run_case(c, fns, floors, quick=ctx.smoke, ref=B.reference_real(c))
        res["providers"].update(not_run)
        res["warnings"] = sorted({str(w.message)[:200] for w in caught})[:8]
        if c.mask is not None:
            res["padded_fraction"] = 1.0 - sum(c.lens) / c.mask.numel()
        _annotate(res, name.startswith("frames"), None if backward else GOAL_TFLOPS)
        (B.print_case_backward if backward else B.print_case)(res)
        report["cases"].append(res)
        report["rope_k_winner"] = _overall_winner(report["cases"])
        ctx.save(report)
        del c, rope, fns
        sync()
        if ctx.gpu:
            torch.cuda.empty_cache()
    report["rope_k_winner"] = _overall_winner(report["cases"])
    report["autotune"] = autotune_choices()
    if report["skipped_cases"]:
        report["status"] = "partial"
        report["reason"] = "cases skipped: " + ", ".join(s["case"] for s in report["skipped_cases"])
    return report


def part_rope_fwd(ctx) -> dict:
    return _timing_part(ctx, backward=False)


def part_rope_bwd(ctx) -> dict:
    return _timing_part(ctx, backward=True)


def part_patchify(ctx) -> dict:
    import bench_video_input

    ok, why = ctx.state["verdicts"].get("patchify", (True, None))
    if not ok:
        return {"status": "skipped", "reason": f"not timed: wrong in check ({why})"}
    s = patchify_shape(ctx)
    res = bench_video_input.bench_kernel(argparse.Namespace(device=ctx.device.type, **s))
    goal = next((r for r in res["cases"] if r["case"] == PATCHIFY_GOAL_CASE), None)
    res["goal"] = {"case": PATCHIFY_GOAL_CASE, "fraction_of_copy": GOAL_PATCHIFY}
    res["goal_met"] = goal is not None and goal["kernel_fraction_of_copy"] >= GOAL_PATCHIFY
    return res
