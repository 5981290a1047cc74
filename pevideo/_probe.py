"""The first, cheap half of a decode: open the file, walk its video packets without decoding them, and
read what its header declares (:func:`probe`). The decode (:mod:`pevideo._decode`) then picks frames
from what this found.

Everything runs against one deadline (:class:`Deadline`), checked between packets.
"""
from __future__ import annotations

import math
import os
import stat
import time
from dataclasses import dataclass

from .metadata import TruncatedVideoError, VideoTimeLimitError

__all__ = ["probe", "Probe", "Deadline", "open_container"]

# Containers whose seek lands on the keyframe it is asked for (index based). Others (MPEG-TS, raw
# streams, ...) seek by bisecting the file, so they are decoded from the start.
_SEEKABLE_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm")

# MPEG-TS packet sizes (plain, M2TS with a 4-byte timestamp prefix, with Reed-Solomon bytes).
_TS_PACKET_SIZES = (188, 192, 204)
_TS_SYNC = 0x47

_clock = time.monotonic  # a name of its own, for tests


class Deadline:
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


def _open_options(av) -> dict:
    """``av.open``'s options: PyAV before 19 raises on metadata that is not UTF-8 unless told to ignore it;
    PyAV 19 dropped the option (and a call naming it raises TypeError for every file)."""
    try:
        major = int(str(av.__version__).split(".")[0])
    except ValueError:
        major = 0
    return {"metadata_errors": "ignore"} if major < 19 else {}


def open_container(src, name):
    """``av.open`` on a path (a regular file) or a binary file object (rewound); ValueError naming the
    file when FFmpeg cannot open it."""
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
        import av
    except ImportError as exc:
        raise ImportError(f"{name}: decoding video files needs PyAV (pip install av): {exc}") from exc
    try:
        return av.open(target, mode="r", **_open_options(av))
    except Exception as exc:  # FFmpeg's errors (InvalidData, EOF, ...) and PyAV's own
        raise ValueError(
            f"{name}: cannot open as a video ({type(exc).__name__}: {exc}); "
            "it may not be a video file, or may be damaged or truncated"
        ) from exc


def _video_stream(container, name):
    streams = container.streams.video
    if len(streams) == 0:
        if len(container.streams) == 0:
            raise ValueError(f"{name}: the file holds no streams at all (a video file with no frames in it, or a "
                             "damaged one)")
        raise ValueError(f"{name}: has no video stream (only {len(container.streams)} other stream(s)); it may not "
                         "be a video, or may be damaged or truncated")
    return streams[0]


@dataclass
class Index:
    pts: list[int] | None  # presentation times (stream time base), sorted; None: not usable
    keyframes: list[int]  # pts of keyframes, sorted
    durations: list[int]  # packet durations in presentation order (0 = unknown)
    count: int  # frames (packets holding a frame)
    declared: int  # what the header claims


def _index_packets(container, stream, name, deadline) -> Index:
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
        return Index(None, [], [], count, declared)  # no usable timestamps: decode in order instead
    order = sorted(range(count), key=pts.__getitem__)
    return Index(
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
    duration when the video is the file's only stream (otherwise that is the longest stream's).
    Matroska's durations count from time 0, the others from the stream's start: for those two, the
    earlier of both readings is taken, so that a stream starting late is never taken for a cut one."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if stream.duration and tb:
        return start + float(stream.duration * tb)
    tag = _parse_hms(stream.metadata.get("DURATION")) if "DURATION" in stream.metadata else None
    if tag:
        return min(start + tag, max(start, tag))
    if len(container.streams) == 1 and container.duration:
        c_start = container.start_time / 1e6 if container.start_time is not None else start
        length = container.duration / 1e6
        return min(c_start + length, max(c_start, length))
    return None


def _head_and_size(src) -> tuple[bytes, int] | None:
    """The first bytes of the file and its size, or None when they cannot be read cheaply."""
    try:
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                return f.read(1024), os.fstat(f.fileno()).st_size
        if hasattr(src, "seek") and hasattr(src, "tell"):
            src.seek(0)
            head = src.read(1024)
            size = src.seek(0, os.SEEK_END)
            src.seek(0)
            return bytes(head), int(size)
    except (OSError, ValueError, TypeError):
        pass
    return None


def ts_truncated_suspect(src, name) -> str | None:
    """MPEG-TS declares no length, so a cut file cannot be told from a short one by its header, and its
    bitrate-based duration scales with what is left (FFmpeg estimates it from this very file). What a
    cut leaves is a file that ends inside a transport packet: its size is not a whole number of the
    packets it is made of. Returns the reason, or None."""
    got = _head_and_size(src)
    if got is None:
        return None
    head, size = got
    for p in _TS_PACKET_SIZES:
        for off in (0, 4):  # M2TS: 4 bytes of timestamp before each sync byte
            if len(head) >= off + 3 * p and all(head[off + k * p] == _TS_SYNC for k in range(3)):
                if size % p:
                    return (f"{name}: the file ends inside a transport packet ({size} bytes is not a whole "
                            f"number of {p}-byte packets): it may be cut short")
                return None
    return None


@dataclass
class Probe:
    index: Index
    time_base: object  # fractions.Fraction
    fps: float | None
    seekable: bool
    declared_end: float | None  # seconds on the stream's clock; see _declared_end
    size: tuple[int, int] | None  # (height, width) the header gives the frames; None: unknown
    codec: str
    truncated_suspect: str | None


def probe(src, name, deadline) -> Probe:
    container = open_container(src, name)
    try:
        stream = _video_stream(container, name)
        index = _index_packets(container, stream, name, deadline)
        if stream.time_base is None:
            index.pts = None  # timestamps without a unit: decode in order
        # Read everything needed now: a stream object is not usable once its container is closed.
        fmt = set((container.format.name or "").split(","))
        cc = stream.codec_context
        size = (int(cc.height), int(cc.width)) if cc.height and cc.width else None
        result = Probe(index, stream.time_base, _rate(stream), bool(fmt & set(_SEEKABLE_FORMATS)),
                       _declared_end(container, stream), size, str(cc.name or "unknown codec"), None)
    finally:
        container.close()
    if "mpegts" in fmt:
        result.truncated_suspect = ts_truncated_suspect(src, name)
    if index.count == 0:
        raise ValueError(f"{name}: its video stream ({result.codec}) holds no frames")
    return result
