"""Video files to uint8 frames, decoding only the frames asked for.

:func:`load_video` reads a file (or binary file object) with PyAV. It first walks the container's
packets without decoding them (cheap; :mod:`pevideo._probe`) to learn every frame's presentation time,
so the frame count is exact even when the container's header is missing or wrong, and frame ``i``
always means the i-th frame a decoder shows. It then decodes only what the chosen frames need
(:mod:`pevideo._decode`): it seeks to the keyframe before a frame when that skips work (MP4/MOV and
Matroska/WebM, whose indexes make seeking exact), and stops after the last one. Frames are converted to
RGB with the same swscale call transformers uses.

Frames are sampled by the one rule of :mod:`pevideo.sampling` (upstream's), which the processors and
``pevideo embed`` use too. Limits, so that one bad input cannot stall or swamp a run (each raises an
error naming the file; see :mod:`pevideo.limits`):

* Only regular files are opened: a FIFO, device or socket could block forever.
* The frames taken may hold at most ``max_bytes`` (frames × height × width × 3, at the size they are
  held; default 4 GiB, or ``PEVIDEO_MAX_VIDEO_BYTES``), checked before they are decoded
  (:class:`~pevideo.limits.VideoTooLargeError`).
* Decoding one video may take at most ``time_limit`` seconds (default 600, or
  ``PEVIDEO_DECODE_TIME_LIMIT``), checked between packets and frames (:class:`VideoTimeLimitError`).
* A truncated video is an error (:class:`TruncatedVideoError`), by the rule in
  :func:`~pevideo.metadata.check_complete`, rather than a clip made of the part that survived. Where
  nothing declares the length (MPEG-TS), a file that ends inside a transport packet is only flagged,
  in ``metadata.truncated_suspect``.
"""
from __future__ import annotations

from ._decode import DecodePlan, read_video
from .limits import DEFAULT_MAX_VIDEO_BYTES, DEFAULT_TIME_LIMIT, Limits, VideoTooLargeError
from .metadata import TruncatedVideoError, UnsupportedVideoError, VideoMetadata, VideoTimeLimitError, source_name
from .resize import FramePlan
from .sampling import Sampling

__all__ = [
    "load_video",
    "read_video",
    "DecodePlan",
    "VideoMetadata",
    "TruncatedVideoError",
    "VideoTimeLimitError",
    "VideoTooLargeError",
    "UnsupportedVideoError",
    "DEFAULT_MAX_VIDEO_BYTES",
    "DEFAULT_TIME_LIMIT",
]


def load_video(
    path_or_file,
    num_frames: int | None = None,
    fps: float | None = None,
    *,
    size: tuple[int, int] | None = None,
    resample: str = "bilinear",
    apply_rotation: bool = False,
    max_bytes: float | None = None,
    time_limit: float | None = None,
    max_frames=None,
):
    """Decode a video into RGB frames.

    Args:
        path_or_file: a path (str or ``os.PathLike``) to a regular file, or a binary file object
            opened for reading.
        num_frames: take this many frames spread over the whole video, as transformers' PE Video
            processor samples: frame ``i`` is index ``int(i·(N−1)/(n−1))`` of the video's N frames
            (n = 1 takes frame 0; n > N repeats frames, as the formula does; a repeated frame is
            decoded once).
        fps: take frames at this rate, by upstream's rule (as the processors and ``pevideo embed``):
            ``n = max(1, int(N / video_fps · fps))`` frames at ``i·N // n``; at or above the video's own
            rate, every frame once (upstream raises there).
        With neither, every frame is returned. Giving both is an error. See :mod:`pevideo.sampling`.
        size: ``(height, width)``: resize each frame right after it is decoded (before the next is
            held), with the processor's resize (:func:`pevideo.resize.resize_uint8`: antialiased
            ``resample`` on uint8, as torchvision), so the result equals resizing the returned frames
            with the processor; None keeps the decoded size.
        resample: ``"bilinear"`` (PE Video's) or ``"bicubic"``, for ``size``.
        apply_rotation: rotate frames upright by the video's display matrix (``metadata.rotation``).
            Off by default, as transformers (upstream) decodes: frames come as stored.
        max_bytes: the memory budget for the frames returned, ``frames × height × width × 3`` bytes
            (default 4 GiB, or the ``PEVIDEO_MAX_VIDEO_BYTES`` environment variable, e.g. ``16G``;
            ``math.inf`` for none): more is a :class:`VideoTooLargeError` before anything is decoded.
        time_limit: seconds the whole decode may take (default 600, or ``PEVIDEO_DECODE_TIME_LIMIT``;
            ``math.inf`` for none); past it, VideoTimeLimitError.
        max_frames: removed (the limit is the memory budget now): giving it is a ValueError pointing
            to ``max_bytes``.

    Returns:
        ``(frames, metadata)``: ``frames`` a uint8 numpy array (T, H, W, 3), RGB (H, W = ``size``
        when given); ``metadata`` a :class:`VideoMetadata` (source fps, frame count, duration,
        rotation, the indices taken, and ``truncated_suspect``). ``torch.from_numpy(frames)`` gives a
        tensor without a copy.

    Raises:
        FileNotFoundError: the path does not exist.
        TruncatedVideoError (a ValueError): the file is cut short (see :mod:`pevideo.metadata`).
        VideoTooLargeError (a ValueError): the frames asked for exceed the memory budget.
        UnsupportedVideoError (a ValueError): FFmpeg cannot decode this codec at this size.
        VideoTimeLimitError (a TimeoutError): decoding took longer than ``time_limit``.
        ValueError: bad arguments (a :class:`pevideo.UsageError` for a bad limit or environment
            variable), a path that is not a regular file (FIFO, device, ...), or a file that is not a
            video, has no video stream or no frames, or is damaged. Messages name the file.
    """
    name = source_name(path_or_file)
    if max_frames is not None:
        raise ValueError(f"{name}: max_frames= was replaced by a memory budget: give max_bytes= (bytes the frames "
                         "may take; default 4 GiB) or set PEVIDEO_MAX_VIDEO_BYTES")
    plan = DecodePlan(
        sampling=Sampling.of(num_frames, fps, name),
        frames=FramePlan(size=size, mode=resample),
        apply_rotation=bool(apply_rotation),
        limits=Limits.resolve(max_bytes, time_limit),
    )
    return read_video(path_or_file, plan)
