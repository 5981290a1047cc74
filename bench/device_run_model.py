"""The model parts of bench/device_run.py: tower (fidelity, then pevideo fast / fast+compile / CUDA graph /
eager against transformers, through ``pevideo.bench``), embed (the embedding pipeline's encoder busy
share, through bench_embed; frames decoded ahead when PyAV is missing) and gpu_tests (``pytest -m gpu``).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_FULL = 1.3  # pevideo fast over transformers (sdpa, bf16), full batches of 16-frame clips (issue 20)
GOAL_PADDED = 2.5  # clips of 16, 12, 8, 4, 2, 1 frames padded to 16
GOAL_FRAMES_PER_S = 1500.0  # frame encoder, full batches
GOAL_COS = 0.999  # fast bf16 vs transformers fp32, per clip
GOAL_BUSY = 0.8  # encoder busy share of the embedding run
TOWER_COMPILE_S = 150  # seconds of budget the tower needs left (after fidelity) to include fast+compile
FAST_KERNELS = ("rope_attention", "patchify")  # check verdicts the fast tower depends on


def _fast_blocked(ctx) -> str | None:
    """Why the fast providers must not be timed (a kernel they run was wrong in check), else None."""
    verdicts = ctx.state["verdicts"]
    default = ctx.state.get("rope_k_default")
    for key, (ok, why) in verdicts.items():
        if ok:
            continue
        if key == "patchify" or (default is None and key.startswith("rope_attention[")) or key == f"rope_attention[{default}]":
            return f"{key} wrong in check ({why})"
    return None


def fidelity(ctx, config, lengths) -> dict:
    """pevideo fast (low precision) and transformers (low precision) against transformers in fp32, on the
    same random weights and clips: cosine per clip of the pooled output, error of each."""
    from transformers import PeVideoEncoder as HFPeVideoEncoder

    import pevideo
    from pevideo.bench import FULL_FRAMES, _inputs

    torch.manual_seed(0)
    ref = HFPeVideoEncoder(config).eval()
    fast = pevideo.PeVideoEncoder(config, fast=True, num_classes=config.vision_config.num_labels).eval()
    missing, unexpected = fast.load_state_dict(ref.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights don't line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    low = copy.deepcopy(ref).to(ctx.device, ctx.dtype)
    ref.to(ctx.device)
    fast.to(ctx.device, ctx.dtype)
    pixels, mask = _inputs(config, lengths, FULL_FRAMES, ctx.device, torch.float32)
    with torch.no_grad():
        a = ref(pixel_values_videos=pixels, padding_mask_videos=mask).pooler_output.float()
        e = low(pixel_values_videos=pixels.to(ctx.dtype), padding_mask_videos=mask).pooler_output.float()
        f = fast(pixels.to(ctx.dtype), padding_mask_videos=mask).pooler_output.float()
    cos = F.cosine_similarity(f, a, dim=-1)
    tol = 1e-4 if ctx.dtype == torch.float32 else 0.0

    def err(x):
        d = (x - a).abs()
        return {"max": d.max().item(), "rms": d.pow(2).mean().sqrt().item()}

    fe, te = err(f), err(e)
    ok = bool(torch.isfinite(f).all()) and cos.min().item() >= GOAL_COS and all(
        fe[k] <= 2 * te[k] + tol for k in ("max", "rms"))
    report = pevideo.kernel_report(fast)
    del ref, low, fast
    return {"lengths": lengths, "dtype": str(ctx.dtype).replace("torch.", ""), "cos_min": cos.min().item(),
            "cos_per_clip": cos.tolist(), "fast_err": fe, "transformers_low_precision_err": te, "ok": ok,
            "goal": f"cos >= {GOAL_COS} per clip; error <= 2x transformers' own "
                    f"{str(ctx.dtype).replace('torch.', '')} error vs fp32",
            "kernels": report, "not_fused": {op: why for op, why in report.items() if why != "fused"}}


def _tower_goals(results: list[dict]) -> list[dict]:
    def rows(batch_prefix, names):
        return [r for r in results if r["batch"].startswith(batch_prefix) and r["provider"] in names]

    fast_names = ("pevideo fast", "pevideo fast+compile", "pevideo fast+graph")
    goals = []
    for prefix, short, goal in (("full", "full", GOAL_FULL), ("unequal", "padded", GOAL_PADDED)):
        best = max(rows(prefix, fast_names), key=lambda r: r["speedup_vs_transformers"] or 0, default=None)
        value = best["speedup_vs_transformers"] if best else None
        goals.append({"name": f"{prefix} batch, best fast provider's speed-up over transformers", "short": f"{short} x HF",
                      "goal": goal, "value": value, "provider": best["provider"] if best else None,
                      "met": value is not None and value >= goal})
    full = rows("full", fast_names)
    fps = max((r["frames_per_s"] for r in full), default=None)
    goals.append({"name": "full batch, frames/s (whole tower)", "short": "frames/s", "goal": GOAL_FRAMES_PER_S,
                  "value": fps, "met": fps is not None and fps >= GOAL_FRAMES_PER_S})
    plain, comp = rows("full", ("pevideo fast",)), rows("full", ("pevideo fast+compile",))
    if plain and comp:
        goals.append({"name": "full batch, fast+compile faster than fast (ms ratio)", "short": "compile/fast",
                      "goal": 1.0, "value": plain[0]["ms"] / comp[0]["ms"], "met": comp[0]["ms"] < plain[0]["ms"]})
    return goals


def part_tower(ctx) -> dict:
    from pevideo import bench

    gpu = ctx.gpu
    preset = "pe-av-large" if gpu else "tiny"
    config = bench.CONFIGS[preset]()
    unequal = list(bench.UNEQUAL) if gpu else [2, 1]
    report = {"preset": preset}
    try:
        report["fidelity"] = fidelity(ctx, config, unequal)
    except Exception as exc:  # noqa: BLE001  (the timing below still tells something)
        report["fidelity"] = {"ok": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    fid = report["fidelity"]
    print(f"  fidelity: cos min {fid.get('cos_min', float('nan')):.6f}, ok {fid['ok']}, kernels {fid.get('kernels')}")
    ctx.save(report)
    blocked = _fast_blocked(ctx) or (None if fid["ok"] is not False else "fidelity check failed")
    # Inductor's first compile of the blocks takes a minute or more: only where the budget has it
    left = ctx.left()
    no_compile = gpu and left < TOWER_COMPILE_S
    args = argparse.Namespace(
        device=ctx.device.type, dtype="bf16" if gpu else "fp32", preset=preset, clips=8 if gpu else 1,
        unequal=unequal, warmup=3 if gpu else 0, repeats=10 if gpu else 1, budget=3.0 if gpu else 1.0,
        fast_on_cpu=ctx.smoke, no_transformers=False, no_compile=no_compile, no_fast=blocked is not None,
        compile_backend=ctx.compile_kw.get("backend"), cuda_graphs=gpu)
    result = bench.run(args)
    if blocked:
        result["notes"].append(f"fast providers not timed: {blocked}")
    if no_compile and not blocked:
        result["notes"].append(f"pevideo fast+compile not run: {left:.0f} s of the budget were left, compiling "
                               f"and timing needs ~{TOWER_COMPILE_S} s (rerun with --parts tower)")
    bench.print_table(result)
    report.update(result)
    report["goals"] = _tower_goals(result["results"])
    return report


# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------
class Predecoded(torch.utils.data.Dataset):
    """Clips decoded ahead (uint8 (T, H, W, 3) in memory), item i resized by the processor in the worker
    as ``pevideo.embed.workers.ClipDataset`` does right after decoding; what the pipeline's workers do,
    less the decoding itself (for a machine without PyAV)."""

    def __init__(self, clips, processor, length):
        self.clips, self.processor, self.length = clips, processor, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        frames = self.clips[i % len(self.clips)]
        return dict(index=i, path=f"predecoded-{i % len(self.clips)}", frames=self.processor.resize_frames(frames),
                    total=frames.shape[0], indices=list(range(frames.shape[0])), error=None)


def _feed(ds, model, processor, batch_size, workers, device, encode=True):
    """The pipeline's loop (pevideo.embed.encode.run_clips) over ``ds``: (clips, seconds, seconds waited)."""
    from pevideo.embed.encode import Encoder
    from pevideo.embed.workers import collate, worker_init

    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers else None, prefetch_factor=2 if workers else None)
    enc = Encoder(model, processor, pooled=False)
    n, wait, pending = 0, 0.0, None
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        launched = enc.launch(batch) if (batch is not None and encode) else None
        if batch is not None and not encode:
            n += len(batch["items"])
            continue
        if pending is not None:
            n += len(enc.collect(pending))
        if launched is None:
            break
        pending = launched
    return n, time.perf_counter() - start, wait


