"""Embeddings as Parquet rows: what the Ray Data stage (:mod:`pevideo.ray_data`) writes, read back.

One row per input video (columns in :func:`schema`): ``path``, ``input_index`` (its position in the
run's input list), ``frame_indices`` (the source frames sampled, as ``pevideo embed`` samples them),
``source_frame_count``, ``embedding`` (fixed-size list of float32, null for a failed video),
optionally ``pooled``, ``fingerprint`` (SHA-256 of everything that decides the numbers: model weights
and config, preprocessing, sampling, dtype, kernels; :func:`row_config`), ``error`` (null, or why the
video could not be read) and ``truncated_suspect`` (null, or why an embedded file may be cut short).

An output is a folder of ``*.parquet`` files (whatever names Ray's writer chose) with, when
``pevideo embed --engine ray`` made it, a ``manifest.json`` recording the run (its fingerprint, the
number and hash of its inputs). Work can be done twice (a retried task, a rerun after a crash, a
user's own pipeline run again), so an input may have several rows: readers keep one per
``input_index`` (a row without error before one with, then the first file by name, then the first
row), and nothing is counted twice. With a manifest, a reader also checks that every row was made by
the run (its fingerprint, its path at its index) and, for a complete output, that the inputs are all
there, in the run's order. Needs pyarrow (``pip install 'pevideo[ray]'``).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .fingerprint import sha256
from .safeio import DamagedOutputError, atomic_write_text, io_errors, tmp_name

__all__ = [
    "PARQUET_FORMAT", "MERGED_NAME", "schema", "results_table", "row_config", "is_parquet_output",
    "parquet_files", "read_manifest", "write_manifest", "scan", "Scan", "read_parquet_embeddings",
    "check_complete", "iter_embedding_chunks", "inputs_sha256",
]

PARQUET_FORMAT = "pevideo.embeddings.parquet"
PARQUET_VERSION = 1
MERGED_NAME = "embeddings.parquet"  # what `pevideo merge` writes: one file, one row per input, in order
INDEX_COLUMNS = ["input_index", "path", "fingerprint", "error"]
RESUME = "rerun `pevideo embed --engine ray` with the same arguments to finish it"


def pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("Parquet embeddings need pyarrow: pip install 'pevideo[ray]' (or pyarrow)") from None
    return pa


def schema(dim: int, pooled_dim: int | None = None):
    """The Parquet schema of ``dim``-wide embeddings (and ``pooled_dim``-wide pooled outputs, if any)."""
    pa = pyarrow()
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("input_index", pa.int64(), nullable=False),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("source_frame_count", pa.int64()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
    ]
    if pooled_dim:
        fields.append(pa.field("pooled", pa.list_(pa.float32(), pooled_dim)))
    fields += [pa.field("fingerprint", pa.string(), nullable=False), pa.field("error", pa.string()),
               pa.field("truncated_suspect", pa.string())]
    return pa.schema(fields)


def _fixed(rows: list, dim: int):
    """A fixed-size list column of float32 rows (None: a null row)."""
    pa = pyarrow()
    flat = np.zeros((len(rows), dim), np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            flat[i] = r.numpy() if isinstance(r, torch.Tensor) else r
    mask = np.array([r is None for r in rows], dtype=bool)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
    return pa.FixedSizeListArray.from_arrays(arr.values, dim, mask=pa.array(mask)) if mask.any() else arr


def results_table(results, fingerprint: str, dim: int, pooled_dim: int | None = None):
    """The rows of :class:`pevideo.embed.ClipResult` s (``index`` = input index) as a pyarrow Table."""
    pa = pyarrow()
    cols = {
        "path": pa.array([r.path for r in results], pa.string()),
        "input_index": pa.array([int(r.index) for r in results], pa.int64()),
        "frame_indices": pa.array([list(map(int, r.frame_indices)) if r.ok else None for r in results],
                                  pa.list_(pa.int32())),
        "source_frame_count": pa.array([int(r.frame_count) if r.ok else None for r in results], pa.int64()),
        "embedding": _fixed([r.video_embeds if r.ok else None for r in results], dim),
    }
    if pooled_dim:
        cols["pooled"] = _fixed([r.pooled if r.ok else None for r in results], pooled_dim)
    cols["fingerprint"] = pa.array([fingerprint] * len(results), pa.string())
    cols["error"] = pa.array([r.error for r in results], pa.string())
    cols["truncated_suspect"] = pa.array([getattr(r, "truncated_suspect", None) for r in results], pa.string())
    return pa.table(cols, schema=schema(dim, pooled_dim))


def row_config(config: dict) -> dict:
    """The part of a run's fingerprint (:func:`pevideo.embed.fingerprint.fingerprint`) that decides a
    row's numbers: without the input list and the shard size (a row is one input)."""
    return {k: v for k, v in config.items() if k not in ("num_inputs", "inputs_sha256", "shard_size")}


