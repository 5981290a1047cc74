"""Issue 21: reruns that heal (failed clips tried again, changed inputs embedded again), start-up
interrupts, decoding workers killed by the OS, a checkpoint folder without config.json, file names
that are not plain text, and a clip's embedding independent of its batch. Shared tiny checkpoint and
videos (conftest ``media``)."""
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("av")

from pevideo import cli  # noqa: E402
from pevideo.embed import embed_to_file, embed_videos, read_embeddings  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no video processor config:UserWarning")

NF = 4
ARGS = dict(num_frames=NF, shard_size=2, batch_size=2, num_workers=0, progress=False)


def alone(media, path):
    """The clip embedded on its own (the reference a healed row must equal)."""
    return next(iter(embed_videos([path], media["ckpt"], num_frames=NF, num_workers=0))).video_embeds


@pytest.mark.parametrize("out", ["e.safetensors", "emb"])
def test_reruns_try_failed_clips_again(media, tmp_path, out):
    """A listed file missing at the first run: the rerun (same arguments) embeds it once it is there;
    with retry_failed=False its error stays."""
    v = tmp_path / "v"
    v.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(os.path.join(media["videos"], name), v / name)
    lst = v / "list.txt"
    lst.write_text("a.mp4\nlater.mp4\nb.mp4\n")
    out = tmp_path / out
    first = embed_to_file([lst], media["ckpt"], out, **ARGS)
    assert first.num_failed == 1 and "later.mp4" in read_embeddings(out).errors[0]["path"]
    shutil.copy(media["good"][3], v / "later.mp4")  # sub/c.mkv's bytes
    kept = embed_to_file([lst], media["ckpt"], out, retry_failed=False, **ARGS)
    assert kept.num_failed == 1 and kept.num_retried == 0
    healed = embed_to_file([lst], media["ckpt"], out, **ARGS)
    assert healed.num_failed == 0 and healed.num_retried == 1 and healed.exit_status == 0
    emb = read_embeddings(out)
    assert emb.input_index.tolist() == [0, 1, 2] and emb.errors == []
    torch.testing.assert_close(emb.video_embeds[1], alone(media, str(v / "later.mp4")))
    errors_file = tmp_path / "e.errors.jsonl" if out.suffix else out / "errors.jsonl"
    assert errors_file.read_text() == ""
    again = embed_to_file([lst], media["ckpt"], out, **ARGS)  # nothing left to heal
    assert again.num_retried == 0 and again.num_changed == 0 and again.stats.clips == 0


