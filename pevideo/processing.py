"""PE Video's processors: frames or video files in, model inputs out, as transformers computes them.

:class:`PeVideoVideoProcessor` reads the same preprocessor files as transformers' and produces the same
``pixel_values_videos``: frames sampled with upstream's rule, resized to S×S with torchvision's
antialiased bilinear on uint8 (the same ``torch.nn.functional.interpolate`` call torchvision makes, so
no torchvision is needed), then ``(x − mean·255) / (std·255)`` in float32 as transformers' fused
rescale+normalize computes it. Where it differs, it is on purpose (see the class docstring).

:class:`PeVideoProcessor` pairs it with the checkpoint's tokenizer. The frame-level steps (input forms,
sampling, resize, crop) are in :mod:`pevideo.frames`; config files and tokenizers in
:mod:`pevideo.processor_files`.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from .frames import (
    as_tensor,
    center_crop,
    channels_first,
    decode_sources,
    resize_uint8,
    sample_array,
    size_hw,
    sampling,
    split_clips,
)
from .processor_files import (
    VIDEO_PROCESSOR_NAME,
    NoProcessorConfig,
    checkpoint_frame_size,
    load_tokenizer,
    load_video_config,
)
from .normalization import Normalization

__all__ = ["PeVideoVideoProcessor", "PeVideoProcessor", "Normalization", "sampling", "checkpoint_frame_size",
           "load_tokenizer"]

# PIL resampling codes, as preprocessor configs store them.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {"bilinear": 2, "bicubic": 3}

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

    Sampling follows upstream: ``num_frames=n`` takes ``int(i·(N−1)/(n−1))`` (n = 1 takes frame 0,
    where upstream divides by zero), ``fps=f`` takes ``max(1, int(N/src_fps·f))`` frames at
    ``i·N // n`` (the source fps comes from the file, or from ``video_metadata`` for arrays). Deliberate
    differences: ``num_frames``/``fps`` given in the call always sample (upstream ignores them unless
    the config sets ``do_sample_frames``), and a call's ``fps`` wins over a config's ``num_frames``.

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
        self._settings({})  # validate now, not at the first call

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
                f"(the model's frame size), {_RESAMPLE[proc.resample]} with antialias, rescale 1/255, "
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

    def _settings(self, kw) -> dict:
        """Merge call options over the config and check them; returns the resolved settings."""
        get = lambda k: kw[k] if kw.get(k) is not None else getattr(self, k)  # noqa: E731
        s = {}
        s["do_resize"] = bool(get("do_resize"))
        s["size"] = size_hw(get("size"), get("default_to_square")) if s["do_resize"] else None
        resample = get("resample")
        if hasattr(resample, "value"):  # PILImageResampling / InterpolationMode enums
            resample = resample.value
        if isinstance(resample, str):
            resample = _RESAMPLE_NAMES.get(resample.lower(), resample)
        if resample not in _RESAMPLE:
            raise NotImplementedError(
                f"resample={resample!r} is not supported; PE Video uses bilinear (2); bicubic (3) also works"
            )
        s["mode"] = _RESAMPLE[resample]
        s["do_rescale"] = bool(get("do_rescale"))
        s["rescale_factor"] = get("rescale_factor")
        s["do_normalize"] = bool(get("do_normalize"))
        # Checked once, by the record the model takes too; only the settings in use are checked.
        s["norm"] = norm = Normalization(
            mean=get("image_mean") if s["do_normalize"] else 0.0,
            std=get("image_std") if s["do_normalize"] else 1.0,
            rescale=s["rescale_factor"] if s["do_rescale"] else 1.0,
        )
        if s["do_normalize"]:
            s["mean"], s["std"] = list(norm.mean), list(norm.std)
        s["do_convert_rgb"] = bool(get("do_convert_rgb"))
        s["crop"] = size_hw(get("crop_size"), True) if get("do_center_crop") else None
        if get("do_center_crop") and s["crop"] is None:
            raise ValueError("do_center_crop needs crop_size")
        fmt = kw.get("data_format")
        fmt = fmt.value if hasattr(fmt, "value") else fmt
        if fmt not in (None, "channels_first"):
            raise NotImplementedError(f"data_format={fmt!r}: outputs are channels-first (B, T, 3, H, W)")
        return s

    def _sampling(self, kw):
        """('n', n), ('fps', f) or None, from the call's and the config's options."""
        dsf = kw.get("do_sample_frames")
        rule = sampling(kw.get("num_frames"), kw.get("fps"))
        if dsf is False and rule is not None:
            raise ValueError("do_sample_frames=False contradicts the num_frames/fps given")
        if rule is None and (dsf if dsf is not None else self.do_sample_frames):
            # upstream's order: the config's num_frames, else its fps
            rule = sampling(self.num_frames or None, None) or sampling(None, self.fps or None)
        return rule

    @property
    def normalization(self) -> Normalization:
        """This processor's rescale + normalize, as a :class:`Normalization` (what
        :meth:`pevideo.PeVideoModel.get_video_features_uint8` takes)."""
        return self._settings({})["norm"]

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of the frames this processor makes (after resize and crop), or None when
        it keeps the input's size (no resize, no crop)."""
        s = self._settings({})
        return s["crop"] or s["size"]

    @property
    def resize_settings(self) -> tuple[tuple[int, int] | None, str]:
        """(size before any crop, or None without resize; resample mode): how this processor resizes,
        so a decoder can resize each frame as it is decoded (:func:`pevideo.load_video`'s ``size`` /
        ``resample``) with the same result."""
        s = self._settings({})
        return s["size"], s["mode"]

    def resize_frames(self, frames) -> torch.Tensor:
        """One clip's uint8 frames (T, H, W, 3) to uint8 (T, h, w, 3): this processor's RGB conversion,
        resize and crop, without sampling or normalizing (pair it with :attr:`normalization` for
        :meth:`pevideo.PeVideoModel.get_video_features_uint8`). A channels-last view of the resized
        frames, not a copy."""
        s = self._settings({})
        clips, _ = self._load(frames, {"do_sample_frames": False, "input_data_format": "channels_last"}, s)
        return clips[0].permute(0, 2, 3, 1)

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
        ``crop_size``.
        """
        from transformers import BatchFeature

        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(_CALL_KWARGS)}")
        s = self._settings(kwargs)
        return_tensors = kwargs.get("return_tensors")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        clips, metas = self._load(videos, kwargs, s)

        if s["do_normalize"] or s["do_rescale"]:
            out_dtype = torch.float32
        else:
            out_dtype = torch.uint8  # upstream leaves frames as they are
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
        from .dispatch import patchify_normalize

        if "return_tensors" in kwargs:
            raise ValueError("to_patches returns tensors; return_tensors does not apply")
        if device is not None:
            kwargs["device"] = device
        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}")
        s = self._settings(kwargs)
        clips, _ = self._load(videos, kwargs, s)
        shapes = {tuple(c.shape[1:]) for c in clips}
        if len(shapes) != 1:
            raise ValueError(f"clips end up with different frame sizes {sorted(shapes)}; set size (do_resize) to batch them")
        frames = clips[0] if len(clips) == 1 else torch.cat(clips)
        mean = std = None
        rescale = s["rescale_factor"] if s["do_rescale"] else 1.0
        if s["do_normalize"]:
            mean, std = s["mean"], s["std"]
        patches = patchify_normalize(frames.permute(0, 2, 3, 1), patch_size, mean, std, rescale, out_dtype)
        lengths = torch.tensor([c.shape[0] for c in clips], dtype=torch.int64, device=frames.device)
        return patches, lengths

    def _normalize_into(self, out, clip, s):
        """Write the normalized clip into ``out``: the float32 ops of transformers' fused path."""
        if s["do_normalize"]:
            m = torch.tensor(s["mean"], dtype=torch.float32, device=out.device)
            d = torch.tensor(s["std"], dtype=torch.float32, device=out.device)
            if s["do_rescale"]:  # upstream folds the rescale into mean and std
                m, d = m * (1.0 / s["rescale_factor"]), d * (1.0 / s["rescale_factor"])
            torch.sub(clip, m[:, None, None], out=out)
            out.div_(d[:, None, None])
        elif s["do_rescale"]:
            out.copy_(clip)
            out.mul_(s["rescale_factor"])
        else:
            out.copy_(clip)

    def _load(self, videos, kw, s):
        """Clips as uint8 (T, 3, h, w) tensors on the target device, sampled, resized, cropped."""
        sampling = self._sampling(kw)
        items = split_clips(videos)
        metadata = kw.get("video_metadata")
        if metadata is not None and not isinstance(metadata, (list, tuple)):
            metadata = [metadata]
        if metadata is not None and len(metadata) != len(items):
            raise ValueError(f"got {len(items)} videos but {len(metadata)} video_metadata entries; give one per video")
        device = kw.get("device")
        decoded = decode_sources(items, sampling)
        clips, metas = [], []
        for i, item in enumerate(items):
            if i in decoded:
                frames, meta = decoded[i]
                clip = torch.from_numpy(frames).permute(0, 3, 1, 2)
            else:
                clip = channels_first(as_tensor(item), i, kw.get("input_data_format"))
                meta_in = metadata[i] if metadata is not None else None
                clip, meta = sample_array(clip, sampling, meta_in, i)
            if device is not None:
                clip = clip.to(device)
            if clip.shape[1] == 1:
                if not s["do_convert_rgb"]:
                    raise ValueError(f"video {i} is grayscale; set do_convert_rgb=True to repeat it to RGB")
                clip = clip.expand(-1, 3, -1, -1)
            if s["size"] is not None:
                clip = resize_uint8(clip, s["size"], s["mode"])
            if s["crop"] is not None:
                clip = center_crop(clip, s["crop"])
            clips.append(clip)
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