def row_fingerprint(config: dict) -> str:
    return sha256(json.dumps(row_config(config), sort_keys=True).encode())


def inputs_sha256(paths) -> str:
    return sha256("\0".join(paths).encode("utf-8", "surrogateescape"))


# --------------------------------------------------------------------------------------------------
def parquet_files(path) -> list[str]:
    """``path`` itself (a ``.parquet`` file), or the ``*.parquet`` files in the folder (not hidden: a
    temporary ``.NAME.tmp.PID`` is not one), sorted by name."""
    p = os.fspath(path)
    if os.path.isfile(p):
        return [p]
    with io_errors(p, "read"):
        names = sorted(n for n in os.listdir(p) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(p, n) for n in names if os.path.isfile(os.path.join(p, n))]


def read_manifest(folder) -> dict | None:
    """The Ray run's manifest in ``folder``; None when there is none (a pipeline of the user's own)."""
    p = os.path.join(os.fspath(folder), "manifest.json")
    if not os.path.isfile(p):
        return None
    with io_errors(p, "read"), open(p, "rb") as f:
        data = f.read()
    try:
        man = json.loads(data.decode("utf-8"))
        if man.get("format") != PARQUET_FORMAT:
            raise ValueError(f"format {man.get('format')!r}")
        man["fingerprint"], int(man["config"]["num_inputs"]), man["config"]["inputs_sha256"]  # noqa: B018
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DamagedOutputError(p, f"is not a manifest of `pevideo embed --engine ray` ({exc})",
                                 "delete it (or the folder), or rerun with --overwrite") from None
    return man


def write_manifest(folder, config: dict) -> dict:
    man = {"format": PARQUET_FORMAT, "version": PARQUET_VERSION, "fingerprint": row_fingerprint(config),
           "config": config}
    atomic_write_text(os.path.join(os.fspath(folder), "manifest.json"), json.dumps(man, indent=2) + "\n")
    return man


def is_parquet_output(path) -> bool:
    """A ``.parquet`` file, or a folder holding a Ray run's manifest or ``*.parquet`` files and no
    safetensors shards."""
    p = os.fspath(path)
    if os.path.isfile(p):
        return p.endswith(".parquet")
    if not os.path.isdir(p):
        return False
    names = os.listdir(p)
    if "manifest.json" in names:
        try:
            with open(os.path.join(p, "manifest.json"), encoding="utf-8") as f:
                return json.load(f).get("format") == PARQUET_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return any(n.endswith(".parquet") for n in names) and not any(n.endswith(".safetensors") for n in names)


