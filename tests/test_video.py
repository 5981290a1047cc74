"""load_video on short videos written here with PyAV: frames, sampling, seeking, resize on decode,
rotation, and the pipeline's use of it (limits and damaged files: test_video_limits.py).

Frame i of every test video is a flat gray of level LEVEL·i (tests/_gray.py), so a decoded frame tells
its index despite compression.
"""
import io
import pathlib

import numpy as np
import pytest

av = pytest.importorskip("av")

from _gray import FORMATS, N, H, RATE, W, levels, write_formats, write_video  # noqa: E402
from _gray import Counting as _Counting  # noqa: E402
from _gray import without_timestamps  # noqa: E402
from _media import write_truncated  # noqa: E402
from _media import write_video as write_textured  # noqa: E402

from pevideo import _decode as D  # noqa: E402
from pevideo import sampling as S  # noqa: E402
from pevideo.resize import FramePlan  # noqa: E402
from pevideo.video import VideoMetadata, load_video  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("videos"))


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
@pytest.mark.parametrize("fps", [2, 6.25, 10, 25, 50])
def test_fps_takes_upstreams_frames(videos, fmt, fps):
    # transformers' rule: n = int(N / video_fps * fps) frames at i * N // n; above the video's own rate
    # (50 here) upstream raises, and every frame is taken once
    frames, meta = load_video(videos[fmt], fps=fps)
    n = min(N, max(1, int(N / RATE * fps)))
    want = [i * N // n for i in range(n)]
    assert meta.frames_indices == want
    assert levels(frames) == want


def test_fps_on_variable_frame_rate(tmp_path):
    times = [0, 100, 150, 500, 900, 1000, 1400]
    path = write_video(tmp_path / "vfr.mkv", n=len(times), fmt="matroska", times_ms=times)
    frames, meta = load_video(path)
    assert meta.timestamps == pytest.approx([t / 1000 for t in times])
    frames, meta = load_video(path, fps=20)
    # the stream's average rate decides the count, as upstream; frames are spread evenly over the index
    n = max(1, int(len(times) / meta.fps * 20))
    assert 1 < n < len(times) and meta.frames_indices == [i * len(times) // n for i in range(n)]
    assert levels(frames) == meta.frames_indices


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


@pytest.mark.parametrize("fmt", ["mp4", "mkv"])
def test_decodes_only_what_is_needed(videos, fmt, monkeypatch):
    stats = {"seeks": 0, "decoded": 0}
    real_open = D.open_container
    monkeypatch.setattr(D, "open_container", lambda src, name: _Counting(real_open(src, name), stats))
    frames, meta = load_video(videos[fmt], num_frames=2)  # frames 0 and 23; keyframes every 8
    assert levels(frames) == [0, N - 1]
    assert stats["seeks"] == 1 and stats["decoded"] <= 9  # frame 0, then the last GOP (16..23)
    stats.update(seeks=0, decoded=0)
    frames, _ = load_video(videos[fmt], fps=1)  # frame 0 only: stop right after it
    assert levels(frames) == [0] and stats["decoded"] <= 8 and stats["seeks"] == 0


def test_decoding_in_order_gives_the_same_frames(videos, monkeypatch):
    # Streams without usable timestamps are decoded in order, frames counted as the decoder shows them.
    want, want_meta = load_video(videos["mp4"], num_frames=6)
    without_timestamps(monkeypatch)
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
# Each frame resized as it is decoded
# --------------------------------------------------------------------------------------------------
def test_repeated_frames_are_decoded_once(videos, monkeypatch):
    stats = {"seeks": 0, "decoded": 0}
    real_open = D.open_container
    monkeypatch.setattr(D, "open_container", lambda src, name: _Counting(real_open(src, name), stats))
    calls = []
    real_take = D._Frames.take
    monkeypatch.setattr(D._Frames, "take", lambda self, key, frame: (calls.append(key), real_take(self, key, frame)))
    frames, meta = load_video(videos["mp4"], num_frames=100)  # 24 frames, each about 4 times
    assert levels(frames) == S.uniform_indices(N, 100)
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
    real_open, real_resize = D.open_container, FramePlan.apply_hwc

    class Logging(_Counting):
        def decode(self, *args, **kwargs):
            for frame in self._c.decode(*args, **kwargs):
                events.append("decode")
                yield frame

    def resize(plan, arr):
        events.append("resize")
        return real_resize(plan, arr)

    monkeypatch.setattr(D, "open_container", lambda src, name: Logging(real_open(src, name), {"seeks": 0}))
    monkeypatch.setattr(FramePlan, "apply_hwc", resize)
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
    real_resize = FramePlan.apply_hwc
    monkeypatch.setattr(FramePlan, "apply_hwc", lambda plan, arr: (resized.append(plan.size), real_resize(plan, arr))[1])
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


def test_workers_decode_by_one_plan(model_and_processor, tmp_path, monkeypatch):
    # The processor's settings are resolved once and its frame plan handed to the decoder; no clip goes
    # back through the processor (resize_frames) or re-resolves its settings.
    import pevideo
    from pevideo.embed import workers
    from pevideo.processor_settings import ProcessorSettings

    ckpt, model, proc = model_and_processor
    good = write_textured(tmp_path / "good.mp4", 12, 40, 56)
    proc.settings  # resolved before the run, as the session does
    monkeypatch.setattr(ProcessorSettings, "resolve", classmethod(lambda cls, get: pytest.fail("resolved again")))
    monkeypatch.setattr(type(proc), "resize_frames", lambda self, frames: pytest.fail("the processor ran per clip"))
    plans = []
    real = workers.read_video
    monkeypatch.setattr(workers, "read_video", lambda path, plan: (plans.append(plan), real(path, plan))[1])
    results = list(pevideo.embed_videos([good] * 3, model, processor=proc, num_frames=4, num_workers=0))
    assert all(r.ok for r in results) and len(plans) == 3 and len({id(p) for p in plans}) == 1
    assert plans[0].frames == proc.frame_plan and plans[0].sampling.num_frames == 4
