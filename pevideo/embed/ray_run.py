"""``pevideo embed --engine ray``: the Ray Data pipeline of :mod:`pevideo.ray_data` over the usual inputs
and options, writing Parquet into a folder, resumably; and ``pevideo merge`` of such a folder.

A run holds the folder's lock (``FOLDER/.pevideo.lock``), records its fingerprint in
``FOLDER/manifest.json`` (a rerun with other arguments is refused, as ``pevideo embed`` refuses), skips
the inputs that already have a row, removes files that a killed writer left unreadable (their videos
are redone), then checks that every input is there exactly once (duplicates from retried tasks are
resolved as :mod:`pevideo.embed.parquet` says) and writes ``errors.jsonl``. Ray is imported only here
and in :mod:`pevideo.ray_data`; a local Ray instance is started unless ``--ray-address`` (or
``RAY_ADDRESS``) names a cluster or Ray is already initialized.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..errors import PevideoError, UsageError
from .encode import PipelineStats
from .fingerprint import describe_mismatch, fingerprint, model_id
from .inputs import expand_inputs
from .parquet import (
    MERGED_NAME,
    PARQUET_FORMAT,
    RESUME,
    check_one_model,
    pyarrow,
    check_complete,
    merged_table,
    read_manifest,
    remove_damaged,
    scan,
    write_manifest,
    write_merged,
)
from .safeio import DamagedOutputError, OutputLock, atomic_write_text, io_errors, remove_stale_temporaries
from .session import check_sampling, checkpoint_folder, open_session, resolve_fast

__all__ = ["embed_with_ray", "merge_parquet", "add_arguments", "run_cli"]


def check_parquet_out(out: str) -> None:
    if not out:
        raise UsageError("the output path is empty")
    if out.endswith(".safetensors"):
        raise UsageError(f"{out}: --engine ray writes a folder of Parquet files; give a folder name (no .safetensors)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} exists and is not a folder; --engine ray writes a folder of Parquet files")
    ext = os.path.splitext(os.path.basename(out.rstrip("/" + os.sep)))[1]
    if ext not in ("", ".parquet") and not os.path.isdir(out) and not out.endswith(("/", os.sep)):
        raise UsageError(f"{out}: a {ext} name looks like a file; --engine ray writes a folder (a name without an "
                         f"extension, X.parquet, or one ending with / as in {out}/)")


def _lock(out: str) -> OutputLock:
    return OutputLock(os.path.join(out, ".pevideo.lock"), out, check=lambda: check_parquet_out(out))


def _init_ray(address) -> bool:
    """Start (or join) Ray unless this process already did; True when it was started here."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING",
             include_dashboard=False)
    return True


def _is_ours(path: str) -> bool:
    """A file of a Ray run's folder that pevideo wrote: its manifest, an errors file, or a Parquet file with
    the stage's columns (:func:`pevideo.embed.parquet.schema`)."""
    from .layout import is_errors_file

    name = os.path.basename(path)
    if name == "manifest.json":
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("format") == PARQUET_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    if name.endswith(".jsonl"):
        return is_errors_file(path)
    try:
        names = set(pyarrow().parquet.read_schema(path).names)
    except Exception:  # noqa: BLE001  not readable as Parquet: proves nothing
        return False
    return {"path", "input_index", "frame_indices", "embedding", "fingerprint", "error"} <= names


def check_paths(out: str, errors_path: str, inputs, checkpoint: str | None) -> None:
    """Before any work: neither the folder nor the errors file is an input or inside the checkpoint, the
    errors file is a file name, and an existing one is pevideo's (as for ``pevideo embed``)."""
    from .layout import refuse_conflicts, refuse_foreign

    refuse_conflicts([("the output", out), ("the errors file", errors_path)], inputs, checkpoint)
    if errors_path.endswith(("/", os.sep)) or os.path.isdir(errors_path):
        raise UsageError(f"{errors_path}: is not a file name (the errors file is one file)")
    if os.path.isfile(errors_path) and os.path.getsize(errors_path) and not _is_ours(errors_path):
        refuse_foreign(errors_path, "an errors file")


