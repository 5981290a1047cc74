"""``pevideo bench``: the video tower, pevideo fast / pevideo eager / transformers, side by side.

On the same random weights and the same synthetic clips it times a full batch of 16-frame clips and a
batch of unequal lengths (16, 12, 8, 4, 2, 1 frames padded to 16), prints a table (ms per batch as
median and min-max over the repeats, clips/s, frames/s, peak memory, speed-up over transformers, share
of the measured matmul rate) and the README's markdown table, and writes JSON (naming the machine) and
a PNG chart. The providers' repeats are interleaved (each round times every provider once, in rotating
order), so a machine that gets busier during the run slows all of them alike. With a GPU it runs the
pe-av-large video architecture in bf16; without one, a reduced configuration that finishes in a few
minutes on an idle machine (and says so).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from .benchtools import Timing, machine_info, machine_slug, sync, time_fn, time_interleaved, write_json
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


def matmul_rate(device, dtype) -> float:
    """Measured dense matmul FLOP/s for this device and dtype (the roofline's compute ceiling)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, warmup=3, repeats=20 if device.type == "cuda" else 5, device=device)
    return 2 * n**3 / t.median_s


@dataclass
class Result:
    provider: str
    batch: str
    clips: int
    real_frames: int
    timing: Timing
    peak_mem_mb: float | None
    kernels: dict | None = None

    @property
    def ms(self) -> float:  # the median: what tables and speed-ups use
        return 1e3 * self.timing.median_s

    def per_s(self, n: int) -> dict:
        """n items per call as a rate: median, and the range from the slowest to the fastest repeat."""
        t = self.timing
        return {"median": n / t.median_s, "min": n / t.max_s, "max": n / t.min_s}


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
    """Build the providers and time both batches; ``args`` as :func:`main` checked and filled them."""
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    gpu = device.type == "cuda"
    preset = args.preset if args.preset != "auto" else ("pe-av-large" if gpu else "reduced")
    config = CONFIGS[preset]()
    full_clips = args.clips or (8 if gpu else 2)
    unequal = args.unequal
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
    notes = [note] if note else []
    if getattr(args, "no_fast", False):
        notes.append("pevideo fast not run (--no-fast)")
    elif gpu or args.fast_on_cpu:
        if not args.no_compile:
            backend = getattr(args, "compile_backend", None)
            providers.insert(0, ("pevideo fast+compile", fast,
                                 compiled_block_fns(**({"backend": backend} if backend else {}))))
        providers.insert(0, ("pevideo fast", fast, EAGER_BLOCK_FNS))
    if hf is not None:
        providers.append(("transformers (sdpa)", hf, None))

    rate = matmul_rate(device, dtype)
    results: list[Result] = []
    graph_jobs = []  # (batch, lengths, pevideo fast's call, its kernel report)
    for bname, lengths in batches.items():
        pixels, mask = _inputs(config, lengths, FULL_FRAMES, device, dtype)
        fns, peaks, kernels = {}, {}, {}
        for pname, model, block_fns in providers:
            def fn(model=model, block_fns=block_fns, pixels=pixels, mask=mask):
                if block_fns is not None:
                    model.vit.block_fns = block_fns  # fast and fast+compile share one model
                if isinstance(model, type(eager)):
                    return model(pixels, padding_mask_videos=mask)
                return model(pixel_values_videos=pixels, padding_mask_videos=mask)

            fns[pname] = fn
            # One call alone per provider: its peak memory and which kernels ran (also a first warm-up).
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            gc.collect()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
                sync(device)
            peaks[pname] = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None
            kernels[pname] = dict(model._ops.report) if hasattr(model, "_ops") else None
        if "pevideo fast" in fns:
            graph_jobs.append((bname, lengths, fns["pevideo fast"], kernels["pevideo fast"]))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget,
                                       device=device)
        for pname in fns:
            r = Result(pname, bname, len(lengths), sum(lengths), timings[pname], peaks[pname], kernels[pname])
            results.append(r)
            t = r.timing
            print(f"  {bname:>24} | {pname:<20} median {r.ms:9.1f} ms  (min {1e3 * t.min_s:.1f}, "
                  f"max {1e3 * t.max_s:.1f}, {len(t.times_s)} repeats)")

    if getattr(args, "cuda_graphs", False):
        # Last, so that a capture the work refuses cannot disturb the other timings.
        for bname, lengths, fast_fn, report in graph_jobs:
            try:  # the fast tower replayed as one CUDA graph (fixed batch shape): no launch gaps
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    replay = cuda_graph(fast_fn, device)
                    t = time_interleaved({"pevideo fast": fast_fn, "pevideo fast+graph": replay}, warmup=1,
                                         repeats=args.repeats, budget_s=args.budget, device=device)
            except Exception as exc:  # noqa: BLE001  (capture refused: say why)
                notes.append(f"{bname}: CUDA graph not used: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            notes.append(f"{bname}: 'pevideo fast+graph' timed after the others, interleaved with 'pevideo fast' "
                         f"alone (there {1e3 * t['pevideo fast'].median_s:.1f} ms)")
            results.append(Result("pevideo fast+graph", bname, len(lengths), sum(lengths), t["pevideo fast+graph"],
                                  None, report))

    machine = machine_info(device, dtype=str(dtype).replace("torch.", ""), matmul_tflops=rate / 1e12)
    rows = []
    for r in results:
        ref = next((x for x in results if x.batch == r.batch and x.provider.startswith("transformers")), None)
        flops = video_tower_flops(config, batches[r.batch])
        clips, frames = r.per_s(r.clips), r.per_s(r.real_frames)
        rows.append({
            "provider": r.provider, "batch": r.batch, "clips": r.clips, "real_frames": r.real_frames,
            "padded_frames": len(batches[r.batch]) * FULL_FRAMES,
            "ms": r.ms, **r.timing.as_dict(),
            "clips_per_s": clips["median"], "clips_per_s_min": clips["min"], "clips_per_s_max": clips["max"],
            "frames_per_s": frames["median"], "peak_mem_mb": r.peak_mem_mb,
            # speed-up of medians; the range pairs this provider's fastest repeat with the reference's
            # slowest and the reverse (repeats were interleaved, so both saw the same machine)
            "speedup_vs_transformers": (ref.ms / r.ms) if ref else None,
            "speedup_vs_transformers_range": [ref.timing.min_s / r.timing.max_s, ref.timing.max_s / r.timing.min_s]
            if ref else None,
            "model_tflops": flops / (r.ms / 1e3) / 1e12, "share_of_matmul_rate": flops / (r.ms / 1e3) / rate,
            "kernels": r.kernels,
        })
    return {
        "benchmark": "pevideo bench (video tower)",
        "config": {"pe-av-large": "pe-av-large video tower", "reduced": "reduced CPU config", "tiny": "tiny smoke-test config"}[preset],
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "budget_s_per_provider": args.budget,
                     "interleaved": True},
        "machine": machine,
        "results": rows,
        "notes": notes,
    }


