"""How much one clip may cost: a memory budget for its frames and a time limit for its decode.

Both are resolved once into a frozen :class:`Limits` record: from the arguments given, else from the
environment (``PEVIDEO_MAX_VIDEO_BYTES``, ``PEVIDEO_DECODE_TIME_LIMIT``), else the defaults. A bad
setting is a :class:`pevideo.UsageError` naming it, raised when the record is made, i.e. before any
work (``pevideo embed`` exits 2).

The memory budget: the frames a clip holds, ``frames × height × width × 3`` bytes as uint8 at the size
they are held (after the resize on decode when there is one), may not exceed ``max_bytes`` (default
:data:`DEFAULT_MAX_VIDEO_BYTES`, 4 GiB: about 3 minutes of 640×360 video at 30 fps taken whole, or
12,000 frames at 336×336). It is checked from the sampled frame count and the frame size before the
frames are allocated (:meth:`Limits.check_frames`), so ``num_frames=100000`` or ``fps=1e9`` fails at
once with the size named instead of after minutes and gigabytes.

A leaf module: it imports only :mod:`pevideo.errors`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from .errors import UsageError

__all__ = ["Limits", "VideoTooLargeError", "DEFAULT_MAX_VIDEO_BYTES", "DEFAULT_TIME_LIMIT", "format_bytes",
           "parse_bytes"]

DEFAULT_MAX_VIDEO_BYTES = 4 << 30
DEFAULT_TIME_LIMIT = 600.0  # seconds one video may take to decode

MAX_BYTES_VAR = "PEVIDEO_MAX_VIDEO_BYTES"
TIME_LIMIT_VAR = "PEVIDEO_DECODE_TIME_LIMIT"
_REMOVED_VAR = "PEVIDEO_MAX_FRAMES"  # the old frame-count cap, replaced by the memory budget

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class VideoTooLargeError(ValueError):
    """The frames asked for would take more memory than the budget (:class:`Limits`)."""


def format_bytes(n: float) -> str:
    if not math.isfinite(n):
        return "no limit"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def parse_bytes(text: str) -> float:
    """``"4294967296"``, ``"4G"``, ``"4GiB"``, ``"512M"``, ``"1.5T"`` (binary units), or ``"inf"`` (no
    limit), in bytes; ValueError otherwise."""
    s = str(text).strip().lower()
    if s in ("inf", "infinity", "none"):
        return math.inf
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?", s)
    if not m:
        raise ValueError(text)
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not value >= 1:
        raise ValueError(text)
    return value


def _env(var: str, parse, what: str):
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise UsageError(f"{var}={raw!r}: must be {what}")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if math.isnan(value):
        raise ValueError(raw)
    return value


@dataclass(frozen=True)
class Limits:
    """What one clip may cost. ``max_bytes``: the memory budget for its frames (``math.inf``: none);
    ``time_limit``: seconds its decode may take (``math.inf``: none). Make it with :meth:`resolve`."""

    max_bytes: float = DEFAULT_MAX_VIDEO_BYTES
    time_limit: float = DEFAULT_TIME_LIMIT

    @classmethod
    def resolve(cls, max_bytes=None, time_limit=None) -> "Limits":
        """The arguments given, else the environment, else the defaults; :class:`pevideo.UsageError`
        (a ValueError) naming the argument or variable for a value that is not positive."""
        if os.environ.get(_REMOVED_VAR, "").strip():
            raise UsageError(
                f"{_REMOVED_VAR} is no longer read: the limit per clip is now a memory budget; set "
                f"{MAX_BYTES_VAR} (e.g. {MAX_BYTES_VAR}=16G; default {format_bytes(DEFAULT_MAX_VIDEO_BYTES)}) "
                f"and unset {_REMOVED_VAR}"
            )
        if max_bytes is None:
            max_bytes = _env(MAX_BYTES_VAR, parse_bytes, "a size in bytes such as 8G, 512M or 4294967296 (or inf)")
        elif isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)) or not max_bytes >= 1:
            raise UsageError(f"max_bytes must be a positive number of bytes (math.inf: no limit), got {max_bytes!r}")
        if time_limit is None:
            time_limit = _env(TIME_LIMIT_VAR, _seconds, "a positive number of seconds (inf: no limit)")
        elif isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0:
            raise UsageError(f"time_limit must be a positive number of seconds (math.inf: none), got {time_limit!r}")
        return cls(float(max_bytes if max_bytes is not None else DEFAULT_MAX_VIDEO_BYTES),
                   float(time_limit if time_limit is not None else DEFAULT_TIME_LIMIT))

    def check_frames(self, count: int, height: int, width: int, name: str = "video") -> None:
        """:class:`VideoTooLargeError` when ``count`` uint8 RGB frames of ``height × width`` exceed the
        budget; the message names the size and the ways out."""
        need = int(count) * int(height) * int(width) * 3
        if need > self.max_bytes:
            raise VideoTooLargeError(
                f"{name}: {count} frames of {height}x{width} would take {format_bytes(need)} "
                f"(frames x height x width x 3 bytes), above the memory budget of {format_bytes(self.max_bytes)} "
                "per clip; sample fewer frames (num_frames / fps) or a smaller size, or raise the budget "
                f"with max_bytes= or {MAX_BYTES_VAR} (e.g. {MAX_BYTES_VAR}={_suggest(need)})"
            )


def _suggest(need: int) -> str:
    return f"{max(1, math.ceil(need / (1 << 30)))}G"
