"""Video files to uint8 frames, decoding only the frames asked for.

:func:`load_video` reads a file (or binary file object) with PyAV (the decoding itself is in
:mod:`pevideo._decode`). It first walks the container's
packets without decoding them (cheap) to learn every frame's presentation time, so the frame count is
exact even when the container's header is missing or wrong, and frame ``i`` always means the i-th frame
a decoder shows. It then decodes only what the chosen frames need: it seeks to the keyframe before a
frame when that skips work (MP4/MOV and Matroska/WebM, whose indexes make seeking exact), and stops
after the last one. Frames are converted to RGB with the same swscale call transformers uses.

Limits, so that one bad input cannot stall or swamp a run (each raises an error naming the file):

* Only regular files are opened: a FIFO, device or socket could block forever.
* Decoding one video may take at most ``time_limit`` seconds (default :data:`DEFAULT_TIME_LIMIT`, or
  the ``PEVIDEO_DECODE_TIME_LIMIT`` environment variable), checked between packets and frames
  (:class:`VideoTimeLimitError`).
* At most ``max_frames`` frames per clip (default :data:`MAX_FRAMES`, or ``PEVIDEO_MAX_FRAMES``).
* A truncated video is an error (:class:`TruncatedVideoError`), by the rule in
  :func:`check_complete`, rather than a clip made of the part that survived.
"""
from __future__ import annotations

import bisect
import math
import operator
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = [
    "load_video",
    "VideoMetadata",
    "TruncatedVideoError",
    "VideoTimeLimitError",
    "MAX_FRAMES",
    "DEFAULT_TIME_LIMIT",
]

# Frames one clip may take unless raised explicitly (max_frames=, or PEVIDEO_MAX_FRAMES): each sampled
# frame is held (at the model's size when resizing on decode) and encoded, so a typo like
# num_frames=100000 should fail at once rather than after minutes and gigabytes.
MAX_FRAMES = 512
# Seconds one video may take to decode (time_limit=, or PEVIDEO_DECODE_TIME_LIMIT).
DEFAULT_TIME_LIMIT = 600.0

# A video is truncated when its decodable frames end before the end its header declares by more than
# this share of the declared duration and more than this many frame intervals (see check_complete).
_TRUNCATED_SHARE = 0.10
_TRUNCATED_FRAMES = 2

# Keys under which transformers' own ``VideoMetadata`` knows these values; the mapping view below
# shows only these, so ``transformers.video_utils.VideoMetadata(**meta)`` accepts ours.
_UPSTREAM_KEYS = ("total_num_frames", "fps", "width", "height", "duration", "video_backend", "frames_indices")

