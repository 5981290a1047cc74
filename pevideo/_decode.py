"""The PyAV side of :func:`pevideo.load_video`: pick frames from the probe's packet index, decode only those.

Each kept frame is converted to RGB (the swscale call transformers makes), rotated when asked and put
through the :class:`~pevideo.resize.FramePlan` (resize, crop) right as it comes out of the decoder, so
only kept frames, at their final size, are held. Before any frame is decoded, the frames selected are
checked against the memory budget (:class:`~pevideo.limits.Limits`) at the size they will be held.
The whole read runs against one deadline, checked between packets and frames.

Imports only downward: :mod:`pevideo._probe`, and the leaf modules (sampling, limits, resize, metadata).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from ._probe import Deadline, Probe, open_container, probe
from .limits import Limits
from .metadata import UnsupportedVideoError, VideoMetadata, check_complete, source_name
from .resize import FramePlan
from .sampling import Sampling

__all__ = ["read_video", "DecodePlan"]

# Seek only past at least this many frames: a seek flushes the decoder, and the frames it had
# buffered ahead are decoded again.
_MIN_SKIP = 12

# swscale on one thread. PyAV's default (0, "automatic") starts a thread pool with FFmpeg 8 (PyAV 19)
# that a forked decoding worker inherits without its threads: the worker's first conversion then waits
# forever. One thread is also what a decoding worker should use (they run single-threaded, side by side).
_SWS = [{"threads": 1}]


def _rgb(frame, **size):
    """``frame`` as an RGB (H, W, 3) uint8 array (resized to ``size`` first, if given), on one thread."""
    try:
        if size:
            frame = frame.reformat(**size, **_SWS[0])
        return frame.to_ndarray(format="rgb24", **_SWS[0])
    except TypeError as exc:  # a PyAV without the threads option (older than the ones CI runs)
        if not _SWS[0] or "threads" not in str(exc):
            raise
        _SWS[0] = {}
        return _rgb(frame, **size)


@dataclass(frozen=True)
class DecodePlan:
    """Everything a decode needs, resolved once (per ``load_video`` call, or per decoding worker):
    which frames (``sampling``), what happens to each (``frames``: resize, crop), whether to rotate
    frames upright (``apply_rotation``), and what a clip may cost (``limits``)."""

    sampling: Sampling = field(default_factory=Sampling)
    frames: FramePlan = field(default_factory=FramePlan)
    apply_rotation: bool = False
    limits: Limits = field(default_factory=Limits.resolve)


class _Fallback(Exception):
    """Frames did not come out as the packet index said (odd timestamps, a seek that missed, a packet
    that decodes to nothing): decode in order and count frames as the decoder shows them."""


def read_video(src, plan: DecodePlan):
    """Open, index, pick frames by ``plan.sampling``, decode them; ``(frames, VideoMetadata)`` as
    :func:`pevideo.load_video` returns them."""
    name = source_name(src)
    deadline = Deadline(plan.limits.time_limit, name)
    found = probe(src, name, deadline)
    kept = _Frames(name, plan, found)
    if found.index.pts is not None:
        for seek in ((True, False) if found.seekable else (False,)):
            try:
                return _read_by_pts(src, name, found, plan.sampling, seek, kept.reset(), deadline)
            except _Fallback:
                continue
    return _read_in_order(src, name, found, plan.sampling, kept.reset(), deadline)


def _rotation(frame) -> int:
    """Counterclockwise degrees the frame's display matrix asks for, in [0, 360)."""
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


