"""``embed_to_file``: a resumable run into safetensors shards (what ``pevideo embed`` runs).

A rerun of the same command heals what it can: shards not written yet are written; in finished ones
(and in a joined file) the clips that failed are tried again (``retry_failed``, the default) and the
inputs whose file changed since they were embedded (size or modification time, recorded with each
row) are embedded again, with a warning naming them. An input that is gone keeps its row.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable

from .distributed import Dist, combine_stats
from .encode import ClipResult, PipelineStats, run_clips
from .fingerprint import fingerprint, model_id, sha256
from .inputs import expand_inputs
from .layout import Layout, plan_output
from .manifest import read_manifest, record_shards
from .merging import EmbedSummary, merge_locked, output_lock, rewrite_final, summary_of_final
from .options import EmbedOptions
from .reading import load_final, results_of
from .records import read_header, shard_problem
from .safeio import StoreError, io_errors
from .session import checkpoint_folder, model_source, open_session, source_device
from .writing import prepare, write_shard

__all__ = ["embed_to_file", "DEFAULT_SHARD_SIZE", "MAX_HEADER_JSON"]

DEFAULT_SHARD_SIZE = 1024

# The safetensors header (where paths and errors go) is limited to 100 MB by its readers; stay well below.
MAX_HEADER_JSON = 40_000_000


def embed_to_file(
    inputs,
    model,
    out,
    *,
    processor=None,
    num_frames: int | None = None,
    fps: float | None = None,
    batch_size: int = 8,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_workers: int | None = None,
    pooled: bool = False,
    device=None,
    dtype=None,
    fast: bool | None = None,
    errors=None,
    overwrite: bool = False,
    keep_shards: bool = False,
    retry_failed: bool = True,
    progress: bool | None = None,
    on_error: Callable[[ClipResult], None] | None = None,
    on_shard: Callable[[int], None] | None = None,
    apply_rotation: bool = False,
) -> EmbedSummary:
    """Embed every video of ``inputs`` into ``out``, resumably; what ``pevideo embed`` runs.

    Args:
        inputs: video files, folders and list files (see :func:`expand_inputs`).
        model: a checkpoint folder / Hub id (loaded on ``device`` in ``dtype`` with ``fast`` only when
            some clip is left to do) or a :class:`pevideo.PeVideoModel`.
        out: ``X.safetensors`` (one file; shards are worked on in ``X.safetensors.shards/``) or a folder
            (the shards are the output). Checked before any work, as
            :func:`pevideo.embed.layout.plan_output` says: nothing is written over a file pevideo did
            not write, an input, or inside the checkpoint. See the package docstring for the contents.
        shard_size: clips per shard, the unit of resumption (and of work split across ranks).
        errors: the errors file (JSONL ``{"index", "path", "error"}``); default ``X.errors.jsonl`` or
            ``folder/errors.jsonl``. It is always written, empty when nothing failed; a device or FIFO
            (``/dev/stderr``) is written in place. A failed write fails the run, naming the clips.
        overwrite: remove a previous run's outputs first (else a run with different arguments is
            refused with :class:`ManifestMismatchError`, and one with the same arguments resumes).
            Only files pevideo wrote are removed.
        keep_shards: keep the shard folder after joining a ``.safetensors`` output (recorded in the
            manifest: a later :func:`merge_shards` keeps them too).
        retry_failed: on a rerun, try the clips that failed before again (a cause that is gone then
            leaves no row missing); False keeps their errors.
        on_error: called with each failed :class:`ClipResult` as it happens (the CLI prints them).
        on_shard: called with each shard number once that shard is on disk.
        Other arguments as :func:`embed_videos`.

    Under torchrun (WORLD_SIZE > 1) rank r takes shards s with s % WORLD_SIZE == r on cuda:LOCAL_RANK
    (or CPU, with gloo), and rank 0 joins them after all ranks are done. Returns an
    :class:`EmbedSummary`; ``summary.exit_status`` is 1 when any video failed.
    """
    opts = EmbedOptions.of(processor=processor, num_frames=num_frames, fps=fps, batch_size=batch_size,
                           num_workers=num_workers, pooled=pooled, device=device, dtype=dtype, fast=fast,
                           progress=progress, apply_rotation=apply_rotation)
    if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    paths = expand_inputs(inputs)
    source = model_source(model)
    layout = plan_output(out, errors, inputs=paths, checkpoint=checkpoint_folder(source))
    if layout.final is not None:
        size = sum(len(p.encode("utf-8", "surrogateescape")) + 4 for p in paths)
        if size > MAX_HEADER_JSON:
            raise ValueError(f"{len(paths)} paths are too many for one safetensors file's header; give a folder as "
                             "the output (no .safetensors suffix) to keep the shards")
    dist = Dist(source_device(source, opts.device))
    lock = output_lock(layout)
    try:
        session = open_session(source, opts.processor, device=dist.device, dtype=opts.dtype, fast=opts.fast,
                               sampling=opts.sampling)
        dist.on_rank0(lock.acquire)  # one run at a time per output; rank 0 holds it for all ranks
        # apply_rotation recorded only when on, so that earlier runs' outputs keep their fingerprint
        fp = fingerprint(paths, model_id(session.source), session.processor, opts.num_frames, opts.fps,
                         session.dtype, opts.pooled, shard_size, fast=session.fast,
                         **({"apply_rotation": True} if opts.apply_rotation else {}))
        fp_sha = sha256(json.dumps(fp, sort_keys=True).encode())
        num_shards = math.ceil(len(paths) / shard_size)
        run = _Run(paths, layout, session, opts, fp_sha, shard_size, retry_failed, on_error, on_shard, dist.rank == 0)
        if dist.on_rank0(prepare, layout, fp, fp_sha, num_shards, overwrite, keep_shards) == "complete":
            # Same arguments, already joined: heal it (failed / changed clips) or just restore its errors file.
            summary = dist.on_rank0(run.heal_final)
            summary.shards_skipped = num_shards
            return summary

        mine = [s for s in range(num_shards) if s % dist.world == dist.rank]
        work, unrecorded = run.plan(mine)
        stats = PipelineStats()
        written = run.encode(work, stats, progress=opts.progress if dist.rank == 0 else False)
        # Also the barrier: after it, every rank's shards are on disk.
        ranks = dist.gather((written, {**unrecorded, **written}, len(mine) - len(written), stats, run.retried,
                             run.changed))
        shas = {s: h for r in ranks for s, h in r[1].items()}
        summary = dist.on_rank0(_finish, layout, shas, keep_shards)
        summary.shards_written = sum(len(r[0]) for r in ranks)
        summary.shards_skipped = sum(r[2] for r in ranks)
        summary.stats = combine_stats([r[3] for r in ranks])
        summary.num_retried, summary.num_changed = sum(r[4] for r in ranks), sum(r[5] for r in ranks)
        return summary
    finally:
        lock.release()  # a no-op on ranks other than 0
        dist.close()


def _finish(layout: Layout, shas: dict, keep_shards: bool) -> EmbedSummary:
    record_shards(layout, shas)  # other ranks' shards (rank 0 recorded its own as it wrote them)
    return merge_locked(layout, keep_shards)


def _changed(results) -> list[int]:
    """Inputs whose file is not the one embedded (size or mtime differ); a file that is gone is not."""
    out = []
    for r in results:
        if not r.ok or r.source_size < 0:
            continue  # failed (retried or kept), or embedded before sizes were recorded
        try:
            st = os.stat(r.path)
        except OSError:
            continue  # gone (or unreachable just now): its row stays
        if (st.st_size, st.st_mtime_ns) != (r.source_size, r.source_mtime_ns):
            out.append(r.index)
    return out


class _Run:
    """One rank's share of a run: which clips are left, encoding them, writing their shards."""

    def __init__(self, paths, layout, session, opts, fp_sha, shard_size, retry_failed, on_error, on_shard, records):
        self.paths, self.layout, self.session, self.opts, self.fp_sha = paths, layout, session, opts, fp_sha
        self.shard_size, self.retry_failed = shard_size, retry_failed
        self.on_error, self.on_shard, self.records = on_error, on_shard, records
        self.retried = 0
        self.changed_inputs: list[int] = []

    def _stale(self, results: list[ClipResult]) -> tuple[set[int], set[int]]:
        """The clips of a finished file to encode again: (failed ones, when retrying; changed ones, said)."""
        failed = {r.index for r in results if not r.ok} if self.retry_failed else set()
        changed = _changed(results)
        self.retried += len(failed)
        self.changed_inputs += changed
        return failed, set(changed)

    @property
    def changed(self) -> int:
        return len(self.changed_inputs)

    def _say_changed(self) -> None:
        found = self.changed_inputs
        if found:
            names = ", ".join(repr(self.paths[i]) for i in found[:3]) + (" ..." if len(found) > 3 else "")
            warnings.warn(f"{len(found)} input(s) changed since they were embedded (size or modification time): "
                          f"{names}; embedding them again", stacklevel=3)

    def plan(self, mine: list[int]):
        """{shard: (inputs to encode, the rows it keeps or None, inputs that changed)} for this rank's
        unfinished shards, and
        {shard: checksum} of finished shards the manifest has not recorded yet (their run was killed)."""
        man = read_manifest(self.layout)
        work, unrecorded = {}, {}
        for s in mine:
            path = self.layout.shard(s)
            full = list(range(s * self.shard_size, min((s + 1) * self.shard_size, len(self.paths))))
            if not os.path.isfile(path):
                work[s] = (full, None, set())
                continue
            try:
                problem, (tensors, meta) = shard_problem(path, s, man, full=False)
            except (StoreError, FileNotFoundError, ValueError) as exc:  # a damaged shard (disk full, ...) is redone
                problem = f"is unreadable ({getattr(exc, 'cause', exc)})"
            if problem is not None:
                warnings.warn(f"{path} {problem}; it will be written again", stacklevel=2)
                work[s] = (full, None, set())
                continue
            failed, changed = self._stale(results_of(tensors, meta, rows_only=True))
            if failed or changed:
                problem, loaded = shard_problem(path, s, man, full=True)
                if problem is not None:
                    warnings.warn(f"{path} {problem}; it will be written again", stacklevel=2)
                    work[s] = (full, None, set())
                    continue
                kept = {r.index: r for r in results_of(*loaded) if r.index not in failed | changed}
                work[s] = (sorted(failed | changed), kept, changed)
            elif str(s) not in man.get("shards", {}):
                with io_errors(path, "read"), open(path, "rb") as f:
                    unrecorded[s] = sha256(f.read())
        self._say_changed()
        return work, unrecorded

    def _dims(self):
        cfg = self.session.model().config
        return cfg.text_config.hidden_size, cfg.video_config.hidden_size

    def encode(self, work: dict, stats: PipelineStats, progress) -> dict[int, str]:
        """Encode the clips of ``work``; write each shard as soon as its last clip is in. Returns
        {shard: checksum} of the shards written."""
        if not work:
            return {}
        dims = self._dims()
        order = [i for s in sorted(work) for i in work[s][0]]
        results = run_clips(self.paths, order, self.session, self.opts, stats, progress=progress)
        buf: dict[int, list[ClipResult]] = {s: [] for s in work}
        written = {}
        try:
            for r in results:
                if not r.ok and self.on_error is not None:
                    self.on_error(r)
                s = r.index // self.shard_size
                buf[s].append(r)
                need, kept, changed = work[s]
                if len(buf[s]) < len(need):
                    continue
                fresh = buf.pop(s)
                if kept is not None and not changed and not any(x.ok for x in fresh):
                    continue  # its failed clips failed again: the shard stands as it is
                rows = fresh if kept is None else sorted([*kept.values(), *fresh], key=lambda x: x.index)
                written[s] = write_shard(self.layout, s, rows, self.fp_sha, dims, self.opts.pooled,
                                         self.opts.num_frames or 0)
                if self.records:
                    record_shards(self.layout, {s: written[s]})
                if self.on_shard is not None:
                    self.on_shard(s)
        finally:
            results.close()  # stop the decoder pool now, also when interrupted
        return written

    def heal_final(self) -> EmbedSummary:
        """A joined file made with these arguments: encode its failed (when retrying) and changed clips
        again and rewrite it when that changes anything; always (re)write its errors file."""
        final = self.layout.final
        meta = read_header(final)
        failed, changed = self._stale(results_of(_row_stats(final), meta, rows_only=True))
        self._say_changed()
        stale = failed | changed
        if not stale:
            return summary_of_final(self.layout)
        tensors, meta = load_final(final)
        before = {r.index: r for r in results_of(tensors, meta)}
        stats = PipelineStats()
        fresh = {}
        results = run_clips(self.paths, sorted(stale), self.session, self.opts, stats)
        try:
            for r in results:
                if not r.ok and self.on_error is not None:
                    self.on_error(r)
                fresh[r.index] = r
        finally:
            results.close()
        if any(r.ok for r in fresh.values()) or any(before[i].ok for i in fresh):
            man = {"fingerprint": meta["fingerprint"], "config": json.loads(meta["config"])}
            rewrite_final(self.layout, [fresh.get(i, r) for i, r in sorted(before.items())], man, self._dims(),
                          self.opts.pooled, self.opts.num_frames or 0)
        # (else every retried clip failed again: the file stands as it is)
        summary = summary_of_final(self.layout)
        summary.stats, summary.num_retried, summary.num_changed = stats, self.retried, self.changed
        return summary


def _row_stats(path: str) -> dict:
    """The small per-row tensors of a file (its input index and input sizes / times), without the rest."""
    from safetensors import safe_open

    with io_errors(path, "read"), safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in ("input_index", "source_size", "source_mtime_ns") if k in f.keys()}

