"""``pevideo bench``: the video tower, pevideo fast / pevideo eager / transformers, side by side.

On the same random weights and the same synthetic clips it times a full batch of 16-frame clips and a
batch of unequal lengths (16, 12, 8, 4, 2, 1 frames padded to 16), prints a table (clips/s, frames/s,
ms per batch, peak memory, speed-up over transformers, share of the measured matmul rate), and writes
JSON and a PNG chart. With a GPU it runs the pe-av-large video architecture in bf16; without one, a
reduced configuration that finishes in about a minute (and says so).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass

import torch

from .loading import parse_dtype

__all__ = ["main", "add_arguments", "video_tower_flops", "pe_av_large_video_config", "reduced_video_config"]

FULL_FRAMES = 16
UNEQUAL = (16, 12, 8, 4, 2, 1)


def pe_av_large_video_config(num_classes: int = 1024):
    """The video tower of facebook/pe-av-large: PE-Core L/14 at 336 px, a 4-layer temporal transformer."""
    from transformers import PeVideoEncoderConfig

    return PeVideoEncoderConfig(
        vision_config=dict(architecture="vit_pe_core_large_patch14_336", num_labels=num_classes),
        hidden_size=1792, intermediate_size=4800, num_hidden_layers=4, num_attention_heads=14, head_dim=128,
    )


def reduced_video_config():
    """A CPU-sized stand-in: PE-Core S/16 widths at 224 px (197 tokens), 6 blocks, small temporal part."""
    from transformers import PeVideoEncoderConfig

    return PeVideoEncoderConfig(
        vision_config=dict(
            architecture="vit_pe_core_small_patch16_384", num_labels=512,
            model_args=dict(img_size=224, depth=6, ref_feat_shape=(14, 14)),
        ),
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, head_dim=64,
    )


def tiny_video_config():
    """A toy tower for smoke tests of the benchmark itself."""
    from transformers import PeVideoEncoderConfig

    return PeVideoEncoderConfig(
        vision_config=dict(architecture="vit_pe_core_tiny_patch16_384", num_labels=16,
                           model_args=dict(img_size=32, depth=1, embed_dim=32, num_heads=2)),
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
    )


CONFIGS = {"pe-av-large": pe_av_large_video_config, "reduced": reduced_video_config, "tiny": tiny_video_config}


def video_tower_flops(config, lengths: list[int]) -> float:
    """Useful matmul FLOPs of the video tower for clips of these lengths (2 per multiply-add).

    Counts real frames and real temporal positions only: what a batch costs if padding costs nothing.
    """
    from .config import vit_args

    a = vit_args(config.vision_config)
    n = sum(lengths)
    L, d, p = a.num_tokens, a.embed_dim, a.patch_size
    patches = a.grid[0] * a.grid[1]
    per_block = 2 * L * d * 3 * d + 4 * L * L * d + 2 * L * d * d + 2 * 2 * L * d * a.mlp_hidden
    pool = 2 * L * d * 2 * d + 4 * L * d + 2 * d * d + 2 * 2 * d * int(d * a.attn_pool_mlp_ratio)
    vit = 2 * patches * 3 * p * p * d + a.depth * per_block + pool + 2 * d * a.num_classes
    h, hd = config.hidden_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    temporal = 0.0
    for t in lengths:
        s = t + 1
        layer = 2 * s * h * (heads + 2 * kv) * hd + 4 * s * s * heads * hd + 2 * s * heads * hd * h
        layer += 3 * 2 * s * h * config.intermediate_size
        temporal += config.num_hidden_layers * layer + 2 * 2 * s * h * h * 3 + 2 * s * h * h
    latent_q = 2 * d * d  # the pooling query is the same for every frame: projected once
    return float(n * vit + latent_q + 2 * n * (a.num_classes * h + h * h) + temporal)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, dtype) -> float:
    """Measured dense matmul FLOP/s for this device and dtype (the roofline's compute ceiling)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@dataclass
class Result:
    provider: str
    batch: str
    clips: int
    real_frames: int
    ms: float
    peak_mem_mb: float | None
    kernels: dict | None = None

    @property
    def clips_per_s(self):
        return self.clips / (self.ms / 1e3)

    @property
    def frames_per_s(self):
        return self.real_frames / (self.ms / 1e3)


def _time(fn, device, warmup: int, repeats: int, budget_s: float) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        start = time.perf_counter()
        while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]  # median


