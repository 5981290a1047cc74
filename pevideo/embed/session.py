"""Model, processor, device and dtype for a run: resolved from a checkpoint path or a model object."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from ..loading import parse_dtype
from .workers import to_model_frames

__all__ = ["load_model", "load_processor", "DEFAULT_NUM_FRAMES"]

DEFAULT_NUM_FRAMES = 16


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available here")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None/"auto": bfloat16 on a GPU, float32 on CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def resolve_fast(fast, device: torch.device) -> bool:
    """None: the fused kernels on a GPU, eager on CPU (where they would run in Triton's slow interpreter)."""
    return (device.type == "cuda") if fast is None else bool(fast)


def load_model(path, *, device=None, dtype=None, fast: bool | None = None):
    """``PeVideoModel.from_pretrained`` with the pipeline's defaults: CUDA when available, bfloat16 on a
    GPU and float32 on CPU, fused kernels on a GPU (on CPU they would run in Triton's slow interpreter)."""
    from ..modeling import PeVideoModel

    device = resolve_device(device)
    fast = resolve_fast(fast, device)
    return PeVideoModel.from_pretrained(path, fast=fast, dtype=resolve_dtype(dtype, device), device=device)


_warned_default_processor: set = set()


def load_processor(path, model=None):
    """The checkpoint's video processor; without a preprocessor config there (e.g. checkpoints written
    by ``model.save_pretrained``), PE's preprocessing at the model's frame size: mean = std = 0.5,
    rescale 1/255, antialiased bilinear resize. Says so once per path."""
    from ..processing import PeVideoVideoProcessor

    if path is not None:
        try:
            return PeVideoVideoProcessor.from_pretrained(path)
        except OSError:
            if model is None:
                raise
    if model is None:
        raise ValueError("load_processor needs a checkpoint path with a preprocessor config, or the model")
    h, w = model.video_encoder.vit.args.img_size
    key = os.fspath(path) if path is not None else None
    if key not in _warned_default_processor:
        _warned_default_processor.add(key)
        where = f"{key} has no preprocessor config" if key else "no processor given"
        warnings.warn(f"{where}; using PE Video's default preprocessing at {h}x{w} (mean = std = 0.5, rescale 1/255)",
                      stacklevel=2)
    return PeVideoVideoProcessor(size={"height": h, "width": w})


def norm_args(processor) -> dict:
    """The processor's rescale + normalize, as ``forward_uint8`` applies them."""
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if processor.do_normalize:
        mean = _three(processor.image_mean)
        std = _three(processor.image_std)
    rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    return dict(image_mean=tuple(mean), image_std=tuple(std), rescale_factor=rescale)


def _three(v) -> list[float]:
    return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]


def check_processor_size(processor, model) -> None:
    """Fail before decoding anything when the processor's output size is not the model's frame size."""
    probe = np.zeros((1, 8, 8, 3), np.uint8)
    got = tuple(to_model_frames(processor, probe).shape[1:3])
    want = tuple(model.video_encoder.vit.args.img_size)
    if got != want:
        raise ValueError(f"the processor makes {got[0]}x{got[1]} frames but the model takes {want[0]}x{want[1]}")


def check_sampling(num_frames, fps):
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is None and fps is None:
        num_frames = DEFAULT_NUM_FRAMES
    if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if fps is not None and not (float(fps) > 0 and math.isfinite(float(fps))):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return (int(num_frames) if num_frames is not None else None), (float(fps) if fps is not None else None)


def model_and_processor(model, processor, device, dtype, fast):
    """(model, processor, checkpoint folder or None) from a model object or a checkpoint path."""
    from ..modeling import PeVideoModel

    path = None
    if isinstance(model, (str, os.PathLike)):
        from ..loading import resolve_checkpoint

        path = resolve_checkpoint(model)
        model = load_model(path, device=device, dtype=dtype, fast=fast)
    elif not isinstance(model, PeVideoModel):
        raise TypeError(f"model must be a pevideo PeVideoModel or a checkpoint path, got {type(model).__name__}")
    if processor is None or isinstance(processor, (str, os.PathLike)):
        processor = load_processor(processor if processor is not None else path, model)
    check_processor_size(processor, model)
    return model, processor, path

