"""A video processor's settings resolved once into a frozen :class:`ProcessorSettings` record: how frames
are resized and cropped (a :class:`~pevideo.resize.FramePlan`), normalized (a
:class:`~pevideo.normalization.Normalization`) and sampled by default (a
:class:`~pevideo.sampling.Sampling`), checked when the record is made.

:class:`pevideo.PeVideoVideoProcessor` keeps one for its configuration (made again only when a setting
is assigned) and makes one per call only when the call overrides a setting.
"""
from __future__ import annotations

from dataclasses import dataclass

from .normalization import Normalization
from .resize import FramePlan, size_hw
from .sampling import Sampling

__all__ = ["ProcessorSettings", "RESAMPLE", "RESAMPLE_NAMES", "SETTING_KEYS"]

# PIL resampling codes, as preprocessor configs store them.
RESAMPLE = {2: "bilinear", 3: "bicubic"}
RESAMPLE_NAMES = {"bilinear": 2, "bicubic": 3}

# The keys that decide a ProcessorSettings (a call giving one of them gets a record of its own).
SETTING_KEYS = frozenset({
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_convert_rgb", "do_center_crop", "crop_size", "default_to_square", "data_format",
})


def _resample_mode(resample) -> str:
    if hasattr(resample, "value"):  # PILImageResampling / InterpolationMode enums
        resample = resample.value
    if isinstance(resample, str):
        resample = RESAMPLE_NAMES.get(resample.lower(), resample)
    if resample not in RESAMPLE:
        raise NotImplementedError(
            f"resample={resample!r} is not supported; PE Video uses bilinear (2); bicubic (3) also works"
        )
    return RESAMPLE[resample]


@dataclass(frozen=True)
class ProcessorSettings:
    """What a processor does to frames, resolved and checked.

    ``frame_plan``: resize (``size``, None without ``do_resize``) with ``mode``, then center crop;
    ``normalization``: rescale + normalize as the model's uint8 entry takes it (no mean / std when
    ``do_normalize`` is off; rescale 1 when ``do_rescale`` is off); ``normalizes``: whether the
    output is float32 (``do_rescale`` or ``do_normalize``) rather than the uint8 frames;
    ``do_convert_rgb``: repeat grayscale to RGB; ``sampling``: the config's ``num_frames``, else its
    ``fps`` (every frame with neither), which applies when a call asks for no sampling of its own and
    ``sample_by_default`` (``do_sample_frames``) or the call's ``do_sample_frames=True`` says to."""

    frame_plan: FramePlan
    normalization: Normalization
    normalizes: bool
    do_convert_rgb: bool
    sampling: Sampling
    sample_by_default: bool

    def call_sampling(self, num_frames=None, fps=None, do_sample_frames=None) -> Sampling:
        """The sampling of one call: its own ``num_frames`` / ``fps``, else the config's when sampling
        is on (the call's ``do_sample_frames``, else the config's)."""
        rule = Sampling.of(num_frames, fps)
        if do_sample_frames is False and not rule.every_frame:
            raise ValueError("do_sample_frames=False contradicts the num_frames/fps given")
        if rule.every_frame and (do_sample_frames if do_sample_frames is not None else self.sample_by_default):
            return self.sampling
        return rule

    @property
    def output_size(self) -> tuple[int, int] | None:
        return self.frame_plan.crop or self.frame_plan.size

    @classmethod
    def resolve(cls, get) -> "ProcessorSettings":
        """From ``get(key)``: a setting's value (a call's override, else the config's; None when unset).
        Sampling comes from the config alone (a call's num_frames / fps: :meth:`call_sampling`)."""
        do_resize, do_rescale, do_normalize = bool(get("do_resize")), bool(get("do_rescale")), bool(get("do_normalize"))
        crop = None
        if get("do_center_crop"):
            if get("crop_size") is None:
                raise ValueError("do_center_crop needs crop_size")
            crop = size_hw(get("crop_size"), True, "crop_size")
        plan = FramePlan(
            size=size_hw(get("size"), get("default_to_square")) if do_resize else None,
            mode=_resample_mode(get("resample")),
            crop=crop,
        )
        # Checked once, by the record the model takes too; only the settings in use are checked.
        norm = Normalization(
            mean=get("image_mean") if do_normalize else None,
            std=get("image_std") if do_normalize else None,
            rescale=get("rescale_factor") if do_rescale else 1.0,
        )
        fmt = get("data_format")
        fmt = fmt.value if hasattr(fmt, "value") else fmt
        if fmt not in (None, "channels_first"):
            raise NotImplementedError(f"data_format={fmt!r}: outputs are channels-first (B, T, 3, H, W)")
        n, f = get("num_frames") or None, get("fps") or None  # upstream's order: num_frames, else fps
        sampling = Sampling.of(n, None if n is not None else f)
        return cls(plan, norm, do_rescale or do_normalize, bool(get("do_convert_rgb")), sampling,
                   bool(get("do_sample_frames")))
