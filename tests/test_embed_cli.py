"""The command line's edges (issue 12): errors as one line with a documented exit status, outputs checked
before the work, output names, the frame-count fields, and the thread split between decoding workers
and the encoder. Tiny checkpoint and videos as in test_embed.py."""
import errno
import os
import warnings

import pytest
import torch

pytest.importorskip("av")

from pevideo import cli  # noqa: E402
from pevideo.embed import embed_to_file, read_embeddings  # noqa: E402
from pevideo.errors import PevideoError, UsageError  # noqa: E402

NF = 4


def run(*args):
    return cli.main([str(a) for a in args])


def err_lines(capsys):
    cap = capsys.readouterr()
    return cap.out, [line for line in cap.err.splitlines() if line.strip()]


def _no_loading(*a, **k):
    raise AssertionError("the model was loaded")


# --------------------------------------------------------------------------------------------------
def test_classify_checks_its_output_before_any_work(media, tmp_path, capsys, monkeypatch):
    from pevideo.modeling import PeVideoModel

    common = ["--model", media["ckpt"], "--labels", "a cat", "--num-frames", NF, "--workers", 0]
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with monkeypatch.context() as m:
        m.setattr(PeVideoModel, "from_pretrained", _no_loading)
        # Under a regular file: an OS error, exit 3, one line naming the output and the cause.
        assert run("classify", media["videos"], *common, "--out", not_a_folder / "p.csv") == 3
        out, err = err_lines(capsys)
        assert len(err) == 1 and str(not_a_folder / "p.csv") in err[0] and "Not a directory" in err[0], err
        assert "rerun" not in err[0] and "Traceback" not in err[0] and out == ""
        # An existing folder as the output file: not a file name, a usage error.
        assert run("classify", media["videos"], *common, "--out", tmp_path) == 2
        out, err = err_lines(capsys)
        assert len(err) == 1 and "not a file name" in err[0]
        # A folder that does not exist: a usage error.
        assert run("classify", media["videos"], *common, "--out", tmp_path / "nope" / "p.json") == 2
        out, err = err_lines(capsys)
        assert len(err) == 1 and "nope" in err[0]
    assert os.listdir(tmp_path) == ["file"]  # no temporary file left behind

    # A writable place: written whole, under its own name only, readable like any other file; what a
    # killed earlier run of this output left (its writer is gone) is removed.
    (tmp_path / ".p.csv.tmp.999999999").write_text("half a table")
    assert run("classify", media["videos"], *common, "--out", tmp_path / "p.csv") == 1
    assert sorted(os.listdir(tmp_path)) == ["file", "p.csv"]
    assert (tmp_path / "p.csv").read_text().startswith("path,a cat,truncated_suspect,error")
    assert os.stat(tmp_path / "p.csv").st_mode & 0o044 == 0o044


def test_classify_prints_a_failed_clip_once_on_stderr(media, capsys):
    assert run("classify", media["videos"], "--model", media["ckpt"], "--labels", "a cat", "a dog",
               "--num-frames", NF, "--workers", 0) == 1
    cap = capsys.readouterr()
    reason = "cannot open as a video"
    assert cap.err.count(reason) == 1 and "bad.mp4" in cap.err
    assert reason not in cap.out
    lines = cap.out.splitlines()
    i = lines.index(os.path.join(media["videos"], "bad.mp4"))
    assert "not scored" in lines[i + 1]  # the table still accounts for the clip
    assert len(lines) == len(media["order"]) + len(media["good"]) * 2 + 1


def test_classify_flags_a_cut_mpegts_in_every_format(media, tmp_path, capsys):
    """A TS file that ends inside a transport packet is scored but flagged (as embed flags it), in the
    text, CSV and JSON tables and once on stderr; an intact clip is not."""
    import csv
    import json

    from _media import write_truncated, write_video

    cut = write_truncated(tmp_path / "cut.ts", write_video(tmp_path / "full.ts", 60), 0.3)
    good = os.path.join(media["videos"], "a.mp4")
    common = ["--model", media["ckpt"], "--labels", "a cat", "--num-frames", NF, "--workers", 0]
    tables = {}
    for name in ("t.txt", "t.csv", "t.json"):
        assert run("classify", cut, good, *common, "--out", tmp_path / name) == 0  # a warning, not a failure
        err = capsys.readouterr().err
        assert err.count("transport packet") == 1
        assert "pevideo classify: warning: " + cut + ": the file ends inside a transport packet" in err
        tables[name] = (tmp_path / name).read_text()
    text = tables["t.txt"].splitlines()
    i = text.index(cut)
    assert text[i + 1].startswith("  warning: ") and "transport packet" in text[i + 1]
    assert not any("warning" in line for line in text[text.index(good):])
    rows = list(csv.DictReader(tables["t.csv"].splitlines()))
    assert [r["path"] for r in rows] == [cut, good] and all(r["a cat"] and not r["error"] for r in rows)
    assert "transport packet" in rows[0]["truncated_suspect"] and rows[1]["truncated_suspect"] == ""
    r0, r1 = json.loads(tables["t.json"])["results"]
    assert "transport packet" in r0["truncated_suspect"] and "truncated_suspect" not in r1
    assert len(r0["probs"]) == len(r1["probs"]) == 1
    from pevideo.embed.tables import is_table

    assert all(is_table(str(tmp_path / n)) for n in tables)  # still proves itself pevideo's (reruns replace it)


