"""Retrieval: the top-k videos of an embeddings output for text or video queries, exact, in chunks.

``search(embeddings, queries, k)`` scores every row against every query, a chunk of rows at a time (on
the GPU when there is one), and keeps a running top-k: memory is bounded by ``chunk_size`` rows, not by
the file, and a ``.safetensors`` file, a folder of shards or a Parquet output is read a chunk at a time.
Scores: ``"cosine"`` (default), or ``"probability"``: ``sigmoid(query · video · scale + bias)`` with the
model's logit scale and bias, exactly what ``classify`` reports for that clip and text (ranked by the
logit, so saturated probabilities still rank). Equal scores rank by row (the smaller first), so results
do not depend on the chunking. An approximate FAISS index (:class:`pevideo.retrieval_faiss.FaissIndex`,
``pip install 'pevideo[faiss]'``) can stand in for the exact scan: ``search(..., index=idx)``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["search", "SearchResult", "open_embeddings", "EmbeddingSource", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 32768  # rows scored at a time: 128 MiB of 1024-wide float32 embeddings


@dataclass
class SearchResult:
    """Per query (Q of them) its top ``k`` rows, best first (fewer when there are fewer rows).

    ``indices`` (Q, k) int64: rows of ``read_embeddings(...)`` (its ``video_embeds``, ``paths``);
    ``input_index`` (Q, k) int64: their positions in the run's input list; ``scores`` (Q, k) float32;
    ``paths``: Q lists of k paths; ``score``: "cosine" or "probability"."""

    indices: torch.Tensor
    scores: torch.Tensor
    input_index: torch.Tensor
    paths: list
    score: str = "cosine"


class EmbeddingSource:
    """Rows of embeddings read a chunk at a time: ``paths``, ``input_index`` (N,), ``config`` (the run's
    fingerprint, {} when unknown), ``dim``; :meth:`chunks` yields ``(rows, embeddings)``."""

    def __init__(self, paths, input_index, config, dim, chunks):
        self.paths, self.input_index, self.config, self.dim = paths, np.asarray(input_index, np.int64), config, dim
        self._chunks = chunks

    def __len__(self) -> int:
        return len(self.paths)

    def chunks(self, chunk_rows: int):
        """Yield ``(rows (n,) int64 numpy, embeddings (n, D) float32 CPU tensor)``, at most ``chunk_rows`` a time."""
        return self._chunks(max(1, int(chunk_rows)))


class _RowNames:
    """The "paths" of rows that have none: their row numbers, as text, made when asked."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return str(i % self.n)


def _tensor_source(x: torch.Tensor, paths=None, input_index=None, config=None) -> EmbeddingSource:
    if x.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got {tuple(x.shape)}")
    n = x.shape[0]

    def chunks(c):
        for a in range(0, n, c):
            yield np.arange(a, min(a + c, n)), x[a : a + c]

    return EmbeddingSource(paths if paths is not None else _RowNames(n),
                           input_index if input_index is not None else np.arange(n), config or {}, x.shape[1], chunks)