def _embed_predecoded(ctx, why: str, fast: bool) -> dict:
    import numpy as np

    import bench_embed
    from pevideo import PeVideoVideoProcessor
    from pevideo.embed.workers import collate

    gpu = ctx.gpu
    preset, clips, bs, frames = ("pe-av-large", 256, 8, 16) if gpu else ("tiny", 4, 2, 4)
    workers = [4, 15] if gpu else [0, 1]
    model = bench_embed.build_model(preset, ctx.device, ctx.dtype, fast)
    h, w = model.video_encoder.vit.args.img_size
    processor = PeVideoVideoProcessor(size={"height": h, "width": w})
    g = torch.Generator().manual_seed(0)
    src = (360, 640) if gpu else (48, 64)
    ds = Predecoded([torch.randint(0, 256, (frames, *src, 3), dtype=torch.uint8, generator=g) for _ in range(8 if gpu else 2)],
                    processor, clips)
    ceiling = bench_embed.encoder_rate(model, processor, collate([ds[i] for i in range(bs)]), ctx.device,
                                       8.0 if gpu else 0.5)
    rows = []
    for nw in workers:
        with bench_embed.GpuSampler(ctx.device) as sampler:
            n, wall, wait = _feed(ds, model, processor, bs, nw, ctx.device)
        rows.append(dict(workers=nw, clips=n, wall_s=round(wall, 3), clips_per_s=round(n / wall, 2),
                         waited_on_decoding=round(wait / wall, 3), encoder_busy=round(min(1.0, n / wall / ceiling), 3),
                         gpu_util=round(float(np.median(sampler.samples)) / 100, 3) if sampler.samples else None))
        print(f"  workers {nw:>2}: {rows[-1]['clips_per_s']:.1f} clips/s, encoder busy {100 * rows[-1]['encoder_busy']:.0f}%")
    n, wall, _ = _feed(ds, model, processor, bs, max(workers), ctx.device, encode=False)
    return dict(preset=preset, dtype=str(ctx.dtype).replace("torch.", ""), fast=fast, num_frames=frames,
                batch_size=bs, clips=clips, source=f"frames decoded ahead, {src[1]}x{src[0]} uint8 ({why})",
                encoder_only_clips_per_s=round(ceiling, 2), results=rows,
                decode_only={"workers": max(workers), "clips_per_s": round(n / wall, 2), "what": "resize only"})


