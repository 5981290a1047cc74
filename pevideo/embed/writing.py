"""Writing a run's files: shards, the joined file, the errors file; setting an output up for a run
(:func:`prepare`) and removing what a previous run or a crashed writer left (only pevideo's own files,
as :func:`pevideo.embed.layout.plan_output` proved them)."""
from __future__ import annotations

import json
import os

import torch

from .encode import ClipResult
from .fingerprint import sha256
from .layout import SHARD_NAME, Layout
from .manifest import check_fingerprint, new_manifest, read_manifest, write_manifest
from .records import FORMAT, FORMAT_VERSION, serialize
from .safeio import StoreIOError, atomic_write_bytes, atomic_write_text, io_errors, remove_stale_temporaries

__all__ = ["clip_rows", "write_shard", "final_bytes", "write_errors", "prepare", "remove_outputs",
           "remove_shard_folder", "errors_of", "warnings_of"]


def clip_rows(results: list[ClipResult], dims: tuple[int, int], pooled: bool, width: int) -> dict:
    """The tensors of the clips in ``results`` that were embedded (failed ones have no row)."""
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
        "source_size": torch.tensor([r.source_size for r in ok], dtype=torch.int64),
        "source_mtime_ns": torch.tensor([r.source_mtime_ns for r in ok], dtype=torch.int64),
    }
    if pooled:
        tensors["pooled"] = torch.stack([r.pooled for r in ok]) if ok else torch.zeros(0, h)
    return tensors


def errors_of(results: list[ClipResult]) -> list[dict]:
    return [{"index": r.index, "path": r.path, "error": r.error} for r in results if not r.ok]


def warnings_of(results: list[ClipResult]) -> list[dict]:
    """The clips embedded with a warning: ``{index, path, truncated_suspect}`` (may be cut short)."""
    return [{"index": r.index, "path": r.path, "truncated_suspect": r.truncated_suspect}
            for r in results if r.ok and r.truncated_suspect]


def write_shard(layout: Layout, s: int, results: list[ClipResult], fp_sha: str, dims, pooled, width) -> str:
    """Shard ``s``: every clip of its input range, in order (``results``, failed ones included).
    Returns the file's SHA-256 (recorded in the manifest)."""
    start, end = (results[0].index, results[-1].index + 1) if results else (0, 0)
    if [r.index for r in results] != list(range(start, end)):
        raise RuntimeError(f"shard {s}: results are not one run of consecutive inputs")  # a bug, not bad data
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "fingerprint": fp_sha,
        "shard": str(s),
        "first_index": str(start),
        "end_index": str(end),
        "paths": json.dumps([r.path for r in results if r.ok]),
        "errors": json.dumps(errors_of(results)),
    }
    suspects = warnings_of(results)
    if suspects:
        meta["warnings"] = json.dumps(suspects)  # clips embedded, but see why
    data = serialize(clip_rows(results, dims, pooled, width), meta)
    atomic_write_bytes(layout.shard(s), data)
    return sha256(data)


def final_bytes(tensors: dict, paths: list[str], errors: list[dict], man: dict,
                warnings: list[dict] = ()) -> tuple[bytes, dict]:
    """The joined file's bytes and metadata (the run's config, every path, error and warning)."""
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "fingerprint": man["fingerprint"],
            "config": json.dumps(man["config"]), "num_inputs": str(man["config"]["num_inputs"]),
            "paths": json.dumps(paths), "errors": json.dumps(sorted(errors, key=lambda e: e["index"]))}
    if warnings:
        meta["warnings"] = json.dumps(sorted(warnings, key=lambda w: w["index"]))
    data = serialize(tensors, meta)
    n = int.from_bytes(data[:8], "little")
    return data, json.loads(data[8 : 8 + n])["__metadata__"]


