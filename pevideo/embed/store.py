"""What a run writes and reads back: safetensors shards, the manifest (the run's fingerprint), the errors
file, joining shards into one file (``merge_shards``) and reading results (``read_embeddings``).

Every file is checked where it is read: each shard records its number, its range of inputs
(``first_index``, ``end_index``) and a SHA-256 per tensor in its metadata, and a shard that is not what
its place says (copied over another, swapped, damaged) is written again on resume and refused (naming
it) by ``read_embeddings`` and ``merge_shards``; a joined file must hold every input exactly once, in
order, before it is renamed into place. One run at a time writes an output (:class:`OutputLock`).
Problems with the files raise :class:`StoreError` subclasses whose message is one line.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch

from .encode import ClipResult, PipelineStats
from .fingerprint import describe_mismatch, fingerprint, model_id, sha256  # noqa: F401 (api imports them here)
from .records import (
    FORMAT,
    FORMAT_VERSION,
    REDO,
    complete_problem,
    read_header,
    serialize,
    shard_problem,
)
from .safeio import (
    DamagedOutputError,
    OutputLock,
    OutputLockedError,
    OutputPathError,
    StoreError,
    StoreIOError,
    atomic_write_bytes,
    atomic_write_text,
    io_errors,
    remove_stale_temporaries,
)

__all__ = [
    "read_embeddings", "merge_shards", "Embeddings", "EmbedSummary", "ManifestMismatchError", "StoreError",
    "StoreIOError", "OutputPathError", "OutputLockedError", "DamagedOutputError", "ShardsMissingError",
    "output_lock", "fingerprint", "model_id",
]

DEFAULT_SHARD_SIZE = 1024

# The safetensors header (where paths and errors go) is limited to 100 MB by its readers; stay well below.
MAX_HEADER_JSON = 40_000_000

class ManifestMismatchError(StoreError, ValueError):
    """An output folder or file holds results made with different arguments (model, weights, frames,
    inputs, ...). The message lists the differences, one per line."""

    exit_status = 2

    def __init__(self, path, cause: str, advice: str = ""):
        StoreError.__init__(self, path, "", advice)
        self.cause = cause
        Exception.__init__(self, f"{self.path} holds results made with different arguments:\n{cause}\n{advice}")


class ShardsMissingError(StoreError, ValueError):
    """Some shards of the run are not written yet (the run was interrupted, or ranks are still working)."""

    exit_status = 2


@dataclass
class Layout:
    final: str | None  # the single output file, or None when the shards are the output
    work: str  # folder holding manifest.json and the shards
    errors: str  # the errors file (JSONL)

    @classmethod
    def of(cls, out, errors=None) -> "Layout":
        out = os.fspath(out)
        if out.endswith(".safetensors"):
            default_errors = out[: -len(".safetensors")] + ".errors.jsonl"
            return cls(out, out + ".shards", os.fspath(errors) if errors else default_errors)
        return cls(None, out, os.fspath(errors) if errors else os.path.join(out, "errors.jsonl"))

    @property
    def manifest(self) -> str:
        return os.path.join(self.work, "manifest.json")

    @property
    def lock(self) -> str:
        """``X.safetensors.lock`` beside a one-file output; ``FOLDER/.pevideo.lock`` in a folder output."""
        return self.final + ".lock" if self.final is not None else os.path.join(self.work, ".pevideo.lock")

    def shard(self, s: int) -> str:
        return os.path.join(self.work, f"shard-{s:05d}.safetensors")


def output_lock(layout: Layout) -> OutputLock:
    """The output's lock (not yet taken); taking it first checks that ``out`` can be this kind of output."""
    return OutputLock(layout.lock, layout.final or layout.work, check=lambda: check_out_path(layout))


def check_out_path(layout: Layout) -> None:
    """A file where a folder goes (or the other way round) is refused before anything is written."""
    if layout.final is not None:
        if os.path.isdir(layout.final):
            raise OutputPathError(layout.final, "is a folder, not a .safetensors file",
                                  "give a new file name, or the folder name without .safetensors for a folder of shards")
        if os.path.exists(layout.work) and not os.path.isdir(layout.work):
            raise OutputPathError(layout.work, "is not a folder (the shards of this output go there)",
                                  "move it away, or give another --out")
    elif os.path.exists(layout.work) and not os.path.isdir(layout.work):
        raise OutputPathError(layout.work, "is a file, not a folder (an --out without .safetensors is a folder of shards)",
                              "give another --out, or X.safetensors for one file")