def _inputs(config, lengths, t_max, device, dtype, seed=0):
    from .config import vit_args

    g = torch.Generator().manual_seed(seed)
    h, w = vit_args(config.vision_config).img_size
    pixels = torch.randn(len(lengths), t_max, 3, h, w, generator=g).clamp_(-1, 1)
    mask = torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]
    return pixels.to(device=device, dtype=dtype), mask.to(device)


def _build(config, device, dtype, with_transformers: bool):
    """(pevideo eager, pevideo fast, transformers or None) video towers sharing one set of random weights."""
    from .modeling import PeVideoEncoder

    num_classes = config.vision_config.num_labels
    torch.manual_seed(0)
    eager = PeVideoEncoder(config, num_classes=num_classes).eval()
    hf = None
    note = None
    if with_transformers:
        try:
            from transformers import PeVideoEncoder as HFPeVideoEncoder

            hf = HFPeVideoEncoder(config).eval()
            missing, unexpected = eager.load_state_dict(hf.state_dict(), strict=False)
            if missing or unexpected:
                raise RuntimeError(f"weights don't line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
            hf.to(device=device, dtype=dtype)
        except Exception as exc:  # transformers' model needs timm (and torchvision)
            hf = None
            note = f"transformers' PeVideoEncoder not run: {type(exc).__name__}: {exc}"
    eager.to(device=device, dtype=dtype)
    fast = PeVideoEncoder(config, fast=True, num_classes=num_classes).eval()
    fast.load_state_dict(eager.state_dict())
    fast.to(device=device, dtype=dtype)
    return eager, fast, hf, note


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    gpu = device.type == "cuda"
    preset = args.preset if args.preset != "auto" else ("pe-av-large" if gpu else "reduced")
    config = CONFIGS[preset]()
    full_clips = args.clips or (8 if gpu else 2)
    unequal = [int(x) for x in args.unequal.split(",")]
    if not unequal or min(unequal) < 1 or max(unequal) > FULL_FRAMES:
        raise SystemExit(f"--unequal takes clip lengths between 1 and {FULL_FRAMES}, got {args.unequal!r}")
    batches = {
        f"full {full_clips}x{FULL_FRAMES}": [FULL_FRAMES] * full_clips,
        "unequal " + ",".join(map(str, unequal)): unequal,
    }
    if preset == "reduced":
        print("No CUDA GPU: running the reduced CPU configuration (PE-Core S widths, 6 blocks, 224 px) in float32; "
              "fused kernels need a GPU, so 'pevideo fast' is skipped here. Use --preset pe-av-large for the real size.")
    eager, fast, hf, note = _build(config, device, dtype, with_transformers=not args.no_transformers)
    if note:
        print(note)
    from .vit import EAGER_BLOCK_FNS, compiled_block_fns

    # (name, model, the frame encoder's block functions: plain, or torch.compiled)
    providers = [("pevideo eager", eager, EAGER_BLOCK_FNS)]
    if gpu or args.fast_on_cpu:
        if not args.no_compile:
            providers.insert(0, ("pevideo fast+compile", fast, compiled_block_fns()))
        providers.insert(0, ("pevideo fast", fast, EAGER_BLOCK_FNS))
    if hf is not None:
        providers.append(("transformers (sdpa)", hf, None))

    rate = matmul_rate(device, dtype)
    results: list[Result] = []
    for bname, lengths in batches.items():
        pixels, mask = _inputs(config, lengths, FULL_FRAMES, device, dtype)
        for pname, model, block_fns in providers:
            if block_fns is not None:
                model.vit.block_fns = block_fns
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            gc.collect()

            def fn(model=model):
                if isinstance(model, type(eager)):
                    return model(pixels, padding_mask_videos=mask)
                return model(pixel_values_videos=pixels, padding_mask_videos=mask)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ms = _time(fn, device, args.warmup, args.repeats, args.budget)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None
            kernels = dict(model._ops.report) if hasattr(model, "_ops") else None
            results.append(Result(pname, bname, len(lengths), sum(lengths), ms, peak, kernels))
            print(f"  {bname:>24} | {pname:<20} {ms:9.1f} ms")

    machine = {
        "device": torch.cuda.get_device_name(device) if gpu else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": rate / 1e12,
    }
    try:
        import triton

        machine["triton"] = triton.__version__
    except Exception:
        machine["triton"] = None
    rows = []
    for r in results:
        ref = next((x for x in results if x.batch == r.batch and x.provider.startswith("transformers")), None)
        flops = video_tower_flops(config, batches[r.batch])
        rows.append({
            "provider": r.provider, "batch": r.batch, "clips": r.clips, "real_frames": r.real_frames,
            "padded_frames": len(batches[r.batch]) * FULL_FRAMES, "ms": r.ms, "clips_per_s": r.clips_per_s,
            "frames_per_s": r.frames_per_s, "peak_mem_mb": r.peak_mem_mb,
            "speedup_vs_transformers": (ref.ms / r.ms) if ref else None,
            "model_tflops": flops / (r.ms / 1e3) / 1e12, "share_of_matmul_rate": flops / (r.ms / 1e3) / rate,
            "kernels": r.kernels,
        })
    return {
        "benchmark": "pevideo bench (video tower)",
        "config": {"pe-av-large": "pe-av-large video tower", "reduced": "reduced CPU config", "tiny": "tiny smoke-test config"}[preset],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "results": rows,
    }


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{report['config']} on {m['device']} ({m['dtype']}, torch {m['torch']}); "
          f"measured matmul rate {m['matmul_tflops']:.1f} TFLOP/s")
    head = f"{'batch':<24} {'provider':<20} {'ms/batch':>9} {'clips/s':>8} {'frames/s':>9} {'peak MB':>8} {'vs HF':>6} {'%mm':>5}"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        peak = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        sp = f"{r['speedup_vs_transformers']:.2f}x" if r["speedup_vs_transformers"] else "-"
        print(f"{r['batch']:<24} {r['provider']:<20} {r['ms']:9.1f} {r['clips_per_s']:8.2f} {r['frames_per_s']:9.1f} "
              f"{peak:>8} {sp:>6} {100 * r['share_of_matmul_rate']:4.0f}%")
    fused = [r for r in report["results"] if r["provider"] == "pevideo fast" and r["kernels"]]
    if fused:
        print("kernels (pevideo fast):", fused[0]["kernels"])