# --------------------------------------------------------------------------------------------------
@dataclass
class Scan:
    """One row per input, chosen among an output's rows (see the module docstring), by input index.

    ``file_id`` / ``row``: where each kept row is (``files[file_id]``, row in that file); ``ok``: no
    error; ``duplicates``: rows left out because their input had another."""

    files: list[str]
    file_id: np.ndarray
    row: np.ndarray
    input_index: np.ndarray
    ok: np.ndarray
    paths: list[str]
    errors: list
    suspects: list
    file_rows: list[int]
    manifest: dict | None = None
    duplicates: int = 0
    fingerprints: set = field(default_factory=set)
    damaged: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_index)

    @property
    def num_ok(self) -> int:
        return int(self.ok.sum())

    def error_records(self) -> list[dict]:
        return [{"index": int(i), "path": p, "error": e}
                for i, p, e, good in zip(self.input_index, self.paths, self.errors, self.ok) if not good]

    def warning_records(self) -> list[dict]:
        """The clips embedded with a warning, as :attr:`pevideo.Embeddings.warnings` lists them."""
        return [{"index": int(i), "path": p, "truncated_suspect": w}
                for i, p, w, good in zip(self.input_index, self.paths, self.suspects, self.ok) if good and w]

    def ok_paths(self) -> list[str]:
        return [p for p, good in zip(self.paths, self.ok) if good]


def _read_index(path: str):
    import pyarrow.parquet as pq

    optional = [c for c in ("truncated_suspect",) if c in pq.read_schema(path).names]
    return pq.read_table(path, columns=INDEX_COLUMNS + optional)


def scan(path, *, skip_damaged: bool = False, paths: list[str] | None = None) -> Scan:
    """Read the index columns of every file of the output at ``path`` and keep one row per input.

    A file that is not a readable Parquet file (a writer killed mid-file) raises
    :class:`DamagedOutputError` naming it, or with ``skip_damaged`` is listed in ``damaged`` and left
    out. With a manifest, a row made by another run (fingerprint), or (``paths``, the run's inputs) whose
    path is not its input's, raises :class:`DamagedOutputError` naming its file."""
    pyarrow()
    p = os.fspath(path)
    man = read_manifest(p) if os.path.isdir(p) else None
    files = parquet_files(p)
    cols = {k: [] for k in ("input_index", "path", "fingerprint", "error", "truncated_suspect", "file_id", "row")}
    kept_files, file_rows, damaged = [], [], []
    for f in files:
        try:
            t = _read_index(f)
        except Exception as exc:  # pyarrow's ArrowInvalid (no footer, ...) and missing columns alike
            if isinstance(exc, OSError) and exc.errno is not None:  # the OS refused: not the file's fault
                with io_errors(f, "read"):
                    raise
            reason = f"is not a complete pevideo Parquet file ({type(exc).__name__}: {exc})"
            if not skip_damaged:
                raise DamagedOutputError(f, reason, "rerun `pevideo embed --engine ray` with the same arguments "
                                         "(it removes it and redoes its videos), or delete it") from None
            damaged.append((f, reason))
            continue
        fid = len(kept_files)
        kept_files.append(f)
        file_rows.append(t.num_rows)
        d = t.to_pydict()
        for k in ("input_index", "path", "fingerprint", "error"):
            cols[k] += d[k]
        cols["truncated_suspect"] += d.get("truncated_suspect", [None] * t.num_rows)
        cols["file_id"] += [fid] * t.num_rows
        cols["row"] += range(t.num_rows)
        if man is not None:
            foreign = set(d["fingerprint"]) - {man["fingerprint"]}
            if foreign:
                raise DamagedOutputError(f, "holds rows made by another run (another model, weights or settings)",
                                         "move it out of this output, or rerun with --overwrite to start over")
            if paths is not None:
                bad = [(i, q) for i, q in zip(d["input_index"], d["path"]) if not 0 <= i < len(paths) or paths[i] != q]
                if bad:
                    raise DamagedOutputError(f, f"holds rows of other inputs (input {bad[0][0]}: {bad[0][1]})",
                                             "move it out of this output, or rerun with --overwrite to start over")
    idx = np.asarray(cols["input_index"], dtype=np.int64)
    ok = np.array([e is None for e in cols["error"]], dtype=bool)
    fid = np.asarray(cols["file_id"], dtype=np.int64)
    row = np.asarray(cols["row"], dtype=np.int64)
    # One row per input: a good row before a failed one (a retry that got through), then file, then row.
    order = np.lexsort((row, fid, ~ok, idx))
    first = np.ones(len(order), dtype=bool)
    first[1:] = idx[order][1:] != idx[order][:-1]
    keep = order[first]
    return Scan(files=kept_files, file_id=fid[keep], row=row[keep], input_index=idx[keep], ok=ok[keep],
                paths=[cols["path"][i] for i in keep], errors=[cols["error"][i] for i in keep],
                suspects=[cols["truncated_suspect"][i] for i in keep], file_rows=file_rows,
                manifest=man, duplicates=len(order) - len(keep), fingerprints=set(cols["fingerprint"]),
                damaged=damaged)


