"""Clips as uint8 frame tensors, as transformers' video processor takes them before resizing: the input
forms a processor accepts (paths, file objects, arrays, lists of clips or frames), sampling of clips
given in memory, and decoding of clips given as files (several at once)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .limits import Limits
from .metadata import VideoMetadata
from .resize import FramePlan
from .sampling import Sampling
from .video import DecodePlan, read_video

__all__ = ["split_clips", "channels_first", "as_tensor", "is_source", "sample_array", "decode_sources"]


def _is_array(x):
    return isinstance(x, (np.ndarray, torch.Tensor))


def is_source(x):
    return isinstance(x, (str, os.PathLike)) or (hasattr(x, "read") and not _is_array(x))


def split_clips(videos) -> list:
    """A batch as a list of clips; each clip a path/file object or an array of frames."""
    if is_source(videos):
        return [videos]
    if _is_array(videos):
        if videos.ndim == 5:
            return list(videos)
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 3:  # a single frame
            return [videos[None]]
        raise ValueError(f"videos must be (T, H, W, 3) frames or a (B, T, H, W, 3) batch, got shape {tuple(videos.shape)}")
    if isinstance(videos, (list, tuple)):
        if len(videos) == 0:
            raise ValueError("no videos given (empty list)")
        if all(_is_array(v) and v.ndim == 3 for v in videos):  # one clip given as a list of frames
            return [_stack_frames(videos, 0)]
        clips = []
        for i, v in enumerate(videos):
            if is_source(v) or (_is_array(v) and v.ndim == 4):
                clips.append(v)
            elif isinstance(v, (list, tuple)) and v and all(_is_array(f) and f.ndim == 3 for f in v):
                clips.append(_stack_frames(v, i))
            elif isinstance(v, (list, tuple)) and len(v) == 0:
                raise ValueError(f"video {i} has no frames")
            else:
                what = f"shape {tuple(v.shape)}" if _is_array(v) else type(v).__name__
                raise ValueError(
                    f"video {i}: expected a path, a file object, (T, H, W, 3) frames or a list of (H, W, 3) frames; got {what}"
                )
        return clips
    raise ValueError(
        "videos must be a path, a file object, a (T, H, W, 3) uint8 array/tensor, or a list of these; "
        f"got {type(videos).__name__}"
    )


def _stack_frames(frames, i):
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"video {i}: its frames have different shapes {sorted(shapes)}")
    if all(isinstance(f, torch.Tensor) for f in frames):
        return torch.stack(list(frames))
    return np.stack([np.asarray(f) for f in frames])


def as_tensor(arr) -> torch.Tensor:
    if isinstance(arr, torch.Tensor):
        return arr
    if any(s < 0 for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():  # read-only arrays (e.g. from np.broadcast_to) are only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def channels_first(clip: torch.Tensor, i: int, input_data_format) -> torch.Tensor:
    """(T, H, W, C) or (T, C, H, W) uint8 -> (T, C, H, W) view, checking dtype and channels."""
    if clip.dtype != torch.uint8:
        raise ValueError(
            f"video {i}: frames must be uint8 (0..255) as decoded, got {clip.dtype}; "
            "float frames are ambiguous (0..1 or 0..255), convert them to uint8 first"
        )
    if clip.ndim != 4:
        raise ValueError(f"video {i}: expected (T, H, W, 3) frames, got shape {tuple(clip.shape)}")
    fmt = input_data_format.value if hasattr(input_data_format, "value") else input_data_format
    if fmt is None:
        first, last = clip.shape[1] in (1, 3), clip.shape[3] in (1, 3)
        if first and last:
            # transformers' choice when both fit; pass input_data_format to say otherwise
            warnings.warn(f"video {i}: shape {tuple(clip.shape)} is ambiguous; reading it as (T, C, H, W)")
            fmt = "channels_first"
        elif last:
            fmt = "channels_last"
        elif first:
            fmt = "channels_first"
        else:
            raise ValueError(
                f"video {i}: expected RGB frames (T, H, W, 3), got shape {tuple(clip.shape)} "
                f"(channels would be {clip.shape[3]}); convert to 3-channel RGB first"
            )
    if fmt == "channels_last":
        clip = clip.permute(0, 3, 1, 2)
    elif fmt != "channels_first":
        raise ValueError(f"input_data_format must be 'channels_last' or 'channels_first', got {input_data_format!r}")
    if clip.shape[1] not in (1, 3):
        raise ValueError(f"video {i}: frames have {clip.shape[1]} channels; give RGB (3) or grayscale (1)")
    if clip.shape[0] == 0:
        raise ValueError(f"video {i} has no frames")
    if clip.shape[2] == 0 or clip.shape[3] == 0:
        raise ValueError(f"video {i}: frames are empty ({clip.shape[2]}x{clip.shape[3]})")
    return clip


def _meta_get(meta, key):
    """A field of video metadata given as a mapping (dict, ours) or an object (transformers')."""
    if meta is None:
        return None
    if isinstance(meta, Mapping):
        return meta.get(key)
    return getattr(meta, key, None)


def decode_sources(items, plan: DecodePlan) -> dict:
    """Decode the clips given as files (``{position: (frames, metadata)}``), several at once (PyAV
    releases the GIL while decoding)."""
    jobs = {i: item for i, item in enumerate(items) if is_source(item)}
    workers = min(len(jobs), os.cpu_count() or 1, 8)
    # File objects are read one at a time (the same object may appear twice); paths in parallel.
    if workers <= 1 or not all(isinstance(item, (str, os.PathLike)) for item in jobs.values()):
        return {i: read_video(item, plan) for i, item in jobs.items()}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(jobs, pool.map(lambda item: read_video(item, plan), jobs.values())))


def sample_array(clip: torch.Tensor, sampling: Sampling, meta, i: int, plan: FramePlan, limits: Limits):
    """Frames of an in-memory clip (T, C, H, W) picked by ``sampling`` (the source fps from ``meta``),
    checked against the memory budget at the sizes they will be held (picked, then through ``plan``)
    before anything is allocated. Returns ``(clip, VideoMetadata)``."""
    total = clip.shape[0]
    name = f"video {i}"
    declared = _meta_get(meta, "total_num_frames")
    if declared is not None and int(declared) != total:
        raise ValueError(
            f"{name}: video_metadata says {declared} frames but the clip has {total}; "
            "give the metadata of the frames passed"
        )
    src_fps = _meta_get(meta, "fps")
    src_fps = float(src_fps) if src_fps else None
    indices = sampling.indices(total, src_fps, name)
    h, w = clip.shape[2], clip.shape[3]
    limits.check_frames(len(indices), *plan.out_size(h, w), name)
    if indices != list(range(total)):
        limits.check_frames(len(indices), h, w, name)
        clip = clip[torch.tensor(indices, dtype=torch.long, device=clip.device)]
    meta_out = VideoMetadata(
        total_num_frames=total,
        fps=src_fps,
        width=int(w),
        height=int(h),
        duration=(total / src_fps) if src_fps else None,
        frames_indices=indices,
        timestamps=[j / src_fps for j in indices] if src_fps else [],
        source=name,
        video_backend="array",
    )
    return clip, meta_out
