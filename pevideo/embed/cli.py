"""``pevideo embed``, ``pevideo classify`` and ``pevideo merge``: the command-line face of :mod:`pevideo.embed`.

Exit status (EXIT_STATUS below, also in ``--help``): 0 = every video done; 1 = some videos could not be
read (the others' outputs are written, the failures listed in the errors file); 2 = refused before any
work (bad arguments, a device torch does not know, missing input or checkpoint, an output made with
different arguments, an output path that would destroy something, an output another run is writing);
3 = the run failed on a file (unwritable output, disk full, damaged output, a failed errors write) or
inside pevideo; 130 = interrupted (also during start-up, see :mod:`pevideo.cli`). Errors print one line
naming the file and the cause (``PEVIDEO_DEBUG=1`` adds the traceback); "rerun the same command to
resume" is said only when finished shards are on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["register"]

EXIT_STATUS = """\
exit status: 0 all done; 1 some videos could not be read (the rest is written, the failures are in
the errors file / on stderr); 2 refused before any work: bad arguments, unknown device, missing input
or checkpoint (or a folder without config.json), an output made with other arguments, an output that
would be written over an input, the checkpoint or a file pevideo did not write, an output another run
is writing; 3 the run failed on a file (unwritable output, disk full, a damaged output file, an errors
file that could not be written) or inside pevideo; 130 interrupted. Errors are one line naming the
file and the cause; PEVIDEO_DEBUG=1 adds the traceback.
"""

OUT_HELP = ("X.safetensors: one file (shards are worked on in X.safetensors.shards/ and joined at the end); "
            "any other name is a folder and the shards in it are the output. A name with another extension "
            "(w14.txt, emb.npy) is refused; end a folder name that has a dot with / (runs/v1.2/)")

EMBED_EPILOG = """\
examples:
  pevideo embed videos/ --model facebook/pe-av-large --out emb.safetensors
  pevideo embed list.txt --model ckpt --out emb/ --shard-size 10000     # keep shards (a folder)
  torchrun --nproc-per-node 8 -m pevideo embed videos/ --model ckpt --out emb.safetensors

