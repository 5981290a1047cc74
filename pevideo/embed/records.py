"""What a shard or a joined file of an embedding run must hold, and the checks that it does: its
place (shard number, input range), its fingerprint, a SHA-256 per tensor and one over its metadata
(paths, errors, range: a flipped bit in a path is caught too), and rows that cover each input of its
range exactly once, in order (the failed ones listed in its ``errors``)."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from .fingerprint import sha256
from .safeio import DamagedOutputError, io_errors

__all__ = [
    "FORMAT", "FORMAT_VERSION", "ROW_STATS", "serialize", "read_header", "load_checked", "shard_problem",
    "complete_problem", "rows_problem", "meta_problem",
]

FORMAT = "pevideo.embeddings"
# 2: shards record their number, input range and per-tensor SHA-256.
# 3: a SHA-256 over the metadata (meta_sha256), and each input's size and mtime (source_size,
#    source_mtime_ns) with its row.
FORMAT_VERSION = 3

# Per-row tensors a version-2 file lacks; read back as -1 ("not recorded").
ROW_STATS = ("source_size", "source_mtime_ns")

REDO = "delete it and rerun the same `pevideo embed` command to redo it"


def tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def meta_sha(meta: dict) -> str:
    """The SHA-256 of a file's metadata, all of it but this checksum itself."""
    return sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}, sort_keys=True).encode())


def serialize(tensors: dict, metadata: dict) -> bytes:
    """The safetensors bytes, with each tensor's SHA-256 and one over the metadata (checked when read)."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = dict(metadata, sha256=json.dumps({k: tensor_sha(v) for k, v in sorted(tensors.items())}))
    metadata["meta_sha256"] = meta_sha(metadata)
    return save(tensors, metadata=metadata)


def read_header(path: str) -> dict:
    """The file's metadata; a file that is not a complete safetensors file raises DamagedOutputError."""
    from safetensors import safe_open

    with io_errors(path, "read"):
        try:
            with safe_open(path, framework="pt") as f:
                return f.metadata() or {}
        except OSError:
            raise
        except Exception as exc:  # SafetensorError: empty, cut short, not safetensors at all
            size = os.path.getsize(path)
            raise DamagedOutputError(path, f"is not a complete safetensors file ({size} bytes; {exc})", REDO) from exc


def load_checked(path: str) -> tuple[dict, dict, str]:
    """(tensors, metadata, SHA-256 of the file's bytes), reading the file once."""
    from safetensors.torch import load

    with io_errors(path, "read"), open(path, "rb") as f:
        data = f.read()
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:
        raise DamagedOutputError(path, f"is not a complete safetensors file ({len(data)} bytes; {exc})", REDO) from exc
    return tensors, meta, sha256(data)


def range_text(a, b) -> str:
    return f"inputs {a}-{int(b) - 1}" if int(b) > int(a) else "no inputs"


def expected_range(man: dict, s: int) -> tuple[int, int]:
    size, n = int(man["config"]["shard_size"]), int(man["config"]["num_inputs"])
    return s * size, min((s + 1) * size, n)


def meta_problem(meta: dict) -> str | None:
    """Why a file's metadata is not as written (None when it is, or when its version had no checksum)."""
    if "meta_sha256" not in meta:
        return "has no metadata checksum" if int(meta.get("version", "0") or 0) >= 3 else None
    if meta_sha(meta) != meta["meta_sha256"]:
        return "its metadata (paths, errors, ranges) fails its checksum (the file was changed or damaged)"
    return None


