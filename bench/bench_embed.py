"""End to end: mp4 files to an embeddings file with ``pevideo embed``'s pipeline, per decoder-worker count.

For each worker count it runs :func:`pevideo.embed_to_file` (decode + resize in worker
processes, encode, write safetensors shards, join) and reports:

* clips/s and frames/s end to end (wall clock, from the file list to the joined file on disk);
* waited on decoding: the share of the run the encoding loop sat blocked on the decoder pool;
* encoder busy: end-to-end clips/s over the encoder's own clips/s on already-decoded batches (the same
  batch size, timed separately), i.e. how close the decoders keep the encoder to its ceiling;
* on a GPU, its mean utilisation as NVML reports it (when pynvml is installed).

Videos: ``--videos DIR`` (or list file), or synthetic h264 mp4s written here (``--unique`` distinct files,
listed over and over up to ``--clips``; decoding cost does not depend on having seen a file before).
The model has random weights: ``--preset pe-av-large`` is the released video architecture (PE-Core
L/14 at 336 px, default on a GPU, bf16 with the fused kernels), ``tiny`` / ``reduced`` are CPU sizes.

    python bench/bench_embed.py --out bench/results/cpu-embed.json        # CPU: tiny model, ~1 min
    python bench/bench_embed.py --workers 4,8,15 --clips 512              # GPU: pe-av-large

Run-to-run steadiness (issue 12: 5.5 / 5.3 / 5.7 / 20.4 clips/s on identical runs when the decoding workers
and the encoder oversubscribed 2 cores): ``--repeats N`` runs each worker count N times, interleaved so that
a busy machine slows all of them alike, and reports min / median / max and the spread (max / min - 1),
with the load average around each run. The CPU scenario of the issue (40 tiny clips, shards of 10,
batches of 4, the default worker count):

    python bench/bench_embed.py --workers default --repeats 3 --clips 40 --unique 40 --size 48x64 \
        --seconds 1.2 --shard-size 10 --batch-size 4 --num-frames 16 --out bench/results/cpu-embed-steady.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from pevideo.benchtools import machine_info, time_interleaved, write_json

TEXT_CONFIG = dict(num_hidden_layers=1, num_attention_heads=4, vocab_size=1000, global_attn_every_n_layers=1,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def build_model(preset: str, device, dtype, fast: bool):
    """A full PeVideoModel with random weights: the preset's video tower, a one-layer text tower."""
    from transformers import PeVideoConfig

    from pevideo import PeVideoModel
    from pevideo.bench import CONFIGS

    video = CONFIGS[preset]()
    width = 1024 if preset == "pe-av-large" else 64  # contrastive width: the released model's / a toy's
    text = dict(TEXT_CONFIG, hidden_size=width, intermediate_size=width)
    config = PeVideoConfig(text_config=text, video_config=video.to_dict())
    torch.manual_seed(0)
    model = PeVideoModel(config, fast=fast, num_classes=video.vision_config.num_labels).eval()
    return model.to(device=device, dtype=dtype)


