"""``pevideo embed``, ``pevideo classify`` and ``pevideo merge``: the command-line face of :mod:`pevideo.embed`.

Exit status: 0 = every video done; 1 = some videos could not be read (the others' outputs are written,
the failures listed in the errors file); 2 = usage error (bad arguments, missing input or checkpoint,
an output made with different arguments); 3 = the run crashed (rerun the same command to resume);
130 = interrupted.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

__all__ = ["register"]

EMBED_EPILOG = """\
examples:
  pevideo embed videos/ --model facebook/pe-av-large --out emb.safetensors
  pevideo embed list.txt --model ckpt --out emb/ --shard-size 10000     # keep shards (a folder)
  torchrun --nproc-per-node 8 -m pevideo embed videos/ --model ckpt --out emb.safetensors

Rerunning the same command resumes: finished shards are skipped. Read the result with
pevideo.read_embeddings(out): video_embeds (N, D), paths, frame_counts, sampled_indices, errors.
exit status: 0 all done, 1 some videos failed (see the errors file), 2 usage error, 3 crashed.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face Hub id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled per clip, spread over the video (default 16; at most 512, "
                   "unless the PEVIDEO_MAX_FRAMES environment variable raises it)")
    g.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead (clips then differ in length)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per encoder call (default 8)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: the CPUs per rank - 1, at most 16; 0 = decode inline)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fast", dest="fast", action="store_const", const=True, default=None,
                   help="fused Triton kernels (default on a GPU)")
    g.add_argument("--eager", dest="fast", action="store_const", const=False, help="plain PyTorch (default on CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"],
                   help="model dtype (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--apply-rotation", action="store_true",
                   help="rotate frames upright by the video's rotation metadata (default: as stored, as upstream)")


