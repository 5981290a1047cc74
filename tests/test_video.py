"""load_video on short videos written here with PyAV.

Frame i of every test video is a flat gray of level LEVEL·i, so a decoded frame tells its index despite
compression.
"""
import io
import math
import pathlib
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")

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
    real_open = V._open
    monkeypatch.setattr(V, "_open", lambda src, name: _Counting(real_open(src, name), stats))
    frames, meta = load_video(videos[fmt], num_frames=2)  # frames 0 and 23; keyframes every 8
    assert levels(frames) == [0, N - 1]
    assert stats["seeks"] == 1 and stats["decoded"] <= 9  # frame 0, then the last GOP (16..23)
    stats.update(seeks=0, decoded=0)
    frames, _ = load_video(videos[fmt], fps=1)  # frame 0 only: stop right after it
    assert levels(frames) == [0] and stats["decoded"] <= 8 and stats["seeks"] == 0


def test_decoding_in_order_gives_the_same_frames(videos, monkeypatch):
    # Streams without usable timestamps are decoded in order, frames counted as the decoder shows them.
    want, want_meta = load_video(videos["mp4"], num_frames=6)
    real_index = V._index_packets

    def no_pts(*args):
        idx = real_index(*args)
        idx.pts = None
        return idx

    monkeypatch.setattr(V, "_index_packets", no_pts)
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
