"""Video files to uint8 frames, decoding only the frames asked for.

:func:`load_video` reads a file (or binary file object) with PyAV. It first walks the container's
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
import stat
import time
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

# Seek only past at least this many frames: a seek flushes the decoder, and the frames it had
# buffered ahead are decoded again.
_MIN_SKIP = 12

# Containers whose seek lands on the keyframe it is asked for (index based). Others (MPEG-TS, raw
# streams, ...) seek by bisecting the file, so they are decoded from the start.
_SEEKABLE_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm")


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


_clock = time.monotonic  # a name of its own, for tests


class _Deadline:
    """Raises VideoTimeLimitError once ``limit`` seconds have passed since it was made."""

    def __init__(self, limit: float, name: str):
        self.limit, self.name = limit, name
        self.end = _clock() + limit if math.isfinite(limit) else math.inf

    def check(self) -> None:
        if _clock() > self.end:
            raise VideoTimeLimitError(
                f"{self.name}: decoding took longer than its time limit of {self.limit:g} s; the file may be "
                "damaged or very long (raise the limit with time_limit= or PEVIDEO_DECODE_TIME_LIMIT)"
            )


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
# Decoding
# --------------------------------------------------------------------------------------------------
def _source_name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else f"<{type(src).__name__} object>"


def _check_path(path: str) -> None:
    """Refuse what is not a regular file before opening it: opening a FIFO waits for a writer, and
    reading a device or socket may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"video file not found: {path}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a directory, not a video file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise ValueError(f"{path} is {kind}, not a video file; only regular files are read")


def _open(src, name):
    import av

    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if "://" not in path:
            _check_path(path)
        target = path
    else:
        if not hasattr(src, "read"):
            raise ValueError(f"expected a path or a binary file object, got {type(src).__name__}")
        if hasattr(src, "seek"):
            src.seek(0)
        target = src
    try:
        return av.open(target, mode="r", metadata_errors="ignore")
    except Exception as exc:  # FFmpeg's errors (InvalidData, EOF, ...) and PyAV's own
        raise ValueError(
            f"{name}: cannot open as a video ({type(exc).__name__}: {exc}); "
            "it may not be a video file, or may be damaged or truncated"
        ) from exc


def _video_stream(container, name):
    streams = container.streams.video
    if len(streams) == 0:
        raise ValueError(f"{name}: has no video stream; it may not be a video, or may be damaged or truncated")
    return streams[0]


@dataclass
class _Index:
    pts: list[int] | None  # presentation times (stream time base), sorted; None: not usable
    keyframes: list[int]  # pts of keyframes, sorted
    durations: list[int]  # packet durations in presentation order (0 = unknown)
    count: int  # frames (packets holding a frame)
    declared: int  # what the header claims


def _index_packets(container, stream, name, deadline) -> _Index:
    """Walk the video packets without decoding: frame count, presentation times, keyframes."""
    import av

    declared = int(stream.frames or 0)
    recs = []
    packets = 0
    try:
        for pkt in container.demux(stream):
            deadline.check()
            if pkt.size == 0:
                continue  # the flush packet at the end
            packets += 1
            if getattr(pkt, "is_discard", False):
                continue  # dropped by an edit list: the decoder never shows it
            recs.append((pkt.pts, bool(pkt.is_keyframe), int(pkt.duration or 0)))
    except av.error.FFmpegError as exc:
        raise ValueError(f"{name}: the file is damaged or truncated (reading packets failed: {exc})") from exc
    count = len(recs)
    if declared > 0 and packets < declared:
        raise TruncatedVideoError(
            f"{name}: the file looks truncated: its header lists {declared} frames but only {packets} are in the file"
        )
    pts = [r[0] for r in recs]
    if any(p is None for p in pts) or len(set(pts)) != len(pts):
        return _Index(None, [], [], count, declared)  # no usable timestamps: decode in order instead
    order = sorted(range(count), key=pts.__getitem__)
    return _Index(
        pts=[pts[i] for i in order],
        keyframes=sorted(p for p, key, _ in recs if key),
        durations=[recs[i][2] for i in order],
        count=count,
        declared=declared,
    )


def _rate(stream):
    for r in (stream.average_rate, getattr(stream, "guessed_rate", None)):
        if r:
            return float(r)
    return None


def _parse_hms(text) -> float | None:
    """Matroska's per-track ``DURATION`` tag, ``HH:MM:SS.nnnnnnnnn``, in seconds."""
    try:
        h, m, sec = str(text).strip().split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return None


