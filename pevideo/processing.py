"""PE Video's processors: frames or video files in, model inputs out, as transformers computes them.

:class:`PeVideoVideoProcessor` reads the same preprocessor files as transformers' and produces the same
``pixel_values_videos``: frames sampled with upstream's rule, resized to S×S with torchvision's
antialiased bilinear on uint8 (the same ``torch.nn.functional.interpolate`` call torchvision makes, so
no torchvision is needed), then ``(x − mean·255) / (std·255)`` in float32 as transformers' fused
rescale+normalize computes it. Where it differs, it is on purpose (see the class docstring).

:class:`PeVideoProcessor` pairs it with the checkpoint's tokenizer. The settings are resolved once into
a :class:`~pevideo.processor_settings.ProcessorSettings` record; input forms are in :mod:`pevideo.frames`,
sampling in :mod:`pevideo.sampling`, resize and crop in :mod:`pevideo.resize`, config files and tokenizers
in :mod:`pevideo.processor_files`.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from pevideo_kernels.patchify import normalize_uint8

from .dispatch import patchify_normalize
from .frames import as_tensor, channels_first, decode_sources, sample_array, split_clips
from .limits import Limits
from .normalization import Normalization
from .processor_files import (
    VIDEO_PROCESSOR_NAME,
    NoProcessorConfig,
    checkpoint_frame_size,
    load_tokenizer,
    load_video_config,
)
from .processor_settings import SETTING_KEYS, ProcessorSettings
from .resize import FramePlan
from .video import DecodePlan

__all__ = ["PeVideoVideoProcessor", "PeVideoProcessor", "Normalization", "ProcessorSettings", "checkpoint_frame_size",
           "load_tokenizer"]

# Per-call options; anything else is refused rather than silently ignored.
_CALL_KWARGS = frozenset(
    {
        "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
        "image_std", "do_convert_rgb", "do_sample_frames", "num_frames", "fps", "video_metadata",
        "return_tensors", "return_metadata", "device", "input_data_format", "do_center_crop", "crop_size",
        "data_format", "default_to_square",
    }
)
# Config keys the processor stores (and saves); the rest of a config file is ignored.
_CONFIG_KEYS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
    "image_std", "do_convert_rgb", "do_sample_frames", "num_frames", "fps", "do_center_crop", "crop_size",
    "default_to_square", "return_metadata",
)


# What transformers' PeVideoVideoProcessor uses for a key its config file leaves out.
_UPSTREAM_DEFAULTS = dict(
    do_resize=None, size=None, resample=2, do_rescale=None, rescale_factor=1 / 255, do_normalize=None,
    image_mean=None, image_std=None, do_convert_rgb=None, do_sample_frames=None, num_frames=None, fps=None,
    do_center_crop=None, crop_size=None, default_to_square=True, return_metadata=False,
)
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download")
_warned_defaults: set = set()  # PE-default warnings already given, by what was missing



# --------------------------------------------------------------------------------------------------
# Video processor
# --------------------------------------------------------------------------------------------------
class PeVideoVideoProcessor:
    """PE Video's video processor: clips to ``pixel_values_videos`` (B, T_max, 3, S, S).

    A drop-in for transformers' ``PeVideoVideoProcessor`` without torchvision: same config files, same
    sampling, resize and normalization, so outputs match upstream's bit for bit on the same device
    (tests allow one uint8 level before normalization). Call it as upstream's::

        proc = PeVideoVideoProcessor.from_pretrained(path)
        inputs = proc(videos, num_frames=16, return_tensors="pt").to(device)

    ``videos``: a path or binary file object (decoded with :func:`pevideo.load_video`, only the sampled
    frames), uint8 frames (T, H, W, 3) as a numpy array or tensor (or (T, 3, H, W)), a list of frames,
    or a list of clips (of different lengths and sizes). Grayscale (1 channel) frames are repeated to
    RGB when ``do_convert_rgb``; other channel counts and non-uint8 frames raise ValueError.

    Sampling follows upstream (:mod:`pevideo.sampling`, the rule ``load_video`` and ``pevideo embed``
    use too): ``num_frames=n`` takes ``int(i·(N−1)/(n−1))`` (n = 1 takes frame 0, where upstream
    divides by zero), ``fps=f`` takes ``max(1, int(N/src_fps·f))`` frames at ``i·N // n`` (the source
    fps comes from the file, or from ``video_metadata`` for arrays; above the clip's own rate, every
    frame once, where upstream raises). Deliberate differences: ``num_frames``/``fps`` given in the call
    always sample (upstream ignores them unless the config sets ``do_sample_frames``), and a call's
    ``fps`` wins over a config's ``num_frames``. A clip's frames may take at most the memory budget
    (``PEVIDEO_MAX_VIDEO_BYTES``, default 4 GiB), checked before they are made.

    With ``return_tensors`` ("pt" or "np") the result holds ``pixel_values_videos`` (B, T_max, 3, h, w)
    float32 (padded frames are 0) and always ``padding_mask_videos`` (B, T_max) bool, True for real
    frames (upstream returns the mask only when lengths differ). Without, ``pixel_values_videos`` is a
    list of (T_i, 3, h, w) tensors, as upstream.
    """

    model_input_names = ["pixel_values_videos", "padding_mask_videos"]

    def __init__(
        self,
        do_resize: bool = True,
        size=None,
        resample=2,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        do_convert_rgb: bool = True,
        do_sample_frames: bool | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        do_center_crop: bool | None = None,
        crop_size=None,
        default_to_square: bool = True,
        return_metadata: bool = False,
        **unused,
    ):
        """Defaults are PE Video's preprocessing (336×336, bilinear, mean = std = 0.5); a config loaded
        with :meth:`from_pretrained` gets upstream's meaning for the keys it leaves out instead."""
        if unused.get("do_pad"):
            raise NotImplementedError("do_pad=True is not supported by PE Video's processor")
        self.do_resize = do_resize
        self.size = {"height": 336, "width": 336} if size is None else size
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if isinstance(image_mean, (list, tuple)) else image_mean
        self.image_std = list(image_std) if isinstance(image_std, (list, tuple)) else image_std
        self.do_convert_rgb = do_convert_rgb
        self.do_sample_frames = do_sample_frames
        self.num_frames = num_frames
        self.fps = fps
        self.do_center_crop = do_center_crop
        self.crop_size = crop_size
        self.default_to_square = default_to_square
        self.return_metadata = return_metadata
        self.settings  # resolve (and so check) now, not at the first call

    # ---- configuration -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "PeVideoVideoProcessor":
        """Load from a directory, a config JSON file, or a Hub id (through transformers' cache).

        Looks, as transformers does, for ``processor_config.json`` holding a ``video_processor``
        entry, then ``video_preprocessor_config.json``, then ``preprocessor_config.json``. Keyword
        arguments that name a setting override the file; ``cache_dir``, ``revision``, ``token``,
        ``local_files_only``, ``subfolder`` go to the download.

        A checkpoint folder without any of these (as ``model.save_pretrained`` writes it) gets PE
        Video's preprocessing at the checkpoint's frame size (from its ``config.json``), with one
        warning naming what was assumed; write the real settings next to the checkpoint with
        ``processor.save_pretrained(path)`` to silence it. Raises OSError when there is neither.
        """
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        unknown = set(kwargs) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {list(_CONFIG_KEYS)}")
        try:
            file_config = load_video_config(pretrained_model_name_or_path, **hub)
        except NoProcessorConfig:
            size = checkpoint_frame_size(pretrained_model_name_or_path)
            if size is None:
                raise
            return cls.pe_default(size, f"{os.fspath(pretrained_model_name_or_path)} has no video processor config",
                                  **kwargs)
        # A key the file leaves out means what it means upstream (mostly: off), not our defaults.
        return cls(**{**_UPSTREAM_DEFAULTS, **file_config, **kwargs})

    @classmethod
    def pe_default(cls, frame_size: tuple[int, int], why: str, **kwargs) -> "PeVideoVideoProcessor":
        """PE Video's preprocessing at ``frame_size`` (h, w), for a checkpoint with no processor config:
        warns once per ``why`` (a phrase saying what was missing) naming every setting assumed."""
        proc = cls(**{"size": {"height": int(frame_size[0]), "width": int(frame_size[1])}, **kwargs})
        if why not in _warned_defaults:
            _warned_defaults.add(why)
            n = proc.normalization
            warnings.warn(
                f"{why}; assuming PE Video's preprocessing: resize to {proc.output_size[0]}x{proc.output_size[1]} "
                f"(the model's frame size), {proc.settings.frame_plan.mode} with antialias, rescale 1/255, "
                f"mean {list(n.mean)}, std {list(n.std)}. Write the real settings next to the checkpoint "
                "with processor.save_pretrained(path) (see README: Your own or an offline checkpoint)",
                stacklevel=3,
            )
        return proc

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _CONFIG_KEYS}
        d["video_processor_type"] = "PeVideoVideoProcessor"
        return d

    def save_pretrained(self, save_directory) -> list[str]:
        """Write ``video_preprocessor_config.json`` (readable by transformers' processor too)."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, VIDEO_PROCESSOR_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return [path]

    def __repr__(self):
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        if key in _CONFIG_KEYS:
            self.__dict__.pop("_settings", None)  # a setting changed: resolve again when next needed

    @property
    def settings(self) -> ProcessorSettings:
        """This processor's configuration, resolved and checked once (again only after a setting is
        assigned): the :class:`ProcessorSettings` record every call without overrides uses."""
        s = self.__dict__.get("_settings")
        if s is None:
            s = ProcessorSettings.resolve(lambda k: getattr(self, k, None))
            self.__dict__["_settings"] = s
        return s

    def _call_settings(self, kw) -> ProcessorSettings:
        """The record for one call: this processor's, or one of its own when the call overrides a setting."""
        if not any(kw.get(k) is not None for k in SETTING_KEYS):
            return self.settings
        return ProcessorSettings.resolve(lambda k: kw[k] if kw.get(k) is not None else getattr(self, k, None))

    @property
    def normalization(self) -> Normalization:
        """This processor's rescale + normalize, as a :class:`Normalization` (what
        :meth:`pevideo.PeVideoModel.get_video_features_uint8` takes)."""
        return self.settings.normalization

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of the frames this processor makes (after resize and crop), or None when
        it keeps the input's size (no resize, no crop)."""
        return self.settings.output_size

    @property
    def frame_plan(self) -> FramePlan:
        """How this processor resizes and crops frames, so a decoder can do it to each frame as it is
        decoded (:func:`pevideo.load_video`'s ``size`` / ``resample``) with the same result."""
        return self.settings.frame_plan

    def resize_frames(self, frames) -> torch.Tensor:
        """One clip's uint8 frames (T, H, W, 3) to uint8 (T, h, w, 3): this processor's RGB conversion,
        resize and crop, without sampling or normalizing (pair it with :attr:`normalization` for
        :meth:`pevideo.PeVideoModel.get_video_features_uint8`). A channels-last view of the resized
        frames, not a copy."""
        s = self.settings
        clip = self._rgb(channels_first(as_tensor(frames), 0, "channels_last"), 0, s)
        Limits.resolve().check_frames(clip.shape[0], *s.frame_plan.out_size(*clip.shape[2:]), "video 0")
        return s.frame_plan.apply(clip).permute(0, 2, 3, 1)

    # ---- the pipeline --------------------------------------------------------------------------
    def __call__(self, videos, **kwargs):
        return self.preprocess(videos, **kwargs)

    def preprocess(self, videos, **kwargs):
        """Process ``videos`` (see the class docstring); returns a ``transformers.BatchFeature``.

        Options (each overrides the config for this call): ``num_frames``, ``fps``,
        ``do_sample_frames``, ``video_metadata`` (dict/:class:`~pevideo.video.VideoMetadata` per
        array clip, for fps sampling), ``return_tensors`` ("pt", "np" or None), ``return_metadata``,
        ``device`` (process there: resize and normalize on the GPU), ``input_data_format``, and the
        config's ``size``, ``resample``, ``do_resize``, ``do_rescale``, ``rescale_factor``,
        ``do_normalize``, ``image_mean``, ``image_std``, ``do_convert_rgb``, ``do_center_crop``,
        ``crop_size``. The frames a clip holds may take at most the memory budget of
        :class:`pevideo.limits.Limits` (``PEVIDEO_MAX_VIDEO_BYTES``), checked before they are made.
        """
        from transformers import BatchFeature

        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(_CALL_KWARGS)}")
        s = self._call_settings(kwargs)
        return_tensors = kwargs.get("return_tensors")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        clips, metas = self._load(videos, kwargs, s)

        out_dtype = torch.float32 if s.normalizes else torch.uint8  # upstream leaves frames as they are
        device = clips[0].device
        if return_tensors is None:
            pixel_values = []
            for c in clips:
                o = torch.empty(c.shape, dtype=out_dtype, device=device)
                self._normalize_into(o, c, s)
                pixel_values.append(o)
            data = {"pixel_values_videos": pixel_values}
        else:
            lengths = [c.shape[0] for c in clips]
            t_max = max(lengths)
            shapes = {tuple(c.shape[1:]) for c in clips}
            if len(shapes) != 1:
                raise ValueError(f"clips end up with different frame sizes {sorted(shapes)}; set size (do_resize) to batch them")
            pv = torch.zeros((len(clips), t_max, *clips[0].shape[1:]), dtype=out_dtype, device=device)
            for b, c in enumerate(clips):
                self._normalize_into(pv[b, : c.shape[0]], c, s)
            mask = torch.arange(t_max, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
            if return_tensors == "np":
                pv, mask = pv.cpu().numpy(), mask.cpu().numpy()
            data = {"pixel_values_videos": pv, "padding_mask_videos": mask}
        if kwargs.get("return_metadata", self.return_metadata):
            data["video_metadata"] = metas
        return BatchFeature(data=data)

    def to_patches(self, videos, patch_size: int, *, out_dtype: torch.dtype | None = None, device=None, **kwargs):
        """Clips straight to normalized patch rows: decode/sample, resize on ``device``, then one fused
        normalize+patchify kernel (:func:`pevideo_kernels.patchify_normalize`).

        uint8 frames go to the device as they are (4× less than float32 over PCIe), are resized there
        (uint8 in, uint8 out, as upstream rounds), and are written once, as patches, in ``out_dtype``.
        Same values as ``patchify(self(videos, ...).pixel_values_videos)`` for the real frames, since
        every step runs the same ops (check it on CPU, where it is the same code).

        Returns ``(patches, lengths)``: patches (ΣT_i, (h/p)·(w/p), 3·p·p) with the clips' frames packed
        in order, features ordered (c, kh, kw); lengths (B,) int64, frames per clip. Takes the same
        options as :meth:`preprocess` (except return_tensors).
        """
        if "return_tensors" in kwargs:
            raise ValueError("to_patches returns tensors; return_tensors does not apply")
        if device is not None:
            kwargs["device"] = device
        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}")
        s = self._call_settings(kwargs)
        clips, _ = self._load(videos, kwargs, s)
        shapes = {tuple(c.shape[1:]) for c in clips}
        if len(shapes) != 1:
            raise ValueError(f"clips end up with different frame sizes {sorted(shapes)}; set size (do_resize) to batch them")
        frames = clips[0] if len(clips) == 1 else torch.cat(clips)
        patches = patchify_normalize(frames.permute(0, 2, 3, 1), patch_size, **s.normalization.as_kwargs(),
                                     out_dtype=out_dtype)
        lengths = torch.tensor([c.shape[0] for c in clips], dtype=torch.int64, device=frames.device)
        return patches, lengths

    @staticmethod
    def _normalize_into(out, clip, s: ProcessorSettings):
        """Write the clip into ``out``: normalized (the float32 ops of transformers' fused path, by the one
        uint8 normalize function), or as it is when the processor neither rescales nor normalizes."""
        if s.normalizes:
            normalize_uint8(clip, **s.normalization.as_kwargs(), out=out)
        else:
            out.copy_(clip)

    @staticmethod
    def _rgb(clip, i, s: ProcessorSettings):
        if clip.shape[1] == 1:
            if not s.do_convert_rgb:
                raise ValueError(f"video {i} is grayscale; set do_convert_rgb=True to repeat it to RGB")
            clip = clip.expand(-1, 3, -1, -1)
        return clip

    def _load(self, videos, kw, s: ProcessorSettings):
        """Clips as uint8 (T, 3, h, w) tensors on the target device, sampled, resized, cropped. Files are
        decoded with the frame plan applied to each frame (on CPU; on another device, whole clips are
        resized there); every clip is checked against the memory budget before its frames are made."""
        sampling = s.call_sampling(kw.get("num_frames"), kw.get("fps"), kw.get("do_sample_frames"))
        items = split_clips(videos)
        metadata = kw.get("video_metadata")
        if metadata is not None and not isinstance(metadata, (list, tuple)):
            metadata = [metadata]
        if metadata is not None and len(metadata) != len(items):
            raise ValueError(f"got {len(items)} videos but {len(metadata)} video_metadata entries; give one per video")
        device = kw.get("device")
        on_cpu = device is None or torch.device(device).type == "cpu"
        limits = Limits.resolve()
        plan = s.frame_plan
        decoded = decode_sources(items, DecodePlan(sampling, plan if on_cpu else FramePlan(), False, limits))
        clips, metas = [], []
        for i, item in enumerate(items):
            if i in decoded:
                frames, meta = decoded[i]
                clip = torch.from_numpy(frames).permute(0, 3, 1, 2)
                if on_cpu:  # resized and cropped as each frame was decoded
                    clips.append(clip)
                    metas.append(meta)
                    continue
                limits.check_frames(clip.shape[0], *plan.out_size(*clip.shape[2:]), meta.source)
            else:
                clip = channels_first(as_tensor(item), i, kw.get("input_data_format"))
                meta_in = metadata[i] if metadata is not None else None
                clip, meta = sample_array(clip, sampling, meta_in, i, plan, limits)
            if device is not None:
                clip = clip.to(device)
            clips.append(plan.apply(self._rgb(clip, i, s)))
            metas.append(meta)
        return clips, metas