def _safetensors_files(path: str) -> tuple[list[str], dict]:
    """The files of a safetensors output in order (the joined file, or the shards of a folder) and its
    config; the same checks of place and run as read_embeddings makes from the headers."""
    from .embed.records import FORMAT, read_header, shard_problem
    from .embed.safeio import DamagedOutputError
    from .embed.layout import Layout
    from .embed.manifest import read_manifest
    from .embed.reading import ShardsMissingError

    layout = Layout.of(path)
    if layout.final is not None and os.path.isfile(layout.final):
        meta = read_header(layout.final)
        if meta.get("format") != FORMAT:
            raise DamagedOutputError(layout.final, "is not a pevideo embeddings file", "give what `pevideo embed` wrote")
        return [layout.final], json.loads(meta.get("config", "{}"))
    if not os.path.isfile(layout.manifest):
        raise FileNotFoundError(f"no embeddings at {path}")
    man = read_manifest(layout)  # checked: format, its checksum, a shard count that fits the inputs
    files = [layout.shard(s) for s in range(int(man["num_shards"]))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ShardsMissingError(layout.work, f"{len(missing)} of {len(files)} shards are missing",
                                 "rerun `pevideo embed` with the same arguments to finish them")
    for s, f in enumerate(files):
        problem, _ = shard_problem(f, s, man, full=False)
        if problem is not None:
            raise DamagedOutputError(f, problem, "rerun `pevideo embed` with the same arguments")
    return files, man["config"]


def _safetensors_source(path: str) -> EmbeddingSource:
    from safetensors import safe_open

    from .embed.records import read_header
    from .embed.safeio import DamagedOutputError

    files, config = _safetensors_files(path)
    paths, index, counts, dim = [], [], [], 0
    for f in files:
        meta = read_header(f)
        paths += json.loads(meta.get("paths", "[]"))
        with safe_open(f, framework="pt") as st:
            index.append(st.get_tensor("input_index").numpy())
            n, dim = st.get_slice("video_embeds").get_shape()
            counts.append(n)

    def chunks(c):
        base = 0
        for f, n in zip(files, counts):
            want = json.loads(read_header(f).get("sha256", "{}")).get("video_embeds")
            h = hashlib.sha256()
            with safe_open(f, framework="pt") as st:
                sl = st.get_slice("video_embeds")
                for a in range(0, n, c):
                    x = sl[a : min(a + c, n)]
                    h.update(x.contiguous().reshape(-1).view(torch.uint8).numpy())
                    yield np.arange(base + a, base + min(a + c, n)), x.float()
            if want is not None and h.hexdigest() != want:  # every row was read: its checksum must hold
                raise DamagedOutputError(f, "video_embeds fails its checksum (the file was changed or damaged)",
                                         "delete it and rerun the same `pevideo embed` command")
            base += n

    return EmbeddingSource(paths, np.concatenate(index) if index else np.zeros(0, np.int64), config, dim, chunks)


def _parquet_source(path: str) -> EmbeddingSource:
    from .embed.parquet import RESUME, check_complete, check_one_model, iter_embedding_chunks, scan

    sc = scan(path)
    if sc.manifest is not None:
        check_complete(sc, os.fspath(path), RESUME)
    check_one_model(sc, os.fspath(path))
    config = sc.manifest["config"] if sc.manifest is not None else {}
    dim = 0
    if sc.num_ok:
        import pyarrow.parquet as pq

        dim = pq.read_schema(sc.files[int(sc.file_id[np.argmax(sc.ok)])]).field("embedding").type.list_size

    def chunks(c):
        for rows, x in iter_embedding_chunks(sc, c):
            yield rows, torch.from_numpy(x)

    return EmbeddingSource(sc.ok_paths(), sc.input_index[sc.ok], config, dim, chunks)


def open_embeddings(embeddings) -> EmbeddingSource:
    """An :class:`EmbeddingSource` over: what ``pevideo embed`` wrote (a ``.safetensors`` file or a folder
    of shards), a Parquet output (``--engine ray``, a Ray pipeline's folder, a ``.parquet`` file), a
    :class:`pevideo.Embeddings`, or a tensor (N, D) (paths are then the row numbers)."""
    if isinstance(embeddings, EmbeddingSource):
        return embeddings
    if isinstance(embeddings, torch.Tensor):
        return _tensor_source(embeddings)
    if isinstance(embeddings, np.ndarray):
        return _tensor_source(torch.from_numpy(embeddings))
    from .embed.reading import Embeddings

    if isinstance(embeddings, Embeddings):
        return _tensor_source(embeddings.video_embeds, embeddings.paths, embeddings.input_index.numpy(),
                              embeddings.config)
    if isinstance(embeddings, (str, os.PathLike)):
        from .embed.parquet import is_parquet_output

        p = os.fspath(embeddings)
        if not os.path.exists(p) and not os.path.exists(p + ".shards"):
            raise FileNotFoundError(f"no embeddings at {p}")
        return _parquet_source(p) if is_parquet_output(p) else _safetensors_source(p)
    raise TypeError(f"embeddings: a path, Embeddings or a tensor, got {type(embeddings).__name__}")


# --------------------------------------------------------------------------------------------------
def _chunk_topk(s: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's top ``k`` of one chunk's scores ``s`` (Q, n), ties to the smaller row."""
    kk = min(k, s.shape[1])
    vals, pos = s.topk(min(kk + 1, s.shape[1]), dim=1)
    # topk picks any of equal scores at the cut: where the (k+1)-th equals the k-th, a tie crosses it,
    # and those queries are ranked exactly.
    over = vals[:, kk] == vals[:, kk - 1] if vals.shape[1] > kk else None
    vals, pos = vals[:, :kk], pos[:, :kk]
    if over is not None and bool(over.any()):
        perm = torch.argsort(rows, stable=True)
        sub = s[over][:, perm]
        v2, p2 = torch.sort(sub, dim=1, descending=True, stable=True)
        vals[over], pos[over] = v2[:, :kk], perm[p2[:, :kk]]
    return vals, rows[pos]


def _merge(bs, bi, cs, ci, k):
    """Two candidate sets to one top ``k``: by score, then by the smaller row."""
    s, i = torch.cat([bs, cs], 1), torch.cat([bi, ci], 1)
    o = torch.argsort(i, dim=1, stable=True)
    s, i = s.gather(1, o), i.gather(1, o)
    o = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, o), i.gather(1, o)


def _queries(queries) -> torch.Tensor:
    q = torch.as_tensor(queries) if not isinstance(queries, torch.Tensor) else queries
    if q.dim() == 1:
        q = q[None]
    if q.dim() != 2 or not q.is_floating_point():
        raise ValueError(f"queries must be float (Q, D) or (D,), got {tuple(q.shape)} {q.dtype}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError("queries hold NaN or infinite values")
    return q.float()


def search(embeddings, queries, k: int = 10, *, score: str = "cosine", logit_scale: float | None = None,
           logit_bias: float | None = None, chunk_size: int = DEFAULT_CHUNK, device=None, index=None,
           progress: bool = False) -> SearchResult:
    """Top-``k`` rows of ``embeddings`` for each of ``queries`` (Q, D) (or (D,)).

    ``embeddings``: see :func:`open_embeddings`. ``score``: "cosine", or "probability" (needs
    ``logit_scale`` and ``logit_bias``: ``model.text_video_logit_scale`` / ``_bias``, as classify uses
    them). ``chunk_size``: rows scored at a time (the memory bound); ``device``: where (default: CUDA
    when available). ``index``: a :class:`pevideo.retrieval_faiss.FaissIndex` built over the same
    embeddings, searched instead of the exact scan (cosine only)."""
    if score not in ("cosine", "probability"):
        raise ValueError(f"score must be 'cosine' or 'probability', got {score!r}")
    if score == "probability" and (logit_scale is None or logit_bias is None):
        raise ValueError("score='probability' needs logit_scale and logit_bias (the model's)")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    source = open_embeddings(embeddings)
    q = _queries(queries)
    if source.dim and q.shape[1] != source.dim:
        raise ValueError(f"queries are {q.shape[1]} wide, the embeddings {source.dim}")
    if index is not None:
        if score != "cosine":
            raise ValueError("a FAISS index ranks by cosine; use score='cosine' or the exact search")
        vals, rows = index.search_rows(q, int(k), source)
    else:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vals, rows = _exact(source, q.to(dev), int(k), score, logit_scale, logit_bias, chunk_size, progress)
        if score == "probability":
            vals = torch.sigmoid(vals)
    vals, rows = vals.float().cpu(), rows.cpu()
    r = rows.numpy()
    paths = [[source.paths[i] if i >= 0 else None for i in row] for row in r.tolist()]  # -1: an index found less
    inputs = np.where(r >= 0, source.input_index[np.clip(r, 0, None)], -1) if len(source) else r.copy()
    return SearchResult(indices=rows, scores=vals, input_index=torch.from_numpy(inputs), paths=paths, score=score)


@torch.inference_mode()
def _exact(source, q, k, score, scale, bias, chunk_size, progress):
    dev = q.device
    if score == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best_s = torch.empty((q.shape[0], 0), device=dev)
    best_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(source), unit="row", unit_scale=True, desc="search")
    for rows, x in source.chunks(chunk_size):
        x = x.to(dev, torch.float32, non_blocking=True)
        if score == "cosine":
            norms = x.norm(dim=1)
            s = (q @ x.T) / norms.clamp_min(1e-12)  # no normalized copy of the chunk: one pass less
        else:
            norms = x.sum(dim=1)  # only to find rows holding NaN or infinity
            s = (q @ x.T) * scale + bias  # the logit; sigmoid (monotone) is applied to the top k only
        bad = ~torch.isfinite(norms)
        if bool(bad.any()):  # a damaged row never ranks first (topk takes NaN for the largest)
            s[:, bad] = float("-inf")
        cs, ci = _chunk_topk(s, torch.as_tensor(rows, device=dev), k)
        best_s, best_i = _merge(best_s, best_i, cs, ci, k)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return best_s, best_i