def _declared_end(container, stream) -> float | None:
    """Where the header says the video ends, in seconds on the stream's clock (None: it does not say).

    The video stream's own duration, else its Matroska ``DURATION`` tag, else the container's
    duration when the video is the file's only stream (otherwise that is the longest stream's)."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else None
    if stream.duration and tb:
        return (start or 0.0) + float(stream.duration * tb)
    tag = _parse_hms(stream.metadata.get("DURATION")) if "DURATION" in stream.metadata else None
    if tag:
        return (start or 0.0) + tag
    if len(container.streams) == 1 and container.duration:
        c_start = container.start_time / 1e6 if container.start_time is not None else (start or 0.0)
        return c_start + container.duration / 1e6
    return None


@dataclass
class _Probe:
    index: _Index
    time_base: object  # fractions.Fraction
    fps: float | None
    seekable: bool
    declared_end: float | None  # seconds on the stream's clock; see _declared_end


def _probe(src, name, deadline) -> _Probe:
    container = _open(src, name)
    try:
        stream = _video_stream(container, name)
        index = _index_packets(container, stream, name, deadline)
        if stream.time_base is None:
            index.pts = None  # timestamps without a unit: decode in order
        # Read everything needed now: a stream object is not usable once its container is closed.
        fmt = set((container.format.name or "").split(","))
        return _Probe(index, stream.time_base, _rate(stream), bool(fmt & set(_SEEKABLE_FORMATS)),
                      _declared_end(container, stream))
    finally:
        container.close()


class _Fallback(Exception):
    """Frames did not come out as the packet index said (odd timestamps, a seek that missed, a packet
    that decodes to nothing): decode in order and count frames as the decoder shows them."""


def _read_video(src, select: Callable, *, size=None, resample="bilinear", apply_rotation=False, max_frames=None,
                time_limit=None):
    """Open, index, pick frames with ``select(total, times, duration, fps) -> indices``, decode them.

    Options as :func:`load_video`, except ``max_frames``: None means no cap here."""
    name = _source_name(src)
    deadline = _Deadline(_time_limit(time_limit), name)
    frames = _Frames(name, size, resample, bool(apply_rotation), max_frames)
    probe = _probe(src, name, deadline)
    if probe.index.count == 0:
        raise ValueError(f"{name}: the video has no frames")
    if probe.index.pts is not None:
        for seek in ((True, False) if probe.seekable else (False,)):
            try:
                return _read_by_pts(src, name, probe, select, seek, frames.reset(), deadline)
            except _Fallback:
                continue
    return _read_in_order(src, name, probe, select, frames.reset(), deadline)


def _rotation(frame) -> int:
    """Counterclockwise degrees the frame's display matrix asks for, in [0, 360)."""
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


