"""What a decode learned about a video (:class:`VideoMetadata`), the errors a video can be refused
with, and the rule that calls a file truncated (:func:`check_complete`).

A leaf module: it imports nothing of pevideo.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

__all__ = ["VideoMetadata", "TruncatedVideoError", "VideoTimeLimitError", "UnsupportedVideoError", "check_complete",
           "source_name"]

# A video is truncated when its decodable frames end before the end its header declares by more than
# this share of the declared duration and more than this many frame intervals (see check_complete).
_TRUNCATED_SHARE = 0.10
_TRUNCATED_FRAMES = 2

# Keys under which transformers' own ``VideoMetadata`` knows these values; the mapping view below
# shows only these, so ``transformers.video_utils.VideoMetadata(**meta)`` accepts ours.
_UPSTREAM_KEYS = ("total_num_frames", "fps", "width", "height", "duration", "video_backend", "frames_indices")


@dataclass
class VideoMetadata(Mapping):
    """What :func:`pevideo.load_video` learned about a video, and which frames it returned.

    Attributes:
        total_num_frames: frames in the video (counted from the file's packets, not taken on trust
            from its header).
        fps: the stream's average frame rate (as transformers reads it), or the rate the frame times
            imply when the container gives none; None if unknown.
        width, height: size in pixels of the decoded frames (after the rotation when it was
            applied; before any resize on decode).
        duration: seconds from the first frame's start to the last frame's end.
        frames_indices: index (0 … total_num_frames − 1) of each returned frame, in order.
        timestamps: presentation time of each returned frame, in seconds from the first frame.
        declared_num_frames: the frame count the container header claims (0 when it gives none).
        rotation: degrees (0, 90, 180 or 270) by which the video's display matrix says to rotate
            the frames counterclockwise to show them upright (what ffprobe prints as "rotation of
            −90 degrees" is 270 here); ``rotation_applied`` says whether the returned frames are.
        truncated_suspect: None, or why the file may be cut short although nothing declares its length
            (an MPEG-TS file that ends inside a transport packet): the frames returned are all the
            file has, but perhaps not all the video had. Not an error; filter on it if it matters.
        source: the file, as named in errors.
        video_backend: ``"pyav"`` (``"array"`` for frames given in memory).

    It is also a read-only mapping of transformers' ``VideoMetadata`` fields (``total_num_frames``,
    ``fps``, ``width``, ``height``, ``duration``, ``video_backend``, ``frames_indices``), so it can be
    passed as ``video_metadata`` to transformers' processors as well as to ours.
    """

    total_num_frames: int
    fps: float | None
    width: int
    height: int
    duration: float | None
    frames_indices: list[int]
    timestamps: list[float] = field(default_factory=list)
    declared_num_frames: int = 0
    rotation: int = 0
    rotation_applied: bool = False
    truncated_suspect: str | None = None
    source: str = ""
    video_backend: str = "pyav"

    def __getitem__(self, key):
        if key not in _UPSTREAM_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_UPSTREAM_KEYS)

    def __len__(self):
        return len(_UPSTREAM_KEYS)

    def __repr__(self):
        vals = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "timestamps")
        return f"VideoMetadata({vals})"


class TruncatedVideoError(ValueError):
    """The file ends well before the duration or frame count its header declares (see :func:`check_complete`)."""


class VideoTimeLimitError(TimeoutError):
    """Decoding one video took longer than its time limit."""


class UnsupportedVideoError(ValueError):
    """FFmpeg (as PyAV ships it) cannot decode this codec, or not at this frame size: the file is not
    damaged, this build cannot read it."""


def source_name(src) -> str:
    """A path or file object as errors name it."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else f"<{type(src).__name__} object>"


def check_complete(name: str, declared_end: float | None, decoded_end: float, start: float, fps: float | None):
    """Raise :class:`TruncatedVideoError` when the file is cut short.

    The rule: where the header declares the video's length (the video stream's own duration, its
    Matroska ``DURATION`` tag, or, for a file holding only this stream, the container's duration),
    the decodable frames must reach its end, give or take 10% of the declared duration or two frame
    intervals, whichever is more. Times are seconds on the stream's clock: ``start`` the first frame's
    start, ``decoded_end`` the last decodable frame's end, ``declared_end`` start + declared duration.
    """
    if declared_end is None or not math.isfinite(declared_end):
        return
    declared = declared_end - start
    if declared <= 0:
        return
    slack = max(_TRUNCATED_SHARE * declared, _TRUNCATED_FRAMES / fps if fps else 0.0)
    if declared_end - decoded_end > slack:
        raise TruncatedVideoError(
            f"{name}: the file looks truncated: its header says the video lasts {declared:.3f} s but its "
            f"frames end after {max(0.0, decoded_end - start):.3f} s"
        )