def shard_ok(path: str, fp_sha: str) -> bool:
    """A finished shard of this run, in its place (checked against the manifest beside it). A file
    there that is not is written again, with a warning saying why."""
    if not os.path.isfile(path):
        return False
    m = re.fullmatch(r"shard-([0-9]+)\.safetensors", os.path.basename(path))
    try:
        man = _read_manifest(Layout(None, os.path.dirname(path), ""))
        if m is None or man.get("fingerprint") != fp_sha:
            return False
        problem, _ = shard_problem(path, int(m.group(1)), man, full=False)
    except (StoreError, FileNotFoundError) as exc:  # a damaged shard (disk full, ...) is redone
        warnings.warn(f"{path} is unreadable ({getattr(exc, 'cause', exc)}); it will be written again", stacklevel=2)
        return False
    if problem is not None:
        warnings.warn(f"{path} {problem}; it will be written again", stacklevel=2)
    return problem is None


def _rows(results: list[ClipResult], dims: tuple[int, int], pooled: bool, width: int) -> dict:
    ok = [r for r in results if r.ok]
    d, h = dims
    t = max([len(r.frame_indices) for r in ok] + [width])
    idx = torch.full((len(ok), t), -1, dtype=torch.int32)
    for i, r in enumerate(ok):
        idx[i, : len(r.frame_indices)] = torch.tensor(r.frame_indices, dtype=torch.int32)
    tensors = {
        "video_embeds": torch.stack([r.video_embeds for r in ok]) if ok else torch.zeros(0, d),
        "source_frame_counts": torch.tensor([r.frame_count for r in ok], dtype=torch.int64),
        "sampled_frame_counts": torch.tensor([len(r.frame_indices) for r in ok], dtype=torch.int64),
        "sampled_indices": idx,
        "input_index": torch.tensor([r.index for r in ok], dtype=torch.int64),
    }
    if pooled:
        tensors["pooled"] = torch.stack([r.pooled for r in ok]) if ok else torch.zeros(0, h)
    return tensors


def write_shard(layout: Layout, s: int, results: list[ClipResult], fp_sha: str, dims, pooled, width) -> None:
    """Shard ``s``: every clip of its input range, in order (``results``, failed ones included)."""
    start, end = (results[0].index, results[-1].index + 1) if results else (0, 0)
    if [r.index for r in results] != list(range(start, end)):
        raise RuntimeError(f"shard {s}: results are not one run of consecutive inputs")  # a bug, not bad data
    errors = [{"index": r.index, "path": r.path, "error": r.error} for r in results if not r.ok]
    suspects = [{"index": r.index, "path": r.path, "truncated_suspect": r.truncated_suspect}
                for r in results if r.ok and r.truncated_suspect]
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "fingerprint": fp_sha,
        "shard": str(s),
        "first_index": str(start),
        "end_index": str(end),
        "paths": json.dumps([r.path for r in results if r.ok]),
        "errors": json.dumps(errors),
        **({"warnings": json.dumps(suspects)} if suspects else {}),  # clips embedded, but see why
    }
    atomic_write_bytes(layout.shard(s), serialize(_rows(results, dims, pooled, width), meta))


