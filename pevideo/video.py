"""Video files to uint8 frames, decoding only the frames asked for.

:func:`load_video` reads a file (or binary file object) with PyAV. It first walks the container's
packets without decoding them (cheap) to learn every frame's presentation time, so the frame count is
exact even when the container's header is missing or wrong, and frame ``i`` always means the i-th frame
a decoder shows. It then decodes only what the chosen frames need: it seeks to the keyframe before a
frame when that skips work (MP4/MOV and Matroska/WebM, whose indexes make seeking exact), and stops
after the last one. Frames are converted to RGB with the same swscale call transformers uses.
"""
from __future__ import annotations

import bisect
import math
import operator
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["load_video", "VideoMetadata"]

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
        width, height: frame size in pixels.
        duration: seconds from the first frame's start to the last frame's end.
        frames_indices: index (0 … total_num_frames − 1) of each returned frame, in order.
        timestamps: presentation time of each returned frame, in seconds from the first frame.
        declared_num_frames: the frame count the container header claims (0 when it gives none).
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


class _SeekFailed(Exception):
    """A seek did not land where the index said; decode from the start instead."""


def load_video(path_or_file, num_frames: int | None = None, fps: float | None = None):
    """Decode a video into RGB frames.

    Args:
        path_or_file: a path (str or ``os.PathLike``) or a binary file object opened for reading.
        num_frames: take this many frames spread over the whole video, as transformers' PE Video
            processor samples: frame ``i`` is index ``int(i·(N−1)/(n−1))`` of the video's N frames
            (n = 1 takes frame 0; n > N repeats frames, as the formula does).
        fps: take frames at this rate: at times k/fps (k = 0, 1, … while k/fps < duration, measured
            from the first frame) the frame on screen at that time, i.e. the last frame that starts
            at or before it. Above the video's own rate frames repeat. At least one frame.
        With neither, every frame is returned. Giving both is an error.

    Returns:
        ``(frames, metadata)``: ``frames`` a uint8 numpy array (T, H, W, 3), RGB; ``metadata`` a
        :class:`VideoMetadata` (source fps, frame count, duration, and the indices taken).
        ``torch.from_numpy(frames)`` gives a tensor without a copy.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: bad ``num_frames``/``fps``, or a file that is not a video, has no video stream or
            no frames, or is damaged or truncated. Messages name the file.
    """
    name = _source_name(path_or_file)
    n = _check_num_frames(num_frames, name)
    rate = _check_fps(fps, name)
    if n is not None and rate is not None:
        raise ValueError(f"{name}: give num_frames or fps, not both")

    def select(total, times, duration, src_fps):
        if n is not None:
            return uniform_indices(total, n)
        if rate is not None:
            return fps_indices(times, duration, rate)
        return list(range(total))

    return _read_video(path_or_file, select)


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


def _open(src, name):
    import av

    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if "://" not in path:
            if not os.path.exists(path):
                raise FileNotFoundError(f"video file not found: {path}")
            if os.path.isdir(path):
                raise ValueError(f"{path} is a directory, not a video file")
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