def write_chart(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    batches = list(dict.fromkeys(r["batch"] for r in report["results"]))
    providers = list(dict.fromkeys(r["provider"] for r in report["results"]))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        vals = [next((r["clips_per_s"] for r in report["results"] if r["batch"] == b and r["provider"] == p), 0) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], vals, width, label=p)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(batches))], batches)
    ax.set_ylabel("clips / s")
    ax.set_title(f"{report['config']} — {report['machine']['device']} ({report['machine']['dtype']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--clips", type=int, default=None, help="clips in the full batch (default 8 on GPU, 2 on CPU)")
    p.add_argument("--unequal", default=",".join(map(str, UNEQUAL)),
                   help=f"clip lengths of the unequal batch, padded to {FULL_FRAMES} (default %(default)s)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement, at most")
    p.add_argument("--preset", choices=["auto", *CONFIGS], default="auto",
                   help="model size: auto = pe-av-large on a GPU, a reduced config on CPU")
    p.add_argument("--fast-on-cpu", action="store_true", help="also time fast=True on CPU (falls back or interprets)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' model")
    p.add_argument("--no-compile", action="store_true", help="skip the 'pevideo fast+compile' provider")
    p.add_argument("--out", default="pevideo-bench", help="folder for the JSON and the PNG chart")
    p.add_argument("--tag", default="model", help="file names are <device>-<tag>.json/.png (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("pevideo bench: --device cuda but no CUDA GPU is visible")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (20 if gpu else 3)
    args.budget = args.budget if args.budget is not None else (10.0 if gpu else 8.0)
    report = run(args)
    print_table(report)
    os.makedirs(args.out, exist_ok=True)
    tag = report["machine"]["device"].replace(" ", "_").replace("/", "_") if gpu else "cpu"
    jpath = os.path.join(args.out, f"{tag}-{args.tag}.json")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    chart = write_chart(report, os.path.join(args.out, f"{tag}-{args.tag}.png"))
    print(f"\nwrote {jpath}" + (f" and {chart}" if chart else " (no chart: matplotlib is not installed)"))
    return 0
