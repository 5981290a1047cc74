"""load_video on short videos written here with PyAV.

Frame i of every test video is a flat gray of level LEVEL·i, so a decoded frame tells its index despite
compression.
"""
import io
import re
import math
import pathlib
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")

from _media import write_truncated  # noqa: E402
from _media import write_video as write_textured  # noqa: E402

from pevideo import _decode as D  # noqa: E402
from pevideo import video as V  # noqa: E402
from pevideo.video import VideoMetadata, load_video  # noqa: E402

N, H, W, RATE, LEVEL = 24, 48, 64, 25, 10


def write_video(path, n=N, fmt=None, codec="h264", gop=8, rate=RATE, times_ms=None, options=None):
    """n frames of flat gray LEVEL·i (times_ms: explicit presentation times, for variable frame rate)."""
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


FORMATS = {  # name -> (container, codec); mp4/mkv are seeked, ts/avi decoded in order
    "mp4": ("mp4", "h264"),
    "mkv": ("matroska", "h264"),
    "ts": ("mpegts", "h264"),
    "avi": ("avi", "mpeg4"),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {name: write_video(d / f"clip.{name}", fmt=fmt, codec=codec) for name, (fmt, codec) in FORMATS.items()}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_all_frames(videos, fmt):
    frames, meta = load_video(videos[fmt])
    assert frames.dtype == np.uint8 and frames.shape == (N, H, W, 3)
    assert levels(frames) == list(range(N))
    assert meta.total_num_frames == N and meta.frames_indices == list(range(N))
    assert meta.fps == pytest.approx(RATE)
    assert meta.duration == pytest.approx(N / RATE)
    assert (meta.width, meta.height) == (W, H)
    assert meta.timestamps == pytest.approx([i / RATE for i in range(N)])


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n", [1, 2, 5, 7, N, 40])
def test_num_frames_picks_upstreams_indices(videos, fmt, n):
    frames, meta = load_video(videos[fmt], num_frames=n)
    want = [0] if n == 1 else [int(i * (N - 1) / (n - 1)) for i in range(n)]
    assert meta.frames_indices == want
    assert levels(frames) == want
    assert frames.shape == (n, H, W, 3)


@pytest.mark.parametrize("fmt", ["mp4", "ts"])
@pytest.mark.parametrize("fps", [2, 6.25, 10, 50])
def test_fps_takes_frames_at_that_rate(videos, fmt, fps):
    frames, meta = load_video(videos[fmt], fps=fps)
    count = math.ceil(N / RATE * fps - 1e-9)  # times k/fps before the end of the video
    want = [math.floor(k / fps * RATE + 1e-6) for k in range(count)]  # the frame on screen at k/fps
    assert meta.frames_indices == want
    assert levels(frames) == want


def test_fps_on_variable_frame_rate(tmp_path):
    times = [0, 100, 150, 500, 900, 1000, 1400]
    path = write_video(tmp_path / "vfr.mkv", n=len(times), fmt="matroska", times_ms=times)
    frames, meta = load_video(path)
    assert meta.timestamps == pytest.approx([t / 1000 for t in times])
    frames, meta = load_video(path, fps=10)
    # at 0.0, 0.1, …: the last frame that starts at or before each time
    want = [max(i for i, t in enumerate(times) if t <= 100 * k) for k in range(len(meta.frames_indices))]
    assert meta.frames_indices == want and levels(frames) == want
    assert len(want) == math.ceil(meta.duration * 10 - 1e-9)


def test_same_frames_as_transformers_loader(videos):
    from transformers.video_utils import load_video as upstream_load

    ours, _ = load_video(videos["mp4"])
    theirs, meta = upstream_load(str(videos["mp4"]), backend="pyav")
    assert np.array_equal(ours, theirs)
    sampled, _ = load_video(videos["mp4"], num_frames=5)
    assert np.array_equal(sampled, theirs[[int(i * (N - 1) / 4) for i in range(5)]])


def test_path_like_and_file_objects(videos):
    ref, _ = load_video(videos["mp4"], num_frames=3)
    got, meta = load_video(pathlib.Path(videos["mp4"]), num_frames=3)
    assert np.array_equal(got, ref)
    data = pathlib.Path(videos["mp4"]).read_bytes()
    got, meta = load_video(io.BytesIO(data), num_frames=3)
    assert np.array_equal(got, ref) and meta.frames_indices == [0, 11, 23]
    with open(videos["mkv"], "rb") as f:
        got, meta = load_video(f, num_frames=3)
    assert levels(got) == [0, 11, 23] and meta.source.endswith("clip.mkv")


class _Counting:
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


@pytest.mark.parametrize("fmt", ["mp4", "mkv"])
def test_decodes_only_what_is_needed(videos, fmt, monkeypatch):
    stats = {"seeks": 0, "decoded": 0}
    real_open = D._open
    monkeypatch.setattr(D, "_open", lambda src, name: _Counting(real_open(src, name), stats))
    frames, meta = load_video(videos[fmt], num_frames=2)  # frames 0 and 23; keyframes every 8
    assert levels(frames) == [0, N - 1]
    assert stats["seeks"] == 1 and stats["decoded"] <= 9  # frame 0, then the last GOP (16..23)
    stats.update(seeks=0, decoded=0)
    frames, _ = load_video(videos[fmt], fps=1)  # frame 0 only: stop right after it
    assert levels(frames) == [0] and stats["decoded"] <= 8 and stats["seeks"] == 0


def test_decoding_in_order_gives_the_same_frames(videos, monkeypatch):
    # Streams without usable timestamps are decoded in order, frames counted as the decoder shows them.
    want, want_meta = load_video(videos["mp4"], num_frames=6)
    real_index = D._index_packets

    def no_pts(*args):
        idx = real_index(*args)
        idx.pts = None
        return idx

    monkeypatch.setattr(D, "_index_packets", no_pts)
    got, meta = load_video(videos["mp4"], num_frames=6)
    assert np.array_equal(got, want) and meta.frames_indices == want_meta.frames_indices
    assert meta.total_num_frames == N


def test_header_frame_count_is_not_trusted(videos):
    # Matroska and MPEG-TS headers give no frame count; it is counted from the packets.
    for fmt in ("mkv", "ts"):
        frames, meta = load_video(videos[fmt], num_frames=3)
        assert meta.declared_num_frames == 0 and meta.total_num_frames == N
        assert levels(frames) == [0, 11, 23]


def test_metadata_is_a_mapping_transformers_accepts(videos):
    from transformers.video_utils import VideoMetadata as UpstreamMeta

    _, meta = load_video(videos["mp4"], num_frames=3)
    assert isinstance(meta, VideoMetadata)
    up = UpstreamMeta(**meta)
    assert up.total_num_frames == N and up.frames_indices == [0, 11, 23] and up.fps == RATE
    assert dict(meta)["duration"] == pytest.approx(N / RATE)


# --------------------------------------------------------------------------------------------------
# Bad input: every error names the file
# --------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(path)


def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(ValueError, match="notes.mp4.*not be a video"):
        load_video(text)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        load_video(empty)
    with pytest.raises(ValueError, match="directory"):
        load_video(tmp_path)


@pytest.mark.parametrize("options", [{}, {"movflags": "faststart"}], ids=["index_at_end", "index_first"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_mp4(tmp_path, videos, options, keep):
    src = write_video(tmp_path / "full.mp4", options=options)
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.mp4.*(truncated|damaged)"):
        load_video(cut)


def test_video_with_no_frames(tmp_path):
    path = write_video(tmp_path / "zero.avi", n=0, fmt="avi", codec="mpeg4")
    with pytest.raises(ValueError, match="zero.avi.*no frames"):
        load_video(path)
    path = write_video(tmp_path / "zero.mp4", n=0)  # the muxer drops a stream that never got a packet
    with pytest.raises(ValueError, match="zero.mp4.*no video stream"):
        load_video(path)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_bad_num_frames(videos, bad):
    with pytest.raises(ValueError, match="clip.mp4.*num_frames"):
        load_video(videos["mp4"], num_frames=bad)


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), float("inf"), "2"])
def test_bad_fps(videos, bad):
    with pytest.raises(ValueError, match="clip.mp4.*fps"):
        load_video(videos["mp4"], fps=bad)