@pytest.mark.parametrize("device", ["tpu", "cuda:banana", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]))
@pytest.mark.parametrize("cmd", ["embed", "classify"])
def test_unknown_device_is_a_usage_error(media, tmp_path, capsys, no_model_loading, device, cmd):
    extra = ["--out", tmp_path / "e.safetensors"] if cmd == "embed" else ["--labels", "a cat"]
    assert run(cmd, media["videos"], "--model", media["ckpt"], "--device", device, *extra) == 2
    out, err = err_lines(capsys)
    assert len(err) == 1 and f"--device" in err[0] and device.split(":")[0] in err[0], err
    assert "rerun" not in err[0] and "Traceback" not in err[0]
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["w14.txt", "emb.json", "emb.npy", "emb.pt", "emb.csv", "emb.SAFETENSORS"])
def test_out_that_looks_like_another_file_type_is_refused(media, tmp_path, capsys, name):
    assert run("embed", media["videos"], "--model", media["ckpt"], "--out", tmp_path / name) == 2
    out, err = err_lines(capsys)
    assert len(err) == 1 and name in err[0] and ".safetensors" in err[0]
    assert not os.listdir(tmp_path)  # no folder named w14.txt
    with pytest.raises(UsageError):
        embed_to_file([media["videos"]], media["ckpt"], tmp_path / name)


def test_out_kinds(media, tmp_path, capsys):
    common = ["--model", media["ckpt"], "--num-frames", NF, "--workers", 0, "-q"]
    (tmp_path / "plain").write_text("x")
    assert run("embed", media["videos"], *common, "--out", tmp_path / "plain") == 2  # an existing file
    (tmp_path / "d.safetensors").mkdir()
    assert run("embed", media["videos"], *common, "--out", tmp_path / "d.safetensors") == 2  # a folder
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and "is a folder" in err
    # A folder name with a dot, said to be a folder with a trailing slash (or already a folder).
    assert run("embed", media["videos"], *common, "--out", str(tmp_path / "v1.2") + os.sep) == 1
    assert "manifest.json" in os.listdir(tmp_path / "v1.2")
    assert run("embed", media["videos"], *common, "--out", tmp_path / "v1.2") == 1  # exists: resumes
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["embed"].format_help()
    assert "w14.txt" in help_text and "any other name is a folder" in " ".join(help_text.split())