def part_embed(ctx) -> dict:
    import bench_embed

    gpu = ctx.gpu
    blocked = _fast_blocked(ctx)
    fast = gpu and blocked is None
    if importlib.util.find_spec("av") is None:
        why = "PyAV is not importable: carry .whl (python bench/device_run.py --prepare)"
        print(f"  {why}; timing the pipeline on frames decoded ahead")
        report = _embed_predecoded(ctx, why, fast)
    else:
        args = argparse.Namespace(
            videos=None, clips=256 if gpu else 4, unique=8 if gpu else 2, seconds=10.0 if gpu else 1.0,
            size="360x640" if gpu else "48x64", preset="pe-av-large" if gpu else "tiny",
            workers="4,15" if gpu else "0,1", repeats=1, batch_size=8 if gpu else 2, num_frames=16 if gpu else 4,
            shard_size=1024, device=ctx.device.type, dtype=None, fast=fast, out=None,
            encode_budget=8.0 if gpu else 0.5, decode_only=True)
        report = bench_embed.run(args)
    if blocked:
        report["note"] = f"fast=False: {blocked}"
    top = max(report["results"], key=lambda r: r["workers"])
    report["goal"] = {"encoder_busy": GOAL_BUSY, "workers": top["workers"]}
    report["goal_met"] = top["encoder_busy"] >= GOAL_BUSY
    return report


# --------------------------------------------------------------------------------------------------
# gpu_tests
# --------------------------------------------------------------------------------------------------
def part_gpu_tests(ctx) -> dict:
    if ctx.smoke:
        return {"status": "skipped", "reason": "smoke: the -m gpu tests run only on a GPU (pytest skips them on CPU)"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", "tests"]
    timeout = max(10.0, ctx.left() - 5)
    timed_out = False
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, timed_out = None, True
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)), None)
    print("\n".join(lines[-15:]))
    report = {"command": " ".join(cmd), "returncode": rc, "timed_out": timed_out, "summary_line": summary,
              "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:30], "tail": text[-4000:]}
    if timed_out:
        report.update(status="partial", reason=f"stopped after {timeout:.0f} s (the budget)")
    elif rc != 0:
        report.update(status="ok", reason=f"pytest exit {rc}: {summary}")
    return report
