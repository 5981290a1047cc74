"""Model, processor, device and dtype for a run, resolved once into one :class:`Session` record.

A run names a checkpoint (folder or Hub id) or passes a model object. From a checkpoint, the device and
dtype are resolved here, the processor is read from the checkpoint (or PE Video's defaults at the frame
size its config.json gives, with one warning), and the model loads only when there is work to do. The
processor's output size is checked against the model's frame size from the settings alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..limits import Limits
from ..loading import resolve_checkpoint, resolve_device, resolve_dtype
from ..processing import Normalization, PeVideoVideoProcessor, checkpoint_frame_size
from ..sampling import Sampling

__all__ = ["Session", "open_session", "model_source", "checkpoint_folder", "source_device", "load_model",
           "load_processor", "check_sampling", "DEFAULT_NUM_FRAMES"]

DEFAULT_NUM_FRAMES = 16


@dataclass(frozen=True)
class Session:
    """What a run encodes with, fixed once opened. ``source``: the checkpoint folder, or the model object
    given; ``checkpoint``: the folder the weights (and processor, tokenizer) come from, None for a model
    built in memory; ``frame_size``: (h, w) the model takes. :meth:`model` loads a checkpoint's model
    once (the only thing that happens later: loading is skipped when a run has nothing left to do)."""

    source: object
    checkpoint: str | None
    device: torch.device
    dtype: torch.dtype
    fast: bool
    processor: PeVideoVideoProcessor
    frame_size: tuple[int, int]
    _loaded: list = field(default_factory=list, repr=False, compare=False)

    @property
    def normalization(self) -> Normalization:
        return self.processor.normalization

    @property
    def loaded(self) -> bool:
        return bool(self._loaded) or not isinstance(self.source, str)

    def model(self):
        """The model: the object given, or the checkpoint's, loaded (once) on ``device`` in ``dtype``."""
        if not isinstance(self.source, str):
            return self.source
        if not self._loaded:
            from ..modeling import PeVideoModel

            self._loaded.append(PeVideoModel.from_pretrained(self.checkpoint, fast=self.fast, dtype=self.dtype,
                                                             device=self.device))
        return self._loaded[0]


def model_source(model):
    """A run's model, resolved without loading it: a checkpoint folder (a Hub id is fetched; a folder
    without config.json is a usage error naming it) or the :class:`pevideo.PeVideoModel` given."""
    from ..errors import UsageError
    from ..modeling import PeVideoModel

    if isinstance(model, PeVideoModel):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a pevideo PeVideoModel or a checkpoint path, got {type(model).__name__}")
    folder = resolve_checkpoint(model)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"{folder}: no config.json, so not a checkpoint folder (a checkpoint holds config.json "
                         "and its weights, as save_pretrained writes them)")
    return folder


def checkpoint_folder(source) -> str | None:
    """The folder ``source`` (from :func:`model_source`) comes from, if any."""
    if isinstance(source, str):
        return source
    folder = getattr(source, "name_or_path", None)  # set by from_pretrained
    return folder if folder and os.path.isdir(folder) else None


def source_device(source, device=None) -> torch.device:
    """Where the run encodes: a model object's own device, else ``device`` resolved ("auto"/None: CUDA
    when available)."""
    return source.device if not isinstance(source, str) else resolve_device(device, default="auto")


def open_session(model, processor=None, *, device=None, dtype=None, fast: bool | None = None,
                 sampling: Sampling | None = None) -> Session:
    """Resolve a run's model, processor, device and dtype once.

    ``model``: a checkpoint folder / Hub id, or a :class:`pevideo.PeVideoModel` (then ``device``,
    ``dtype``, ``fast`` are the model's own and the arguments are ignored). ``device``: see
    :func:`pevideo.loading.resolve_device` ("auto"/None: CUDA when available). ``dtype``: "auto"/None
    is bfloat16 on a GPU and float32 on CPU (see :func:`pevideo.loading.resolve_dtype`). ``fast``:
    default on a GPU (on CPU the kernels would run in Triton's slow interpreter). ``processor``: a
    :class:`pevideo.PeVideoVideoProcessor`, a folder to read one from, or None: the checkpoint's (see
    :func:`load_processor`). Raises ValueError when the processor's frames don't fit the model, or
    when ``sampling``'s ``num_frames`` frames at the model's frame size exceed the memory budget
    (:class:`pevideo.limits.Limits`): refused before any model is loaded or clip decoded.
    """
    source = model_source(model)
    folder = checkpoint_folder(source)
    if isinstance(source, str):
        dev = source_device(source, device)
        settings = dict(device=dev, dtype=resolve_dtype(dtype, dev), fast=resolve_fast(fast, dev),
                        frame_size=checkpoint_frame_size(source))
    else:
        settings = dict(device=source.device, dtype=source.dtype, fast=source.fast,
                        frame_size=tuple(source.video_encoder.vit.args.img_size))
    proc = load_processor(processor, folder, settings["frame_size"])
    got = proc.output_size
    if got is None or tuple(got) != tuple(settings["frame_size"]):
        made = "frames of the input's size (no resize)" if got is None else f"{got[0]}x{got[1]} frames"
        h, w = settings["frame_size"]
        raise ValueError(f"the processor makes {made} but the model takes {h}x{w}")
    if sampling is not None and sampling.num_frames is not None:
        Limits.resolve().check_frames(sampling.num_frames, *settings["frame_size"], name="num_frames")
    return Session(source=source, checkpoint=folder, processor=proc, **settings)


def load_processor(processor, checkpoint, frame_size) -> PeVideoVideoProcessor:
    """``processor`` as given (an object, or a folder to read it from); None: the checkpoint's own
    (:meth:`PeVideoVideoProcessor.from_pretrained`, which falls back to PE Video's preprocessing at the
    checkpoint's frame size with one warning); for a model with no checkpoint folder, PE Video's
    preprocessing at ``frame_size``, with one warning."""
    if isinstance(processor, PeVideoVideoProcessor):
        return processor
    if processor is not None:
        if not isinstance(processor, (str, os.PathLike)):
            raise TypeError(f"processor must be a PeVideoVideoProcessor or a folder, got {type(processor).__name__}")
        return PeVideoVideoProcessor.from_pretrained(processor)
    if checkpoint is not None:
        return PeVideoVideoProcessor.from_pretrained(checkpoint)
    return PeVideoVideoProcessor.pe_default(frame_size, "no processor given and the model has no checkpoint folder")


def resolve_fast(fast, device: torch.device) -> bool:
    """None: the fused kernels on a GPU, eager on CPU (where they would run in Triton's slow interpreter)."""
    return (device.type == "cuda") if fast is None else bool(fast)


def load_model(path, *, device=None, dtype=None, fast: bool | None = None):
    """``PeVideoModel.from_pretrained`` with the pipeline's defaults (see :func:`open_session`)."""
    return open_session(path, device=device, dtype=dtype, fast=fast).model()


def check_sampling(num_frames, fps) -> Sampling:
    """A run's sampling, checked once into a :class:`~pevideo.sampling.Sampling` record (neither given:
    16 frames), and the decode limits' environment checked with it (``PEVIDEO_MAX_VIDEO_BYTES``,
    ``PEVIDEO_DECODE_TIME_LIMIT``): a bad value is a :class:`pevideo.UsageError` before anything runs."""
    Limits.resolve()
    sampling = Sampling.of(num_frames, fps)
    return Sampling(num_frames=DEFAULT_NUM_FRAMES) if sampling.every_frame else sampling
