"""Video input throughput: mp4 files to ``pixel_values_videos``, and the fused patchify kernel.

Part 1 (CPU or GPU): clips per second from mp4 files to ``pixel_values_videos`` (B, 16, 3, S, S):
  * pevideo: ``PeVideoVideoProcessor(paths, num_frames=16)`` (decodes only the sampled frames);
  * transformers, as its PE Video docs do it: ``transformers.video_utils.load_video(path)`` (PyAV,
    every frame), then its ``PeVideoVideoProcessor(frames, num_frames=16)``;
  * transformers with a sampling function passed to ``load_video`` (decodes up to the last sampled
    frame, converts only the sampled ones), the fairest upstream variant.
  Outputs are checked against each other.

Part 2 (GPU only): ``patchify_normalize`` GB/s (bytes read + written) against the plain PyTorch
reference, with the device's measured copy bandwidth beside it; and decoded uint8 frames to patches
on the GPU (``to_patches``) against the CPU processor + upload + patchify.

    python bench/bench_video_input.py --quick            # CPU, a minute or less
    python bench/bench_video_input.py --out results.json  # full, GPU part when CUDA is there
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial

import numpy as np
import torch


def make_clips(directory, count, frames, height, width, fps=30):
    """Write ``count`` h264 mp4 clips with moving, textured content (so decoding does real work)."""
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for c in range(count):
        path = os.path.join(directory, f"clip{c}.mp4")
        out = av.open(path, "w")
        s = out.add_stream("h264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.gop_size = 2 * fps  # a keyframe every 2 s, like typical web video
        texture = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
        for i in range(frames):
            t = i / fps
            r = 127 + 100 * np.sin(xx / 23 + 3 * t + c)
            g = 127 + 100 * np.sin(yy / 17 - 2 * t)
            b = 127 + 100 * np.sin((xx + yy) / 31 + t)
            img = np.stack([r, g, b], -1).clip(0, 215).astype(np.uint8) + texture
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
        out.close()
        paths.append(path)
    return paths


def timeit(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Providers timed interleaved (pevideo.benchtools): name -> {"median", "min", "max"} seconds."""
    from pevideo.benchtools import time_interleaved

    timings = time_interleaved(fns, warmup=warmup, repeats=repeats, min_repeats=repeats)
    return {k: {"median": t.median_s, "min": t.min_s, "max": t.max_s} for k, t in timings.items()}


def _rates(res: dict, key: str, n: int, t: dict) -> float:
    """Store n items per second as median and range under ``key``; return the median rate."""
    res[key] = n / t["median"]
    res[key + "_range"] = [n / t["max"], n / t["min"]]
    return res[key]