def _prepare(out: str, config: dict, overwrite: bool) -> dict:
    """Check or write the manifest (holding the lock); with ``overwrite`` remove a previous run's files:
    only those that prove themselves pevideo's (a user's file in the folder is refused, never removed)."""
    from .layout import refuse_foreign
    from .records import FORMAT
    from .manifest import ManifestMismatchError

    with io_errors(out):
        os.makedirs(out, exist_ok=True)
        names = os.listdir(out)
        if overwrite:
            mine = [n for n in names if n in ("manifest.json", "errors.jsonl") or n.endswith(".parquet")]
            for n in mine:
                if not _is_ours(os.path.join(out, n)):
                    refuse_foreign(os.path.join(out, n), "a file of a `pevideo embed --engine ray` run",
                                   "this folder holds other files: give another --out")
            for n in mine:
                os.remove(os.path.join(out, n))
            names = os.listdir(out)
    remove_stale_temporaries(out, ("manifest.json", "errors.jsonl", MERGED_NAME), 0)
    p = os.path.join(out, "manifest.json")
    if os.path.isfile(p):
        try:
            with open(p, encoding="utf-8") as f:
                other = json.load(f).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            other = False
        if other:
            raise UsageError(f"{out} holds a `pevideo embed` run without --engine ray (safetensors shards); "
                             "use another --out")
        man = read_manifest(out)
        if man["fingerprint"] != _row_fp(config) or man["config"] != config:
            raise ManifestMismatchError(out, describe_mismatch(man["config"], config),
                                        "use another --out, or --overwrite to start over")
        return man
    if any(n.endswith(".parquet") for n in names):
        raise UsageError(f"{out} holds Parquet files that `pevideo embed --engine ray` did not make (no manifest); "
                         "use another --out")
    return write_manifest(out, config)


def _row_fp(config: dict) -> str:
    from .parquet import row_fingerprint

    return row_fingerprint(config)


def _write_errors(path: str, errors: list[dict]) -> None:
    with io_errors(path):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    # As pevideo embed's: a line per failed clip, and per clip embedded with a warning, in input order.
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in sorted(errors, key=lambda e: e["index"])))


class RayTasksFailedError(PevideoError):
    """Ray tasks failed again and again over many videos: not one file's fault (exit status 3)."""


# Tries of a Ray task that fails (its worker dies): Ray Data's default is to try without end, so a file
# that crashes the decoder process itself would hold the job forever.
TASK_TRIES = 3


def run_passes(run_pass, todo: list[int], paths: list[str], out: str) -> None:
    """Embed the inputs ``todo`` with ``run_pass(todo, decode_batch, errors=None)`` (which returns the
    inputs still without a row), each Ray task tried ``TASK_TRIES`` times and a task that fails them all
    dropped rather than ending the job. What a dropped task held is tried again one video per task;
    a video whose task fails again then is written as that video's error, unless every video of that
    second pass failed (then the cause is not one file: the run stops, the rows written kept)."""
    import warnings

    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1  # a failed task drops its block; what it held is found missing below
    try:
        lost = run_pass(todo, 2)
        if not lost:
            return
        how = f"a worker that died {TASK_TRIES} times, or an error the task raised; see Ray's log"
        warnings.warn(f"{len(lost)} video(s) were in Ray tasks that failed ({how}); trying them again, one "
                      "video per task")
        still = run_pass(lost, 1)
        if not still:
            return
        if len(still) == len(lost) > 1:
            raise RayTasksFailedError(f"{out}: the Ray tasks of {len(still)} videos failed again, one video per task "
                                      f"({how}): not one file's fault; the rows written are kept: {RESUME}")
        reason = f"its Ray task failed in both passes, alone in the second ({how}): does it crash the decoder?"
        run_pass(still, 1, errors={i: f"{paths[i]}: {reason}" for i in still})
    finally:
        ctx.max_errored_blocks = before