def write_videos(folder: str, count: int, seconds: float, height: int, width: int, fps: int = 30) -> list[str]:
    """``count`` h264 mp4s with moving texture (so the decoder does real work), a keyframe every 2 s."""
    import av

    rng = np.random.default_rng(0)
    paths = []
    for c in range(count):
        path = os.path.join(folder, f"clip{c:03d}.mp4")
        base = rng.integers(0, 256, (height + 64, width + 64, 3), dtype=np.uint8)
        base = ((base.astype(np.uint16) + np.roll(base, 1, 0) + np.roll(base, 1, 1)) // 3).astype(np.uint8)
        with av.open(path, "w") as out:
            s = out.add_stream("h264", rate=fps)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            s.codec_context.gop_size = 2 * fps
            for i in range(int(seconds * fps)):
                dy, dx = (2 * i) % 64, (3 * i + c) % 64
                img = np.ascontiguousarray(base[dy : dy + height, dx : dx + width])
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
        paths.append(path)
    return paths


class GpuSampler:
    """Mean GPU utilisation (NVML, through torch.cuda.utilization) sampled every 50 ms in a thread."""

    def __init__(self, device):
        self.device, self.samples, self.ok = device, [], False
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
                self.ok = True
            except Exception:  # pynvml missing, or no NVML
                pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(0.05):
            self.samples.append(torch.cuda.utilization(self.device))

    def __enter__(self):
        if self.ok:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()

    @property
    def mean(self):
        return float(np.mean(self.samples)) if self.samples else None


def encode_only(model, processor, paths, num_frames, batch_size, device, budget_s=10.0) -> float:
    """The encoder's clips/s on one already-decoded batch, fed again and again (its ceiling)."""
    from pevideo.embed.workers import ClipDataset, collate
    from pevideo.sampling import Sampling

    ds = ClipDataset(paths, processor, Sampling(num_frames=num_frames))
    batch = collate([ds[i % len(paths)] for i in range(batch_size)])
    return encoder_rate(model, processor, batch, device, budget_s)


def encoder_rate(model, processor, batch, device, budget_s=10.0) -> float:
    """Clips/s of the pipeline's encoder on one collated batch (``pevideo.embed.workers.collate``),
    launched again and again, one batch in flight while the next is launched, as the pipeline runs it."""
    from pevideo.embed.encode import Encoder

    batch_size = len(batch["items"])
    if device.type == "cuda":
        batch["videos"] = batch["videos"].pin_memory()
    enc = Encoder(model, processor, pooled=False)
    enc.collect(enc.launch(batch))  # warm-up (kernel compilation, allocator)
    n, t0 = 0, time.perf_counter()
    pending = enc.launch(batch)
    while True:
        nxt = enc.launch(batch)
        enc.collect(pending)
        pending, n = nxt, n + 1
        if time.perf_counter() - t0 > budget_s or n >= 200:
            break
    enc.collect(pending)
    n += 1
    return n * batch_size / (time.perf_counter() - t0)


def decode_only(paths, processor, num_frames, batch_size, num_workers) -> float:
    """Clips/s of the pipeline's decoding alone: the same loader (workers, batches, collate), no encoder."""
    from pevideo.embed.workers import ClipDataset, collate, worker_init
    from pevideo.sampling import Sampling

    loader = torch.utils.data.DataLoader(
        ClipDataset(paths, processor, Sampling(num_frames=num_frames)), batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate, worker_init_fn=worker_init if num_workers else None)
    t0 = time.perf_counter()
    n = sum(len(batch["items"]) for batch in loader)
    return n / (time.perf_counter() - t0)


def run(args) -> dict:
    from pevideo import PeVideoVideoProcessor
    from pevideo import embed_to_file, expand_inputs
    from pevideo.loading import resolve_dtype

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("pe-av-large" if gpu else "tiny")
    dtype = resolve_dtype(args.dtype, device)
    fast = gpu if args.fast is None else args.fast
    from pevideo.embed.workers import default_workers, encoder_threads

    spec = args.workers or ("0,4,8," + str(max(1, (os.cpu_count() or 2) - 1)) if gpu else "0,1")
    workers = sorted({default_workers() if w.strip() == "default" else int(w) for w in spec.split(",")})
    model = build_model(preset, device, dtype, fast)
    h, w = model.video_encoder.vit.args.img_size
    processor = PeVideoVideoProcessor(size={"height": h, "width": w})

    with tempfile.TemporaryDirectory() as tmp:
        if args.videos:
            unique = expand_inputs(args.videos, must_exist=True)
            source = f"{len(unique)} videos from {args.videos}"
        else:
            vh, vw = (int(x) for x in args.size.split("x"))
            t0 = time.perf_counter()
            unique = write_videos(tmp, args.unique, args.seconds, vh, vw)
            source = f"{args.unique} synthetic h264 mp4s, {args.seconds:g} s at 30 fps, {vw}x{vh}"
            print(f"wrote {source} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        clips = args.clips or (256 if gpu else 32)
        paths = [unique[i % len(unique)] for i in range(clips)]
        # The encoder alone, with the threads the pipeline gives it beside the fewest (nonzero) workers.
        threads_before = torch.get_num_threads()
        ceiling_threads = min(threads_before, encoder_threads(min([w for w in workers if w > 0], default=0)))
        torch.set_num_threads(ceiling_threads)
        try:
            ceiling = encode_only(model, processor, unique, args.num_frames, args.batch_size, device,
                                  budget_s=getattr(args, "encode_budget", None) or (10.0 if gpu else 5.0))
        finally:
            torch.set_num_threads(threads_before)
        print(f"encoder alone: {ceiling:.1f} clips/s on {ceiling_threads} thread(s) ({preset}, "
              f"{str(dtype).replace('torch.', '')}, "
              f"fast={fast}, batch {args.batch_size} x {args.num_frames} frames)", file=sys.stderr)

        # Worker counts are providers of the same work: timed in interleaved rounds (pevideo.benchtools),
        # so a machine that gets busier during the run slows every worker count alike.
        runs: dict[int, list] = {nw: [] for nw in workers}

        def one_run(nw):
            out = os.path.join(tmp, f"emb-{nw}.safetensors")
            with GpuSampler(device) as sampler:
                t0 = time.perf_counter()
                summary = embed_to_file(paths, model, out, processor=processor, num_frames=args.num_frames,
                                        batch_size=args.batch_size, shard_size=args.shard_size, num_workers=nw,
                                        progress=False, overwrite=True)
                wall = time.perf_counter() - t0
            runs[nw].append((wall, summary, sampler.mean))
            print(f"workers {nw:>2}: {summary.num_embedded / wall:8.1f} clips/s  waited on decoding "
                  f"{100 * summary.stats.wait_fraction:5.1f}%", file=sys.stderr)

        timings = time_interleaved({nw: (lambda nw=nw: one_run(nw)) for nw in workers}, warmup=0,
                                   repeats=args.repeats, min_repeats=args.repeats)
        rows = []
        for nw in workers:
            t = timings[nw]
            wall = t.median_s
            _, summary, _ = min(runs[nw], key=lambda r: abs(r[0] - wall))  # the median run's own numbers
            st = summary.stats
            util = [u for _, _, u in runs[nw] if u is not None]
            row = dict(
                workers=nw, clips=summary.num_embedded, failed=summary.num_failed, runs=len(t.times_s),
                wall_s=round(wall, 3), wall_s_min=round(t.min_s, 3), wall_s_max=round(t.max_s, 3),
                clips_per_s=round(summary.num_embedded / wall, 2),
                clips_per_s_range=[round(summary.num_embedded / t.max_s, 2), round(summary.num_embedded / t.min_s, 2)],
                frames_per_s=round(st.frames / wall, 1),
                waited_on_decoding=round(st.wait_fraction, 3),
                encoder_busy=round(min(1.0, summary.num_embedded / wall / ceiling), 3),
                gpu_util=round(float(np.median(util)) / 100, 3) if util else None,
                encoder_threads=min(torch.get_num_threads(), encoder_threads(nw)),
            )
            rows.append(row)
            print(f"workers {nw:>2}: median {row['clips_per_s']:8.1f} clips/s (range {row['clips_per_s_range']})"
                  f"  encoder busy {100 * row['encoder_busy']:5.1f}%"
                  + (f"  GPU util {100 * row['gpu_util']:5.1f}%" if row["gpu_util"] is not None else ""),
                  file=sys.stderr)

        decode = None
        if getattr(args, "decode_only", False):
            nw = max(workers)
            decode = {"workers": nw, "clips_per_s": round(decode_only(paths, processor, args.num_frames,
                                                                       args.batch_size, nw), 2)}
            print(f"decoding alone, {nw} workers: {decode['clips_per_s']:.1f} clips/s", file=sys.stderr)

    return dict(
        benchmark="embed", machine=machine_info(device), preset=preset, dtype=str(dtype).replace("torch.", ""), fast=fast,
        num_frames=args.num_frames, batch_size=args.batch_size, clips=clips, source=source,
        encoder_only_clips_per_s=round(ceiling, 2), encoder_only_threads=ceiling_threads, results=rows,
        decode_only=decode,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", default=None, help="a folder or list file of videos (default: synthetic mp4s)")
    p.add_argument("--clips", type=int, default=None, help="clips per run (default 256 on a GPU, 32 on CPU)")
    p.add_argument("--unique", type=int, default=8, help="distinct synthetic videos (default %(default)s)")
    p.add_argument("--seconds", type=float, default=None, help="synthetic video length (default 10 on GPU, 2 on CPU)")
    p.add_argument("--size", default=None, help="synthetic video size HxW (default 360x640 on GPU, 240x320 on CPU)")
    p.add_argument("--preset", choices=["tiny", "reduced", "pe-av-large"], default=None,
                   help="model size (default: pe-av-large on a GPU, tiny on CPU)")
    p.add_argument("--workers", default=None, help="comma-separated decoder worker counts, 'default' = pevideo's "
                   "default (default 0,4,8,cores-1 on a GPU; 0,1 on CPU)")
    p.add_argument("--repeats", type=int, default=1, help="runs per worker count, interleaved; >1 reports min / "
                   "median / max and the spread (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on CPU")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fast", dest="fast", action="store_const", const=True, default=None)
    g.add_argument("--eager", dest="fast", action="store_const", const=False)
    p.add_argument("--decode-only", action="store_true",
                   help="also time decoding alone (the same loader, no encoder) at the largest worker count")
    p.add_argument("--encode-budget", type=float, default=None,
                   help="seconds to time the encoder alone (default 10 on a GPU, 5 on CPU)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    gpu = args.device.startswith("cuda")
    args.seconds = args.seconds if args.seconds is not None else (10.0 if gpu else 2.0)
    args.size = args.size or ("360x640" if gpu else "240x320")
    report = run(args)
    if args.out:
        write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