def bench_processor(args):
    from pevideo.processing import PeVideoVideoProcessor

    config = dict(
        size={"height": args.size, "width": args.size}, do_resize=True, resample=2, do_rescale=True,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True, do_sample_frames=True,
    )
    ours = PeVideoVideoProcessor(**config)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        paths = make_clips(d, args.clips, args.clip_frames, args.height, args.width)
        print(f"wrote {args.clips} clips of {args.clip_frames} frames {args.width}x{args.height} in {time.perf_counter() - t0:.1f}s")
        n = args.num_frames
        res = {"clips": args.clips, "clip_frames": args.clip_frames, "source_size": [args.height, args.width], "size": args.size, "num_frames": n}

        def run_ours():
            return ours(paths, num_frames=n, return_tensors="pt")["pixel_values_videos"]

        fns = {"pevideo": run_ours}
        want = run_ours()

        try:
            from transformers.models.pe_video.video_processing_pe_video import PeVideoVideoProcessor as Upstream
            from transformers.video_utils import load_video as upstream_load
        except Exception as exc:  # torchvision missing, ...
            print(f"transformers' processor unavailable: {exc}")
            upstream = None
        else:
            upstream = Upstream(**config)

            def run_docs():
                vids = [upstream_load(p, backend="pyav")[0] for p in paths]
                return upstream(vids, num_frames=n, return_tensors="pt")["pixel_values_videos"]

            def run_sampled():
                fn = partial(upstream.sample_frames, num_frames=n)
                vids = [upstream_load(p, backend="pyav", sample_indices_fn=fn)[0] for p in paths]
                return upstream(vids, do_sample_frames=False, return_tensors="pt")["pixel_values_videos"]

            fns.update(transformers_docs=run_docs, transformers_sampled=run_sampled)
        times = timeit(fns, args.repeats)
        rate = _rates(res, "pevideo_clips_per_s", args.clips, times["pevideo"])
        print(f"pevideo                          {rate:8.2f} clips/s")
        if upstream is None:
            return res
        for key, label in (
            ("transformers_docs", "transformers (load all, sample)"),
            ("transformers_sampled", "transformers (sampled load)"),
        ):
            rate = _rates(res, key + "_clips_per_s", args.clips, times[key])
            diff = (fns[key]() - want).abs().max().item()
            res[key + "_max_abs_diff"] = diff
            print(f"{label:32s} {rate:8.2f} clips/s   max |diff| vs pevideo {diff:.2e}")
        res["speedup_vs_docs"] = res["pevideo_clips_per_s"] / res["transformers_docs_clips_per_s"]
        res["speedup_vs_sampled"] = res["pevideo_clips_per_s"] / res["transformers_sampled_clips_per_s"]
        print(f"speedup: {res['speedup_vs_docs']:.2f}x vs the docs' flow, {res['speedup_vs_sampled']:.2f}x vs sampled load")
    return res


def device_time(fns: dict, device="cuda") -> dict:
    """Seconds per call, interleaved (pevideo.benchtools): CUDA-event bursts on a GPU, the wall clock on
    CPU (smoke runs of the kernel part under TRITON_INTERPRET=1). name -> median seconds."""
    from pevideo.benchtools import cuda_events, time_interleaved

    if device == "cuda":
        timings = time_interleaved(fns, warmup=1, repeats=5, sampler=cuda_events(25.0))
    else:
        timings = time_interleaved(fns, warmup=1, repeats=2, min_repeats=2)
    return {k: t.median_s for k, t in timings.items()}


