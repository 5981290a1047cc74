"""The one record of how resized uint8 frames become model inputs (rescale, then per-channel mean / std),
owned by the processor and taken by the model's uint8 entry point."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Normalization"]

def _channel_list(v, name):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)] * 3
    try:
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        raise ValueError(f"{name} needs 3 numbers (one per RGB channel), got {v!r}") from None
    if len(vals) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel), got {vals}")
    return vals


@dataclass(frozen=True)
class Normalization:
    """How resized uint8 frames become model inputs: ``(x * rescale - mean) / std`` per RGB channel, or
    ``x * rescale`` alone when ``mean`` and ``std`` are None (a processor with ``do_normalize`` off).

    A processor's rescale + normalize settings (:attr:`PeVideoVideoProcessor.normalization`), as
    :meth:`pevideo.PeVideoModel.get_video_features_uint8` applies them inside the patchify op (the
    record goes as it is to ``Ops.patchify``; :func:`pevideo_kernels.patchify.normalize_uint8` is the
    one place the arithmetic is written). The defaults are PE Video's: mean = std = 0.5, rescale
    1/255. Checked on creation (ValueError): three finite means, three finite positive stds (0 or NaN
    would make every output NaN), both or neither, a finite non-zero rescale.
    """

    mean: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255

    def __post_init__(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("image_mean and image_std go together: give both, or neither (rescale only)")
        if self.mean is not None:
            mean, std = _channel_list(self.mean, "image_mean"), _channel_list(self.std, "image_std")
            if not all(math.isfinite(v) for v in mean):
                raise ValueError(f"image_mean must be finite, got {mean}")
            if not all(math.isfinite(v) and v > 0 for v in std):
                raise ValueError(f"image_std must be finite and positive, got {std}")
            object.__setattr__(self, "mean", tuple(mean))
            object.__setattr__(self, "std", tuple(std))
        r = self.rescale
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r == 0:
            raise ValueError(f"rescale_factor must be a finite non-zero number, got {r!r}")
        object.__setattr__(self, "rescale", float(r))

    @property
    def normalizes(self) -> bool:
        """Whether mean / std apply (else only the rescale)."""
        return self.mean is not None

    def as_kwargs(self) -> dict:
        """``mean``, ``std`` (None: rescale only), ``rescale`` as the patchify kernels take them."""
        return dict(mean=self.mean, std=self.std, rescale=self.rescale)
