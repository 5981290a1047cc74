"""The PyAV side of :func:`pevideo.load_video`: index the packets, pick frames, decode only those.

Each kept frame is converted to RGB (the swscale call transformers makes), rotated when asked and
resized when asked right as it comes out of the decoder, so only kept frames, at their final size,
are held. The whole read runs against one deadline, checked between packets and frames.
"""
from __future__ import annotations

import bisect
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .video import (
    TruncatedVideoError,
    VideoMetadata,
    VideoTimeLimitError,
    _source_name,
    _time_limit,
    check_complete,
    check_frame_cap,
)

__all__ = ["read_video"]

# Seek only past at least this many frames: a seek flushes the decoder, and the frames it had
# buffered ahead are decoded again.
_MIN_SKIP = 12

# Containers whose seek lands on the keyframe it is asked for (index based). Others (MPEG-TS, raw
# streams, ...) seek by bisecting the file, so they are decoded from the start.
_SEEKABLE_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm")

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


def read_video(src, select: Callable, *, size=None, resample="bilinear", apply_rotation=False, max_frames=None,
               time_limit=None):
    """Open, index, pick frames with ``select(total, times, duration, fps) -> indices``, decode them.

    Options as :func:`pevideo.load_video`, except ``max_frames``: None means no cap here."""
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