@dataclass
class VideoMetadata(Mapping):
    """What :func:`load_video` learned about a video, and which frames it returned.

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
        source: the file, as named in errors.
        video_backend: always ``"pyav"``.

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


def load_video(
    path_or_file,
    num_frames: int | None = None,
    fps: float | None = None,
    *,
    size: tuple[int, int] | None = None,
    resample: str = "bilinear",
    apply_rotation: bool = False,
    max_frames: int | None = None,
    time_limit: float | None = None,
):
    """Decode a video into RGB frames.

    Args:
        path_or_file: a path (str or ``os.PathLike``) to a regular file, or a binary file object
            opened for reading.
        num_frames: take this many frames spread over the whole video, as transformers' PE Video
            processor samples: frame ``i`` is index ``int(i·(N−1)/(n−1))`` of the video's N frames
            (n = 1 takes frame 0; n > N repeats frames, as the formula does; a repeated frame is
            decoded once).
        fps: take frames at this rate: at times k/fps (k = 0, 1, … while k/fps < duration, measured
            from the first frame) the frame on screen at that time, i.e. the last frame that starts
            at or before it. Above the video's own rate frames repeat. At least one frame.
        With neither, every frame is returned. Giving both is an error.
        size: ``(height, width)``: resize each frame right after it is decoded (before the next is
            held), with the processor's resize (:func:`pevideo.processing.resize_uint8`: antialiased
            ``resample`` on uint8, as torchvision), so the result equals resizing the returned frames
            with the processor; None keeps the decoded size.
        resample: ``"bilinear"`` (PE Video's) or ``"bicubic"``, for ``size``.
        apply_rotation: rotate frames upright by the video's display matrix (``metadata.rotation``).
            Off by default, as transformers (upstream) decodes: frames come as stored.
        max_frames: the most frames one clip may take (default :data:`MAX_FRAMES`, or the
            ``PEVIDEO_MAX_FRAMES`` environment variable); more sampled frames is a ValueError.
        time_limit: seconds the whole decode may take (default :data:`DEFAULT_TIME_LIMIT`, or
            ``PEVIDEO_DECODE_TIME_LIMIT``; ``math.inf`` for none); past it, VideoTimeLimitError.

    Returns:
        ``(frames, metadata)``: ``frames`` a uint8 numpy array (T, H, W, 3), RGB (H, W = ``size``
        when given); ``metadata`` a :class:`VideoMetadata` (source fps, frame count, duration,
        rotation, and the indices taken). ``torch.from_numpy(frames)`` gives a tensor without a copy.

    Raises:
        FileNotFoundError: the path does not exist.
        TruncatedVideoError (a ValueError): the file is cut short (see :func:`check_complete`).
        VideoTimeLimitError (a TimeoutError): decoding took longer than ``time_limit``.
        ValueError: bad arguments, too many frames selected, a path that is not a regular file
            (FIFO, device, ...), or a file that is not a video, has no video stream or no frames, or
            is damaged. Messages name the file.
    """
    name = _source_name(path_or_file)
    n = _check_num_frames(num_frames, name)
    rate = _check_fps(fps, name)
    if n is not None and rate is not None:
        raise ValueError(f"{name}: give num_frames or fps, not both")
    cap = frame_cap(max_frames)
    if n is not None:
        check_frame_cap(n, cap, name)

    def select(total, times, duration, src_fps):
        if n is not None:
            return uniform_indices(total, n)
        if rate is not None:
            return fps_indices(times, duration, rate)
        return list(range(total))

    return _read_video(path_or_file, select, size=size, resample=resample, apply_rotation=apply_rotation,
                       max_frames=cap, time_limit=time_limit)


# --------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------
def _env_number(var, default, kind):
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{var} must be positive, got {raw!r}")
    return value


def frame_cap(max_frames: int | None = None) -> int:
    """The most frames one clip may take: ``max_frames`` if given, else ``PEVIDEO_MAX_FRAMES``, else
    :data:`MAX_FRAMES`."""
    if max_frames is None:
        return _env_number("PEVIDEO_MAX_FRAMES", MAX_FRAMES, int)
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
    return max_frames


def check_frame_cap(count: int, cap: int | None = None, name: str = "video") -> None:
    """ValueError when ``count`` frames are more than the cap (:func:`frame_cap`)."""
    cap = frame_cap() if cap is None else cap
    if count > cap:
        raise ValueError(
            f"{name}: {count} frames per clip is above the limit of {cap}; sample fewer (num_frames / fps), "
            "or raise the limit with max_frames= or the PEVIDEO_MAX_FRAMES environment variable"
        )


def _time_limit(time_limit) -> float:
    if time_limit is None:
        return _env_number("PEVIDEO_DECODE_TIME_LIMIT", DEFAULT_TIME_LIMIT, float)
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds (math.inf: none), got {time_limit!r}")
    return float(time_limit)


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

# --------------------------------------------------------------------------------------------------
# Sampling rules
# --------------------------------------------------------------------------------------------------
def uniform_indices(total: int, n: int) -> list[int]:
    """``int(i·(total−1)/(n−1))`` for i < n, as transformers' PE Video processor (n = 1 gives [0])."""
    if n == 1:
        return [0]
    return [int(i * (total - 1) / (n - 1)) for i in range(n)]  # the same float expression as upstream


def fps_indices(times: list[float], duration: float | None, fps: float) -> list[int]:
    """Frames on screen at times k/fps (k ≥ 0, k/fps < duration); ``times`` are the frames' start times."""
    count = 1
    if duration and duration > 0:
        count = max(1, math.ceil(duration * fps - 1e-9))
    out = []
    for k in range(count):
        t = k / fps
        # 1 µs of slack so that a frame starting exactly at t is not lost to float rounding.
        out.append(max(0, bisect.bisect_right(times, t + 1e-6) - 1))
    return out


def upstream_fps_indices(total: int, src_fps: float | None, fps: float, source: str = "video") -> list[int]:
    """transformers' default fps rule (``default_sample_indices_fn``), kept for processor parity."""
    if not src_fps:
        raise ValueError(
            f"{source}: sampling at fps={fps} needs the video's own frame rate, which is unknown; "
            "pass video_metadata with 'fps', or use num_frames"
        )
    n = max(1, int(total / src_fps * fps))
    if n > total:
        raise ValueError(
            f"{source}: fps={fps} asks for {n} frames but the video has only {total} "
            f"(at {src_fps:g} fps); lower fps or use num_frames"
        )
    return [int(i) for i in np.arange(n, dtype=int) * total // n]


def _check_num_frames(num_frames, name="video"):
    if num_frames is None:
        return None
    msg = f"{name}: num_frames must be a positive int, got {num_frames!r}"
    if isinstance(num_frames, bool):
        raise ValueError(msg)
    try:
        n = operator.index(num_frames)
    except TypeError:
        raise ValueError(msg) from None
    if n <= 0:
        raise ValueError(msg)
    return n


def _check_fps(fps, name="video"):
    if fps is None:
        return None
    msg = f"{name}: fps must be a positive finite number, got {fps!r}"
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)):
        raise ValueError(msg)
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(msg)
    return fps


# --------------------------------------------------------------------------------------------------
# Decoding: pevideo._decode does it (it imports this module; this one imports it only when decoding)
# --------------------------------------------------------------------------------------------------
def _source_name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else f"<{type(src).__name__} object>"


def _read_video(src, select: Callable, **options):
    """Open, index, pick frames with ``select(total, times, duration, fps) -> indices``, decode them.

    ``options``: ``size``, ``resample``, ``apply_rotation``, ``time_limit`` as :func:`load_video`;
    ``max_frames`` None means no cap. Returns ``(frames, VideoMetadata)``."""
    from ._decode import read_video

    return read_video(src, select, **options)