@dataclass
class Embeddings:
    """What an embedding run wrote, in input order (failed videos have no row).

    video_embeds (N, D) float32; pooled (N, H) float32 or None; source_frame_counts (N,) int64 (frames
    in the source video, as its container reports them); sampled_frame_counts (N,) int64 (frames taken
    from it and encoded); sampled_indices (N, T) int32, −1 where a clip has fewer than T frames; input_index
    (N,) int64, each row's position in the input list; paths: N paths; errors: [{index, path, error}]
    for the videos that failed; config: the run's arguments fingerprint (model, num_frames, ...);
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
    warnings: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def frame_counts(self) -> torch.Tensor:
        """The old name of ``source_frame_counts`` (frames in the source video, not the frames sampled)."""
        return self.source_frame_counts

    def __repr__(self) -> str:
        pooled = "" if self.pooled is None else f", pooled={tuple(self.pooled.shape)}"
        return (f"Embeddings({len(self)} clips, video_embeds={tuple(self.video_embeds.shape)}{pooled}, "
                f"{len(self.errors)} failed, num_frames={self.config.get('num_frames')})")


def _load_final(path: str) -> tuple[dict, dict]:
    """A joined file, checked: every input exactly once, in order, checksums intact."""
    from safetensors.torch import load_file

    meta = read_header(path)
    if meta.get("format") != FORMAT:
        raise DamagedOutputError(path, "is not a pevideo embeddings file", "give the file `pevideo embed --out` wrote")
    with io_errors(path, "read"):
        tensors = load_file(path)
    try:
        config = json.loads(meta.get("config", "{}"))
    except ValueError:
        config = {}
    problem = complete_problem(tensors, meta, config)
    if problem is not None:
        raise DamagedOutputError(path, problem, "delete it and rerun the same `pevideo embed` command to make it again")
    return tensors, meta


def _join_tensors(parts: list[tuple[dict, dict]]) -> dict:
    """Concatenate the shards' tensors (in order); sampled_indices padded with -1 to the widest."""
    width = max((t["sampled_indices"].shape[1] for t, _ in parts if "sampled_indices" in t), default=0)
    out = {}
    for name in dict.fromkeys(k for t, _ in parts for k in t):
        ts = [t[name] for t, _ in parts if name in t]
        if name == "sampled_indices":
            ts = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1) for x in ts]
        out[name] = torch.cat(ts)
    return out


def _join(parts: list[tuple[dict, dict]], config: dict) -> Embeddings:
    """Concatenate shards (in order); pad sampled_indices to the widest."""
    t = _join_tensors(parts)
    idx = t.get("sampled_indices", torch.zeros(0, 0, dtype=torch.int32))
    # Files written before the two counts had their names hold "frame_counts" (the source's count) only;
    # their sampled counts are the sampled indices that are not padding.
    source = t["source_frame_counts"] if "source_frame_counts" in t else t["frame_counts"]
    sampled = t["sampled_frame_counts"] if "sampled_frame_counts" in t else (idx >= 0).sum(1)
    paths, errors = [], []
    for _, m in parts:
        paths += json.loads(m.get("paths", "[]"))
        errors += json.loads(m.get("errors", "[]"))
    return Embeddings(
        video_embeds=t["video_embeds"], pooled=t.get("pooled"), source_frame_counts=source,
        sampled_frame_counts=sampled, sampled_indices=idx,
        input_index=t["input_index"], paths=paths, errors=sorted(errors, key=lambda e: e["index"]), config=config,
        warnings=_warnings(m for _, m in parts),
    )


def _warnings(metas) -> list[dict]:
    """The clips embedded with a warning (truncated_suspect), from shard / file headers, in input order."""
    return sorted((w for m in metas for w in json.loads(m.get("warnings", "[]"))), key=lambda w: w["index"])


def _read_manifest(layout: Layout) -> dict:
    """The run's manifest; a garbage one raises DamagedOutputError (delete the folder or --overwrite)."""
    try:
        with io_errors(layout.manifest, "read"), open(layout.manifest, "rb") as f:
            data = f.read()
    except StoreIOError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(f"no embeddings at {layout.final or layout.work} (no manifest {layout.manifest})") from None
        raise
    try:
        man = json.loads(data.decode("utf-8"))
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise ValueError("not a pevideo manifest")
        for key in ("fingerprint", "config", "num_shards"):
            if key not in man:
                raise ValueError(f"no {key!r}")
        int(man["config"]["shard_size"]), int(man["config"]["num_inputs"])
    except (ValueError, TypeError, KeyError) as exc:
        raise DamagedOutputError(layout.manifest, f"is not a pevideo manifest ({exc})",
                                 f"delete {layout.work} (or rerun `pevideo embed` with --overwrite) to start over") from None
    return man


def _check_all_shards(layout: Layout, man: dict, full: bool = False) -> list:
    """Every shard of the manifest's run, checked (loaded when ``full``): ShardsMissingError naming the
    missing ones, DamagedOutputError naming the first that is not what its place says."""
    missing = [s for s in range(man["num_shards"]) if not os.path.isfile(layout.shard(s))]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ShardsMissingError(
            layout.work, f"{len(missing)} of {man['num_shards']} shards are missing or unfinished ({shown})",
            "rerun `pevideo embed` with the same arguments to finish them")
    parts = []
    for s in range(man["num_shards"]):
        problem, loaded = shard_problem(layout.shard(s), s, man, full)
        if problem is not None:
            raise DamagedOutputError(layout.shard(s), problem, REDO)
        parts.append(loaded)
    return parts


