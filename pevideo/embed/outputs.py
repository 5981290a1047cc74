"""Reading and joining any embedding output: what ``pevideo embed`` writes (safetensors, :mod:`.reading`,
:mod:`.merging`) or
what ``pevideo embed --engine ray`` / a Ray Data pipeline writes (Parquet, :mod:`.parquet`), told apart
by :func:`pevideo.embed.parquet.is_parquet_output`. ``pevideo.read_embeddings`` and ``pevideo merge``
are these two functions."""
from __future__ import annotations

from . import merging, reading
from .parquet import is_parquet_output

__all__ = ["read_embeddings", "merge_shards"]


def read_embeddings(path, *, partial: bool = False) -> reading.Embeddings:
    """An embedding run's output, in input order, checked. A ``.safetensors`` file or a folder of
    shards: see :func:`pevideo.embed.reading.read_embeddings` (``partial=True``: what is finished of a
    run still writing it, or of an interrupted one). A Parquet output (a folder of ``.parquet`` files,
    or one): one row per input, duplicates left by retried work resolved, a run's manifest checked
    (:func:`pevideo.embed.parquet.read_parquet_embeddings`; ``partial`` does not apply)."""
    if is_parquet_output(path):
        from .parquet import read_parquet_embeddings

        return read_parquet_embeddings(path)
    return reading.read_embeddings(path, partial=partial)


def merge_shards(out, *, keep_shards: bool | None = None, errors=None) -> merging.EmbedSummary:
    """Join an output's pieces: the shards of a safetensors run (:func:`pevideo.embed.merging.merge_shards`),
    or a Parquet folder's files into ``embeddings.parquet``, one row per input, in input order
    (:func:`pevideo.embed.ray_run.merge_parquet`)."""
    if is_parquet_output(out):
        from .ray_run import merge_parquet

        return merge_parquet(out, keep_shards=keep_shards, errors=errors)
    return merging.merge_shards(out, keep_shards=keep_shards, errors=errors)