def bench_kernel(args):
    from pevideo.processing import PeVideoVideoProcessor
    from pevideo_kernels import patchify as P

    dev = args.device
    s, p = args.size, args.patch
    n = args.batch * args.num_frames
    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    res = {"device": name, "frames": n, "size": s, "patch": p, "kernel": P._HAS_KERNEL}
    big = torch.empty((256 if dev == "cuda" else 8) * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    t = device_time({"copy": lambda: dst.copy_(big)}, device=dev)["copy"]
    res["copy_GBps"] = 2 * big.numel() / t / 1e9
    print(f"copy bandwidth                         {res['copy_GBps']:8.0f} GB/s (read + write)")
    del big, dst
    mean = std = (0.5, 0.5, 0.5)
    u8 = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, device=dev)
    padded = torch.randn(args.batch, args.num_frames, 3, s, s, device=dev)
    lengths = [max(1, args.num_frames * (i + 1) // args.batch) for i in range(args.batch)]
    real = torch.cat([torch.arange(k, device=dev) + i * args.num_frames for i, k in enumerate(lengths)])
    flat = padded.flatten(0, 1)
    cases = [
        ("uint8 NHWC -> float32", u8, dict(mean=mean, std=std, out_dtype=torch.float32)),
        ("uint8 NHWC -> bfloat16", u8, dict(mean=mean, std=std, out_dtype=torch.bfloat16)),
        ("float32 padded, frame_index -> bf16", flat, dict(out_dtype=torch.bfloat16, frame_index=real)),
    ]
    res["cases"] = []
    for label, x, kw in cases:
        out = P.patchify_normalize(x, p, **kw)
        ref = P.patchify_normalize_ref(x, p, **kw)
        if dev == "cuda":
            assert torch.equal(out, ref), label
        else:  # the interpreter truncates to bfloat16 instead of rounding
            torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)
        frames_read = out.shape[0]
        nbytes = frames_read * (x[0].numel() * x.element_size()) + out.numel() * out.element_size()
        t = device_time({"kernel": lambda: P.patchify_normalize(x, p, **kw),
                         "reference": lambda: P.patchify_normalize_ref(x, p, **kw)}, device=dev)
        tk, tr = t["kernel"], t["reference"]
        row = {"case": label, "kernel_GBps": nbytes / tk / 1e9, "reference_GBps": nbytes / tr / 1e9,
               "kernel_ms": tk * 1e3, "reference_ms": tr * 1e3}
        row["kernel_fraction_of_copy"] = row["kernel_GBps"] / res["copy_GBps"]
        res["cases"].append(row)
        print(f"{label:38s} kernel {row['kernel_GBps']:6.0f} GB/s ({100 * row['kernel_fraction_of_copy']:.0f}% of copy)"
              f"   reference {row['reference_GBps']:6.0f} GB/s")

    # Decoded uint8 frames (e.g. 360p) to patch rows: GPU path vs CPU processor + upload + patchify.
    proc = PeVideoVideoProcessor(size={"height": s, "width": s})
    clips = [torch.randint(0, 256, (args.num_frames, 360, 640, 3), dtype=torch.uint8) for _ in range(args.batch)]
    if dev == "cuda":
        clips = [c.pin_memory() for c in clips]

    def gpu_path():
        return proc.to_patches(clips, p, device=dev, out_dtype=torch.bfloat16, do_sample_frames=False)[0]

    def cpu_path():
        out = proc(clips, do_sample_frames=False, return_tensors="pt")
        pv = out["pixel_values_videos"].to(dev, non_blocking=True)
        return P.patchify_normalize(pv.flatten(0, 1), p, out_dtype=torch.bfloat16)

    from pevideo.benchtools import time_interleaved

    t = time_interleaved({"gpu": gpu_path, "cpu": cpu_path}, warmup=1, repeats=3, min_repeats=3, device=dev)
    res["to_patches_gpu_ms"] = t["gpu"].median_s * 1e3
    res["processor_cpu_then_gpu_ms"] = t["cpu"].median_s * 1e3
    print(f"{args.batch}x{args.num_frames} 360p frames -> patches: to_patches on {dev} {res['to_patches_gpu_ms']:.1f} ms"
          f", CPU processor + upload + patchify {res['processor_cpu_then_gpu_ms']:.1f} ms")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small clips, few repeats; processor part only on CPU")
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--clips", type=int, default=None)
    ap.add_argument("--clip-frames", type=int, default=None, help="frames per source clip")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--batch", type=int, default=4, help="clips per batch in the kernel part")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--skip-processor", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--device", default="cuda", help="kernel part device; 'cpu' (with TRITON_INTERPRET=1, tiny --size) only smoke-tests the script")
    args = ap.parse_args(argv)
    quick = dict(clips=4, clip_frames=60, height=240, width=320, repeats=2)
    full = dict(clips=6, clip_frames=600, height=360, width=640, repeats=3)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    from pevideo.benchtools import machine_info, write_json

    device = args.device if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    results = {"machine": machine_info(device), "quick": args.quick}
    if not args.skip_processor:
        results["processor"] = bench_processor(args)
    if not args.skip_kernel:
        if args.device != "cuda" or torch.cuda.is_available():
            results["kernel"] = bench_kernel(args)
        else:
            print("no CUDA device: kernel GB/s part skipped")
    if args.out:
        print(f"wrote {write_json(args.out, results)}")
    return results


if __name__ == "__main__":
    main()
