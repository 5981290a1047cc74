"""Which frames of a clip to take: the one sampling rule of pevideo, upstream's.

A request (``num_frames`` or ``fps``, or neither for every frame) is checked once into a frozen
:class:`Sampling` record; :meth:`Sampling.indices` turns it into frame indices for a clip of ``total``
frames at ``src_fps``. ``load_video``, the processors, ``pevideo embed`` / ``classify`` and the Python
API all take frames through this record, so the same request picks the same frames everywhere:

* ``num_frames=n``: ``int(i·(N−1)/(n−1))`` for i < n, transformers' PE Video processor's rule
  (n = 1 takes frame 0, where upstream divides by zero; n > N repeats frames, as the formula does).
* ``fps=f``: transformers' default rule (``default_sample_indices_fn``), which PE Video's processor
  uses for fps: ``n = max(1, int(N / src_fps · f))`` frames at ``i·N // n``. Where that asks for more
  frames than the clip has (f above the clip's own rate), upstream raises; here every frame is taken
  once (n = N). The source rate is needed: without it, ValueError.

A leaf module: it imports nothing of pevideo.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

__all__ = ["Sampling", "uniform_indices", "fps_indices", "check_num_frames", "check_fps"]


def uniform_indices(total: int, n: int) -> list[int]:
    """``int(i·(total−1)/(n−1))`` for i < n, as transformers' PE Video processor (n = 1 gives [0])."""
    if n == 1:
        return [0]
    return [int(i * (total - 1) / (n - 1)) for i in range(n)]  # the same float expression as upstream


def fps_count(total: int, src_fps: float, fps: float) -> int:
    """Frames an fps request takes from ``total`` frames at ``src_fps``: upstream's count, at most ``total``."""
    return min(total, max(1, int(total / src_fps * fps)))


def fps_indices(total: int, src_fps: float | None, fps: float, source: str = "video") -> list[int]:
    """transformers' fps rule: ``n = max(1, int(total/src_fps·fps))`` frames at ``i·total // n`` (n at
    most ``total``: above the clip's own rate every frame is taken once, where upstream raises)."""
    if not src_fps:
        raise ValueError(
            f"{source}: sampling at fps={fps:g} needs the video's own frame rate, which is unknown; "
            "pass video_metadata with 'fps', or use num_frames"
        )
    n = fps_count(total, src_fps, fps)
    return [i * total // n for i in range(n)]  # numpy's arange(n) * total // n, in Python ints


def _prefix(name: str | None) -> str:
    return f"{name}: " if name else ""


def check_num_frames(num_frames, name: str | None = None) -> int | None:
    """``num_frames`` as a positive int (None stays None); ValueError (naming ``name``) otherwise."""
    if num_frames is None:
        return None
    msg = f"{_prefix(name)}num_frames must be a positive int, got {num_frames!r}"
    if isinstance(num_frames, bool):
        raise ValueError(msg)
    try:
        n = operator.index(num_frames)
    except TypeError:
        raise ValueError(msg) from None
    if n <= 0:
        raise ValueError(msg)
    return n


def check_fps(fps, name: str | None = None) -> float | None:
    """``fps`` as a positive finite float (None stays None); ValueError (naming ``name``) otherwise."""
    if fps is None:
        return None
    msg = f"{_prefix(name)}fps must be a positive finite number, got {fps!r}"
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise ValueError(msg)
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(msg)
    return fps


@dataclass(frozen=True)
class Sampling:
    """A checked sampling request: ``num_frames`` or ``fps`` (not both), or neither (every frame).

    Build it with :meth:`of` (which checks); :meth:`indices` applies the rule (see the module)."""

    num_frames: int | None = None
    fps: float | None = None

    @classmethod
    def of(cls, num_frames=None, fps=None, name: str | None = None) -> "Sampling":
        """Check a request once. Refuses both at once, and values that are not a positive int / a
        positive finite number (ValueError, naming ``name`` when given)."""
        if num_frames is not None and fps is not None:
            raise ValueError(f"{_prefix(name)}give num_frames or fps, not both")
        return cls(check_num_frames(num_frames, name), check_fps(fps, name))

    @property
    def every_frame(self) -> bool:
        return self.num_frames is None and self.fps is None

    def indices(self, total: int, src_fps: float | None, source: str = "video") -> list[int]:
        """Indices (into the clip's ``total`` frames) of the frames to take, in order."""
        if self.num_frames is not None:
            return uniform_indices(total, self.num_frames)
        if self.fps is not None:
            return fps_indices(total, src_fps, self.fps, source)
        return list(range(total))

    def __str__(self) -> str:
        if self.num_frames is not None:
            return f"num_frames={self.num_frames}"
        return f"fps={self.fps:g}" if self.fps is not None else "every frame"
