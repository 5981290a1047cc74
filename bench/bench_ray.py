"""``pevideo embed`` against ``pevideo embed --engine ray`` on one machine: the same clips, the same model.

Each engine runs as a user runs it, a fresh ``python -m pevideo embed`` process per run (model loading,
and for Ray starting a local instance, included in the wall time), timed in interleaved rounds
(:mod:`pevideo.benchtools`) so that a machine getting busier slows both alike. Reported per engine:
wall seconds and clips/s end to end, and the pipeline's own clips/s as the CLI prints it (from the
first clip to the output on disk). The model is a random checkpoint of ``bench/bench_embed.py``'s
``--preset`` (``tiny`` by default: decoding-bound, where the engines' overheads show).

    python bench/bench_ray.py --clips 200 --out bench/results/cpu-embed-ray.json
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_embed import build_model, write_videos  # noqa: E402

from pevideo.benchtools import machine_info, time_interleaved, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--unique", type=int, default=40, help="distinct synthetic videos, listed over and over")
    ap.add_argument("--seconds", type=float, default=1.2)
    ap.add_argument("--size", default="48x64", help="synthetic video size HxW")
    ap.add_argument("--preset", choices=["tiny", "reduced"], default="tiny")
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from pevideo import PeVideoVideoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.preset, torch.device("cpu"), torch.float32, False)
        ckpt = os.path.join(tmp, "ckpt")
        model.save_pretrained(ckpt)
        h, w = model.video_encoder.vit.args.img_size
        PeVideoVideoProcessor(size={"height": h, "width": w}).save_pretrained(ckpt)
        vh, vw = (int(x) for x in args.size.split("x"))
        unique = write_videos(tmp, args.unique, args.seconds, vh, vw)
        with open(os.path.join(tmp, "list.txt"), "w") as f:
            f.writelines(unique[i % len(unique)] + "\n" for i in range(args.clips))
        base = [sys.executable, "-m", "pevideo", "embed", os.path.join(tmp, "list.txt"), "--model", ckpt,
                "--num-frames", str(args.num_frames), "--batch-size", str(args.batch_size), "--overwrite",
                "--no-progress"]
        cmds = {"local": base + ["--out", os.path.join(tmp, "local.safetensors")],
                "ray": base + ["--out", os.path.join(tmp, "ray"), "--engine", "ray"]}
        printed: dict[str, list] = {k: [] for k in cmds}
        loads: list = []

        def run(name):
            loads.append(os.getloadavg()[0])
            t0 = time.perf_counter()
            p = subprocess.run(cmds[name], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                sys.exit(f"{name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
            m = re.search(r"([0-9.]+) clips/s", p.stderr)
            printed[name].append(float(m.group(1)) if m else None)
            print(f"{name}: {wall:.1f} s, {args.clips / wall:.1f} clips/s end to end; the CLI says "
                  f"{printed[name][-1]} clips/s", file=sys.stderr)

        t = time_interleaved({k: (lambda k=k: run(k)) for k in cmds}, warmup=0, repeats=args.repeats,
                             min_repeats=args.repeats)
    rows = {}
    for k in cmds:
        rows[k] = {"wall_s_median": round(t[k].median_s, 2), "wall_s": [round(x, 2) for x in t[k].times_s],
                   "clips_per_s_end_to_end": round(args.clips / t[k].median_s, 2),
                   "pipeline_clips_per_s_printed": printed[k]}
    report = {"benchmark": "embed-ray", "clips": args.clips, "unique_videos": args.unique,
              "video": f"h264 {args.size.split('x')[1]}x{args.size.split('x')[0]}, {args.seconds:g} s at 30 fps",
              "preset": args.preset, "num_frames": args.num_frames, "batch_size": args.batch_size,
              "command": " ".join(["pevideo embed LIST --model CKPT --num-frames", str(args.num_frames), "--batch-size",
                                   str(args.batch_size), "[--engine ray]"]),
              "load_average_at_starts": [round(x, 2) for x in loads], "results": rows}
    print(report, file=sys.stderr)
    if args.out:
        print(write_json(args.out, report, machine_info("cpu")), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
