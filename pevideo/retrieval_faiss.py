"""An approximate index for :func:`pevideo.search` over very large embedding sets: FAISS
(``pip install 'pevideo[faiss]'``), by cosine (inner product of L2-normalized rows).

::

    idx = FaissIndex.build("emb.safetensors")             # IVF (k-means cells), exact within each cell
    idx.save("emb.faiss")                                  # + emb.faiss.json (what it was built from)
    pevideo.search("emb.safetensors", queries, 10, index=FaissIndex.load("emb.faiss"))

The index holds row numbers of the embeddings it was built from, and refuses (ValueError) other
embeddings (another row count or run). ``nprobe`` cells are searched per query: more is slower and
closer to exact (``bench/bench_search.py`` reports recall@10 against the exact search). A query can get
fewer than k rows when the cells searched hold fewer: the missing ones have index -1, score -inf and
path None.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import torch

from .retrieval import DEFAULT_CHUNK, open_embeddings

__all__ = ["FaissIndex", "default_factory"]


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("the approximate index needs FAISS: pip install 'pevideo[faiss]' (faiss-cpu)") from None
    return faiss


def _identity(source) -> str:
    """What an index must be searched with: the row count and the run's fingerprint (when known)."""
    cfg = json.dumps(source.config or {}, sort_keys=True)
    return hashlib.sha256(f"{len(source)}|{source.dim}|{cfg}".encode()).hexdigest()


def default_factory(n: int) -> str:
    """``IVF<nlist>,Flat`` with about 4·sqrt(n) cells (a power of two, at least 39 rows a cell to train),
    or ``Flat`` (exact) for small sets."""
    nlist = 2 ** int(round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return "Flat" if nlist < 16 else f"IVF{nlist},Flat"


def _normalized(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return np.ascontiguousarray((x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy())


class FaissIndex:
    """A FAISS index over the rows of one embeddings output (see the module docstring)."""

    def __init__(self, index, identity: str, count: int, factory: str, nprobe: int = 16):
        self.index, self.identity, self.count, self.factory = index, identity, count, factory
        self.nprobe = nprobe

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = int(value)
        ivf = _faiss().try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = self._nprobe

    @classmethod
    def build(cls, embeddings, *, factory: str | None = None, nprobe: int = 16, train_rows: int | None = None,
              chunk_size: int = DEFAULT_CHUNK, seed: int = 0) -> "FaissIndex":
        """Build over ``embeddings`` (anything :func:`pevideo.retrieval.open_embeddings` takes), read a chunk
        at a time. ``factory``: a FAISS index factory string (default :func:`default_factory`);
        ``train_rows``: rows sampled (seeded) to train it (default 64 per IVF cell, at most all)."""
        faiss = _faiss()
        source = open_embeddings(embeddings)
        n, d = len(source), source.dim
        if n == 0:
            raise ValueError("no embeddings to index")
        factory = factory or default_factory(n)
        index = faiss.IndexIDMap2(faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT))
        if not index.is_trained:
            ivf = faiss.try_extract_index_ivf(index)
            want = min(n, train_rows or 64 * (ivf.nlist if ivf is not None else 256))
            pick = np.sort(np.random.default_rng(seed).choice(n, size=want, replace=False))
            parts = []
            for rows, x in source.chunks(chunk_size):
                sel = np.isin(rows, pick)
                if sel.any():
                    parts.append(_normalized(x[torch.from_numpy(sel)]))
            index.train(np.concatenate(parts))
        for rows, x in source.chunks(chunk_size):
            index.add_with_ids(_normalized(x), np.ascontiguousarray(rows, dtype=np.int64))
        return cls(index, _identity(source), n, factory, nprobe)

    def search_rows(self, q: torch.Tensor, k: int, source) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rows) (Q, k) of the queries ``q`` (Q, D); ``source``: the embeddings it was built from."""
        if len(source) != self.count or _identity(source) != self.identity:
            raise ValueError(f"this index was built from other embeddings ({self.count} rows; these have "
                             f"{len(source)}, or come from another run): build it again")
        scores, rows = self.index.search(_normalized(q.cpu()), int(k))
        scores = torch.from_numpy(scores)
        scores[torch.from_numpy(rows) < 0] = float("-inf")
        return scores, torch.from_numpy(rows)

    def save(self, path) -> None:
        """``path`` (the FAISS index) and ``path.json`` (what it was built from, its settings)."""
        faiss = _faiss()
        p = os.fspath(path)
        faiss.write_index(self.index, p)
        with open(p + ".json", "w", encoding="utf-8") as f:
            json.dump({"identity": self.identity, "count": self.count, "factory": self.factory,
                       "nprobe": self.nprobe}, f, indent=2)

    @classmethod
    def load(cls, path, nprobe: int | None = None) -> "FaissIndex":
        faiss = _faiss()
        p = os.fspath(path)
        with open(p + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        return cls(faiss.read_index(p), meta["identity"], int(meta["count"]), meta["factory"],
                   nprobe if nprobe is not None else int(meta["nprobe"]))
