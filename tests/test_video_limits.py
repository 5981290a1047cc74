"""load_video's limits and refusals: bad input (every error names the file), truncated files, inputs
that never end, the memory budget, unsupported codecs; and the same limits in the processor and the
pipeline (tests/_gray.py: flat-gray videos whose frames tell their index)."""
import math
import re

import numpy as np
import pytest

av = pytest.importorskip("av")

from _gray import N, H, W, RATE, LEVEL, levels, write_formats, write_video  # noqa: E402
from _gray import Counting as _Counting  # noqa: E402
from _gray import without_timestamps  # noqa: E402
from _media import write_truncated  # noqa: E402
from _media import write_video as write_textured  # noqa: E402

from pevideo import _decode as D  # noqa: E402
from pevideo import _probe as P  # noqa: E402
from pevideo import metadata as M  # noqa: E402
from pevideo import sampling as S  # noqa: E402
from pevideo.video import load_video  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("videos"))


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
    with pytest.raises(ValueError, match=r"zero.avi: its video stream \(mpeg4\) holds no frames"):
        load_video(path)
    path = write_video(tmp_path / "zero.mp4", n=0)  # the muxer drops a stream that never got a packet
    with pytest.raises(ValueError, match="zero.mp4: the file holds no streams at all"):
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
    assert S.uniform_indices(10, 1) == [0]
    assert S.uniform_indices(10, 4) == [0, 3, 6, 9]
    assert S.uniform_indices(3, 5) == [0, 0, 1, 1, 2]
    assert S.fps_indices(3, 25.0, 1.0) == [0]
    assert S.fps_indices(100, 25.0, 2) == [0, 12, 25, 37, 50, 62, 75, 87]  # transformers' default fps rule
    assert S.fps_indices(10, 25.0, 1e9) == list(range(10))  # above the video's rate: every frame, once
    with pytest.raises(ValueError, match="frame rate"):
        S.fps_indices(100, None, 2)
    assert S.Sampling.of(num_frames=4).indices(10, None) == [0, 3, 6, 9]
    assert S.Sampling.of().indices(3, None) == [0, 1, 2]


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
    with pytest.raises(M.TruncatedVideoError, match=rf"cut\.{ext}.*truncated.*2\.400 s"):
        load_video(cut, num_frames=4)
    with pytest.raises(ValueError):  # a ValueError, as every other unreadable file
        load_video(cut)


def test_truncated_when_decoded_in_order(tmp_path, monkeypatch):
    # The same rule holds on the path that decodes in order (streams without usable timestamps).
    full = write_textured(tmp_path / "full.mkv", 60)
    cut = write_truncated(tmp_path / "cut.mkv", full, 0.5)
    without_timestamps(monkeypatch)
    assert load_video(full, num_frames=3)[1].total_num_frames == 60
    with pytest.raises(M.TruncatedVideoError, match="cut.mkv"):
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
        with pytest.raises(M.TruncatedVideoError, match="0.960 s"):
            load_video(write_truncated(tmp_path / "cut.mkv", path, 0.8))


def test_truncation_rule():
    # Missing more than max(10% of the declared duration, 2 frame intervals) at the end is truncated.
    ok = dict(name="v", start=1.0, fps=25.0)
    M.check_complete(declared_end=11.0, decoded_end=10.0, **ok)  # 10 s declared, 1.0 s missing: 10%
    with pytest.raises(M.TruncatedVideoError, match="v: .*10.000 s.*8.999 s"):
        M.check_complete(declared_end=11.0, decoded_end=9.999, **ok)
    M.check_complete(declared_end=1.4, decoded_end=1.32, **ok)  # 0.4 s declared: 2 frames (0.08 s) of slack
    with pytest.raises(M.TruncatedVideoError):
        M.check_complete(declared_end=1.4, decoded_end=1.31, **ok)
    M.check_complete(declared_end=None, decoded_end=1.0, **ok)  # nothing declared: nothing to check
    M.check_complete(declared_end=30.0, decoded_end=31.0, **ok)  # longer than declared is not truncated


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
        with pytest.raises(M.VideoTimeLimitError, match=rf"clip\.{fmt}.*time limit of 1e-09 s"):
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
    monkeypatch.setattr(P, "_clock", lambda: clock["t"])
    real_open = D.open_container

    class Slow(_Counting):
        def decode(self, *args, **kwargs):
            for frame in self._c.decode(*args, **kwargs):
                clock["t"] += 1.0  # each frame takes "a second"
                yield frame

    monkeypatch.setattr(D, "open_container", lambda src, name: Slow(real_open(src, name), {"seeks": 0}))
    assert load_video(videos["ts"], num_frames=2, time_limit=100)[1].frames_indices == [0, N - 1]
    clock["t"] = 0.0
    with pytest.raises(M.VideoTimeLimitError):
        load_video(videos["ts"], num_frames=2, time_limit=10)  # frame 23 is the 24th decoded


