"""One sampling rule everywhere: load_video, the processor (files and in-memory clips), the Python
pipeline (embed_videos), the CLI (pevideo embed) and transformers' own processor pick the same frame
indices for the same num_frames / fps, on videos of several lengths and frame rates."""
import dataclasses
import warnings
from fractions import Fraction

import pytest

av = pytest.importorskip("av")

from _media import write_checkpoint, write_video  # noqa: E402

import pevideo  # noqa: E402
from pevideo import cli  # noqa: E402
from pevideo.sampling import Sampling  # noqa: E402

# (frames, rate): short and long, integer and NTSC rates
CLIPS = [(9, 12), (24, 25), (37, 30), (50, 24), (61, Fraction(30000, 1001))]
REQUESTS = [{"num_frames": 1}, {"num_frames": 4}, {"num_frames": 16}, {"fps": 0.5}, {"fps": 2}, {"fps": 7.5}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampling")
    paths = [write_video(d / f"v{n}_{float(r):.2f}.mp4", n, 32, 40, rate=r, seed=n) for n, r in CLIPS]
    return paths, write_checkpoint(d / "ckpt", tokenizer=False)


def _upstream(path, request):
    """transformers' PeVideoVideoProcessor.sample_frames on transformers' own metadata of the file."""
    from transformers.models.pe_video.video_processing_pe_video import PeVideoVideoProcessor as Upstream
    from transformers.video_utils import load_video as upstream_load

    _, meta = upstream_load(str(path), backend="pyav")
    return [int(i) for i in Upstream().sample_frames(meta, **request)]


def _ids(request):
    return ",".join(f"{k}={v}" for k, v in request.items())


@pytest.mark.parametrize("request_", REQUESTS, ids=_ids)
def test_every_entry_point_picks_the_same_frames(media, tmp_path, request_):
    paths, ckpt = media
    want = [pevideo.load_video(p, **request_)[1].frames_indices for p in paths]
    assert all(want)

    # upstream (its processor divides by zero for num_frames=1, where frame 0 is what the formula means;
    # transformers before 5.25 also for an fps request that rounds to no frame, where 5.25 takes one)
    if request_ != {"num_frames": 1}:
        for p, w in zip(paths, want):
            try:
                assert _upstream(p, request_) == w, p
            except ZeroDivisionError:
                assert "fps" in request_ and len(w) == 1

    # the processor, on the files and on the same frames in memory
    proc = pevideo.PeVideoVideoProcessor(size={"height": 64, "width": 64})
    out = proc([str(p) for p in paths], return_metadata=True, **request_)
    assert [m.frames_indices for m in out["video_metadata"]] == want
    for p, w in zip(paths, want):
        frames, meta = pevideo.load_video(p)
        got = proc(frames, video_metadata={"fps": meta.fps}, return_metadata=True, **request_)
        assert got["video_metadata"][0].frames_indices == w

    # the Python pipeline and the CLI
    with warnings.catch_warnings():  # the checkpoint has no processor config: one warning, expected
        warnings.simplefilter("ignore")
        results = list(pevideo.embed_videos(paths, ckpt, num_workers=0, **request_))
        assert [r.frame_indices for r in results] == want
        flag = "--num-frames" if "num_frames" in request_ else "--fps"
        out = tmp_path / "emb.safetensors"
        code = cli.main(["embed", *map(str, paths), "--model", ckpt, "--out", str(out), flag,
                         str(next(iter(request_.values()))), "--workers", "0", "-q"])
    assert code == 0
    emb = pevideo.read_embeddings(out)
    rows = [row[: int(n)].tolist() for row, n in zip(emb.sampled_indices, emb.sampled_frame_counts)]
    assert rows == want


def test_fps_above_the_video_rate_takes_every_frame_once(media):
    # Upstream raises here ("the requested number of frames exceeds total_num_frames"); one frame each.
    paths, _ = media
    for p, (n, rate) in zip(paths, CLIPS):
        assert pevideo.load_video(p, fps=float(rate) * 1.5)[1].frames_indices == list(range(n))
    proc = pevideo.PeVideoVideoProcessor(size={"height": 64, "width": 64})
    out = proc(str(paths[0]), fps=1e9, return_metadata=True)
    assert out["video_metadata"][0].frames_indices == list(range(CLIPS[0][0]))


def test_sampling_is_one_frozen_record():
    s = Sampling.of(num_frames=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_frames = 5
    assert Sampling.of(fps=2).indices(100, 25.0) == [0, 12, 25, 37, 50, 62, 75, 87]
    for bad in ({"num_frames": 0}, {"num_frames": 2.5}, {"fps": float("nan")}, {"num_frames": 2, "fps": 1}):
        with pytest.raises(ValueError):
            Sampling.of(**bad)
