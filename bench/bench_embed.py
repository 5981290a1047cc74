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

from pevideo.bench import _cpu_name

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
    from pevideo.embed.encode import Encoder
    from pevideo.embed.workers import ClipDataset, collate

    ds = ClipDataset(paths, processor, num_frames, None)
    batch = collate([ds[i % len(paths)] for i in range(batch_size)])
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
                                  budget_s=10.0 if gpu else 5.0)
        finally:
            torch.set_num_threads(threads_before)
        print(f"encoder alone: {ceiling:.1f} clips/s on {ceiling_threads} thread(s) ({preset}, "
              f"{str(dtype).replace('torch.', '')}, "
              f"fast={fast}, batch {args.batch_size} x {args.num_frames} frames)", file=sys.stderr)

        runs = {nw: [] for nw in workers}
        for rep in range(args.repeats):  # interleaved: a busy spell slows every worker count alike
            for nw in workers:
                out = os.path.join(tmp, f"emb-{nw}.safetensors")
                load_before = os.getloadavg()[0]
                with GpuSampler(device) as sampler:
                    t0 = time.perf_counter()
                    summary = embed_to_file(paths, model, out, processor=processor, num_frames=args.num_frames,
                                            batch_size=args.batch_size, shard_size=args.shard_size, num_workers=nw,
                                            progress=False, overwrite=True)
                    wall = time.perf_counter() - t0
                st = summary.stats
                run_ = dict(
                    clips=summary.num_embedded, failed=summary.num_failed, wall_s=round(wall, 3),
                    clips_per_s=round(summary.num_embedded / wall, 2), frames_per_s=round(st.frames / wall, 1),
                    waited_on_decoding=round(st.wait_fraction, 3),
                    encoder_busy=round(min(1.0, summary.num_embedded / wall / ceiling), 3),
                    gpu_util=None if sampler.mean is None else round(sampler.mean / 100, 3),
                    load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                )
                runs[nw].append(run_)
                print(f"workers {nw:>2} run {rep + 1}: {run_['clips_per_s']:8.1f} clips/s  waited on decoding "
                      f"{100 * run_['waited_on_decoding']:5.1f}%  encoder busy {100 * run_['encoder_busy']:5.1f}%"
                      + (f"  GPU util {100 * run_['gpu_util']:5.1f}%" if run_["gpu_util"] is not None else "")
                      + f"  load {load_before:.1f}", file=sys.stderr)
        rows = []
        for nw in workers:
            rates = sorted(r["clips_per_s"] for r in runs[nw])
            median = float(np.median(rates))
            row = dict(runs[nw][-1] if args.repeats == 1 else {}, workers=nw,
                       encoder_threads=min(torch.get_num_threads(), encoder_threads(nw)))
            if args.repeats > 1:
                row.update(clips_per_s_min=rates[0], clips_per_s_median=round(median, 2), clips_per_s_max=rates[-1],
                           spread=round(rates[-1] / rates[0] - 1, 3), runs=runs[nw])
                print(f"workers {nw:>2}: {rates[0]:.1f} / {median:.1f} / {rates[-1]:.1f} clips/s (min / median / max "
                      f"of {args.repeats}), spread {100 * (rates[-1] / rates[0] - 1):.0f}%", file=sys.stderr)
            rows.append(row)

    return dict(
        benchmark="embed",
        device=torch.cuda.get_device_name(device) if gpu else _cpu_name(),
        cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(), torch_threads=torch.get_num_threads(), preset=preset, dtype=str(dtype).replace("torch.", ""), fast=fast,
        num_frames=args.num_frames, batch_size=args.batch_size, clips=clips, source=source,
        encoder_only_clips_per_s=round(ceiling, 2), encoder_only_threads=ceiling_threads, results=rows,
        torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
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
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    gpu = args.device.startswith("cuda")
    args.seconds = args.seconds if args.seconds is not None else (10.0 if gpu else 2.0)
    args.size = args.size or ("360x640" if gpu else "240x320")
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
