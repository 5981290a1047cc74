"""Joining a run's shards into its one output file (:func:`merge_shards`, ``pevideo merge``), and what a
run did (:class:`EmbedSummary`)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from .encode import ClipResult, PipelineStats
from .layout import Layout, plan_output
from .manifest import read_manifest
from .records import FORMAT, complete_problem, meta_problem, read_header
from .reading import check_all_shards, join_tensors, names_of, warnings_in
from .safeio import DamagedOutputError, OutputLock, OutputPathError, atomic_write_bytes
from .writing import clip_rows, errors_of, final_bytes, remove_shard_folder, warnings_of, write_errors

__all__ = ["EmbedSummary", "merge_shards", "merge_locked", "summary_of_final", "write_final", "output_lock"]


@dataclass
class EmbedSummary:
    """What :func:`embed_to_file` did. ``num_failed`` counts videos that could not be read (in this
    run or the finished shards it kept); the ``shards_*`` counts are this process's; ``num_retried``:
    clips that had failed in an earlier run and were tried again; ``num_changed``: inputs whose file
    changed (size or modification time) since they were embedded, embedded again."""

    out: str
    errors_path: str
    num_inputs: int
    num_embedded: int
    num_failed: int
    num_shards: int
    shards_written: int = 0
    shards_skipped: int = 0
    num_retried: int = 0
    num_changed: int = 0
    stats: PipelineStats = field(default_factory=PipelineStats)

    @property
    def exit_status(self) -> int:
        """0 when every video was embedded, 1 when some failed (their outputs are still written)."""
        return 1 if self.num_failed else 0


def output_lock(layout: Layout) -> OutputLock:
    """The output's lock (not yet taken)."""
    return OutputLock(layout.lock, layout.out)


def _not_ours(path: str) -> OutputPathError:
    return OutputPathError(path, "is not a pevideo embeddings file (its metadata does not say pevideo wrote it)",
                           "give what `pevideo embed --out` was given")


def summary_of_final(layout: Layout) -> EmbedSummary:
    """A joined file is complete: (re)write its errors file from its header and sum it up."""
    meta = read_header(layout.final)
    if meta.get("format") != FORMAT:
        raise _not_ours(layout.final)
    problem = meta_problem(meta)
    try:
        if problem is not None:
            raise ValueError(problem)
        errs = json.loads(meta.get("errors", "[]"))
        n_in = int(meta.get("num_inputs", "0"))
        shard_size = json.loads(meta.get("config", "{}")).get("shard_size", n_in or 1)
    except ValueError as exc:
        raise DamagedOutputError(layout.final, f"has damaged metadata ({exc})",
                                 "delete it and rerun the same `pevideo embed` command to make it again") from None
    write_errors(layout.errors, errs, warnings_in([meta]))
    num_shards = math.ceil(n_in / shard_size)
    return EmbedSummary(layout.final, layout.errors, n_in, n_in - len(errs), len(errs), num_shards)


def write_final(layout: Layout, tensors: dict, paths: list[str], errors: list[dict], man: dict,
                warnings: list[dict] = ()) -> None:
    """The joined file, checked to hold every input once, in order, before it is renamed into place."""
    data, meta = final_bytes(tensors, paths, errors, man, warnings)
    problem = complete_problem(tensors, meta, man["config"])
    if problem is not None:  # the parts passed their own checks, so they do not fit together
        raise DamagedOutputError(layout.work, f"the joined shards are not the run's output: {problem}",
                                 f"delete {layout.work} and rerun `pevideo embed` to redo the run")
    atomic_write_bytes(layout.final, data)


def rewrite_final(layout: Layout, results: list[ClipResult], man: dict, dims, pooled: bool, width: int) -> None:
    """The joined file again, from every input's result (some of them encoded again)."""
    ok = [r for r in results if r.ok]
    write_final(layout, clip_rows(results, dims, pooled, width), [r.path for r in ok], errors_of(results), man,
                warnings_of(results))


def merge_shards(out, *, keep_shards: bool | None = None, errors=None) -> EmbedSummary:
    """Finish a run whose shards are all written (e.g. a multi-GPU run stopped before rank 0 joined them).

    ``out`` as given to :func:`embed_to_file`. For a ``.safetensors`` output, checks every shard and the
    joined result (each input once, in order), writes it under a temporary name and renames it, then
    removes the shard folder unless ``keep_shards`` (None: as the embed run that made the shards chose,
    recorded in its manifest). For a folder output, the shards stay as they are. Either way writes the
    errors file. Takes the output's lock (:class:`OutputLockedError`, naming the pid, while a run writes
    it). Raises :class:`ShardsMissingError` naming the shards still missing, :class:`DamagedOutputError`
    naming a damaged or misplaced one, :class:`OutputPathError` for a file pevideo did not write.
    """
    layout = plan_output(out, errors)
    with output_lock(layout):
        return merge_locked(layout, keep_shards)


def merge_locked(layout: Layout, keep_shards: bool | None) -> EmbedSummary:
    """:func:`merge_shards` for the holder of the output's lock."""
    if layout.final is not None and os.path.isfile(layout.final) and not os.path.isdir(layout.work):
        return summary_of_final(layout)
    man = read_manifest(layout)
    keep = bool(man.get("keep_shards", False)) if keep_shards is None else bool(keep_shards)
    if layout.final is None:
        # The shards are the output and stay where they are: check them (headers) and gather their errors.
        parts = [p for _, p in check_all_shards(layout, man)]
        paths, errs = names_of(parts)
        meta = {"paths": json.dumps(paths), "errors": json.dumps(errs)}
        problem = complete_problem(join_tensors([({"input_index": t["input_index"]}, m) for t, m in parts]), meta,
                                   man["config"])
        if problem is not None:
            raise DamagedOutputError(layout.work, f"the shards together are not the run's output: {problem}",
                                     f"delete {layout.work} and rerun `pevideo embed` to redo the run")
        warns = warnings_in(m for _, m in parts)
    else:
        parts = [p for _, p in check_all_shards(layout, man, full=True)]
        paths, errs = names_of(parts)
        warns = warnings_in(m for _, m in parts)
        write_final(layout, join_tensors(parts), paths, errs, man, warns)
    write_errors(layout.errors, errs, warns)
    if layout.final is not None and not keep:
        remove_shard_folder(layout)
    n_in = man["config"]["num_inputs"]
    return EmbedSummary(layout.out, layout.errors, n_in, n_in - len(errs), len(errs), man["num_shards"])