--out: X.safetensors is one file; any other name is a folder of shards (the output itself). Names with
another extension (w14.txt, emb.npy) are refused; end a folder name that has a dot with /.
Rerunning the same command resumes: finished shards are skipped. Read the result with
pevideo.read_embeddings(out): video_embeds (N, D), source_frame_counts (frames in each source video),
sampled_frame_counts (frames encoded per clip), sampled_indices, input_index, paths, errors.
""" + EXIT_STATUS


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face Hub id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled per clip, spread over the video (default 16); a clip's frames may take at "
                   "most 4 GiB at the model's frame size (frames x S x S x 3 bytes; the PEVIDEO_MAX_VIDEO_BYTES "
                   "environment variable, e.g. 16G, raises it)")
    g.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead, by upstream's rule "
                   "(int(frames / video fps x FPS) frames, evenly spaced; every frame at or above the video's own "
                   "rate); clips then differ in length")
    p.add_argument("--batch-size", type=int, default=8, help="clips per encoder call (default 8)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: the CPUs per rank - 1, "
                   "at most 16; never more than the clips or the usable CPUs; 0 = decode inline). Each takes 20-50 MB "
                   "of its own (measured, 360p-1080p H.264) plus the 2 batches it prepares ahead (2 x batch x frames "
                   "x S x S x 3 bytes: 87 MB at 8 x 16 x 336x336)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fast", dest="fast", action="store_const", const=True, default=None,
                   help="fused Triton kernels (default on a GPU)")
    g.add_argument("--eager", dest="fast", action="store_const", const=False, help="plain PyTorch (default on CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"],
                   help="model dtype (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available); a device "
                   "torch does not know, or cuda without a GPU, is a usage error (exit 2)")
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
    p.add_argument("--out", required=True, help=OUT_HELP)
    _add_common(p)
    p.add_argument("--shard-size", type=int, default=1024, help="clips per shard, the unit of resuming (default 1024)")
    p.add_argument("--pooled", action="store_true", help="also store the video encoder's pooled output ('pooled')")
    p.add_argument("--errors", default=None, help="errors file, JSONL (default: X.errors.jsonl, or FOLDER/errors.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run's outputs instead of resuming "
                   "(only files pevideo wrote: anything else at those places is refused)")
    p.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                   help="on a rerun, try the clips that failed before again (default; --no-retry-failed keeps "
                   "their errors). Inputs whose file changed since they were embedded are always embedded again")
    p.add_argument("--keep-shards", action="store_true", help="keep X.safetensors.shards/ after joining")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-video failure lines or summary")
    from .ray_run import add_arguments as add_ray_arguments

    add_ray_arguments(p)  # --engine ray and its options
    p.set_defaults(func=run_embed)

    p = sub.add_parser("classify", help="zero-shot: per-clip probability of each text label",
                       description="Score clips against text labels: sigmoid(video · text · scale + bias), as PE "
                       "Video's quickstart. Prints a table, or writes CSV / JSON. Needs the checkpoint's text "
                       "tokenizer (tokenizer.json / tokenizer_config.json) in the --model folder: "
                       "model.save_pretrained writes none; save it there with "
                       "AutoTokenizer.from_pretrained(<the checkpoint the weights come from>).save_pretrained(folder) "
                       "(README: Your own or an offline checkpoint). "
                       "A clip that cannot be read is named on stderr (once) and in the CSV / JSON output's "
                       "error field.",
                       epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="VIDEO", help="video files, folders, or list files")
    p.add_argument("--labels", nargs="+", default=None, help='text labels, e.g. "a person playing tennis" "a cat sleeping"')
    p.add_argument("--labels-file", default=None, help="labels, one per line")
    _add_common(p)
    p.add_argument("--format", choices=["text", "csv", "json"], default=None,
                   help="output format (default: from --out's suffix, else text)")
    p.add_argument("--out", default=None, help="write here instead of stdout (checked before any clip is "
                   "scored; written under a temporary name, renamed when complete; an existing file is replaced "
                   "only when it is a table pevideo wrote). File names that are not UTF-8 or hold a newline are "
                   "written as their JSON string (\"...\" with escapes), as in the embeddings file")
    p.set_defaults(func=run_classify)

    p = sub.add_parser("merge", help="join the shards of an embedding run (e.g. after a multi-GPU run was cut short)",
                       description="Join the shards of `pevideo embed --out OUT` into OUT (a .safetensors "
                       "output) and write the errors file.",
                       epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="what was given to `pevideo embed --out`")
    p.add_argument("--errors", default=None, help="errors file (default as for embed)")
    p.add_argument("--keep-shards", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the shard folder after joining (default: as `pevideo embed --keep-shards` chose)")
    p.set_defaults(func=run_merge)


# --------------------------------------------------------------------------------------------------
def _err(line: str) -> None:
    from .tables import printable

    print(printable(line), file=sys.stderr)


def _fail(cmd: str, msg) -> int:
    _err(f"pevideo {cmd}: error: {msg}")
    return 2


def _one_line(exc: BaseException) -> str:
    """The cause in one line, naming the file: OSErrors as ``FILE: strerror``, the rest by their message
    (pevideo's messages name their file; others get their type, as they may not)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    else:
        from ..errors import PevideoError

        text = str(exc) if isinstance(exc, (PevideoError, ValueError, TypeError, OSError)) else (
            f"{type(exc).__name__}: {exc}")
    return text.strip()


def _guarded(cmd: str, fn, resumable=lambda: 0, where: str | None = None) -> int:
    """Run ``fn`` and turn what it raises into an exit status and one line on stderr (see EXIT_STATUS):
    usage problems 2, failures on files or inside pevideo 3, Ctrl-C 130. ``resumable()``: how many
    finished shards a rerun would keep (said only then: "rerun the same command to resume"). ``where``:
    the output the command works on, named when a file there turns out damaged (a JSON or safetensors
    reader's error does not say which file it read)."""
    import warnings

    from ..errors import PevideoError, UsageError
    from .manifest import ManifestMismatchError
    from .safeio import StoreError

    def show(message, category, filename, lineno, file=None, line=None):
        if _is_rank0():  # under torchrun, once rather than once per rank
            _say(f"pevideo {cmd}: warning: {message}")

    def advice() -> str:
        try:
            n = resumable()
        except Exception:  # the advice must not hide the error
            n = 0
        return f"; {n} finished shard(s) are kept: rerun the same command to resume" if n else ""

    def traceback_if_asked():
        if os.environ.get("PEVIDEO_DEBUG"):
            import traceback

            traceback.print_exc()

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show  # one plain line, not the source line that raised it
            return fn()
    except StoreError as exc:  # the output's files: one line naming the file, the cause and what to do
        traceback_if_asked()
        _err(f"pevideo {cmd}: error: {exc}")
        return exc.exit_status
    except (UsageError, ManifestMismatchError) as exc:
        traceback_if_asked()
        return _fail(cmd, _one_line(exc))
    except PevideoError as exc:  # pevideo's own runtime errors (a damaged output file, ...)
        traceback_if_asked()
        _err(f"pevideo {cmd}: error: {_one_line(exc)}{advice()}")
        return 3
    except json.JSONDecodeError as exc:  # a damaged manifest / metadata: a file's fault, not the command's
        traceback_if_asked()
        _err(f"pevideo {cmd}: error: {where or 'the output'}: damaged (a JSON file in it: {exc})")
        return 3
    except (FileNotFoundError, ValueError, TypeError) as exc:  # a missing input/checkpoint, bad values
        traceback_if_asked()
        return _fail(cmd, _one_line(exc))
    except OSError as exc:  # unwritable output, disk full, ...
        traceback_if_asked()
        _err(f"pevideo {cmd}: error: {_one_line(exc)}{advice()}")
        return 3
    except KeyboardInterrupt:
        _err(f"pevideo {cmd}: interrupted{advice()}")
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on demand
        traceback_if_asked()
        if type(exc).__module__.startswith("safetensors") or type(exc).__name__ == "SafetensorError":
            _err(f"pevideo {cmd}: error: {where or 'the output'}: damaged (a .safetensors file: {exc})")
            return 3
        hint = "" if os.environ.get("PEVIDEO_DEBUG") else " (internal error; PEVIDEO_DEBUG=1 shows the traceback)"
        _err(f"pevideo {cmd}: error: {_one_line(exc)}{hint}{advice()}")
        return 3


def check_device(device) -> None:
    """Refuse, as a usage error, a device string torch does not know or a device this machine lacks."""
    import torch

    from ..errors import UsageError

    if device is None or device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {device!r}: not a device torch knows (cpu, cuda, cuda:N)") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type == "meta" or available is None or not available():
        raise UsageError(f"--device {device}: not available here (cpu, cuda, cuda:N)")


def _failure(r) -> str:
    return r.error if r.path in r.error else f"{r.path}: {r.error}"


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    from .tables import printable

    tqdm.write(printable(msg), file=sys.stderr)  # above the progress bar, not through it; one line


def _finished_shards(out) -> int:
    """Finished shards a rerun with --out ``out`` would keep (0 once the joined file is there)."""
    from .layout import Layout

    layout = Layout.of(out)
    if layout.final is not None and os.path.isfile(layout.final):
        return 0
    if not os.path.isfile(layout.manifest):
        return 0
    return sum(1 for n in os.listdir(layout.work) if n.startswith("shard-") and n.endswith(".safetensors"))


def run_embed(args: argparse.Namespace) -> int:
    from .inputs import expand_inputs
    from .tofile import embed_to_file

    def go():
        if args.engine == "ray":
            from .ray_run import run_cli

            return run_cli(args)
        check_device(args.device)
        paths = expand_inputs(args.inputs, must_exist=True)
        summary = embed_to_file(  # checks --out and --errors before any work
            paths, args.model, args.out, num_frames=args.num_frames, fps=args.fps, batch_size=args.batch_size,
            shard_size=args.shard_size, num_workers=args.workers, pooled=args.pooled, device=args.device,
            dtype=args.dtype, fast=args.fast, errors=args.errors, overwrite=args.overwrite,
            keep_shards=args.keep_shards, retry_failed=args.retry_failed, progress=args.progress,
            apply_rotation=args.apply_rotation,
            on_error=None if args.quiet else (lambda r: _say(f"pevideo embed: failed: {_failure(r)}")),
        )
        if not args.quiet and _is_rank0():
            st = summary.stats
            line = (f"pevideo embed: {summary.num_embedded} of {summary.num_inputs} videos embedded -> {summary.out}"
                    f" ({summary.shards_written} shard(s) written, {summary.shards_skipped} already done)")
            if summary.num_retried:
                line += f"; {summary.num_retried} that had failed tried again"
            if summary.num_changed:
                line += f"; {summary.num_changed} changed input(s) embedded again"
            if summary.num_failed:
                line += f"; {summary.num_failed} failed, see {summary.errors_path}"
            if st.clips:
                line += (f"; {st.clips_per_s:.1f} clips/s, waited on decoding "
                         f"{100 * st.wait_fraction:.0f}% of the time")
            _err(line)
        # Under torchrun, rank 0 alone says that videos failed: torchrun exits with its status, and a
        # failing rank 0 does not get the others killed while they are still closing down.
        return summary.exit_status if _is_rank0() else 0

    return _guarded("embed", go, resumable=lambda: _finished_shards(args.out), where=args.out)


def run_merge(args: argparse.Namespace) -> int:
    from .outputs import merge_shards  # safetensors or Parquet

    def go():
        summary = merge_shards(args.out, keep_shards=args.keep_shards, errors=args.errors)
        msg = f"pevideo merge: {summary.num_embedded} of {summary.num_inputs} videos -> {summary.out}"
        if summary.num_failed:
            msg += f"; {summary.num_failed} failed, see {summary.errors_path}"
        _err(msg)
        return summary.exit_status

    return _guarded("merge", go, where=args.out)


def _labels(args) -> list[str]:
    from ..errors import UsageError

    labels = list(args.labels or [])
    if args.labels_file:
        with open(args.labels_file, encoding="utf-8") as f:
            labels += [line.strip() for line in f if line.strip()]
    if not labels:
        raise UsageError("give --labels (or --labels-file)")
    return labels


def run_classify(args: argparse.Namespace) -> int:
    from .api import classify_videos
    from .inputs import expand_inputs
    from .layout import check_table_path
    from .session import checkpoint_folder, model_source
    from .tables import TableOutput, is_table, render, table_format

    def go():
        labels = _labels(args)
        fmt = table_format(args.format, args.out)
        check_device(args.device)
        paths = expand_inputs(args.inputs, must_exist=True)
        source = model_source(args.model)  # resolved, not loaded
        if args.out:  # before the model is loaded or a clip decoded
            check_table_path(args.out, inputs=paths, checkpoint=checkpoint_folder(source), owned=is_table)
        with TableOutput(args.out) as out:
            results = list(classify_videos(
                paths, source, labels, num_frames=args.num_frames, fps=args.fps, batch_size=args.batch_size,
                num_workers=args.workers, device=args.device, dtype=args.dtype, fast=args.fast,
                progress=args.progress, apply_rotation=args.apply_rotation,
            ))
            failed = [r for r in results if not r.ok]
            for r in failed:  # once, on stderr; the table on stdout only marks the clip
                _err(f"pevideo classify: failed: {_failure(r)}")
            for r in results:  # scored, but the file may be cut short: the table says it too
                if r.ok and r.truncated_suspect:
                    _err(f"pevideo classify: warning: {r.truncated_suspect}")
            out.commit(render(fmt, results, labels, to_file=out.to_file))
        return 1 if failed else 0

    return _guarded("classify", go)