def test_num_frames_and_fps_together(videos):
    with pytest.raises(ValueError, match="not both"):
        load_video(videos["mp4"], num_frames=4, fps=2)


def test_sampling_rules():
    assert V.uniform_indices(10, 1) == [0]
    assert V.uniform_indices(10, 4) == [0, 3, 6, 9]
    assert V.uniform_indices(3, 5) == [0, 0, 1, 1, 2]
    assert V.fps_indices([0.0, 0.04, 0.08], 0.12, 1.0) == [0]
    assert V.fps_indices([0.0, 0.5, 1.0], 1.5, 2.0) == [0, 1, 2]
    # transformers' default fps rule, kept for the processor
    assert V.upstream_fps_indices(100, 25.0, 2) == [0, 12, 25, 37, 50, 62, 75, 87]
    with pytest.raises(ValueError, match="frame rate"):
        V.upstream_fps_indices(100, None, 2)


# --------------------------------------------------------------------------------------------------
# Truncated files: the header's duration against the frames that are there
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,ext,codec", [("matroska", "mkv", "h264"), ("webm", "webm", "libvpx-vp9")])
@pytest.mark.parametrize("keep", [0.35, 0.8])
def test_truncated_matroska_is_an_error(tmp_path, fmt, ext, codec, keep):
    # Matroska has no frame count in its header, only a duration: 2.4 s here, 60 frames.
    full = write_textured(tmp_path / f"full.{ext}", 60, codec=codec)
    frames, meta = load_video(full, num_frames=4)  # the whole file passes
    assert meta.total_num_frames == 60 and meta.duration == pytest.approx(2.4)
    cut = write_truncated(tmp_path / f"cut.{ext}", full, keep)
    with pytest.raises(V.TruncatedVideoError, match=rf"cut\.{ext}.*truncated.*2\.400 s"):
        load_video(cut, num_frames=4)
    with pytest.raises(ValueError):  # a ValueError, as every other unreadable file
        load_video(cut)