def test_frame_counts_have_clear_names_and_old_files_still_read(media, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "e.safetensors"
    embed_to_file([media["videos"]], media["ckpt"], out, num_frames=NF, num_workers=0, shard_size=2)
    emb = read_embeddings(out)
    good = len(media["good"])
    assert emb.source_frame_counts.tolist() == media["frames"]
    assert emb.sampled_frame_counts.tolist() == [NF] * good
    assert emb.frame_counts.tolist() == media["frames"]  # the old name: the source's count
    tensors = load_file(out)
    assert "frame_counts" not in tensors and tensors["sampled_frame_counts"].tolist() == [NF] * good

    # A file written before the names changed: "frame_counts" only.
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    old = {k: v for k, v in tensors.items() if k not in ("source_frame_counts", "sampled_frame_counts")}
    old["frame_counts"] = tensors["source_frame_counts"]
    old_path = tmp_path / "old.safetensors"
    save_file(old, old_path, metadata=meta)
    emb = read_embeddings(old_path)
    assert emb.source_frame_counts.tolist() == media["frames"] and emb.sampled_frame_counts.tolist() == [NF] * good


def test_os_error_mid_run_is_one_line_and_resume_advice_only_when_true(media, tmp_path, capsys, monkeypatch):
    import pevideo.embed.tofile as api

    real = api.write_shard
    out = tmp_path / "e.safetensors"
    args = ["embed", media["videos"], "--model", media["ckpt"], "--out", out, "--num-frames", NF, "--workers", 0,
            "--shard-size", 2, "-q"]

    def disk_full_on_second(layout, s, *a, **k):
        if s == 1:
            raise OSError(errno.ENOSPC, "No space left on device", layout.shard(s))
        return real(layout, s, *a, **k)

    monkeypatch.setattr(api, "write_shard", disk_full_on_second)
    assert run(*args) == 3
    out_text, err = err_lines(capsys)
    assert len(err) == 1, err
    assert "shard-00001.safetensors: No space left on device" in err[0]
    assert "1 finished shard(s) are kept: rerun the same command to resume" in err[0]

    # The advice was true: the rerun keeps shard 0 and finishes.
    monkeypatch.setattr(api, "write_shard", real)
    assert run(*args[:-1]) == 1
    assert "1 already done" in capsys.readouterr().err

    # Failing before any shard is on disk: no resume advice (there is nothing to resume).
    def disk_full(layout, s, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", layout.shard(s))

    monkeypatch.setattr(api, "write_shard", disk_full)
    assert run(*args[:5], tmp_path / "f.safetensors", *args[6:]) == 3
    out_text, err = err_lines(capsys)
    assert len(err) == 1 and "No space left" in err[0] and "rerun" not in err[0]


def test_interrupt_and_internal_errors(media, tmp_path, capsys, monkeypatch):
    import pevideo.embed.tofile as api

    args = ["embed", media["videos"], "--model", media["ckpt"], "--out", tmp_path / "e.safetensors",
            "--num-frames", NF, "--workers", 0, "-q"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "write_shard", interrupted)
    assert run(*args) == 130
    out, err = err_lines(capsys)
    assert err == ["pevideo embed: interrupted"]  # no shard on disk: nothing to resume

    def bug(*a, **k):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(api, "write_shard", bug)
    assert run(*args) == 3
    out, err = err_lines(capsys)
    assert len(err) == 1 and "RuntimeError: something inside broke" in err[0] and "PEVIDEO_DEBUG" in err[0]

    monkeypatch.setenv("PEVIDEO_DEBUG", "1")
    assert run(*args) == 3
    assert "Traceback" in capsys.readouterr().err

    # pevideo's own runtime errors: exit 3, their message as it is.
    monkeypatch.delenv("PEVIDEO_DEBUG")

    def damaged(*a, **k):
        raise PevideoError("/x/e.safetensors: truncated (12 of 4096 bytes)")

    monkeypatch.setattr(api, "write_shard", damaged)
    assert run(*args) == 3
    out, err = err_lines(capsys)
    assert err == ["pevideo embed: error: /x/e.safetensors: truncated (12 of 4096 bytes)"]


def test_damaged_outputs_are_one_line_file_errors(media, tmp_path, capsys):
    common = ["--model", media["ckpt"], "--num-frames", NF, "--workers", 0, "-q"]
    zero = tmp_path / "zero.safetensors"
    zero.write_bytes(b"")  # a 0-byte final file (a crash or a full disk)
    assert run("embed", media["videos"], *common, "--out", zero) == 3
    out, err = err_lines(capsys)
    assert len(err) == 1 and str(zero) in err[0] and "damaged" in err[0] and "internal error" not in err[0], err
    garbage = tmp_path / "g"
    garbage.mkdir()
    (garbage / "manifest.json").write_text('{"format": "pevideo.embeddings", "conf')  # pevideo's, cut short
    assert run("embed", media["videos"], *common, "--out", garbage) == 3
    out, err = err_lines(capsys)
    assert len(err) == 1 and str(garbage) in err[0] and "damaged" in err[0], err


def test_merge_of_nothing_is_a_usage_error(tmp_path, capsys):
    assert run("merge", tmp_path / "none.safetensors") == 2
    out, err = err_lines(capsys)
    assert len(err) == 1 and "none.safetensors" in err[0]


# --------------------------------------------------------------------------------------------------
def _thread_settings(_):
    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def test_workers_run_single_threaded():
    from pevideo.embed.workers import worker_init

    loader = torch.utils.data.DataLoader(list(range(2)), batch_size=1, num_workers=1, worker_init_fn=worker_init,
                                         collate_fn=_thread_settings)
    assert list(loader) == [(1, "1"), (1, "1")]


def test_encoder_takes_the_cores_the_workers_leave(media, monkeypatch):
    import pevideo.embed.workers as workers
    from pevideo.embed import embed_videos, load_model
    from pevideo.embed.workers import default_workers, encoder_threads

    monkeypatch.setattr(workers, "cpu_budget", lambda: 6)
    assert default_workers() == 5 and encoder_threads(2) == 4 and encoder_threads(5) == 1 and encoder_threads(9) == 1
    assert encoder_threads(0) == 6

    model = load_model(media["ckpt"], device="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        seen = []
        with warnings.catch_warnings():  # the default-processor warning, given once per checkpoint and process
            warnings.simplefilter("ignore")
            gen = embed_videos([os.path.join(media["videos"], "a.mp4")] * 3, model, num_frames=NF, batch_size=1,
                               num_workers=2)
        for r in gen:
            assert r.ok
            seen.append(torch.get_num_threads())
        assert seen == [4, 4, 4]  # 6 cores, 2 workers
        assert torch.get_num_threads() == 8  # restored
        # Never more threads than torch had (a user's OMP_NUM_THREADS stands).
        torch.set_num_threads(1)
        gen = embed_videos([os.path.join(media["videos"], "a.mp4")], model, num_frames=NF, num_workers=2)
        assert [torch.get_num_threads() for _ in gen] == [1]
    finally:
        torch.set_num_threads(before)


def test_workers_fork_with_pyav_already_imported():
    # Each forked decoding worker would otherwise import PyAV before its first clip (~0.1 s a worker,
    # more on a cold cache): in a short run that start-up was a large share of the clips/s, run to run.
    import subprocess
    import sys

    code = ("import sys; from pevideo.embed.workers import ClipDataset; "
            "from pevideo.processing import PeVideoVideoProcessor; assert 'av' not in sys.modules; "
            "from pevideo.sampling import Sampling; ClipDataset([], PeVideoVideoProcessor(), Sampling(4)); assert 'av' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
