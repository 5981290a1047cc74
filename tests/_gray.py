"""Flat-gray test videos: frame i is a flat gray of level LEVEL·i, so a decoded frame tells its index
despite compression (shared by the load_video tests)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np

N, H, W, RATE, LEVEL = 24, 48, 64, 25, 10

FORMATS = {  # name -> (container, codec); mp4/mkv are seeked, ts/avi decoded in order
    "mp4": ("mp4", "h264"),
    "mkv": ("matroska", "h264"),
    "ts": ("mpegts", "h264"),
    "avi": ("avi", "mpeg4"),
}


def write_video(path, n=N, fmt=None, codec="h264", gop=8, rate=RATE, times_ms=None, options=None):
    """n frames of flat gray LEVEL·i (times_ms: explicit presentation times, for variable frame rate)."""
    import av

    c = av.open(str(path), "w", format=fmt, options=options or {})
    s = c.add_stream(codec, rate=rate)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    s.codec_context.gop_size = gop
    if codec == "mpeg4":
        s.codec_context.options = {"qscale": "2"}  # fine quantizer: keep the gray levels apart
    if times_ms is not None:
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
    if n == 0:
        c.start_encoding()
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), LEVEL * i, np.uint8), format="rgb24")
        if times_ms is not None:
            frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
        for p in s.encode(frame):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def levels(frames):
    return [int(round(v / LEVEL)) for v in frames.reshape(len(frames), -1).mean(1)]


def write_formats(folder) -> dict:
    """One N-frame clip per container of FORMATS, in ``folder``: {name: path}."""
    return {name: write_video(folder / f"clip.{name}", fmt=fmt, codec=codec) for name, (fmt, codec) in FORMATS.items()}


class Counting:
    """Wraps a container, counting decoded frames and seeks."""

    def __init__(self, container, stats):
        self._c, self._stats = container, stats

    def __getattr__(self, name):
        return getattr(self._c, name)

    def seek(self, *args, **kwargs):
        self._stats["seeks"] += 1
        return self._c.seek(*args, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self._c.decode(*args, **kwargs):
            self._stats["decoded"] += 1
            yield frame


def without_timestamps(monkeypatch) -> None:
    """Make every stream look as if its packets had no usable timestamps, so load_video decodes in order."""
    from pevideo import _probe

    real_index = _probe._index_packets

    def no_pts(*args):
        idx = real_index(*args)
        idx.pts = None
        return idx

    monkeypatch.setattr(_probe, "_index_packets", no_pts)