def cuda_graph(fn, device):
    """``fn`` captured once as a CUDA graph (after warm-up calls on a side stream, so autotuning and
    first-call checks stay out of the capture); returns a function that replays it. Raises where the
    work cannot be captured (e.g. a host sync on the way)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)

    def replay():
        graph.replay()
        return out

    return replay


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{report['config']} on {m['label']} ({m['dtype']}, torch {m['torch']}); "
          f"measured matmul rate {m['matmul_tflops']:.2f} TFLOP/s; load average {m.get('load_average_1_5_15min')}")
    head = (f"{'batch':<24} {'provider':<20} {'ms/batch: median':>16} {'(min-max)':>15} {'clips/s':>8} "
            f"{'frames/s':>9} {'peak MB':>8} {'vs HF':>6} {'%mm':>5}")
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        peak = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        sp = f"{r['speedup_vs_transformers']:.2f}x" if r["speedup_vs_transformers"] else "-"
        rng = f"({r['ms_min']:.0f}-{r['ms_max']:.0f})"
        print(f"{r['batch']:<24} {r['provider']:<20} {r['ms']:16.1f} {rng:>15} {r['clips_per_s']:8.2f} "
              f"{r['frames_per_s']:9.1f} {peak:>8} {sp:>6} {100 * r['share_of_matmul_rate']:4.0f}%")
    fused = [r for r in report["results"] if r["provider"] == "pevideo fast" and r["kernels"]]
    if fused:
        print("kernels (pevideo fast):", fused[0]["kernels"])


def markdown_table(report: dict) -> str:
    """The README's table: per batch, clips/s of each provider as median (slowest-fastest repeat) and the
    speed-up of medians over transformers (with its range)."""
    batches = list(dict.fromkeys(r["batch"] for r in report["results"]))
    providers = list(dict.fromkeys(r["provider"] for r in report["results"]))
    lines = ["| batch | " + " | ".join(f"{p}, clips/s" for p in providers) + " | speed-up |",
             "| --- |" + " --- |" * (len(providers) + 1)]
    for b in batches:
        rows = {r["provider"]: r for r in report["results"] if r["batch"] == b}
        first = rows[providers[0]]
        label = f"{b} ({first['real_frames']} of {first['padded_frames']} frames real)"
        cells = [f"{r['clips_per_s']:.2f} ({r['clips_per_s_min']:.2f}–{r['clips_per_s_max']:.2f})"
                 if (r := rows.get(p)) else "-" for p in providers]
        mine = rows.get("pevideo fast") or rows.get("pevideo eager")
        sp = "-"
        if mine and mine["speedup_vs_transformers"]:
            lo, hi = mine["speedup_vs_transformers_range"]
            sp = f"{mine['speedup_vs_transformers']:.2f}× ({lo:.2f}–{hi:.2f})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sp} |")
    return "\n".join(lines)


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
    ax.set_title(f"{report['config']} — {report['machine']['label']} ({report['machine']['dtype']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Numbers are parsed by main (not argparse), so that any bad value is one line and exit status 2.
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--clips", default=None, help=f"clips in the full batch, 1-{MAX_CLIPS} (default 8 on GPU, 2 on CPU)")
    p.add_argument("--unequal", default=",".join(map(str, UNEQUAL)),
                   help=f"clip lengths of the unequal batch, each 1-{FULL_FRAMES}, padded to {FULL_FRAMES} "
                   "(default %(default)s)")
    p.add_argument("--warmup", default=None, help="untimed calls per provider first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--repeats", default=None,
                   help="timed rounds; each round times every provider once, in rotating order "
                   "(default 20 on GPU, 5 on CPU); min/median/max are over these")
    p.add_argument("--budget", default=None,
                   help="stop timing a batch after this many seconds per provider, once 3 rounds are done "
                   "(default 10)")
    p.add_argument("--preset", choices=["auto", *CONFIGS], default="auto",
                   help="model size: auto = pe-av-large on a GPU, a reduced config on CPU")
    p.add_argument("--fast-on-cpu", action="store_true", help="also time fast=True on CPU (falls back or interprets)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' model")
    p.add_argument("--no-compile", action="store_true", help="skip the 'pevideo fast+compile' provider")
    p.add_argument("--no-fast", action="store_true", help="skip the fast providers (e.g. when a kernel check failed)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for 'pevideo fast+compile' (default inductor; 'eager' only traces)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time 'pevideo fast' replayed as a CUDA graph (GPU; skipped with a note where capture fails)")
    p.add_argument("--out", default="pevideo-bench", help="folder for the JSON and the PNG chart")
    p.add_argument("--tag", default="model", help="file names are <device>-<tag>.json/.png (default %(default)s)")


MAX_CLIPS = 256
MAX_REPEATS = 10000


class _Usage(Exception):
    """A bad command-line value: one line, exit status 2."""


def _int(name: str, value, lo: int, hi: int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise _Usage(f"{name} takes a whole number from {lo} to {hi}, got {value!r}") from None
    if not lo <= n <= hi:
        raise _Usage(f"{name} takes a whole number from {lo} to {hi}, got {n}")
    return n


def _check_args(args: argparse.Namespace) -> None:
    """Validate and fill in defaults in place; raise _Usage naming the first bad value."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise _Usage(f"--device {args.device!r} is not a device torch knows ({str(exc).splitlines()[0]})") from None
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise _Usage("--device cuda but no CUDA GPU is visible")
    if device.type not in ("cpu", "cuda"):
        raise _Usage(f"--device takes cpu or cuda[:N], got {args.device!r}")
    if args.clips is not None:
        args.clips = _int("--clips", args.clips, 1, MAX_CLIPS)
    lengths = [x.strip() for x in str(args.unequal).split(",")]
    if not lengths or len(lengths) > MAX_CLIPS or not all(x.isdigit() and 1 <= int(x) <= FULL_FRAMES for x in lengths):
        raise _Usage(f"--unequal takes 1 to {MAX_CLIPS} comma-separated clip lengths from 1 to {FULL_FRAMES}, "
                     f"got {args.unequal!r}")
    args.unequal = [int(x) for x in lengths]
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = _int("--warmup", args.warmup, 0, 1000) if args.warmup is not None else (3 if gpu else 1)
    args.repeats = _int("--repeats", args.repeats, 1, MAX_REPEATS) if args.repeats is not None else (20 if gpu else 5)
    if args.budget is None:
        args.budget = 10.0
    else:
        try:
            budget = float(args.budget)
        except ValueError:
            budget = math.nan
        if not (math.isfinite(budget) and budget > 0):
            raise _Usage(f"--budget takes a positive number of seconds, got {args.budget!r}")
        args.budget = budget


def main(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
    except _Usage as exc:
        print(f"pevideo bench: error: {exc}", file=sys.stderr)
        return 2
    report = run(args)
    print_table(report)
    print("\n" + markdown_table(report))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{machine_slug(report['machine'])}-{args.tag}")
    jpath = write_json(stem + ".json", report)
    chart = write_chart(report, stem + ".png")
    print(f"\nwrote {jpath}" + (f" and {chart}" if chart else " (no chart: matplotlib is not installed)"))
    return 0