@pytest.mark.parametrize("out", ["e.safetensors", "emb"])
def test_a_changed_input_is_embedded_again(media, tmp_path, out):
    v = tmp_path / "v"
    v.mkdir()
    inputs = [str(v / name) for name in ("a.mp4", "b.mp4", "bad.mp4")]
    for p in inputs:
        shutil.copy(os.path.join(media["videos"], os.path.basename(p)), p)
    out = tmp_path / out
    embed_to_file(inputs, media["ckpt"], out, retry_failed=False, **ARGS)
    old = read_embeddings(out).video_embeds[0].clone()
    st = os.stat(v / "a.mp4")
    shutil.copy(media["good"][2], v / "a.mp4")  # another video at the same path (d.avi's bytes)
    os.utime(v / "a.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match=r"1 input\(s\) changed since they were embedded .*a\.mp4.*embedding them again"):
        summary = embed_to_file(inputs, media["ckpt"], out, retry_failed=False, **ARGS)
    assert summary.num_changed == 1 and summary.num_failed == 1
    emb = read_embeddings(out)
    new = alone(media, str(v / "a.mp4"))
    torch.testing.assert_close(emb.video_embeds[0], new)
    assert not torch.allclose(old, new) and emb.source_size[0] == os.path.getsize(v / "a.mp4")
    assert embed_to_file(inputs, media["ckpt"], out, retry_failed=False, **ARGS).num_changed == 0
    os.remove(v / "b.mp4")  # gone: its row stays
    assert embed_to_file(inputs, media["ckpt"], out, retry_failed=False, **ARGS).num_changed == 0
    assert read_embeddings(out).input_index.tolist() == [0, 1]


def test_ctrl_c_during_start_up_is_one_line(media, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    many = tmp_path / "many.txt"  # a run long enough to be interrupted at any of these times
    many.write_text((media["good"][0] + "\n") * 400)
    for i, delay in enumerate((0.3, 0.8, 1.5)):
        cmd = [sys.executable, "-m", "pevideo", "embed", str(many), "--model", media["ckpt"], "--out",
               str(tmp_path / f"e{i}.safetensors"), "--workers", "0", "--num-frames", str(NF)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip() and ": warning:" not in line]
        assert p.returncode == 130 and len(lines) == 1 and lines[0].startswith("pevideo"), (delay, err[-2000:])
        assert lines[0].endswith("interrupted"), lines


def _killing(monkeypatch, name: str, marker=None):
    """Decoding ``name`` kills the decoding worker process (SIGKILL, as the OOM killer does); only the
    first time when ``marker`` (a file, created then) is given."""
    from pevideo.embed import workers

    real = workers.read_video

    def read_video(path, *a, **k):
        if os.path.basename(path) == name and (marker is None or not os.path.exists(marker)):
            if marker is not None:
                open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *a, **k)

    monkeypatch.setattr(workers, "read_video", read_video)


def test_a_killed_decoding_worker_is_restarted(media, tmp_path, monkeypatch):
    kw = dict(ARGS, num_workers=1, batch_size=1)
    ref = tmp_path / "ref.safetensors"
    embed_to_file([media["videos"]], media["ckpt"], ref, **kw)
    with monkeypatch.context() as m:
        _killing(m, "b.mp4", marker=tmp_path / "killed-once")
        with pytest.warns(UserWarning, match="killed by signal SIGKILL, likely out of memory.*restarting"):
            summary = embed_to_file([media["videos"]], media["ckpt"], tmp_path / "e.safetensors", **kw)
    assert summary.num_failed == 1  # bad.mp4 only
    a, b = read_embeddings(ref), read_embeddings(tmp_path / "e.safetensors")
    assert b.input_index.tolist() == a.input_index.tolist() and torch.equal(b.video_embeds, a.video_embeds)

    # A clip that kills its worker every time: that clip's error, the run goes on (exit status 1).
    with monkeypatch.context() as m:
        _killing(m, "b.mp4")
        with pytest.warns(UserWarning, match="killed by signal SIGKILL"):
            summary = embed_to_file([media["videos"]], media["ckpt"], tmp_path / "f.safetensors", **kw)
    emb = read_embeddings(tmp_path / "f.safetensors")
    assert summary.num_failed == 2 and emb.input_index.tolist() == [0, 3, 4]
    err = emb.errors[0]
    assert err["index"] == 1 and "kills the worker process" in err["error"] and "SIGKILL" in err["error"]


def test_a_folder_without_config_json_is_a_usage_error(media, tmp_path, capsys, no_model_loading):
    bare = tmp_path / "ckpt"
    bare.mkdir()
    os.link(os.path.join(media["ckpt"], "model.safetensors"), bare / "model.safetensors")
    for cmd, extra in (("embed", ["--out", tmp_path / "e.safetensors"]), ("classify", ["--labels", "a cat"])):
        assert cli.main([cmd, media["good"][0], "--model", str(bare), *map(str, extra)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{bare}: no config.json" in err[0], err


def _decode_cell(cell: str) -> bytes:
    return os.fsencode(json.loads(cell) if cell.startswith('"') else cell)


def test_odd_file_names_round_trip(media, tmp_path, capsys):
    """Names that are not UTF-8, or hold a newline: classify's CSV / JSON / text and embed's outputs
    write them escaped (round-trippable to the same bytes); stderr keeps one line per failure."""
    v = tmp_path / "v"
    v.mkdir()
    names = [b"caf\xe9.mp4", b"new\nline.mp4", b'"quoted".mp4', b"plain.mp4"]
    for n in names:
        shutil.copy(media["good"][0], os.path.join(os.fsencode(v), n))
    with open(os.path.join(os.fsencode(v), b"bro\nken\xff.mp4"), "wb") as f:
        f.write(b"not a video")
    base = ["classify", str(v), "--model", media["ckpt"], "--labels", "a cat", "--num-frames", str(NF),
            "--workers", "0"]
    assert cli.main(base + ["--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bro\\nken\\xff.mp4" in err[0]
    rows = list(csv.reader(io.StringIO((tmp_path / "p.csv").read_text(encoding="utf-8"))))[1:]
    got = {_decode_cell(r[0]) for r in rows}
    want = {os.path.join(os.fsencode(v), n) for n in names + [b"bro\nken\xff.mp4"]}
    assert got == want
    assert cli.main(base + ["--out", str(tmp_path / "p.json")]) == 1
    data = json.loads((tmp_path / "p.json").read_text(encoding="ascii"))
    assert {os.fsencode(r["path"]) for r in data["results"]} == want
    assert cli.main(base) == 1  # the text table on stdout
    out = capsys.readouterr().out.splitlines()
    assert {_decode_cell(line) for line in out if not line.startswith(" ")} == want

    e = tmp_path / "e.safetensors"
    assert cli.main(["embed", str(v), "--model", media["ckpt"], "--out", str(e), "--num-frames", str(NF),
                     "--workers", "0"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2 and "failed" in err[0]  # the failure, the summary
    emb = read_embeddings(e)
    assert {os.fsencode(p) for p in emb.paths} | {os.fsencode(x["path"]) for x in emb.errors} == want
    with open(tmp_path / "e.errors.jsonl", encoding="ascii") as f:
        assert [os.fsencode(json.loads(line)["path"]) for line in f] == [os.path.join(os.fsencode(v), b"bro\nken\xff.mp4")]


def test_a_clips_embedding_does_not_depend_on_its_batch(media):
    """On CPU the same clip gives the same bits alone or beside others (of other lengths: fps sampling)."""
    import pevideo

    model = pevideo.PeVideoModel.from_pretrained(media["ckpt"])
    x = media["good"][0]
    others = media["good"][1:]
    got = []
    for batch_size, paths in ((1, [x]), (2, [others[0], x]), (3, [x, *others]), (4, [*others, x])):
        res = {r.path: r.video_embeds for r in embed_videos(paths, model, fps=12.0, batch_size=batch_size,
                                                            num_workers=0)}
        got.append(res[x])
    assert all(torch.equal(got[0], g) for g in got[1:]), [float((got[0] - g).abs().max()) for g in got]