def _read_shards(layout: Layout) -> Embeddings:
    man = _read_manifest(layout)
    return _join(_check_all_shards(layout, man, full=True), man["config"])


def read_embeddings(path) -> Embeddings:
    """Read an embedding run's output: the ``.safetensors`` file, or the folder of shards (``out`` without
    the suffix). A ``.safetensors`` output whose shards were never joined is read from its shards.
    Every file is checked (see the module docstring): a damaged or misplaced one raises
    :class:`DamagedOutputError` naming it, unfinished shards :class:`ShardsMissingError`."""
    layout = Layout.of(path)
    if layout.final is not None and os.path.isfile(layout.final):
        tensors, meta = _load_final(layout.final)
        return _join([(tensors, meta)], json.loads(meta.get("config", "{}")))
    if layout.final is None and not os.path.isdir(layout.work):
        raise FileNotFoundError(f"no embeddings at {layout.work}")
    return _read_shards(layout)


@dataclass
class EmbedSummary:
    """What :func:`embed_to_file` did. ``num_failed`` counts videos that could not be read (in this
    run or the finished shards it kept); the ``shards_*`` counts are this process's."""

    out: str
    errors_path: str
    num_inputs: int
    num_embedded: int
    num_failed: int
    num_shards: int
    shards_written: int = 0
    shards_skipped: int = 0
    stats: PipelineStats = field(default_factory=PipelineStats)

    @property
    def exit_status(self) -> int:
        """0 when every video was embedded, 1 when some failed (their outputs are still written)."""
        return 1 if self.num_failed else 0


def prepare(layout: Layout, fp: dict, fp_sha: str, num_shards: int, overwrite: bool, keep_shards: bool = False) -> str:
    """Rank 0, holding the output's lock: check or create the manifest (recording ``keep_shards`` for a
    later ``pevideo merge``) and remove what crashed writers left; 'complete' when the joined file is
    already there."""
    check_out_path(layout)
    if overwrite:
        _remove_outputs(layout)
    _remove_temporaries(layout)
    if layout.final is not None and os.path.isfile(layout.final):
        meta = read_header(layout.final)
        if meta.get("fingerprint") != fp_sha:
            try:
                old = json.loads(meta.get("config", "{}"))
            except ValueError:
                old = {}
            raise ManifestMismatchError(
                layout.final, describe_mismatch(old, fp),
                "use another --out, or --overwrite to replace it")
        return "complete"
    with io_errors(layout.work):
        os.makedirs(layout.work, exist_ok=True)
    if os.path.isfile(layout.manifest):
        man = _read_manifest(layout)
        if man.get("fingerprint") != fp_sha:
            raise ManifestMismatchError(
                layout.work, describe_mismatch(man.get("config", {}), fp), "use another --out, or --overwrite to start over")
        if man.get("keep_shards") != bool(keep_shards):  # the latest embed run's choice counts
            man["keep_shards"] = bool(keep_shards)
            atomic_write_text(layout.manifest, json.dumps(man, indent=2) + "\n")
    else:
        man = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fp_sha, "config": fp,
               "num_shards": num_shards, "keep_shards": bool(keep_shards)}
        atomic_write_text(layout.manifest, json.dumps(man, indent=2) + "\n")
    return "todo"


def _remove_temporaries(layout: Layout) -> None:
    """Temporaries of crashed or killed writers of this output (of older runs: this one holds the lock)."""
    from .safeio import lock_time

    since = lock_time(layout.lock)
    remove_stale_temporaries(layout.work, ("shard-*.safetensors", "manifest.json", "errors.jsonl"), since)
    if layout.final is not None:
        remove_stale_temporaries(os.path.dirname(layout.final) or ".", (os.path.basename(layout.final),), since)
    remove_stale_temporaries(os.path.dirname(layout.errors) or ".", (os.path.basename(layout.errors),), since)


def _remove_outputs(layout: Layout) -> None:
    """Remove what a previous run wrote (only our own file names, never a whole user folder)."""
    with io_errors(layout.work):
        for p in (layout.final, layout.errors):
            if p is not None and os.path.isfile(p):
                os.remove(p)
        if os.path.isdir(layout.work):
            for name in os.listdir(layout.work):
                ours = name in ("manifest.json", "errors.jsonl") or (
                    name.startswith(("shard-", ".shard-")) and ".safetensors" in name) or (
                    name.startswith((".manifest.json.tmp.", ".errors.jsonl.tmp.")))
                if ours:
                    os.remove(os.path.join(layout.work, name))
            if layout.final is not None and not os.listdir(layout.work):
                os.rmdir(layout.work)