def test_truncated_when_decoded_in_order(tmp_path, monkeypatch):
    # The same rule holds on the path that decodes in order (streams without usable timestamps).
    full = write_textured(tmp_path / "full.mkv", 60)
    cut = write_truncated(tmp_path / "cut.mkv", full, 0.5)
    real_index = D._index_packets

    def no_pts(*args):
        idx = real_index(*args)
        idx.pts = None
        return idx

    monkeypatch.setattr(D, "_index_packets", no_pts)
    assert load_video(full, num_frames=3)[1].total_num_frames == 60
    with pytest.raises(V.TruncatedVideoError, match="cut.mkv"):
        load_video(cut, num_frames=3)


@pytest.mark.parametrize("fmt,ext", [("matroska", "mkv"), ("mp4", "mp4")])
def test_late_start_is_not_truncation(tmp_path, fmt, ext):
    # Matroska's durations count from time 0, MP4's from the stream's start: a video starting at 2 s
    # is complete either way, and a cut one is still found.
    times = [2000 + 40 * i for i in range(N)]
    path = write_video(tmp_path / f"late.{ext}", fmt=fmt, times_ms=times)
    frames, meta = load_video(path, num_frames=3)
    assert levels(frames) == [0, 11, 23] and meta.timestamps[-1] == pytest.approx(0.92)
    if ext == "mkv":
        with pytest.raises(V.TruncatedVideoError, match="0.960 s"):
            load_video(write_truncated(tmp_path / "cut.mkv", path, 0.8))