def embed_with_ray(inputs, model, out, *, processor=None, num_frames: int | None = None, fps: float | None = None,
                   batch_size: int = 8, shard_size: int = 1024, decoders: int | None = None,
                   encoders: int | None = None, gpus_per_encoder: float | None = None, cpus_per_encoder: float = 1,
                   pooled: bool = False, dtype=None, fast: bool | None = None, errors=None, overwrite: bool = False,
                   apply_rotation: bool = False, address: str | None = None, progress: bool | None = None,
                   decode_cls=None, encode_cls=None):
    """Embed every video of ``inputs`` with Ray Data into the Parquet folder ``out``, resumably.

    ``decoders``: decode tasks at once (None: as free CPUs allow); ``encoders``: model copies (default:
    one per GPU of the cluster, or 1 on CPU); ``gpus_per_encoder`` (default 1 when the cluster has GPUs,
    else 0: on CPU; 0.5 packs two copies per GPU); ``shard_size``: rows per Parquet file (at least, but
    the last). ``progress``: Ray Data's progress bars and log lines on (True) or off (False; None: as
    Ray decides). ``decode_cls`` / ``encode_cls``: subclasses of :class:`pevideo.ray_data.Decode` /
    ``Encode`` to run instead. Other arguments as :func:`pevideo.embed_to_file`. Returns an
    :class:`pevideo.EmbedSummary` (``exit_status`` 1 when some video failed); ``summary.duplicates``
    counts rows written twice (retries), each input counted once.
    """
    import ray

    from . import ray_stages as ray_data
    from .merging import EmbedSummary

    out = os.fspath(out)
    check_parquet_out(out)
    sampling = check_sampling(num_frames, fps)
    num_frames, fps = sampling.num_frames, sampling.fps
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    paths = expand_inputs(inputs)
    # The processor and the frame size only: the model loads in the encoder actors.
    session = open_session(model, processor, device="cpu", dtype="float32", fast=False, sampling=sampling)
    errors_path = os.fspath(errors) if errors else os.path.join(out, "errors.jsonl")
    check_paths(out, errors_path, paths, checkpoint_folder(session.source))
    started = _init_ray(address)
    try:
        if progress is not None:
            import logging

            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = bool(progress)
            logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus_per_encoder is None:
            gpus_per_encoder = 1.0 if gpus else 0.0
        if gpus_per_encoder and not gpus:
            raise UsageError("--gpus-per-encoder: the Ray cluster has no GPU (give 0 to encode on CPU)")
        if encoders is None:
            encoders = max(1, int(gpus // gpus_per_encoder)) if gpus_per_encoder else 1
        device = torch.device("cuda" if gpus_per_encoder else "cpu")
        from ..loading import resolve_dtype

        dt, fa = resolve_dtype(dtype, device), resolve_fast(fast, device)
        rot = {"apply_rotation": True} if apply_rotation else {}
        config = fingerprint(paths, model_id(session.source), session.processor, num_frames, fps, dt, pooled,
                             shard_size, fast=fa, **rot)
        with _lock(out):
            _prepare(out, config, overwrite)
            before = scan(out, skip_damaged=True, paths=paths)
            remove_damaged(before)
            done = set(before.input_index.tolist())
            start = time.perf_counter()
            if len(done) < len(paths):
                def run_pass(todo, decode_batch, errors=None):
                    ds = ray_data.video_dataset(paths, skip=set(range(len(paths))) - set(todo), errors=errors)
                    ds = ray_data.embed_dataset(
                        ds, session.checkpoint or session.source, processor=session.processor, num_frames=num_frames,
                        fps=fps, apply_rotation=apply_rotation, batch_size=batch_size, pooled=pooled, dtype=dt,
                        fast=fa, decoders=decoders, encoders=encoders, gpus_per_encoder=gpus_per_encoder,
                        cpus_per_encoder=cpus_per_encoder, decode_batch=decode_batch,
                        decode_retries=TASK_TRIES - 1, decode_cls=decode_cls or ray_data.Decode,
                        encode_cls=encode_cls or ray_data.Encode)
                    ds.write_parquet(out, min_rows_per_file=shard_size)
                    written = scan(out, skip_damaged=True, paths=paths)  # a writer task that died mid-file
                    remove_damaged(written)
                    return sorted(set(todo) - set(written.input_index.tolist()))

                run_passes(run_pass, [i for i in range(len(paths)) if i not in done], paths, out)
            elapsed = time.perf_counter() - start
            after = scan(out, paths=paths)
            check_complete(after, out, "rerun the same command to finish")
            _write_errors(errors_path, after.error_records() + after.warning_records())
    finally:
        if started:
            ray.shutdown()
    n, failed = len(paths), len(paths) - after.num_ok
    new = [i for i in range(len(after)) if int(after.input_index[i]) not in done]
    new_ok = sum(bool(after.ok[i]) for i in new)
    summary = EmbedSummary(out, errors_path, n, after.num_ok, failed, len(after.files),
                           shards_written=len(after.files) - len(before.files), shards_skipped=len(before.files))
    summary.stats = PipelineStats(clips=new_ok, failed=len(new) - new_ok, total_s=elapsed)
    summary.duplicates = after.duplicates
    summary.done_before = len(done)
    return summary


def merge_parquet(out, *, keep_shards: bool | None = None, errors=None):
    """``pevideo merge`` of a Parquet output: one row per input, in input order, into
    ``out/embeddings.parquet`` (temporary name, then renamed); the other Parquet files are removed
    unless ``keep_shards``; ``errors.jsonl`` written. A run's folder must hold every input
    (:class:`ShardsMissingError` otherwise)."""
    from .merging import EmbedSummary

    out = os.fspath(out)
    if not os.path.isdir(out):
        raise FileNotFoundError(f"no Parquet embeddings folder at {out}")
    errors_path = os.fspath(errors) if errors else os.path.join(out, "errors.jsonl")
    check_paths(out, errors_path, None, None)  # the errors file: never a file of the user's
    with _lock(out):
        sc = scan(out)
        if sc.manifest is not None:
            check_complete(sc, out, RESUME)
        check_one_model(sc, out)
        table = merged_table(sc)
        if table is None:
            raise DamagedOutputError(out, "holds no rows", "rerun `pevideo embed --engine ray`")
        merged = write_merged(out, table)
        if not keep_shards:
            for f in sc.files:
                if os.path.abspath(f) != os.path.abspath(merged):
                    with io_errors(f):
                        os.remove(f)
        _write_errors(errors_path, sc.error_records() + sc.warning_records())
    n = len(sc)
    return EmbedSummary(out, errors_path, n, sc.num_ok, n - sc.num_ok, 1)


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--engine`` and the Ray options of ``pevideo embed``."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine, or torchrun (default); ray: a Ray Data pipeline writing Parquet "
                   "into the --out folder (pip install 'pevideo[ray]')")
    g = p.add_argument_group("--engine ray", "(--workers: decode tasks at once, default as free CPUs allow; "
                             "--shard-size: rows per Parquet file)")
    g.add_argument("--ray-address", default=None, help="the Ray cluster (default: RAY_ADDRESS, else a local instance)")
    g.add_argument("--encoders", type=int, default=None, help="model copies (default: one per GPU, 1 on CPU)")
    g.add_argument("--gpus-per-encoder", type=float, default=None,
                   help="GPUs per model copy (default 1 with GPUs, else 0 = CPU; 0.5 packs two per GPU)")
    g.add_argument("--cpus-per-encoder", type=float, default=1, help="CPUs per model copy (default 1)")


def run_cli(args, say=print) -> int:
    """``pevideo embed --engine ray``: the run, and one summary line on stderr."""
    if args.keep_shards:
        raise UsageError("--keep-shards does not apply to --engine ray (the Parquet files are the output)")
    if args.device not in (None, "auto"):
        raise UsageError("--device does not apply to --engine ray (the encoders' devices follow --gpus-per-encoder)")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'pevideo[ray]'") from None
    paths = expand_inputs(args.inputs, must_exist=True)
    summary = embed_with_ray(
        paths, args.model, args.out, num_frames=args.num_frames, fps=args.fps, batch_size=args.batch_size,
        shard_size=args.shard_size, decoders=args.workers or None, encoders=args.encoders,
        gpus_per_encoder=args.gpus_per_encoder, cpus_per_encoder=args.cpus_per_encoder, pooled=args.pooled,
        dtype=args.dtype, fast=args.fast, errors=args.errors, overwrite=args.overwrite,
        apply_rotation=args.apply_rotation, address=args.ray_address, progress=False if args.quiet else args.progress)
    if not args.quiet:
        st = summary.stats
        line = (f"pevideo embed: {summary.num_embedded} of {summary.num_inputs} videos embedded -> {summary.out} "
                f"({st.clips + st.failed} this run, {summary.done_before} already done")
        if summary.duplicates:
            line += f"; {summary.duplicates} duplicate row(s) from retried work ignored"
        line += ")"
        if summary.num_failed:
            line += f"; {summary.num_failed} failed, see {summary.errors_path}"
        if st.clips:
            line += f"; {st.clips_per_s:.1f} clips/s"
        say(line, file=sys.stderr)
    return summary.exit_status
