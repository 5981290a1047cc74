"""Reading a run's output back (:func:`read_embeddings`): the joined file or the folder of shards, every
file checked (see :mod:`.records` and :mod:`.manifest`), and the whole checked to hold every input
exactly once (embedded, or listed in the errors). A run still writing the output (it holds the lock)
is not read as if it were finished: refused, or with ``partial=True`` what is finished so far.

(:mod:`.outputs` puts this beside the Parquet reader as ``pevideo.read_embeddings``.)"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .encode import ClipResult
from .layout import Layout
from .manifest import read_manifest
from .records import FORMAT, REDO, ROW_STATS, complete_problem, load_checked, shard_problem
from .safeio import DamagedOutputError, OutputLockedError, StoreError, lock_holder

__all__ = ["Embeddings", "read_embeddings", "ShardsMissingError", "check_all_shards",
           "load_final", "join_tensors", "results_of", "names_of", "warnings_in"]


class ShardsMissingError(StoreError, ValueError):
    """Some shards of the run are not written yet (the run was interrupted, or ranks are still working)."""

    exit_status = 2


@dataclass
class Embeddings:
    """What an embedding run wrote, in input order (failed videos have no row).

    video_embeds (N, D) float32; pooled (N, H) float32 or None; source_frame_counts (N,) int64 (frames
    in the source video, as its container reports them); sampled_frame_counts (N,) int64 (frames taken
    from it and encoded); sampled_indices (N, T) int32, −1 where a clip has fewer than T frames; input_index
    (N,) int64, each row's position in the input list; paths: N paths; errors: [{index, path, error}]
    for the videos that failed; config: the run's arguments fingerprint (model, num_frames, ...);
    source_size / source_mtime_ns (N,) int64: each input's size and modification time when it was
    embedded (−1: not recorded, files from before they were). ``partial``: True when read with
    ``partial=True`` before the run finished; ``missing`` then lists the inputs not done yet.
    warnings: [{index, path, truncated_suspect}] for embedded videos that may be cut short (an MPEG-TS
    file ending inside a transport packet; see :attr:`pevideo.VideoMetadata.truncated_suspect`).
    """

    video_embeds: torch.Tensor
    source_frame_counts: torch.Tensor
    sampled_frame_counts: torch.Tensor
    sampled_indices: torch.Tensor
    input_index: torch.Tensor
    paths: list[str]
    errors: list[dict]
    config: dict
    pooled: torch.Tensor | None = None
    source_size: torch.Tensor | None = None
    source_mtime_ns: torch.Tensor | None = None
    partial: bool = False
    missing: list[int] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def frame_counts(self) -> torch.Tensor:
        """The old name of ``source_frame_counts`` (frames in the source video, not the frames sampled)."""
        return self.source_frame_counts

    def __repr__(self) -> str:
        pooled = "" if self.pooled is None else f", pooled={tuple(self.pooled.shape)}"
        partial = f", partial: {len(self.missing)} inputs not done yet" if self.partial else ""
        return (f"Embeddings({len(self)} clips, video_embeds={tuple(self.video_embeds.shape)}{pooled}, "
                f"{len(self.errors)} failed, num_frames={self.config.get('num_frames')}{partial})")


def load_final(path: str) -> tuple[dict, dict]:
    """A joined file, checked: every input exactly once, in order, checksums intact."""
    tensors, meta, _ = load_checked(path)
    if meta.get("format") != FORMAT:
        raise DamagedOutputError(path, "is not a pevideo embeddings file", "give the file `pevideo embed --out` wrote")
    try:
        config = json.loads(meta.get("config", "{}"))
    except ValueError:
        config = {}
    problem = complete_problem(tensors, meta, config)
    if problem is not None:
        raise DamagedOutputError(path, problem, "delete it and rerun the same `pevideo embed` command to make it again")
    return tensors, meta


def join_tensors(parts: list[tuple[dict, dict]]) -> dict:
    """Concatenate the shards' tensors (in order); sampled_indices padded with -1 to the widest, the
    per-row input stats filled with -1 where a (version 2) shard has none."""
    width = max((t["sampled_indices"].shape[1] for t, _ in parts if "sampled_indices" in t), default=0)
    out = {}
    for name in dict.fromkeys(k for t, _ in parts for k in t):
        ts = []
        for t, _ in parts:
            if name in t:
                ts.append(t[name])
            elif name in ROW_STATS:
                ts.append(torch.full((t["input_index"].shape[0],), -1, dtype=torch.int64))
        if name == "sampled_indices":
            ts = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1) for x in ts]
        out[name] = torch.cat(ts)
    return out


def warnings_in(metas) -> list[dict]:
    """The clips embedded with a warning (truncated_suspect), from shard / file headers, in input order."""
    return sorted((w for m in metas for w in json.loads(m.get("warnings", "[]"))), key=lambda w: w["index"])


def names_of(parts) -> tuple[list, list]:
    paths, errors = [], []
    for _, m in parts:
        paths += json.loads(m.get("paths", "[]"))
        errors += json.loads(m.get("errors", "[]"))
    return paths, sorted(errors, key=lambda e: e["index"])


def _join(parts: list[tuple[dict, dict]], config: dict) -> Embeddings:
    t = join_tensors(parts)
    idx = t.get("sampled_indices", torch.zeros(0, 0, dtype=torch.int32))
    # Files written before the two counts had their names hold "frame_counts" (the source's count) only;
    # their sampled counts are the sampled indices that are not padding.
    source = t["source_frame_counts"] if "source_frame_counts" in t else t["frame_counts"]
    sampled = t["sampled_frame_counts"] if "sampled_frame_counts" in t else (idx >= 0).sum(1)
    paths, errors = names_of(parts)
    return Embeddings(
        video_embeds=t["video_embeds"], pooled=t.get("pooled"), source_frame_counts=source,
        sampled_frame_counts=sampled, sampled_indices=idx, input_index=t["input_index"], paths=paths,
        errors=errors, config=config, source_size=t.get("source_size"), source_mtime_ns=t.get("source_mtime_ns"),
        warnings=warnings_in(m for _, m in parts),
    )


def check_all_shards(layout: Layout, man: dict, full: bool = False, partial: bool = False) -> list:
    """Every shard of the manifest's run, checked (loaded when ``full``): ShardsMissingError naming the
    missing ones (skipped instead when ``partial``), DamagedOutputError naming the first that is not what
    its place says. Returns [(s, (tensors, meta))]."""
    missing = [s for s in range(man["num_shards"]) if not os.path.isfile(layout.shard(s))]
    if missing and not partial:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ShardsMissingError(
            layout.work, f"{len(missing)} of {man['num_shards']} shards are missing or unfinished ({shown})",
            "rerun `pevideo embed` with the same arguments to finish them (or read what is there with partial=True)")
    parts = []
    for s in range(man["num_shards"]):
        if s in missing:
            continue
        problem, loaded = shard_problem(layout.shard(s), s, man, full)
        if problem is not None:
            raise DamagedOutputError(layout.shard(s), problem, REDO)
        parts.append((s, loaded))
    return parts


def _read_shards(layout: Layout, partial: bool) -> Embeddings:
    man = read_manifest(layout)
    parts = [p for _, p in check_all_shards(layout, man, full=True, partial=partial)]
    emb = _join(parts, man["config"])
    n = int(man["config"]["num_inputs"])
    done = set(emb.input_index.tolist()) | {int(e["index"]) for e in emb.errors}
    if len(done) < n:  # only with partial: each shard passed its own checks
        emb.partial, emb.missing = True, sorted(set(range(n)) - done)
        return emb
    tensors = join_tensors(parts)
    paths, errors = emb.paths, emb.errors
    problem = complete_problem(tensors, {"paths": json.dumps(paths), "errors": json.dumps(errors)}, man["config"])
    if problem is not None:  # each shard passed its checks, so they do not fit together
        raise DamagedOutputError(layout.work, f"the shards together are not the run's output: {problem}",
                                 f"delete {layout.work} and rerun `pevideo embed` to redo the run")
    return emb


def _read_pevideo(path: str, partial: bool) -> Embeddings:
    layout = Layout.of(path)
    holder = lock_holder(layout.lock)
    if holder is not None and not partial:
        raise OutputLockedError(layout.out, f"a run is writing this output ({holder})",
                                "wait for it to finish, or read what is finished with read_embeddings(out, partial=True)")
    shards_first = holder is not None and os.path.isfile(layout.manifest)  # the run's newest state
    if layout.final is not None and os.path.isfile(layout.final) and not shards_first:
        tensors, meta = load_final(layout.final)
        return _join([(tensors, meta)], json.loads(meta.get("config", "{}")))
    if layout.final is None and not os.path.isdir(layout.work):
        raise FileNotFoundError(f"no embeddings at {layout.work}")
    return _read_shards(layout, partial)


def read_embeddings(path, *, partial: bool = False) -> Embeddings:
    """Read an embedding run's output: the ``.safetensors`` file, or the folder of shards (``out`` without
    the suffix). A ``.safetensors`` output whose shards were never joined is read from its shards.
    Every file is checked (see the module docstring): a damaged or misplaced one raises
    :class:`DamagedOutputError` naming it, unfinished shards :class:`ShardsMissingError`, an output a
    run is still writing :class:`OutputLockedError` naming its pid. ``partial=True``: return what is
    finished instead (``Embeddings.partial`` and ``.missing`` say what is not)."""
    return _read_pevideo(os.fspath(path), partial)


def results_of(tensors: dict, meta: dict, rows_only: bool = False) -> list[ClipResult]:
    """A file's rows and errors back as :class:`ClipResult` objects, in input order (to rewrite the
    file with some clips encoded again). ``rows_only``: index, path, error and input stats only (from
    ``input_index`` and the ``source_*`` tensors: what deciding which clips to redo needs)."""
    paths = json.loads(meta.get("paths", "[]"))
    out = [ClipResult(index=int(e["index"]), path=e["path"], error=e["error"]) for e in json.loads(meta.get("errors", "[]"))]
    if rows_only:
        stats = [tensors[k].tolist() if k in tensors else [-1] * len(paths) for k in ROW_STATS]
        for i, (p, n) in enumerate(zip(paths, tensors["input_index"].tolist())):
            out.append(ClipResult(index=n, path=p, source_size=stats[0][i], source_mtime_ns=stats[1][i]))
        return sorted(out, key=lambda r: r.index)
    counts = tensors.get("sampled_frame_counts")
    source = tensors["source_frame_counts"] if "source_frame_counts" in tensors else tensors["frame_counts"]
    idx = tensors["sampled_indices"]
    suspects = {int(w["index"]): w["truncated_suspect"] for w in warnings_in([meta])}
    for i, p in enumerate(paths):
        n = int(counts[i]) if counts is not None else int((idx[i] >= 0).sum())
        out.append(ClipResult(
            index=int(tensors["input_index"][i]), path=p, video_embeds=tensors["video_embeds"][i],
            pooled=tensors["pooled"][i] if "pooled" in tensors else None,
            frame_count=int(source[i]), frame_indices=idx[i, :n].tolist(),
            source_size=int(tensors["source_size"][i]) if "source_size" in tensors else -1,
            source_mtime_ns=int(tensors["source_mtime_ns"][i]) if "source_mtime_ns" in tensors else -1,
            truncated_suspect=suspects.get(int(tensors["input_index"][i])),
        ))
    return sorted(out, key=lambda r: r.index)