def _index_packets(container, stream, name) -> _Index:
    """Walk the video packets without decoding: frame count, presentation times, keyframes."""
    import av

    declared = int(stream.frames or 0)
    recs = []
    packets = 0
    try:
        for pkt in container.demux(stream):
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
        raise ValueError(
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


@dataclass
class _Probe:
    index: _Index
    time_base: object  # fractions.Fraction
    fps: float | None
    seekable: bool


def _probe(src, name) -> _Probe:
    container = _open(src, name)
    try:
        stream = _video_stream(container, name)
        index = _index_packets(container, stream, name)
        if stream.time_base is None:
            index.pts = None  # timestamps without a unit: decode in order
        # Read everything needed now: a stream object is not usable once its container is closed.
        fmt = set((container.format.name or "").split(","))
        return _Probe(index, stream.time_base, _rate(stream), bool(fmt & set(_SEEKABLE_FORMATS)))
    finally:
        container.close()


class _Fallback(Exception):
    """Frames did not come out as the packet index said (odd timestamps, a seek that missed, a packet
    that decodes to nothing): decode in order and count frames as the decoder shows them."""


def _read_video(src, select: Callable):
    """Open, index, pick frames with ``select(total, times, duration, fps) -> indices``, decode them."""
    name = _source_name(src)
    probe = _probe(src, name)
    if probe.index.count == 0:
        raise ValueError(f"{name}: the video has no frames")
    if probe.index.pts is not None:
        for seek in ((True, False) if probe.seekable else (False,)):
            try:
                return _read_by_pts(src, name, probe, select, seek)
            except _Fallback:
                continue
    return _read_in_order(src, name, probe, select)


def _checked(indices, total, name):
    out = [int(i) for i in indices]
    if not out:
        raise ValueError(f"{name}: no frames selected")
    bad = [i for i in out if not 0 <= i < total]
    if bad:
        raise ValueError(f"{name}: frame indices {bad[:5]} are outside the video's {total} frames")
    return out


def _to_rgb(frame, size):
    if size is not None and (frame.height, frame.width) != size:
        # The stream changed size mid-way: bring the frame to the first returned frame's size.
        frame = frame.reformat(width=size[1], height=size[0])
    return frame.to_ndarray(format="rgb24")


def _assemble(indices, got, key_of):
    first = got[key_of(indices[0])]
    out = np.empty((len(indices), *first.shape), dtype=np.uint8)
    for pos, i in enumerate(indices):
        out[pos] = got[key_of(i)]
    return out


def _decode_error(name, exc):
    return ValueError(f"{name}: decoding failed ({type(exc).__name__}: {exc}); the file may be damaged or truncated")


def _read_by_pts(src, name, probe, select, seek):
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
    indices = _checked(select(index.count, times, duration, fps), index.count, name)

    targets = sorted({index.pts[i] for i in indices})
    keyframes = index.keyframes
    got: dict[int, np.ndarray] = {}
    size = None
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
                if frame.pts is None:
                    raise _Fallback
                if expect is not None and frame.pts != expect:
                    raise _Fallback  # the seek did not land on the keyframe asked for
                expect = None
                if frame.pts not in position:
                    raise _Fallback
                next_pos = position[frame.pts] + 1
                if frame.pts == t:
                    arr = _to_rgb(frame, size)
                    size = size or arr.shape[:2]
                    got[t] = arr
                    break
                if frame.pts > t:
                    raise _Fallback  # the target never came out of the decoder
            else:
                raise _Fallback  # the stream ended before the target
    except av.error.FFmpegError as exc:
        raise _decode_error(name, exc) from exc
    finally:
        container.close()

    frames = _assemble(indices, got, lambda i: index.pts[i])
    meta = VideoMetadata(
        total_num_frames=index.count,
        fps=fps,
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        duration=duration,
        frames_indices=indices,
        timestamps=[times[i] for i in indices],
        declared_num_frames=index.declared,
        source=name,
    )
    return frames, meta


def _read_in_order(src, name, probe, select):
    """Frame i is the i-th frame the decoder shows: count them in a first pass, collect in a second."""
    import av

    container = _open(src, name)
    stamps = []
    try:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
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
    if times is None:
        times = [0.0] * total  # only fps sampling needs times, and it cannot work without a rate

    indices = _checked(select(total, times, duration, fps), total, name)
    wanted = set(indices)
    stop = max(wanted)
    got: dict[int, np.ndarray] = {}
    size = None
    container = _open(src, name)
    try:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                arr = _to_rgb(frame, size)
                size = size or arr.shape[:2]
                got[i] = arr
            if i >= stop:
                break
    except av.error.FFmpegError as exc:
        raise _decode_error(name, exc) from exc
    finally:
        container.close()
    if len(got) != len(wanted):
        raise ValueError(f"{name}: the video changed between two reads (frames {sorted(wanted - set(got))[:5]} missing)")

    frames = _assemble(indices, got, lambda i: i)
    meta = VideoMetadata(
        total_num_frames=total,
        fps=fps,
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        duration=duration,
        frames_indices=indices,
        timestamps=[times[i] for i in indices],
        declared_num_frames=probe.index.declared,
        source=name,
    )
    return frames, meta