# --------------------------------------------------------------------------------------------------
# Processor: video processor + tokenizer
# --------------------------------------------------------------------------------------------------
class PeVideoProcessor:
    """PE Video's processor: :class:`PeVideoVideoProcessor` plus the checkpoint's tokenizer.

    ``processor(text=labels, videos=clips, padding=True, return_tensors="pt")`` returns
    ``input_ids``, ``attention_mask`` (from the tokenizer) and ``pixel_values_videos``,
    ``padding_mask_videos``. Options that the video processor knows go to it, the rest to the
    tokenizer; ``return_tensors`` goes to both. ``processor.video_processor(...)`` and
    ``processor.tokenizer(...)`` work as upstream.
    """

    def __init__(self, video_processor: PeVideoVideoProcessor, tokenizer):
        self.video_processor = video_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "PeVideoProcessor":
        """The video processor's config and the tokenizer (``AutoTokenizer``) from the same place.

        A checkpoint folder without a processor config gets PE Video's default preprocessing (see
        :meth:`PeVideoVideoProcessor.from_pretrained`); one without a tokenizer raises ValueError
        saying where to get one (see :func:`load_tokenizer`)."""
        video_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_KEYS}
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        tokenizer = load_tokenizer(pretrained_model_name_or_path, **kwargs)
        video_processor = PeVideoVideoProcessor.from_pretrained(pretrained_model_name_or_path, **video_kwargs, **hub)
        return cls(video_processor, tokenizer)

    def save_pretrained(self, save_directory) -> list[str]:
        files = self.video_processor.save_pretrained(save_directory)
        files += list(self.tokenizer.save_pretrained(save_directory))
        return files

    @property
    def model_input_names(self):
        return list(dict.fromkeys(list(self.tokenizer.model_input_names) + self.video_processor.model_input_names))

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        from transformers import BatchFeature

        if images is not None or audio is not None:
            raise ValueError("PE Video's processor takes text and videos (no images or audio)")
        if text is None and videos is None:
            raise ValueError("give text, videos, or both")
        video_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _CALL_KWARGS and k != "return_tensors"}
        return_tensors = kwargs.get("return_tensors")
        data = {}
        if text is not None:
            data.update(self.tokenizer(text, **kwargs))
        if videos is not None:
            data.update(self.video_processor(videos, return_tensors=return_tensors, **video_kwargs))
        elif video_kwargs:
            raise ValueError(f"video options {sorted(video_kwargs)} given without videos")
        return BatchFeature(data=data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}(video_processor={self.video_processor!r}, tokenizer={self.tokenizer!r})"

