"""pevideo: PE Video (Perception Encoder, video) inference, a drop-in for transformers' PeVideoModel.

``PeVideoModel.from_pretrained(path, fast=True)`` loads the same checkpoints as transformers and runs
the video tower through pevideo's fused Triton kernels where they can run.
"""
from .dispatch import PeVideoKernelFallbackWarning
from .loading import CheckpointMismatchError
from .modeling import PeVideoEncoder, PeVideoModel, PeVideoOutput, kernel_report
from .embed import (
    ClassifyResult,
    ClipResult,
    Embeddings,
    EmbedSummary,
    ManifestMismatchError,
    PipelineStats,
    classify_videos,
    embed_to_file,
    embed_videos,
    expand_inputs,
    merge_shards,
    read_embeddings,
)
from .processing import PeVideoProcessor, PeVideoVideoProcessor
from .video import VideoMetadata, load_video

__version__ = "0.1.0"

__all__ = [
    "PeVideoModel",
    "PeVideoEncoder",
    "PeVideoOutput",
    "kernel_report",
    "load_video",
    "VideoMetadata",
    "PeVideoVideoProcessor",
    "PeVideoProcessor",
    "embed_videos",
    "embed_to_file",
    "classify_videos",
    "read_embeddings",
    "merge_shards",
    "expand_inputs",
    "ClipResult",
    "ClassifyResult",
    "Embeddings",
    "EmbedSummary",
    "PipelineStats",
    "ManifestMismatchError",
    "PeVideoKernelFallbackWarning",
    "CheckpointMismatchError",
]
