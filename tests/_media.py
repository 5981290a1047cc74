"""Tiny test media: short videos written with PyAV, and a tiny checkpoint folder with a tokenizer."""
from __future__ import annotations

import os

import numpy as np


def write_video(path, n_frames: int, height: int = 48, width: int = 64, codec: str = "h264", rate: int = 25, seed: int = 0,
                rotation: int | None = None):
    """``n_frames`` frames of smooth moving color (so that clips differ and compress well).

    ``rotation``: a display matrix asking players to rotate the frames by this many degrees
    counterclockwise (what PyAV's ``VideoFrame.rotation`` reads back)."""
    import av

    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6.28, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(os.fspath(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.gop_size = 4
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n_frames):
            img = np.stack([127 + 100 * np.sin(xx / (7 + k) + yy / (9 + k) + 0.5 * i + phase[k]) for k in range(3)], -1)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return os.fspath(path)


def write_corrupt(path, like: str | None = None) -> str:
    """Not a video: garbage bytes (or the first bytes of ``like``, cut before any frame)."""
    data = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4
    if like is not None:
        with open(like, "rb") as f:
            data = f.read()[:200]
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_truncated(path, like: str, keep: float) -> str:
    """The first ``keep`` share of the bytes of the video ``like``: a download or copy cut short."""
    with open(like, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return os.fspath(path)


def write_tokenizer(folder) -> None:
    """The word-level tokenizer of ``pevideo tiny-checkpoint`` (vocab 97; pad 0, cls 1, sep 2)."""
    from pevideo.tiny import write_tokenizer as write

    write(folder, vocab_size=97)


def write_checkpoint(folder, name: str = "tiny", seed: int = 0, tokenizer: bool = True) -> str:
    """A random upstream (transformers) PeVideoModel saved with ``save_pretrained``, plus a tokenizer."""
    from _upstream import upstream_model

    upstream_model(name, seed).save_pretrained(os.fspath(folder))
    if tokenizer:
        write_tokenizer(folder)
    return os.fspath(folder)