def check_complete(sc: Scan, where: str, advice: str) -> None:
    """A scanned output with a manifest holds every input of its run exactly once, in order:
    :class:`ShardsMissingError` (with ``advice``) when inputs are missing, :class:`DamagedOutputError`
    when its rows are not the run's inputs."""
    from .reading import ShardsMissingError

    n = int(sc.manifest["config"]["num_inputs"])
    missing = n - int(((sc.input_index >= 0) & (sc.input_index < n)).sum())
    if missing or len(sc) != n:
        raise ShardsMissingError(
            where, f"{missing} of {n} videos are not written yet (the run was interrupted or is still going)", advice)
    if inputs_sha256(sc.paths) != sc.manifest["config"]["inputs_sha256"]:
        raise DamagedOutputError(where, "its rows' paths are not the run's inputs, in order",
                                 "rerun `pevideo embed --engine ray` with --overwrite to make it again")


def check_one_model(sc: Scan, where: str) -> None:
    if len(sc.fingerprints) > 1:
        raise DamagedOutputError(where, f"holds rows of {len(sc.fingerprints)} different models or settings "
                                 "(fingerprint column)", "keep one run's files per folder")


# --------------------------------------------------------------------------------------------------
def _rows_of(sc: Scan, fid: int, only_ok: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rows in file ``fid``, their positions among the kept rows) of the kept rows in that file."""
    pos = np.nonzero((sc.file_id == fid) & (sc.ok if only_ok else True))[0]
    return sc.row[pos], pos


def _fixed_numpy(col, name: str, where: str) -> np.ndarray:
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if arr.null_count:
        raise DamagedOutputError(where, f"a row without error has no {name}", "delete it and rerun")
    dim = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False, writable=True).astype(np.float32, copy=False).reshape(-1, dim)


def read_parquet_embeddings(path):
    """:func:`pevideo.read_embeddings` of a Parquet output: one row per input, in input order."""
    import pyarrow.parquet as pq

    from .reading import Embeddings

    where = os.fspath(path)
    sc = scan(where)
    if sc.manifest is not None:
        check_complete(sc, where, RESUME)
    check_one_model(sc, where)
    good = np.nonzero(sc.ok)[0]
    rank = np.full(len(sc), -1, dtype=np.int64)
    rank[good] = np.arange(len(good))
    n = len(good)
    emb = pooled = None
    counts = np.zeros(n, np.int64)
    lists: list = [None] * n
    for fid, f in enumerate(sc.files):
        rows, pos = _rows_of(sc, fid)
        if not len(rows):
            continue
        names = pq.read_schema(f).names
        cols = ["embedding", "frame_indices", "source_frame_count"] + (["pooled"] if "pooled" in names else [])
        with io_errors(f, "read"):
            t = pq.read_table(f, columns=cols).take(rows)
        e = _fixed_numpy(t.column("embedding"), "embedding", f)
        if emb is None:
            emb = np.zeros((n, e.shape[1]), np.float32)
        emb[rank[pos]] = e
        if "pooled" in cols:
            pv = _fixed_numpy(t.column("pooled"), "pooled", f)
            if pooled is None:
                pooled = np.zeros((n, pv.shape[1]), np.float32)
            pooled[rank[pos]] = pv
        counts[rank[pos]] = t.column("source_frame_count").to_numpy(zero_copy_only=False)
        for r, li in zip(rank[pos], t.column("frame_indices").to_pylist()):
            lists[r] = li or []
    width = max((len(li) for li in lists), default=0)
    idx = torch.full((n, width), -1, dtype=torch.int32)
    for r, li in enumerate(lists):
        idx[r, : len(li)] = torch.tensor(li, dtype=torch.int32)
    config = sc.manifest["config"] if sc.manifest is not None else {"fingerprint": next(iter(sc.fingerprints), None)}
    return Embeddings(
        video_embeds=torch.from_numpy(emb if emb is not None else np.zeros((0, 0), np.float32)),
        pooled=None if pooled is None else torch.from_numpy(pooled),
        source_frame_counts=torch.from_numpy(counts), sampled_frame_counts=(idx >= 0).sum(1).to(torch.int64),
        sampled_indices=idx, input_index=torch.from_numpy(sc.input_index[good].copy()),
        paths=sc.ok_paths(), errors=sc.error_records(), config=config, warnings=sc.warning_records(),
    )


def iter_embedding_chunks(sc: Scan, chunk_rows: int):
    """Yield ``(rows, embeddings)`` over the kept rows without error: ``rows`` (n,) int64, each row's
    place in :func:`read_parquet_embeddings`' order, and its embeddings (n, D) float32; at most
    ``chunk_rows`` rows read at a time."""
    import pyarrow.parquet as pq

    good = np.nonzero(sc.ok)[0]
    rank = np.full(len(sc), -1, dtype=np.int64)
    rank[good] = np.arange(len(good))
    for fid, f in enumerate(sc.files):
        rows, pos = _rows_of(sc, fid)
        if not len(rows):
            continue
        where = np.full(sc.file_rows[fid], -1, dtype=np.int64)  # row in file -> place, -1: not kept
        where[rows] = rank[pos]
        start = 0
        with io_errors(f, "read"):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=max(1, chunk_rows), columns=["embedding"]):
                places = where[start : start + batch.num_rows]
                sel = np.nonzero(places >= 0)[0]
                start += batch.num_rows
                if len(sel):
                    col = batch.column(0).take(sel)
                    yield places[sel], _fixed_numpy(col, "embedding", f)


def merged_table(sc: Scan):
    """Every kept row (failed ones too), in input order, as one pyarrow Table."""
    pa = pyarrow()
    import pyarrow.parquet as pq

    parts, order = [], []
    for fid, f in enumerate(sc.files):
        rows, pos = _rows_of(sc, fid, only_ok=False)
        if len(rows):
            with io_errors(f, "read"):
                parts.append(pq.read_table(f).take(rows))
            order.append(sc.input_index[pos])
    if not parts:
        return None
    table = pa.concat_tables(parts, promote_options="default")
    return table.take(np.argsort(np.concatenate(order), kind="stable"))


def write_merged(folder: str, table) -> str:
    """``folder/embeddings.parquet``, written under a temporary (hidden) name and renamed into place."""
    import pyarrow.parquet as pq

    path = os.path.join(folder, MERGED_NAME)
    tmp = tmp_name(path)
    with io_errors(path):
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    return path


def remove_damaged(sc: Scan) -> None:
    """Remove the files a scan with ``skip_damaged`` found unreadable (their videos are redone)."""
    for f, reason in sc.damaged:
        warnings.warn(f"{f} {reason}; removed, its videos will be embedded again", stacklevel=2)
        with io_errors(f):
            os.remove(f)