# --------------------------------------------------------------------------------------------------
# The memory budget: frames x height x width x 3 bytes, checked before anything is decoded
# --------------------------------------------------------------------------------------------------
def _count_decodes(monkeypatch):
    stats = {"seeks": 0, "decoded": 0}
    real_open = D.open_container
    monkeypatch.setattr(D, "open_container", lambda src, name: _Counting(real_open(src, name), stats))
    return stats


def test_a_600_frame_clip_loads_whole(tmp_path):
    # 20 s at 30 fps: refused by the old 512-frame cap, 1.8 MB of frames here
    path = write_textured(tmp_path / "long.mp4", 600, 32, 32, rate=30)
    frames, meta = load_video(path)
    assert frames.shape == (600, 32, 32, 3) and meta.total_num_frames == 600 and meta.duration == pytest.approx(20)


def test_budget_refuses_before_decoding(videos, monkeypatch):
    from pevideo.limits import VideoTooLargeError

    stats = _count_decodes(monkeypatch)
    # 100000 frames at 336x336: 31.5 GiB, above the 4 GiB default, named with the way out
    with pytest.raises(VideoTooLargeError, match=r"clip\.mp4: 100000 frames of 336x336 would take 31\.5 GiB.*"
                       r"4\.0 GiB.*max_bytes=.*PEVIDEO_MAX_VIDEO_BYTES=32G"):
        load_video(videos["mp4"], num_frames=100000, size=(336, 336))
    one = H * W * 3
    with pytest.raises(VideoTooLargeError, match=f"10 frames of {H}x{W}"):
        load_video(videos["ts"], num_frames=10, max_bytes=10 * one - 1)  # in-order decoding too
    with pytest.raises(VideoTooLargeError, match=r"25 frames of 16x16"):
        load_video(videos["mkv"], num_frames=25, size=(16, 16), max_bytes=24 * 16 * 16 * 3)
    assert stats["decoded"] == 0  # refused from the packet index, before any frame was decoded
    assert load_video(videos["mp4"], num_frames=10, max_bytes=10 * one)[0].shape == (10, H, W, 3)
    monkeypatch.setenv("PEVIDEO_MAX_VIDEO_BYTES", str(5 * one))  # the default, from the environment
    with pytest.raises(VideoTooLargeError, match="budget of 45.0 KiB"):
        load_video(videos["mp4"], num_frames=6)
    monkeypatch.setenv("PEVIDEO_MAX_VIDEO_BYTES", "1G")
    assert load_video(videos["mp4"], num_frames=2000)[0].shape[0] == 2000


def test_fps_far_above_the_video_rate_is_capped_at_once(videos):
    # fps=1e9 used to build a billion-entry index list before any cap applied (a hang, then gigabytes)
    import threading
    import time

    got = {}

    def run():
        t0 = time.perf_counter()
        got["meta"] = load_video(videos["mp4"], fps=1e9)[1]
        got["s"] = time.perf_counter() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "load_video(fps=1e9) did not finish"
    assert got["meta"].frames_indices == list(range(N)) and got["s"] < 10


