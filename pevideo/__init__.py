"""pevideo: PE Video (Perception Encoder, video) inference, a drop-in for transformers' PeVideoModel.

``PeVideoModel.from_pretrained(path, fast=True)`` loads the same checkpoints as transformers and runs
the video tower through pevideo's fused Triton kernels where they can run.

The names below are imported on first use (PEP 562): ``import pevideo`` alone does not import torch
or transformers, so the ``pevideo`` command starts at once (and a Ctrl-C during its start-up is
handled like any other, see :mod:`pevideo.cli`).
"""
from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_HOME = {
    "PeVideoModel": ".modeling",
    "PeVideoEncoder": ".modeling",
    "PeVideoOutput": ".modeling",
    "kernel_report": ".modeling",
    "load_video": ".video",
    "VideoMetadata": ".video",
    "TruncatedVideoError": ".video",
    "VideoTimeLimitError": ".video",
    "VideoTooLargeError": ".video",
    "UnsupportedVideoError": ".video",
    "PeVideoVideoProcessor": ".processing",
    "PeVideoProcessor": ".processing",
    "PeVideoKernelFallbackWarning": ".dispatch",
    "PeVideoCompatibilityWarning": ".dropin",
    "CheckpointMismatchError": ".errors",
    "CheckpointConfigError": ".errors",
    "Normalization": ".normalization",
    "PevideoError": ".errors",
    "UsageError": ".errors",
    "search": ".retrieval",
    "SearchResult": ".retrieval",
    "FaissIndex": ".retrieval_faiss",  # FAISS itself is imported only when an index is built or loaded
    # the embedding pipeline's API (pevideo.embed.__all__)
    **{name: ".embed" for name in (
        "embed_videos", "embed_to_file", "classify_videos", "read_embeddings", "merge_shards", "expand_inputs",
        "load_model", "ClipResult", "ClassifyResult", "Embeddings", "EmbedSummary", "PipelineStats",
        "ManifestMismatchError", "StoreError", "OutputPathError", "OutputLockedError", "DamagedOutputError",
        "ShardsMissingError",
    )},
}

__all__ = list(_HOME)


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: pevideo.dispatch, ...
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'pevideo' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