class _Frames:
    """The decoded frames kept, keyed by frame: converted to RGB, rotated and resized as each comes out
    of the decoder, so only the kept frames, at their final size, are ever held."""

    def __init__(self, name, size, resample, apply_rotation, max_frames):
        self.name, self.apply_rotation, self.max_frames = name, apply_rotation, max_frames
        self.size = None if size is None else _size_hw(size)
        if resample not in ("bilinear", "bicubic"):
            raise ValueError(f"resample must be 'bilinear' or 'bicubic', got {resample!r}")
        self.resample = resample

    def reset(self) -> "_Frames":
        self.got, self.src_size, self.rotation, self.shown = {}, None, 0, None
        return self

    def check_count(self, indices, total):
        out = [int(i) for i in indices]
        if not out:
            raise ValueError(f"{self.name}: no frames selected")
        bad = [i for i in out if not 0 <= i < total]
        if bad:
            raise ValueError(f"{self.name}: frame indices {bad[:5]} are outside the video's {total} frames")
        if self.max_frames is not None:
            check_frame_cap(len(out), self.max_frames, self.name)
        return out

    def take(self, key, frame) -> None:
        if self.src_size is None:
            self.src_size, self.rotation = (frame.height, frame.width), _rotation(frame)
            if self.apply_rotation and self.rotation % 90:
                raise ValueError(f"{self.name}: its rotation of {self.rotation} degrees is not a multiple of 90; "
                                 "it cannot be applied (decode with apply_rotation=False)")
        elif (frame.height, frame.width) != self.src_size:
            # The stream changed size mid-way: bring the frame to the first kept frame's size.
            frame = frame.reformat(width=self.src_size[1], height=self.src_size[0])
        arr = frame.to_ndarray(format="rgb24")
        if self.apply_rotation and self.rotation:
            arr = np.ascontiguousarray(np.rot90(arr, self.rotation // 90))  # counterclockwise, as np.rot90
        if self.shown is None:
            self.shown = arr.shape[:2]
        if self.size is not None:
            arr = _resize(arr, self.size, self.resample)
        self.got[key] = arr

    def assemble(self, indices, key_of) -> np.ndarray:
        first = self.got[key_of(indices[0])]
        out = np.empty((len(indices), *first.shape), dtype=np.uint8)
        for pos, i in enumerate(indices):
            out[pos] = self.got[key_of(i)]  # a repeated index is one decoded frame, copied
        return out

    def metadata(self, frames_indices, times, total, fps, duration, declared) -> VideoMetadata:
        return VideoMetadata(
            total_num_frames=total,
            fps=fps,
            width=int(self.shown[1]),
            height=int(self.shown[0]),
            duration=duration,
            frames_indices=frames_indices,
            timestamps=[times[i] for i in frames_indices],
            declared_num_frames=declared,
            rotation=self.rotation,
            rotation_applied=self.apply_rotation and self.rotation != 0,
            source=self.name,
        )


def _size_hw(size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {h}x{w}")
    return h, w


def _resize(arr: np.ndarray, size, mode) -> np.ndarray:
    """One (H, W, 3) uint8 frame resized by the processor's resize (the same op, the same values)."""
    import torch

    from .processing import resize_uint8  # here: processing imports this module

    frame = torch.from_numpy(arr).permute(2, 0, 1)[None]  # (1, 3, H, W), as the processor views clips
    return resize_uint8(frame, size, mode)[0].permute(1, 2, 0).numpy()


def _decode_error(name, exc):
    return ValueError(f"{name}: decoding failed ({type(exc).__name__}: {exc}); the file may be damaged or truncated")


def _read_by_pts(src, name, probe, select, seek, kept, deadline):
    import av

    index, tb = probe.index, probe.time_base
    t0 = index.pts[0]
    times = [float((p - t0) * tb) for p in index.pts]
    fps = probe.fps
    if fps is None and index.count > 1 and times[-1] > 0:
        fps = (index.count - 1) / times[-1]
    last = index.durations[-1]
    last_s = float(last * tb) if last > 0 else (1.0 / fps if fps else 0.0)
    duration = times[-1] + last_s
    check_complete(name, probe.declared_end, float(t0 * tb) + duration, float(t0 * tb), fps)
    indices = kept.check_count(select(index.count, times, duration, fps), index.count)

    targets = sorted({index.pts[i] for i in indices})
    keyframes = index.keyframes
    container = _open(src, name)
    try:
        stream = container.streams.video[0]
        frames_iter = None
        position = {p: i for i, p in enumerate(index.pts)}
        next_pos = 0  # index of the next frame the decoder will show
        for t in targets:
            k = bisect.bisect_right(keyframes, t) - 1
            kf = keyframes[k] if k >= 0 else None
            # Seek when that skips enough frames to pay for flushing the decoder: the target's
            # keyframe lies well beyond the next frame decoding on would give.
            expect = None
            if seek and kf is not None and position[kf] - next_pos >= _MIN_SKIP:
                try:
                    container.seek(kf, stream=stream, backward=True, any_frame=False)
                except av.error.FFmpegError:
                    raise _Fallback from None
                frames_iter = container.decode(stream)
                expect = kf
            elif frames_iter is None:
                frames_iter = container.decode(stream)
            for frame in frames_iter:
                deadline.check()
                if frame.pts is None:
                    raise _Fallback
                if expect is not None and frame.pts != expect:
                    raise _Fallback  # the seek did not land on the keyframe asked for
                expect = None
                if frame.pts not in position:
                    raise _Fallback
                next_pos = position[frame.pts] + 1
                if frame.pts == t:
                    kept.take(t, frame)
                    break
                if frame.pts > t:
                    raise _Fallback  # the target never came out of the decoder
            else:
                raise _Fallback  # the stream ended before the target
    except av.error.FFmpegError as exc:
        raise _decode_error(name, exc) from exc
    finally:
        container.close()

    frames = kept.assemble(indices, lambda i: index.pts[i])
    return frames, kept.metadata(indices, times, index.count, fps, duration, index.declared)


def _read_in_order(src, name, probe, select, kept, deadline):
    """Frame i is the i-th frame the decoder shows: count them in a first pass, collect in a second."""
    import av

    container = _open(src, name)
    stamps = []
    try:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            deadline.check()
            stamps.append(frame.time)
    except av.error.FFmpegError as exc:
        raise _decode_error(name, exc) from exc
    finally:
        container.close()
    total = len(stamps)
    if total == 0:
        raise ValueError(f"{name}: the video has no decodable frames")
    fps = probe.fps
    if all(s is not None for s in stamps):
        times = [s - stamps[0] for s in stamps]
        if fps is None and total > 1 and times[-1] > 0:
            fps = (total - 1) / times[-1]
    elif fps:
        times = [i / fps for i in range(total)]
    else:
        times = None
    duration = (times[-1] + (1.0 / fps if fps else 0.0)) if times is not None else None
    if duration is not None and stamps[0] is not None:
        check_complete(name, probe.declared_end, stamps[0] + duration, stamps[0], fps)
    if times is None:
        times = [0.0] * total  # only fps sampling needs times, and it cannot work without a rate

    indices = kept.check_count(select(total, times, duration, fps), total)
    wanted = set(indices)
    stop = max(wanted)
    container = _open(src, name)
    try:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            deadline.check()
            if i in wanted:
                kept.take(i, frame)
            if i >= stop:
                break
    except av.error.FFmpegError as exc:
        raise _decode_error(name, exc) from exc
    finally:
        container.close()
    if len(kept.got) != len(wanted):
        missing = sorted(wanted - set(kept.got))[:5]
        raise ValueError(f"{name}: the video changed between two reads (frames {missing} missing)")

    frames = kept.assemble(indices, lambda i: i)
    return frames, kept.metadata(indices, times, total, fps, duration, probe.index.declared)