def write_errors(path: str, errors: list[dict], suspects: list[dict] = ()) -> None:
    """The errors file: one JSON line per failed clip (``{index, path, error}``) and per clip embedded
    with a warning (``{index, path, truncated_suspect}``, no "error"), in input order. Its failure fails
    the run and names the clips whose errors it could not hold (they stay in the output's metadata)."""
    errors = sorted(errors, key=lambda e: e["index"])
    lines = sorted([*errors, *suspects], key=lambda e: e["index"])
    try:
        with io_errors(path):
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in lines))
    except StoreIOError as exc:
        if not errors:
            raise
        shown = ", ".join(f"{e['index']} ({os.path.basename(e['path'])!r})" for e in errors[:5])
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise StoreIOError(exc.path, f"{exc.cause}; the errors of {len(errors)} failed clip(s) were not written "
                           f"there: inputs {shown}{more}",
                           "they are kept in the output (read_embeddings(out).errors); fix the cause and rerun "
                           "the same command to write the errors file", exc.errno) from exc


def remove_shard_folder(layout: Layout) -> None:
    """After joining: the shard folder's files (pevideo's: the manifest, the shards, their temporaries,
    an errors file there), then the folder when empty."""
    with io_errors(layout.work):
        if not os.path.isdir(layout.work):
            return
        for name in os.listdir(layout.work):
            if _ours(name):
                os.remove(os.path.join(layout.work, name))
        if not os.listdir(layout.work):
            os.rmdir(layout.work)


def _ours(name: str) -> bool:
    return name in ("manifest.json", "errors.jsonl") or bool(SHARD_NAME.fullmatch(name)) or (
        name.startswith((".shard-", ".manifest.json.tmp.", ".errors.jsonl.tmp.")) and ".tmp." in name)


def remove_outputs(layout: Layout) -> None:
    """``--overwrite``: remove what a previous run wrote. :func:`plan_output` proved these files
    pevideo's (a foreign file there was refused before); never a whole user folder."""
    with io_errors(layout.work):
        for p in (layout.final, layout.errors):
            if p is not None and os.path.isfile(p):
                os.remove(p)
        if os.path.isdir(layout.work):
            for name in os.listdir(layout.work):
                if _ours(name):
                    os.remove(os.path.join(layout.work, name))
            if layout.final is not None and not os.listdir(layout.work):
                os.rmdir(layout.work)


def _remove_temporaries(layout: Layout) -> None:
    """Temporaries of crashed or killed writers of this output (of older runs: this one holds the lock)."""
    from .safeio import lock_time

    since = lock_time(layout.lock)
    remove_stale_temporaries(layout.work, ("shard-*.safetensors", "manifest.json", "errors.jsonl"), since)
    if layout.final is not None:
        remove_stale_temporaries(os.path.dirname(layout.final) or ".", (os.path.basename(layout.final),), since)
    remove_stale_temporaries(os.path.dirname(layout.errors) or ".", (os.path.basename(layout.errors),), since)


def prepare(layout: Layout, fp: dict, fp_sha: str, num_shards: int, overwrite: bool, keep_shards: bool = False) -> str:
    """Rank 0, holding the output's lock: start over (``overwrite``), remove what crashed writers left,
    check the fingerprint against what is there, and create the manifest (recording ``keep_shards`` for
    a later ``pevideo merge``). 'complete' when the joined file is already there, else 'todo'."""
    if overwrite:
        remove_outputs(layout)
    _remove_temporaries(layout)
    state = check_fingerprint(layout, fp, fp_sha)
    if state == "complete":
        return state
    with io_errors(layout.work):
        os.makedirs(layout.work, exist_ok=True)
    if state == "resume":
        man = read_manifest(layout)
        if man.get("keep_shards") != bool(keep_shards) or man.get("version") != new_manifest(fp, fp_sha, 0, 0)["version"]:
            man["keep_shards"] = bool(keep_shards)  # the latest embed run's choice counts
            write_manifest(layout, man)
    else:
        write_manifest(layout, new_manifest(fp, fp_sha, num_shards, keep_shards))
    return "todo"

