"""The video limits in the pipeline (pevideo embed and the Python API): a bad setting or too many frames
refused before anything runs, an unreadable clip that clip's error, workers capped, a cut MPEG-TS
flagged in the results and the errors file."""
import pytest

av = pytest.importorskip("av")

from _gray import write_formats, write_video  # noqa: E402
from _media import write_truncated  # noqa: E402
from _media import write_video as write_textured  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import warnings

    from _media import write_checkpoint

    from pevideo import PeVideoVideoProcessor

    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt"), tokenizer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeVideoVideoProcessor.from_pretrained(folder).save_pretrained(folder)  # no default-processor warning
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading the model fail loudly: what is refused here must be refused before that."""
    from pevideo.modeling import PeVideoModel

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(PeVideoModel, "from_pretrained", refuse)


def _embed(args, capsys):
    from pevideo import cli

    code = cli.main(["embed", *map(str, args), "--workers", "0"])
    return code, capsys.readouterr().err


def test_too_many_frames_are_refused_before_the_model_loads(ckpt, videos, tmp_path, capsys, no_model_loading,
                                                             monkeypatch):
    import pevideo
    from pevideo.limits import VideoTooLargeError

    out = tmp_path / "emb.safetensors"
    code, err = _embed([videos["mp4"], "--model", ckpt, "--out", out, "--num-frames", 1000000], capsys)
    assert code == 2 and "num_frames: 1000000 frames of 64x64 would take 11.4 GiB" in err
    assert "PEVIDEO_MAX_VIDEO_BYTES" in err and not out.exists()
    # the budget, not a frame count, is the knob: lowered, 100000 frames are refused the same way
    monkeypatch.setenv("PEVIDEO_MAX_VIDEO_BYTES", "100M")
    code, err = _embed([videos["mp4"], "--model", ckpt, "--out", out, "--num-frames", 100000], capsys)
    assert code == 2 and "100000 frames of 64x64 would take 1.1 GiB" in err and "budget of 100.0 MiB" in err
    with pytest.raises(VideoTooLargeError, match="num_frames: 100000 frames"):
        pevideo.embed_videos([videos["mp4"]], ckpt, num_frames=100000)


@pytest.mark.parametrize("value", ["-5", "abc"])
def test_bad_time_limit_is_a_usage_error_before_anything_runs(ckpt, videos, tmp_path, capsys, no_model_loading,
                                                              monkeypatch, value):
    # (every clip failed and the run exited 1 before)
    monkeypatch.setenv("PEVIDEO_DECODE_TIME_LIMIT", value)
    out = tmp_path / "emb.safetensors"
    code, err = _embed([videos["mp4"], "--model", ckpt, "--out", out], capsys)
    assert code == 2 and f"PEVIDEO_DECODE_TIME_LIMIT='{value}': must be a positive number of seconds" in err
    assert not out.exists() and not (tmp_path / "emb.errors.jsonl").exists()


def test_video_without_frames_is_that_clips_error(ckpt, videos, tmp_path, capsys):
    import json

    import pevideo

    empty_avi = write_video(tmp_path / "zero.avi", n=0, fmt="avi", codec="mpeg4")
    empty_mp4 = write_video(tmp_path / "zero.mp4", n=0)
    out = tmp_path / "emb.safetensors"
    code, err = _embed([empty_avi, videos["mp4"], empty_mp4, "--model", ckpt, "--out", out, "--num-frames", 3],
                       capsys)
    assert code == 1 and "not found" not in err
    lines = [json.loads(line) for line in (tmp_path / "emb.errors.jsonl").read_text().splitlines()]
    assert [e["index"] for e in lines] == [0, 2]
    assert "zero.avi: its video stream (mpeg4) holds no frames" in lines[0]["error"]
    assert "zero.mp4: the file holds no streams at all" in lines[1]["error"]
    assert len(pevideo.read_embeddings(out)) == 1


def test_workers_never_outnumber_clips_or_cores(ckpt, videos, monkeypatch):
    import warnings

    import torch

    import pevideo
    from pevideo.embed import workers

    monkeypatch.setattr(workers, "cpu_budget", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert workers.plan_workers(64, 1) == 1 and workers.plan_workers(0, 5) == 0 and workers.plan_workers(2, 9) == 2
    with pytest.warns(UserWarning, match="64 decoding workers asked for, but this process may use 2 CPU"):
        assert workers.plan_workers(64, 3) == 2
    with pytest.raises(ValueError, match="num_workers"):
        workers.plan_workers(-1, 3)

    started = []
    real = torch.utils.data.DataLoader

    class Recording(real):
        def __init__(self, *args, **kwargs):
            started.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    with pytest.warns(UserWarning, match="using 2"):
        results = list(pevideo.embed_videos([videos["mp4"]] * 3, ckpt, num_frames=2, num_workers=64))
    assert started == [2] and all(r.ok for r in results)  # (64 processes before)


def test_cut_mpegts_is_flagged_in_results_and_errors_file(ckpt, videos, tmp_path, capsys):
    import json

    import pevideo

    cut = write_truncated(tmp_path / "cut.ts", write_textured(tmp_path / "full.ts", 60), 0.3)
    (r0, r1) = pevideo.embed_videos([cut, videos["mp4"]], ckpt, num_frames=3, num_workers=0)
    assert r0.ok and "cut.ts: the file ends inside a transport packet" in r0.truncated_suspect
    assert r1.ok and r1.truncated_suspect is None
    for out, errors in ((tmp_path / "emb.safetensors", tmp_path / "emb.errors.jsonl"),
                        (tmp_path / "folder", tmp_path / "folder" / "errors.jsonl")):
        code, _ = _embed([cut, videos["mp4"], "--model", ckpt, "--out", out, "--num-frames", 3], capsys)
        assert code == 0  # a warning, not a failure
        (line,) = [json.loads(x) for x in errors.read_text().splitlines()]
        assert line["index"] == 0 and "error" not in line and "transport packet" in line["truncated_suspect"]
        emb = pevideo.read_embeddings(out)
        assert len(emb) == 2 and emb.errors == [] and emb.warnings == [line]


def test_workers_forked_after_decoding_in_process_do_not_hang(ckpt, videos, tmp_path):
    """A decode in the parent, then forked decoding workers: with PyAV 19 (FFmpeg 8) the parent's swscale
    thread pool, inherited without its threads, made a worker's first RGB conversion wait forever. In a
    subprocess with a deadline, so that a hang fails the test instead of the run."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, pevideo\n"
        "frames, _ = pevideo.load_video(sys.argv[1])\n"  # swscale used in this process first
        "res = list(pevideo.embed_videos([sys.argv[1]] * 4, sys.argv[2], num_frames=2, num_workers=2))\n"
        "assert all(r.ok for r in res), [r.error for r in res]\n"
        "print('ok', len(res))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, videos["mp4"], ckpt], capture_output=True, text=True,
                              timeout=180, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        pytest.fail("decoding workers forked after an in-process decode hung")
    assert proc.returncode == 0 and "ok 4" in proc.stdout, proc.stderr[-2000:]