def rows_problem(tensors: dict, shapes: dict, meta: dict, start: int, end: int) -> str | None:
    """Why the rows of a file covering inputs [start, end) are not each of them exactly once, in order
    (with the failed ones listed in ``errors``); None when they are. ``shapes``: every tensor's shape."""
    problem = meta_problem(meta)
    if problem is not None:
        return problem
    sums = json.loads(meta.get("sha256", "{}"))
    for name, t in tensors.items():
        if name in sums and tensor_sha(t) != sums[name]:
            return f"{name} fails its checksum (the file was changed or damaged)"
    idx = tensors["input_index"]
    rows = idx.shape[0] if idx.dim() == 1 else -1
    bad = [n for n, shp in shapes.items() if not shp or shp[0] != rows]
    try:
        paths, errors = json.loads(meta.get("paths", "[]")), json.loads(meta.get("errors", "[]"))
        err_idx = [int(e["index"]) for e in errors]
    except (ValueError, KeyError, TypeError) as exc:
        return f"its metadata is damaged ({exc})"
    if bad or len(paths) != rows:
        return f"its tensors and paths disagree on the number of rows ({rows} in input_index)"
    if rows > 1 and not bool((idx[1:] > idx[:-1]).all()):
        return "input_index is not strictly increasing (rows duplicated or out of order)"
    have = set(idx.tolist()) | set(err_idx)
    if len(have) != rows + len(err_idx) or have != set(range(start, end)):
        missing = sorted(set(range(start, end)) - have)[:5]
        extra = sorted(have - set(range(start, end)))[:5]
        return (f"input_index and errors do not cover {range_text(start, end)} exactly once "
                f"(missing {missing}, foreign {extra})")
    return None


def shard_problem(path: str, s: int, man: dict, full: bool) -> tuple[str | None, tuple]:
    """Why the file at shard ``s``'s place is not shard ``s`` of this run (None when it is), and the
    loaded (tensors, meta) when ``full``. A shard whose checksum the manifest recorded must match it."""
    from safetensors import safe_open

    if full:
        tensors, meta, file_sha = load_checked(path)
    else:
        meta = read_header(path)
    if meta.get("format") != FORMAT:
        return "is not a pevideo embeddings shard", ()
    if meta.get("fingerprint") != man["fingerprint"]:
        return "was made by another run (other arguments, weights or inputs)", ()
    start, end = expected_range(man, s)
    got = (meta.get("shard"), meta.get("first_index"), meta.get("end_index"))
    if "first_index" not in meta and meta.get("version") == "1":  # no range recorded: the rows tell
        got = (got[0], str(start), str(end))
    if got != (str(s), str(start), str(end)):
        return (f"holds shard {got[0]} ({range_text(got[1] or 0, got[2] or 0)}), not shard {s} "
                f"({range_text(start, end)}): copied or renamed"), ()
    if full:
        recorded = (man.get("shards") or {}).get(str(s))
        if recorded is not None and file_sha != recorded and meta_problem(meta) is None:
            # (a damaged metadata or tensor is named below, more precisely)
            problem = rows_problem(tensors, {k: tuple(v.shape) for k, v in tensors.items()}, meta, start, end)
            return problem or "does not match the checksum the manifest recorded for it (changed or damaged)", ()
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    else:
        with io_errors(path, "read"), safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            tensors = {k: f.get_tensor(k) for k in ("input_index", *ROW_STATS) if k in shapes}
    if "input_index" not in tensors:
        return "has no input_index", ()
    return rows_problem(tensors, shapes, meta, start, end), (tensors, meta)


def complete_problem(tensors: dict, meta: dict, config: dict) -> str | None:
    """Why a joined file (or what is about to become one) does not hold each input once, in order."""
    if "input_index" not in tensors or "num_inputs" not in config:
        return "has no input_index or no num_inputs"
    n = int(config["num_inputs"])
    problem = rows_problem(tensors, {k: tuple(v.shape) for k, v in tensors.items()}, meta, 0, n)
    if problem is not None or "inputs_sha256" not in config:
        return problem
    names = [""] * n
    for i, p in zip(tensors["input_index"].tolist(), json.loads(meta.get("paths", "[]"))):
        names[i] = p
    for e in json.loads(meta.get("errors", "[]")):
        names[int(e["index"])] = e["path"]
    if sha256("\0".join(names).encode("utf-8", "surrogateescape")) != config["inputs_sha256"]:
        return "its paths are not the run's inputs, in order"
    return None
