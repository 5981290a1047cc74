"""Clips as uint8 frame tensors, as transformers' video processor prepares them before normalizing: the
input forms a processor takes (paths, file objects, arrays, lists of clips or frames), frame sampling,
and torchvision's resize and crop computed with plain ``torch.nn.functional`` (no torchvision needed)."""
from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .video import VideoMetadata, _check_fps, _check_num_frames, _read_video, _source_name, uniform_indices, upstream_fps_indices

__all__ = ["resize_uint8", "center_crop", "split_clips", "channels_first", "as_tensor", "is_source", "sample_array",
           "decode_sources", "size_hw", "sampling"]


def _native_uint8_resize(mode: str, device: torch.device) -> bool:
    """Whether torchvision resizes uint8 directly (else via float32 and rounding), as it decides."""
    if device.type != "cpu":
        return False
    if mode == "bilinear":  # torchvision's rule: the uint8 kernel is only faster with these
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return True


def resize_uint8(frames: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize uint8 frames (T, C, H, W) to ``size`` = (h, w) exactly as torchvision's ``resize`` does.

    Antialiased bilinear (or bicubic), align_corners=False. On CPU with AVX2/AVX512 (or ARM) the uint8
    kernel runs directly; elsewhere (other CPUs, GPUs) in float32, rounded back to uint8. Same device,
    same result as upstream. Returns uint8 (T, C, h, w); the input itself when the size already matches.
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if _native_uint8_resize(mode, frames.device):
        return F.interpolate(frames, size=list(size), mode=mode, align_corners=False, antialias=True)
    x = F.interpolate(frames.to(torch.float32), size=list(size), mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic":
        x = x.clamp_(0, 255)  # bicubic overshoots; bilinear's weights are all positive
    return x.round_().to(torch.uint8)


def center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers' center crop on (T, C, H, W): zero-pad if smaller, then crop at int((H − h)/2)."""
    ch, cw = size
    h, w = frames.shape[-2:]
    if ch > h or cw > w:
        pad_w = (cw - w) if cw > w else 0
        pad_h = (ch - h) if ch > h else 0
        frames = F.pad(frames, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = frames.shape[-2:]
        if (ch, cw) == (h, w):
            return frames
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return frames[..., top : top + ch, left : left + cw]



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



def decode_sources(items, sampling) -> dict:
    """Decode the clips given as files, several at once (PyAV releases the GIL while decoding)."""
    jobs = {i: item for i, item in enumerate(items) if is_source(item)}

    def work(item):
        return _read_video(item, _selector(sampling, _source_name(item)))

    workers = min(len(jobs), os.cpu_count() or 1, 8)
    # File objects are read one at a time (the same object may appear twice); paths in parallel.
    if workers <= 1 or not all(isinstance(item, (str, os.PathLike)) for item in jobs.values()):
        return {i: work(item) for i, item in jobs.items()}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(jobs, pool.map(work, jobs.values())))


def size_hw(size, default_to_square=True):
    if size is None:
        raise ValueError("do_resize needs size, e.g. {'height': 336, 'width': 336}")
    if isinstance(size, int) and not isinstance(size, bool):
        if not default_to_square:
            raise NotImplementedError("size as a shortest edge (default_to_square=False) is not supported")
        h = w = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = size
    elif isinstance(size, Mapping) and "height" in size and "width" in size:
        h, w = size["height"], size["width"]
    else:
        raise NotImplementedError(f"size={size!r}: only a fixed height and width (PE Video's) is supported")
    h, w = int(h), int(w)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {h}x{w}")
    return h, w


def _selector(sampling, name):
    def select(total, times, duration, src_fps):
        if sampling is None:
            return list(range(total))
        kind, v = sampling
        if kind == "n":
            return uniform_indices(total, v)
        return upstream_fps_indices(total, src_fps, v, name)

    return select


def sample_array(clip, sampling, meta, i):
    total = clip.shape[0]
    declared = _meta_get(meta, "total_num_frames")
    if declared is not None and int(declared) != total:
        raise ValueError(
            f"video {i}: video_metadata says {declared} frames but the clip has {total}; "
            "give the metadata of the frames passed"
        )
    src_fps = _meta_get(meta, "fps")
    src_fps = float(src_fps) if src_fps else None
    if sampling is None:
        indices = list(range(total))
    elif sampling[0] == "n":
        indices = uniform_indices(total, sampling[1])
    else:
        indices = upstream_fps_indices(total, src_fps, sampling[1], f"video {i}")
    if indices != list(range(total)):
        clip = clip[torch.tensor(indices, dtype=torch.long, device=clip.device)]
    meta_out = VideoMetadata(
        total_num_frames=total,
        fps=src_fps,
        width=int(clip.shape[3]),
        height=int(clip.shape[2]),
        duration=(total / src_fps) if src_fps else None,
        frames_indices=indices,
        timestamps=[j / src_fps for j in indices] if src_fps else [],
        source=f"video {i}",
        video_backend="array",
    )
    return clip, meta_out


def sampling(num_frames=None, fps=None):
    """The one rule for a call's ``num_frames`` / ``fps``: ``("n", n)``, ``("fps", f)`` or None (neither
    given). Refuses both at once, and values that are not a positive int / a positive finite number."""
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is not None:
        return ("n", _check_num_frames(num_frames))
    if fps is not None:
        return ("fps", _check_fps(fps))
    return None
