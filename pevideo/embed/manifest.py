"""The run's manifest (``manifest.json`` in the shard folder): its fingerprint and arguments, the number
of shards, each finished shard's SHA-256, and a SHA-256 over all of that, so that an edited or
damaged manifest (5 shards turned into 3, a checksum changed) is refused rather than believed.

Only the process holding the output's lock (rank 0 under torchrun) writes it; shards that other ranks
finish are recorded when rank 0 gathers them, and a shard written but not yet recorded (its run was
killed in between) is taken on its own checks and recorded by the next run.
"""
from __future__ import annotations

import errno
import json
import math
import os

from .fingerprint import describe_mismatch, sha256
from .layout import Layout
from .records import FORMAT, read_header
from .safeio import DamagedOutputError, StoreError, StoreIOError, atomic_write_text, io_errors

__all__ = ["MANIFEST_VERSION", "ManifestMismatchError", "read_manifest", "write_manifest", "record_shards",
           "new_manifest", "check_fingerprint"]

MANIFEST_VERSION = 3  # 3: the shard list with checksums, and the manifest's own checksum


class ManifestMismatchError(StoreError, ValueError):
    """An output folder or file holds results made with different arguments (model, weights, frames,
    inputs, ...). The message lists the differences, one per line."""

    exit_status = 2

    def __init__(self, path, cause: str, advice: str = ""):
        StoreError.__init__(self, path, "", advice)
        self.cause = cause
        Exception.__init__(self, f"{self.path} holds results made with different arguments:\n{cause}\n{advice}")


def _checksum(man: dict) -> str:
    return sha256(json.dumps({k: v for k, v in man.items() if k != "sha256"}, sort_keys=True).encode())


def new_manifest(fp: dict, fp_sha: str, num_shards: int, keep_shards: bool) -> dict:
    return {"format": FORMAT, "version": MANIFEST_VERSION, "fingerprint": fp_sha, "config": fp,
            "num_shards": num_shards, "keep_shards": bool(keep_shards), "shards": {}}


def write_manifest(layout: Layout, man: dict) -> None:
    """Write ``man`` (as the current version, with its checksum) atomically."""
    man = dict(man, version=MANIFEST_VERSION)
    man.setdefault("shards", {})
    man["sha256"] = _checksum(man)
    atomic_write_text(layout.manifest, json.dumps(man, indent=2) + "\n")


def _damaged(layout: Layout, why: str) -> DamagedOutputError:
    return DamagedOutputError(layout.manifest, why,
                              f"delete {layout.work} (or rerun `pevideo embed` with --overwrite) to start over")


def read_manifest(layout: Layout) -> dict:
    """The run's manifest, checked: format, fields, its checksum (from version 3 on) and a shard count
    that fits the inputs. Raises FileNotFoundError when there is none, DamagedOutputError otherwise."""
    try:
        with io_errors(layout.manifest, "read"), open(layout.manifest, "rb") as f:
            data = f.read()
    except StoreIOError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(f"no embeddings at {layout.out} (no manifest {layout.manifest})") from None
        raise
    try:
        man = json.loads(data.decode("utf-8"))
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise ValueError("not a pevideo manifest")
        for key in ("fingerprint", "config", "num_shards"):
            if key not in man:
                raise ValueError(f"no {key!r}")
        size, n = int(man["config"]["shard_size"]), int(man["config"]["num_inputs"])
        shards = man.get("shards", {})
        if not isinstance(shards, dict):
            raise ValueError("'shards' is not a mapping")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _damaged(layout, f"is not a pevideo manifest ({exc})") from None
    if int(man.get("version", 0) or 0) >= 3 and man.get("sha256") != _checksum(man):
        raise _damaged(layout, "fails its checksum (edited or damaged)")
    if size < 1 or man["num_shards"] != math.ceil(n / size):
        raise _damaged(layout, f"lists {man['num_shards']} shards, but {n} inputs in shards of {size} make "
                       f"{math.ceil(n / max(size, 1))}")
    return man


def record_shards(layout: Layout, shas: dict[int, str]) -> None:
    """Record finished shards' checksums in the manifest (the lock holder only)."""
    if not shas:
        return
    man = read_manifest(layout)
    man.setdefault("shards", {}).update({str(s): h for s, h in shas.items()})
    write_manifest(layout, man)


def check_fingerprint(layout: Layout, fp: dict, fp_sha: str) -> str:
    """Against what is already at the output: 'complete' when the joined file is there (made with the
    same arguments), 'resume' when a manifest is, 'new' otherwise. ManifestMismatchError when either
    was made with other arguments."""
    if layout.final is not None and os.path.isfile(layout.final):
        meta = read_header(layout.final)
        if meta.get("fingerprint") != fp_sha:
            try:
                old = json.loads(meta.get("config", "{}"))
            except ValueError:
                old = {}
            raise ManifestMismatchError(layout.final, describe_mismatch(old, fp),
                                        "use another --out, or --overwrite to replace it")
        return "complete"
    if os.path.isfile(layout.manifest):
        man = read_manifest(layout)
        if man.get("fingerprint") != fp_sha:
            raise ManifestMismatchError(layout.work, describe_mismatch(man.get("config", {}), fp),
                                        "use another --out, or --overwrite to start over")
        return "resume"
    return "new"