class _Frames:
    """The decoded frames kept, keyed by frame: converted to RGB, rotated and resized as each comes out
    of the decoder, so only the kept frames, at their final size, are ever held."""

    def __init__(self, name: str, plan: DecodePlan, found: Probe):
        self.name, self.plan, self.found = name, plan, found

    def reset(self) -> "_Frames":
        self.got, self.src_size, self.rotation, self.shown, self.count = {}, None, 0, None, 0
        return self

    def check_count(self, indices, total):
        out = [int(i) for i in indices]
        if not out:
            raise ValueError(f"{self.name}: no frames selected")
        bad = [i for i in out if not 0 <= i < total]
        if bad:
            raise ValueError(f"{self.name}: frame indices {bad[:5]} are outside the video's {total} frames")
        self.count = len(out)
        if self.found.size is not None:  # before any frame is decoded, at the size the header gives
            self._check_budget(*self.found.size)
        return out

    def _check_budget(self, height, width):
        self.plan.limits.check_frames(self.count, *self.plan.frames.out_size(height, width), self.name)

    def take(self, key, frame) -> None:
        if self.src_size is None:
            self.src_size, self.rotation = (frame.height, frame.width), _rotation(frame)
            if self.plan.apply_rotation and self.rotation % 90:
                raise ValueError(f"{self.name}: its rotation of {self.rotation} degrees is not a multiple of 90; "
                                 "it cannot be applied (decode with apply_rotation=False)")
            if (frame.height, frame.width) != self.found.size:
                self._check_budget(frame.height, frame.width)  # the header did not say, or said otherwise
        size = {}
        if (frame.height, frame.width) != self.src_size:
            # The stream changed size mid-way: bring the frame to the first kept frame's size.
            size = dict(width=self.src_size[1], height=self.src_size[0])
        arr = _rgb(frame, **size)
        if self.plan.apply_rotation and self.rotation:
            arr = np.ascontiguousarray(np.rot90(arr, self.rotation // 90))  # counterclockwise, as np.rot90
        if self.shown is None:
            self.shown = arr.shape[:2]
        self.got[key] = self.plan.frames.apply_hwc(arr)

    def assemble(self, indices, key_of) -> np.ndarray:
        first = self.got[key_of(indices[0])]
        out = np.empty((len(indices), *first.shape), dtype=np.uint8)
        for pos, i in enumerate(indices):
            out[pos] = self.got[key_of(i)]  # a repeated index is one decoded frame, copied
        return out

    def metadata(self, frames_indices, times, total, fps, duration) -> VideoMetadata:
        return VideoMetadata(
            total_num_frames=total,
            fps=fps,
            width=int(self.shown[1]),
            height=int(self.shown[0]),
            duration=duration,
            frames_indices=frames_indices,
            timestamps=[times[i] for i in frames_indices],
            declared_num_frames=self.found.index.declared,
            rotation=self.rotation,
            rotation_applied=self.plan.apply_rotation and self.rotation != 0,
            truncated_suspect=self.found.truncated_suspect,
            source=self.name,
        )


def _decode_error(name, exc, found: Probe):
    import av

    size = f"{found.size[1]}x{found.size[0]}" if found.size else "this size"
    if isinstance(exc, (av.error.PatchWelcomeError, av.error.DecoderNotFoundError, av.error.NotImplementedError,
                        av.error.ExperimentalError)):
        return UnsupportedVideoError(
            f"{name}: this FFmpeg cannot decode {found.codec} video at {size} ({type(exc).__name__}: {exc}); "
            "the codec or frame size is unsupported (the file itself may well be intact): re-encode it, e.g. "
            "to H.264 at a smaller size"
        )
    return ValueError(f"{name}: decoding failed ({type(exc).__name__}: {exc}); the file may be damaged or truncated")


def _read_by_pts(src, name, found, sampling, seek, kept, deadline):
    import av

    index, tb = found.index, found.time_base
    t0 = index.pts[0]
    times = [float((p - t0) * tb) for p in index.pts]
    fps = found.fps
    if fps is None and index.count > 1 and times[-1] > 0:
        fps = (index.count - 1) / times[-1]
    last = index.durations[-1]
    last_s = float(last * tb) if last > 0 else (1.0 / fps if fps else 0.0)
    duration = times[-1] + last_s
    check_complete(name, found.declared_end, float(t0 * tb) + duration, float(t0 * tb), fps)
    indices = kept.check_count(sampling.indices(index.count, fps, name), index.count)

    targets = sorted({index.pts[i] for i in indices})
    keyframes = index.keyframes
    container = open_container(src, name)
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
        raise _decode_error(name, exc, found) from exc
    finally:
        container.close()

    frames = kept.assemble(indices, lambda i: index.pts[i])
    return frames, kept.metadata(indices, times, index.count, fps, duration)


def _read_in_order(src, name, found, sampling, kept, deadline):
    """Frame i is the i-th frame the decoder shows: count them in a first pass, collect in a second."""
    import av

    container = open_container(src, name)
    stamps = []
    try:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            deadline.check()
            stamps.append(frame.time)
    except av.error.FFmpegError as exc:
        raise _decode_error(name, exc, found) from exc
    finally:
        container.close()
    total = len(stamps)
    if total == 0:
        raise ValueError(f"{name}: its video stream ({found.codec}) has packets but none decodes to a frame")
    fps = found.fps
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
        check_complete(name, found.declared_end, stamps[0] + duration, stamps[0], fps)
    if times is None:
        times = [0.0] * total  # no frame times at all: only the metadata's timestamps need them

    indices = kept.check_count(sampling.indices(total, fps, name), total)
    wanted = set(indices)
    stop = max(wanted)
    container = open_container(src, name)
    try:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            deadline.check()
            if i in wanted:
                kept.take(i, frame)
            if i >= stop:
                break
    except av.error.FFmpegError as exc:
        raise _decode_error(name, exc, found) from exc
    finally:
        container.close()
    if len(kept.got) != len(wanted):
        missing = sorted(wanted - set(kept.got))[:5]
        raise ValueError(f"{name}: the video changed between two reads (frames {missing} missing)")

    frames = kept.assemble(indices, lambda i: i)
    return frames, kept.metadata(indices, times, total, fps, duration)