@pytest.mark.parametrize("var,value,match", [
    ("PEVIDEO_DECODE_TIME_LIMIT", "-5", "PEVIDEO_DECODE_TIME_LIMIT='-5'"),
    ("PEVIDEO_DECODE_TIME_LIMIT", "abc", "PEVIDEO_DECODE_TIME_LIMIT='abc'"),
    ("PEVIDEO_MAX_VIDEO_BYTES", "lots", "PEVIDEO_MAX_VIDEO_BYTES='lots'"),
    ("PEVIDEO_MAX_VIDEO_BYTES", "0", "PEVIDEO_MAX_VIDEO_BYTES='0'"),
    ("PEVIDEO_MAX_FRAMES", "1000", "PEVIDEO_MAX_FRAMES is no longer read.*PEVIDEO_MAX_VIDEO_BYTES"),
])
def test_bad_settings_are_usage_errors(videos, monkeypatch, var, value, match):
    from pevideo import UsageError

    monkeypatch.setenv(var, value)
    with pytest.raises(UsageError, match=match):
        load_video(videos["mp4"], num_frames=2)


def test_removed_and_bad_limit_arguments(videos):
    with pytest.raises(ValueError, match="max_frames= was replaced.*max_bytes="):
        load_video(videos["mp4"], num_frames=2, max_frames=600)
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError, match="max_bytes"):
            load_video(videos["mp4"], num_frames=2, max_bytes=bad)
    assert load_video(videos["mp4"], num_frames=2, max_bytes=math.inf)[0].shape[0] == 2


def test_processor_checks_the_budget_before_allocating(videos):
    import torch

    from pevideo import PeVideoVideoProcessor
    from pevideo.limits import VideoTooLargeError

    proc = PeVideoVideoProcessor(size={"height": 336, "width": 336})
    clip = np.zeros((4, H, W, 3), np.uint8)
    with pytest.raises(VideoTooLargeError, match="video 0: 4 frames of 100000x100000 would take 111.8 GiB"):
        proc(clip, size=(100000, 100000), return_tensors="pt")  # (torch's allocator error before)
    with pytest.raises(VideoTooLargeError, match="video 0: 100000 frames of 336x336"):
        proc(clip, num_frames=100000, return_tensors="pt")  # (accepted before)
    with pytest.raises(VideoTooLargeError, match=r"clip\.mp4: 100000 frames of 336x336"):
        proc(str(videos["mp4"]), num_frames=100000, return_tensors="pt")
    with pytest.raises(VideoTooLargeError, match="video 0: 20000 frames of 336x336"):
        proc.resize_frames(np.zeros((20000, 2, 2, 3), np.uint8))
    assert proc(clip, num_frames=3, return_tensors="pt")["pixel_values_videos"].dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# What a file is, worded as what it is: unsupported codecs, MPEG-TS cut short
# --------------------------------------------------------------------------------------------------
def test_unsupported_codec_is_not_called_damaged(videos, monkeypatch):
    # FFmpeg's "Not yet implemented" (FFV1 at 16384x8192 does it in avcodec_open2) used to read as
    # "the file may be damaged or truncated"
    real_open = D.open_container

    class Refusing(_Counting):
        def decode(self, *args, **kwargs):
            raise av.error.PatchWelcomeError(-1163346256, "Not yet implemented in FFmpeg, patches welcome")
            yield

    monkeypatch.setattr(D, "open_container", lambda src, name: Refusing(real_open(src, name), {}))
    for fmt in ("mp4", "ts"):
        with pytest.raises(M.UnsupportedVideoError, match=rf"clip\.{fmt}: this FFmpeg cannot decode h264 video at "
                           rf"{W}x{H}.*unsupported") as info:
            load_video(videos[fmt], num_frames=2)
        assert "damaged" not in str(info.value)


def test_cut_mpegts_is_flagged_not_refused(tmp_path):
    full = write_textured(tmp_path / "full.ts", 60)
    assert load_video(full)[1].truncated_suspect is None
    for keep in (0.2, 0.55):
        cut = write_truncated(tmp_path / f"cut{keep}.ts", full, keep)
        frames, meta = load_video(cut)
        assert 0 < len(frames) < 60  # the frames that are there, as before
        assert re.search(r"cut0\.\d+\.ts: the file ends inside a transport packet .*188-byte packets.*cut short",
                         meta.truncated_suspect)

