"""pevideo: PE Video (Perception Encoder, video) inference, a drop-in for transformers' PeVideoModel.

``PeVideoModel.from_pretrained(path, fast=True)`` loads the same checkpoints as transformers and runs
the video tower through pevideo's fused Triton kernels where they can run.
"""
from .dispatch import PeVideoKernelFallbackWarning
from .errors import PevideoError, UsageError
from .dropin import PeVideoCompatibilityWarning
from .errors import CheckpointConfigError, CheckpointMismatchError
from .modeling import PeVideoEncoder, PeVideoModel, PeVideoOutput, kernel_report
from .embed import *  # noqa: F403 (the embedding pipeline's API, listed in pevideo.embed.__all__)
from .embed import __all__ as _embed_all
from .processing import PeVideoProcessor, PeVideoVideoProcessor
from .normalization import Normalization
from .video import (
    TruncatedVideoError,
    UnsupportedVideoError,
    VideoMetadata,
    VideoTimeLimitError,
    VideoTooLargeError,
    load_video,
)
from .retrieval import SearchResult, search
from .retrieval_faiss import FaissIndex  # FAISS itself is imported only when an index is built or loaded

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
    "PeVideoKernelFallbackWarning",
    "CheckpointMismatchError",
    "CheckpointConfigError",
    "PeVideoCompatibilityWarning",
    "Normalization",
    "PevideoError",
    "UsageError",
    "TruncatedVideoError",
    "VideoTimeLimitError",
    "VideoTooLargeError",
    "UnsupportedVideoError",
    "search",
    "SearchResult",
    "FaissIndex",
    *_embed_all,
]
