"""How a run embeds: the arguments :func:`~pevideo.embed.embed_videos`, :func:`~pevideo.embed.embed_to_file`
and :func:`~pevideo.embed.classify_videos` share, checked once into one frozen :class:`EmbedOptions`
record that the rest of the pipeline reads."""
from __future__ import annotations

from dataclasses import dataclass

from ..sampling import Sampling
from .session import DEFAULT_NUM_FRAMES, check_sampling

__all__ = ["EmbedOptions"]


@dataclass(frozen=True)
class EmbedOptions:
    """A run's options, checked (see :func:`~pevideo.embed.embed_videos` for each one's meaning).

    ``sampling``: the sampling rule, checked (num_frames or fps; neither given: 16 frames).
    ``processor``, ``device``, ``dtype``, ``fast``: what the session is opened with (for a
    model object its own device, dtype and kernels count). ``num_workers`` None: the default count
    (:func:`~pevideo.embed.workers.default_workers`)."""

    sampling: Sampling = Sampling(num_frames=DEFAULT_NUM_FRAMES)
    batch_size: int = 8
    num_workers: int | None = None
    pooled: bool = False
    processor: object = None
    device: object = None
    dtype: object = None
    fast: bool | None = None
    progress: bool | None = False
    apply_rotation: bool = False

    @classmethod
    def of(cls, *, num_frames=None, fps=None, batch_size: int = 8, num_workers=None, **rest) -> "EmbedOptions":
        """Check the arguments (ValueError naming the bad one) and resolve the sampling rule."""
        sampling = check_sampling(num_frames, fps)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if num_workers is not None and (isinstance(num_workers, bool) or int(num_workers) != num_workers
                                        or num_workers < 0):
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        return cls(sampling=sampling, batch_size=int(batch_size),
                   num_workers=None if num_workers is None else int(num_workers), **rest)

    @property
    def num_frames(self) -> int | None:
        return self.sampling.num_frames

    @property
    def fps(self) -> float | None:
        return self.sampling.fps