def test_truncation_rule():
    # Missing more than max(10% of the declared duration, 2 frame intervals) at the end is truncated.
    ok = dict(name="v", start=1.0, fps=25.0)
    V.check_complete(declared_end=11.0, decoded_end=10.0, **ok)  # 10 s declared, 1.0 s missing: 10%
    with pytest.raises(V.TruncatedVideoError, match="v: .*10.000 s.*8.999 s"):
        V.check_complete(declared_end=11.0, decoded_end=9.999, **ok)
    V.check_complete(declared_end=1.4, decoded_end=1.32, **ok)  # 0.4 s declared: 2 frames (0.08 s) of slack
    with pytest.raises(V.TruncatedVideoError):
        V.check_complete(declared_end=1.4, decoded_end=1.31, **ok)
    V.check_complete(declared_end=None, decoded_end=1.0, **ok)  # nothing declared: nothing to check
    V.check_complete(declared_end=30.0, decoded_end=31.0, **ok)  # longer than declared is not truncated


def test_audio_longer_than_video_is_not_truncated(tmp_path):
    # The container's duration is the longest stream's; the video's own duration is what counts.
    for fmt, ext in (("matroska", "mkv"), ("mp4", "mp4")):
        path = str(tmp_path / f"av.{ext}")
        c = av.open(path, "w", format=fmt)
        v = c.add_stream("h264", rate=RATE)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = c.add_stream("aac", rate=48000)
        for i in range(10):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((H, W, 3), LEVEL * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        for k in range(0, 96000, 1024):  # 2 s of silence against 0.4 s of video
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 48000, k
            for p in a.encode(af):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
        c.close()
        frames, meta = load_video(path, num_frames=3)
        assert meta.total_num_frames == 10 and levels(frames) == [0, 4, 9]


# --------------------------------------------------------------------------------------------------
# Inputs that never end: non-regular files, and a time limit per video
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this OS")
def test_fifo_is_refused_without_blocking(tmp_path):
    import os
    import threading

    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    outcome = {}

    def run():
        try:
            load_video(fifo)
        except Exception as exc:  # noqa: BLE001
            outcome["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # blocked opening the FIFO: let it go (a writer opens it), then fail
        with open(fifo, "wb"):
            pass
        t.join(20)
        pytest.fail("load_video blocked on a FIFO")
    assert isinstance(outcome.get("exc"), ValueError)
    assert re.search(r"stream\.mp4 is a FIFO.*not a video file", str(outcome["exc"]))
    with pytest.raises(ValueError, match="a device"):
        load_video("/dev/null")


def test_time_limit(videos, monkeypatch):
    for fmt in ("mp4", "ts"):  # seeking and in-order decoding
        with pytest.raises(V.VideoTimeLimitError, match=rf"clip\.{fmt}.*time limit of 1e-09 s"):
            load_video(videos[fmt], num_frames=3, time_limit=1e-9)
        frames, _ = load_video(videos[fmt], num_frames=3, time_limit=60)
        assert levels(frames) == [0, 11, 23]
    frames, _ = load_video(videos["mp4"], num_frames=3, time_limit=math.inf)
    assert levels(frames) == [0, 11, 23]
    monkeypatch.setenv("PEVIDEO_DECODE_TIME_LIMIT", "1e-9")  # the default, from the environment
    with pytest.raises(TimeoutError, match="time limit"):
        load_video(videos["mp4"])
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError, match="time_limit"):
            load_video(videos["mp4"], time_limit=bad)
    monkeypatch.setenv("PEVIDEO_DECODE_TIME_LIMIT", "soon")
    with pytest.raises(ValueError, match="PEVIDEO_DECODE_TIME_LIMIT"):
        load_video(videos["mp4"])


def test_time_limit_is_checked_while_decoding(videos, monkeypatch):
    # Not only before starting: a decode that runs long stops between frames.
    clock = {"t": 0.0}
    monkeypatch.setattr(D, "_clock", lambda: clock["t"])
    real_open = D._open

    class Slow(_Counting):
        def decode(self, *args, **kwargs):
            for frame in self._c.decode(*args, **kwargs):
                clock["t"] += 1.0  # each frame takes "a second"
                yield frame

    monkeypatch.setattr(D, "_open", lambda src, name: Slow(real_open(src, name), {"seeks": 0}))
    assert load_video(videos["ts"], num_frames=2, time_limit=100)[1].frames_indices == [0, N - 1]
    clock["t"] = 0.0
    with pytest.raises(V.VideoTimeLimitError):
        load_video(videos["ts"], num_frames=2, time_limit=10)  # frame 23 is the 24th decoded


# --------------------------------------------------------------------------------------------------
# Frames per clip: a cap, and each frame resized as it is decoded
# --------------------------------------------------------------------------------------------------
def test_frame_cap(videos, monkeypatch):
    assert V.MAX_FRAMES == 512
    with pytest.raises(ValueError, match=r"clip\.mp4: 100000 frames per clip is above the limit of 512"):
        load_video(videos["mp4"], num_frames=100000)
    frames, meta = load_video(videos["mp4"], num_frames=600, max_frames=600)  # raised explicitly
    assert frames.shape[0] == 600 and meta.frames_indices == V.uniform_indices(N, 600)
    with pytest.raises(ValueError, match="limit of 40"):  # fps sampling: 48 frames
        load_video(videos["mp4"], fps=50, max_frames=40)
    monkeypatch.setenv("PEVIDEO_MAX_FRAMES", "4")
    with pytest.raises(ValueError, match="limit of 4.*PEVIDEO_MAX_FRAMES"):
        load_video(videos["mp4"], num_frames=5)
    assert load_video(videos["mp4"], num_frames=4)[0].shape[0] == 4
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_frames"):
            load_video(videos["mp4"], num_frames=2, max_frames=bad)


def test_pipeline_refuses_too_many_frames_at_once(tmp_path):
    import pevideo

    with pytest.raises(ValueError, match="num_frames: 100000 frames per clip is above the limit of 512"):
        pevideo.embed_videos(["never-read.mp4"], str(tmp_path), num_frames=100000)  # nothing loaded


def test_repeated_frames_are_decoded_once(videos, monkeypatch):
    stats = {"seeks": 0, "decoded": 0}
    real_open = D._open
    monkeypatch.setattr(D, "_open", lambda src, name: _Counting(real_open(src, name), stats))
    calls = []
    real_take = D._Frames.take
    monkeypatch.setattr(D._Frames, "take", lambda self, key, frame: (calls.append(key), real_take(self, key, frame)))
    frames, meta = load_video(videos["mp4"], num_frames=100)  # 24 frames, each about 4 times
    assert levels(frames) == V.uniform_indices(N, 100)
    assert len(calls) == N and stats["decoded"] <= N


def _processor_resize(frames, size, resample="bilinear"):
    from pevideo import PeVideoVideoProcessor

    proc = PeVideoVideoProcessor(size={"height": size[0], "width": size[1]}, resample=resample)
    out = proc(frames, do_sample_frames=False, do_rescale=False, do_normalize=False,
               input_data_format="channels_last")["pixel_values_videos"][0]
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("fmt", ["mp4", "ts"])
@pytest.mark.parametrize("size,resample", [((32, 40), "bilinear"), ((17, 23), "bicubic"), ((96, 80), "bilinear")])
def test_resize_on_decode_equals_the_processors_resize(tmp_path, fmt, size, resample):
    # Not flat frames: a resize of a flat frame is the same whatever the interpolation.
    path = write_textured(tmp_path / f"t.{fmt}", 10, 48, 64)
    full, meta_full = load_video(path, num_frames=4)
    got, meta = load_video(path, num_frames=4, size=size, resample=resample)
    assert got.shape == (4, *size, 3) and got.dtype == np.uint8
    assert np.array_equal(got, _processor_resize(full, size, resample))
    assert (meta.width, meta.height) == (64, 48)  # the video's size, not the resized one
    assert meta.frames_indices == meta_full.frames_indices


def test_frames_are_resized_as_they_are_decoded(videos, monkeypatch):
    # Decode, resize, decode, resize, ...: never two full-size frames held.
    events = []
    real_open, real_resize = D._open, D._resize

    class Logging(_Counting):
        def decode(self, *args, **kwargs):
            for frame in self._c.decode(*args, **kwargs):
                events.append("decode")
                yield frame

    def resize(arr, size, mode):
        events.append("resize")
        return real_resize(arr, size, mode)

    monkeypatch.setattr(D, "_open", lambda src, name: Logging(real_open(src, name), {"seeks": 0}))
    monkeypatch.setattr(D, "_resize", resize)
    frames, _ = load_video(videos["mkv"], size=(8, 8))
    assert frames.shape == (N, 8, 8, 3)
    assert events == ["decode", "resize"] * N
    with pytest.raises(ValueError, match="size"):
        load_video(videos["mp4"], size=(0, 8))
    with pytest.raises(ValueError, match="resample"):
        load_video(videos["mp4"], size=(8, 8), resample="nearest")


# --------------------------------------------------------------------------------------------------
# Rotation metadata
# --------------------------------------------------------------------------------------------------
def write_quadrant(path, rotation, fmt=None, n=3):
    """Frames black but for a white top-left quadrant, with a display matrix rotation (ccw degrees)."""
    c = av.open(str(path), "w", format=fmt)
    s = c.add_stream("h264", rate=RATE)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    if rotation is not None:
        s.set_display_rotation(rotation)
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 2, : W // 2] = 255
    for _ in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def bright_corner(frame):
    h, w = frame.shape[:2]
    quads = {"top-left": frame[: h // 2, : w // 2], "top-right": frame[: h // 2, w // 2 :],
             "bottom-left": frame[h // 2 :, : w // 2], "bottom-right": frame[h // 2 :, w // 2 :]}
    return max(quads, key=lambda k: quads[k].mean())


# Rotating counterclockwise (FFmpeg's display matrix convention; ffmpeg's autorotate turns 90 into
# "transpose=cclock") moves the top-left corner to the bottom-left, and so on.
ROTATED = {0: "top-left", 90: "bottom-left", 180: "bottom-right", 270: "top-right"}


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
@pytest.mark.parametrize("written,degrees", [(None, 0), (90, 90), (180, 180), (-90, 270), (270, 270)])
def test_rotation_is_recorded_and_applied_on_request(tmp_path, fmt, written, degrees):
    path = write_quadrant(tmp_path / "rot.video", written, fmt)
    frames, meta = load_video(path)  # upstream's default: frames as stored
    assert meta.rotation == degrees and not meta.rotation_applied
    assert frames.shape == (3, H, W, 3) and bright_corner(frames[0]) == "top-left"
    assert (meta.width, meta.height) == (W, H)
    up, meta = load_video(path, apply_rotation=True)
    assert meta.rotation == degrees and meta.rotation_applied == (degrees != 0)
    shape = (W, H) if degrees in (90, 270) else (H, W)
    assert up.shape == (3, *shape, 3) and (meta.height, meta.width) == shape
    assert all(bright_corner(f) == ROTATED[degrees] for f in up)
    assert np.array_equal(up, np.rot90(frames, degrees // 90, axes=(1, 2)))
    # Resize on decode comes after the rotation.
    small, _ = load_video(path, apply_rotation=True, size=(10, 12))
    assert np.array_equal(small, _processor_resize(up, (10, 12)))


def test_upstream_decodes_rotated_videos_as_stored(tmp_path):
    # Parity: transformers' loader ignores the rotation, and so does the default here.
    from transformers.video_utils import load_video as upstream_load

    path = write_quadrant(tmp_path / "rot.mp4", 90, "mp4")
    theirs, _ = upstream_load(str(path), backend="pyav")
    ours, _ = load_video(path)
    assert np.array_equal(ours, theirs)


# --------------------------------------------------------------------------------------------------
# In the embedding pipeline: each problem is that clip's error; options reach the workers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    from _media import write_checkpoint

    import pevideo

    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt"), tokenizer=False)
    model = pevideo.PeVideoModel.from_pretrained(ckpt)
    h, w = model.video_encoder.vit.args.img_size
    return ckpt, model, pevideo.PeVideoVideoProcessor(size={"height": h, "width": w})


def _reference(model, proc, frames):
    import torch

    with torch.no_grad():
        inputs = proc(frames, return_tensors="pt", do_sample_frames=False)
        return model.get_video_features(**inputs).pooler_output[0]


def test_pipeline_fails_bad_clips_and_resizes_on_decode(model_and_processor, tmp_path, monkeypatch):
    import os

    import torch

    import pevideo

    ckpt, model, proc = model_and_processor
    good = write_textured(tmp_path / "good.mp4", 12, 40, 56)
    cut = write_truncated(tmp_path / "cut.mkv", write_textured(tmp_path / "full.mkv", 60), 0.4)
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    resized = []
    real_resize = D._resize
    monkeypatch.setattr(D, "_resize", lambda arr, size, mode: (resized.append(size), real_resize(arr, size, mode))[1])
    results = list(pevideo.embed_videos([good, cut, fifo], model, processor=proc, num_frames=4, num_workers=0))
    assert [r.ok for r in results] == [True, False, False]
    assert "cut.mkv: the file looks truncated" in results[1].error
    assert "fifo.mp4 is a FIFO" in results[2].error
    assert resized == [tuple(model.video_encoder.vit.args.img_size)] * 4  # each frame, as it was decoded
    frames, _ = load_video(good, num_frames=4)  # full size, then the processor's resize: the same numbers
    torch.testing.assert_close(results[0].video_embeds, _reference(model, proc, frames), atol=2e-5, rtol=1e-4)

    monkeypatch.setenv("PEVIDEO_DECODE_TIME_LIMIT", "1e-9")
    (r,) = pevideo.embed_videos([good], model, processor=proc, num_frames=4, num_workers=0)
    assert not r.ok and "good.mp4: decoding took longer than its time limit" in r.error


def test_pipeline_and_cli_apply_rotation(model_and_processor, tmp_path):
    import torch

    import pevideo
    from pevideo import cli

    ckpt, model, proc = model_and_processor
    path = write_textured(tmp_path / "rot.mp4", 8, 40, 56, rotation=90)
    stored, meta = load_video(path, num_frames=4)
    upright, _ = load_video(path, num_frames=4, apply_rotation=True)
    assert meta.rotation == 90 and upright.shape[1:3] == (56, 40)
    want = _reference(model, proc, upright)
    (as_stored,) = pevideo.embed_videos([path], model, processor=proc, num_frames=4, num_workers=0)
    (rotated,) = pevideo.embed_videos([path], model, processor=proc, num_frames=4, num_workers=0,
                                      apply_rotation=True)
    torch.testing.assert_close(as_stored.video_embeds, _reference(model, proc, stored), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rotated.video_embeds, want, atol=2e-5, rtol=1e-4)
    assert (rotated.video_embeds - as_stored.video_embeds).abs().max() > 1e-3

    out = tmp_path / "emb.safetensors"
    args = ["embed", str(path), "--model", ckpt, "--out", str(out), "--num-frames", "4", "--workers", "0", "-q"]
    assert cli.main([*args, "--apply-rotation"]) == 0
    torch.testing.assert_close(pevideo.read_embeddings(out).video_embeds[0], want, atol=2e-5, rtol=1e-4)
    assert cli.main(args) == 2  # not a resume: the rotation changes the numbers