def _write_errors(path: str, errors: list[dict], suspects: list[dict] = ()) -> None:
    """The errors file: one JSON line per failed clip ({index, path, error}) and per clip embedded with a
    warning ({index, path, truncated_suspect}, no "error"), in input order."""
    with io_errors(path):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        lines = sorted([*errors, *suspects], key=lambda e: e["index"])
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in lines))


def summary_of_final(layout: Layout) -> EmbedSummary:
    """A joined file is complete: (re)write its errors file from its header and sum it up."""
    meta = read_header(layout.final)
    try:
        errs = json.loads(meta.get("errors", "[]"))
        n_in = int(meta.get("num_inputs", "0"))
        shard_size = json.loads(meta.get("config", "{}")).get("shard_size", n_in or 1)
    except ValueError as exc:
        raise DamagedOutputError(layout.final, f"has damaged metadata ({exc})",
                                 "delete it and rerun the same `pevideo embed` command to make it again") from None
    _write_errors(layout.errors, errs, _warnings([meta]))
    num_shards = math.ceil(n_in / shard_size)
    return EmbedSummary(layout.final, layout.errors, n_in, n_in - len(errs), len(errs), num_shards)


def merge_shards(out, *, keep_shards: bool | None = None, errors=None) -> EmbedSummary:
    """Finish a run whose shards are all written (e.g. a multi-GPU run stopped before rank 0 joined them).

    ``out`` as given to :func:`embed_to_file`. For a ``.safetensors`` output, checks every shard and the
    joined result (each input once, in order), writes it under a temporary name and renames it, then
    removes the shard folder unless ``keep_shards`` (None: as the embed run that made the shards chose,
    recorded in its manifest). For a folder output, the shards stay as they are. Either way writes the
    errors file. Takes the output's lock. Raises :class:`ShardsMissingError` naming the shards still
    missing, :class:`DamagedOutputError` naming a damaged or misplaced one.
    """
    layout = Layout.of(out, errors)
    with output_lock(layout):
        return _merge(layout, keep_shards)


def _merge(layout: Layout, keep_shards: bool | None) -> EmbedSummary:
    if layout.final is not None and os.path.isfile(layout.final) and not os.path.isdir(layout.work):
        return summary_of_final(layout)
    man = _read_manifest(layout)
    keep = bool(man.get("keep_shards", False)) if keep_shards is None else bool(keep_shards)
    if layout.final is None:
        # The shards are the output and stay where they are: check them and gather their errors.
        _check_all_shards(layout, man)
        errs, headers = [], [read_header(layout.shard(s)) for s in range(man["num_shards"])]
        for h in headers:
            errs += json.loads(h.get("errors", "[]"))
        warns = _warnings(headers)
    else:
        parts = _check_all_shards(layout, man, full=True)
        tensors = _join_tensors(parts)
        paths, errs = [], []
        for _, m in parts:
            paths += json.loads(m.get("paths", "[]"))
            errs += json.loads(m.get("errors", "[]"))
        errs.sort(key=lambda e: e["index"])
        warns = _warnings(m for _, m in parts)
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "fingerprint": man["fingerprint"],
                "config": json.dumps(man["config"]), "num_inputs": str(man["config"]["num_inputs"]),
                "paths": json.dumps(paths), "errors": json.dumps(errs),
                **({"warnings": json.dumps(warns)} if warns else {})}
        problem = complete_problem(tensors, meta, man["config"])
        if problem is not None:  # the shards passed their own checks, so they do not fit together
            raise DamagedOutputError(layout.work, f"the joined shards are not the run's output: {problem}",
                                     f"delete {layout.work} and rerun `pevideo embed` to redo the run")
        atomic_write_bytes(layout.final, serialize(tensors, meta))
    _write_errors(layout.errors, errs, warns)
    if layout.final is not None and not keep:
        _remove_outputs(Layout(None, layout.work, os.path.join(layout.work, "errors.jsonl")))
        with io_errors(layout.work):
            if os.path.isdir(layout.work) and not os.listdir(layout.work):
                os.rmdir(layout.work)
    n_in = man["config"]["num_inputs"]
    return EmbedSummary(layout.final or layout.work, layout.errors, n_in, n_in - len(errs), len(errs), man["num_shards"])