def register(sub) -> None:
    """Add the ``embed``, ``classify`` and ``merge`` subcommands to the ``pevideo`` parser's subparsers."""
    p = sub.add_parser("embed", help="videos to embeddings (safetensors), resumable, multi-GPU with torchrun",
                       description="Embed video files, folders (recursively) and list files (one path a line) with "
                       "PE Video. Decoding runs in background processes while the model encodes.",
                       epilog=EMBED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders, or .txt/.lst list files")
    p.add_argument("--out", required=True,
                   help="X.safetensors (one file) or a folder (the shards are the output)")
    _add_common(p)
    p.add_argument("--shard-size", type=int, default=1024, help="clips per shard, the unit of resuming (default 1024)")
    p.add_argument("--pooled", action="store_true", help="also store the video encoder's pooled output ('pooled')")
    p.add_argument("--errors", default=None, help="errors file, JSONL (default: X.errors.jsonl, or FOLDER/errors.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run's outputs instead of resuming")
    p.add_argument("--keep-shards", action="store_true", help="keep X.safetensors.shards/ after joining")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-video failure lines or summary")
    p.set_defaults(func=run_embed)

    p = sub.add_parser("classify", help="zero-shot: per-clip probability of each text label",
                       description="Score clips against text labels: sigmoid(video · text · scale + bias), as PE "
                       "Video's quickstart. Prints a table, or writes CSV / JSON. Needs the checkpoint's text "
                       "tokenizer (tokenizer.json / tokenizer_config.json) in the --model folder: "
                       "model.save_pretrained writes none; save it there with "
                       "AutoTokenizer.from_pretrained(<the checkpoint the weights come from>).save_pretrained(folder) "
                       "(README: Your own or an offline checkpoint).")
    p.add_argument("inputs", nargs="+", metavar="VIDEO", help="video files, folders, or list files")
    p.add_argument("--labels", nargs="+", default=None, help='text labels, e.g. "a person playing tennis" "a cat sleeping"')
    p.add_argument("--labels-file", default=None, help="labels, one per line")
    _add_common(p)
    p.add_argument("--format", choices=["text", "csv", "json"], default=None,
                   help="output format (default: from --out's suffix, else text)")
    p.add_argument("--out", default=None, help="write here instead of stdout")
    p.set_defaults(func=run_classify)

    p = sub.add_parser("merge", help="join the shards of an embedding run (e.g. after a multi-GPU run was cut short)",
                       description="Join the shards of `pevideo embed --out OUT` into OUT (a .safetensors "
                       "output) and write the errors file.")
    p.add_argument("out", metavar="OUT", help="what was given to `pevideo embed --out`")
    p.add_argument("--errors", default=None, help="errors file (default as for embed)")
    p.add_argument("--keep-shards", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the shard folder after joining (default: as `pevideo embed --keep-shards` chose)")
    p.set_defaults(func=run_merge)


# --------------------------------------------------------------------------------------------------
def _fail(cmd: str, msg) -> int:
    print(f"pevideo {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _guarded(cmd: str, fn) -> int:
    """Exit statuses: usage problems 2, crashes 3 (with the traceback), Ctrl-C 130."""
    import warnings

    from .store import ManifestMismatchError, StoreError

    def show(message, category, filename, lineno, file=None, line=None):
        if _is_rank0():  # under torchrun, once rather than once per rank
            _say(f"pevideo {cmd}: warning: {message}")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show  # one plain line, not the source line that raised it
            return fn()
    except StoreError as exc:  # the output's files: one line naming the file, the cause and what to do
        print(f"pevideo {cmd}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except (ManifestMismatchError, FileNotFoundError, ValueError, TypeError) as exc:
        return _fail(cmd, exc)
    except KeyboardInterrupt:
        print(f"pevideo {cmd}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"pevideo {cmd}: crashed; rerun the same command to resume", file=sys.stderr)
        return 3


def _failure(r) -> str:
    return r.error if r.path in r.error else f"{r.path}: {r.error}"


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)  # above the progress bar, not through it


def run_embed(args: argparse.Namespace) -> int:
    from .api import embed_to_file
    from .inputs import expand_inputs

    def go():
        paths = expand_inputs(args.inputs, must_exist=True)
        summary = embed_to_file(
            paths, args.model, args.out, num_frames=args.num_frames, fps=args.fps, batch_size=args.batch_size,
            shard_size=args.shard_size, num_workers=args.workers, pooled=args.pooled, device=args.device,
            dtype=args.dtype, fast=args.fast, errors=args.errors, overwrite=args.overwrite,
            keep_shards=args.keep_shards, progress=args.progress, apply_rotation=args.apply_rotation,
            on_error=None if args.quiet else (lambda r: _say(f"pevideo embed: failed: {_failure(r)}")),
        )
        if not args.quiet and _is_rank0():
            st = summary.stats
            line = (f"pevideo embed: {summary.num_embedded} of {summary.num_inputs} videos embedded -> {summary.out}"
                    f" ({summary.shards_written} shard(s) written, {summary.shards_skipped} already done)")
            if summary.num_failed:
                line += f"; {summary.num_failed} failed, see {summary.errors_path}"
            if st.clips:
                line += (f"; {st.clips_per_s:.1f} clips/s, waited on decoding "
                         f"{100 * st.wait_fraction:.0f}% of the time")
            print(line, file=sys.stderr)
        # Under torchrun, rank 0 alone says that videos failed: torchrun exits with its status, and a
        # failing rank 0 does not get the others killed while they are still closing down.
        return summary.exit_status if _is_rank0() else 0

    return _guarded("embed", go)


def run_merge(args: argparse.Namespace) -> int:
    from .store import merge_shards

    def go():
        summary = merge_shards(args.out, keep_shards=args.keep_shards, errors=args.errors)
        msg = f"pevideo merge: {summary.num_embedded} of {summary.num_inputs} videos -> {summary.out}"
        if summary.num_failed:
            msg += f"; {summary.num_failed} failed, see {summary.errors_path}"
        print(msg, file=sys.stderr)
        return summary.exit_status

    return _guarded("merge", go)


def _labels(args) -> list[str]:
    labels = list(args.labels or [])
    if args.labels_file:
        with open(args.labels_file, encoding="utf-8") as f:
            labels += [line.strip() for line in f if line.strip()]
    if not labels:
        raise ValueError("give --labels (or --labels-file)")
    return labels


def run_classify(args: argparse.Namespace) -> int:
    from .api import classify_videos
    from .inputs import expand_inputs

    def go():
        labels = _labels(args)
        fmt = args.format
        if fmt is None:
            ext = os.path.splitext(args.out or "")[1].lower()
            fmt = {".csv": "csv", ".json": "json"}.get(ext, "text")
        paths = expand_inputs(args.inputs, must_exist=True)
        results = list(classify_videos(
            paths, args.model, labels, num_frames=args.num_frames, fps=args.fps, batch_size=args.batch_size,
            num_workers=args.workers, device=args.device, dtype=args.dtype, fast=args.fast, progress=args.progress,
            apply_rotation=args.apply_rotation,
        ))
        failed = [r for r in results if not r.ok]
        for r in failed:
            print(f"pevideo classify: failed: {_failure(r)}", file=sys.stderr)
        text = {"text": _as_text, "csv": _as_csv, "json": _as_json}[fmt](results, labels)
        if args.out:
            with open(args.out, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 1 if failed else 0

    return _guarded("classify", go)


def _as_text(results, labels) -> str:
    width = max(len(label) for label in labels)
    lines = []
    for r in results:
        lines.append(r.path)
        if not r.ok:
            lines.append(f"  error: {r.error}")
            continue
        for label, p in zip(labels, r.probs.tolist()):
            lines.append(f"  {p:.4f}  {label:<{width}}".rstrip())
    return "\n".join(lines) + "\n"


def _as_csv(results, labels) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", *labels, "error"])
    for r in results:
        probs = [f"{p:.6g}" for p in r.probs.tolist()] if r.ok else [""] * len(labels)
        w.writerow([r.path, *probs, r.error or ""])
    return buf.getvalue()


def _as_json(results, labels) -> str:
    rows = []
    for r in results:
        row = {"index": r.index, "path": r.path}
        if r.ok:
            row["probs"] = [round(p, 6) for p in r.probs.tolist()]
        else:
            row["error"] = r.error
        rows.append(row)
    return json.dumps({"labels": labels, "results": rows}, indent=2) + "\n"
