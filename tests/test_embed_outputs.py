"""Issue 21: nothing of the user's is ever written over, and damaged or unfinished outputs are never
read as good. ``pevideo embed`` / ``merge`` / ``classify`` and ``read_embeddings`` on the shared tiny
checkpoint and videos (see conftest ``media``)."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch

pytest.importorskip("av")

from pevideo import cli  # noqa: E402
from pevideo.embed import embed_to_file, merge_shards, read_embeddings  # noqa: E402
from pevideo.embed.safeio import DamagedOutputError, OutputLockedError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no video processor config:UserWarning")

NF = 4
ARGS = dict(num_frames=NF, shard_size=2, batch_size=2, num_workers=0, progress=False)


def run(*args):
    return cli.main([str(a) for a in args])


def one_line(capsys, cmd="embed"):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"pevideo {cmd}: error: "), err
    return err[0]


def snapshot(*paths):
    return {str(p): open(p, "rb").read() for p in paths}


@pytest.fixture(scope="module")
def done(media, tmp_path_factory):
    """A finished folder output (3 shards: inputs 0-1, 2-3, 4)."""
    out = tmp_path_factory.mktemp("outputs") / "emb"
    embed_to_file([media["videos"]], media["ckpt"], out, **ARGS)
    return out


@pytest.fixture
def ckpt(media, tmp_path):
    """A copy of the checkpoint (its files hard-linked) that a test may point outputs into."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in os.listdir(media["ckpt"]):
        os.link(os.path.join(media["ckpt"], name), folder / name)
    return folder


# --------------------------------------------------------------------------------------------------
def test_nothing_of_the_users_is_written_over(media, ckpt, tmp_path, capsys, no_model_loading):
    """Each refused before any work (the model is never loaded), exit 2, one line naming the path; the
    files are byte for byte as they were."""
    from safetensors.torch import save_file

    video = os.path.join(media["videos"], "a.mp4")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, foreign)
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my own notes\n")
    listed = tmp_path / "list.txt"
    listed.write_text(video + "\n")
    base = ["--model", ckpt, "--num-frames", NF, "--workers", 0]
    out = tmp_path / "e.safetensors"
    before = snapshot(video, foreign, notes, listed, *(ckpt / n for n in os.listdir(ckpt)))
    cases = [
        ([media["videos"], "--out", ckpt / "model.safetensors", "--overwrite"], "checkpoint"),
        ([media["videos"], "--out", ckpt / "model.safetensors"], "checkpoint"),
        ([media["videos"], "--out", foreign, "--overwrite"], "is not an embeddings file pevideo wrote"),
        ([media["videos"], "--out", foreign], "is not an embeddings file pevideo wrote"),
        ([media["videos"], "--out", out, "--errors", video], "an input of this run"),
        ([media["videos"], "--out", out, "--errors", ckpt / "config.json"], "checkpoint"),
        ([media["videos"], "--out", out, "--errors", out], "another output of this run"),
        ([media["videos"], "--out", tmp_path / "f", "--errors", tmp_path / "f" / "manifest.json"], "another output"),
        ([media["videos"], "--out", out, "--errors", notes], "is not an errors file pevideo wrote"),
        ([listed, "--out", out, "--errors", listed], "an input of this run"),
        ([media["videos"], "--out", media["videos"]], "an input of this run"),
        ([media["videos"], "--out", str(out) + "/"], "ends with a slash"),
        ([media["videos"], "--out", out, "--errors", str(tmp_path / "errs") + "/"], "not a file name"),
    ]
    for args, why in cases:
        assert run("embed", *args[:1], *base, *args[1:]) == 2, args
        line = one_line(capsys)
        assert why in line, (args, line)
    assert snapshot(*before) == before
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", "foreign.safetensors", "notes.jsonl", "list.txt"])

    # classify --out its own input, or the checkpoint's files: refused the same way.
    for target, why in ((video, "an input of this run"), (ckpt / "config.json", "inside the checkpoint folder")):
        assert run("classify", video, "--model", ckpt, "--labels", "a cat", "--out", target) == 2
        assert why in one_line(capsys, "classify")
    # ... and a file that is not a table pevideo wrote.
    assert run("classify", video, "--model", ckpt, "--labels", "a cat", "--out", notes, "--format", "csv") == 2
    assert "is not a table pevideo wrote" in one_line(capsys, "classify")
    assert snapshot(*before) == before


def test_a_users_shards_and_lock_file_are_not_replaced(media, tmp_path, capsys, no_model_loading):
    from safetensors.torch import save_file

    base = [media["videos"], "--model", media["ckpt"], "--num-frames", NF, "--workers", 0]
    folder = tmp_path / "mine"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "shard-00000.safetensors")
    assert run("embed", *base, "--out", folder, "--overwrite") == 2
    assert "shard-00000.safetensors: exists and is not a shard pevideo wrote" in one_line(capsys)
    lock = tmp_path / "e.safetensors.lock"
    lock.write_text("my lock notes\n")
    assert run("embed", *base, "--out", tmp_path / "e.safetensors") == 2
    assert "e.safetensors.lock: exists and is not a pevideo lock file" in one_line(capsys)
    assert lock.read_text() == "my lock notes\n" and os.listdir(folder) == ["shard-00000.safetensors"]


def test_overwrite_replaces_what_pevideo_wrote(media, tmp_path):
    out = tmp_path / "e.safetensors"
    embed_to_file([media["videos"]], media["ckpt"], out, **ARGS)
    summary = embed_to_file(media["good"][:2], media["ckpt"], out, overwrite=True, **ARGS)
    assert summary.num_inputs == 2 and read_embeddings(out).paths == media["good"][:2]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_failed_errors_write_fails_the_run(media, tmp_path, capsys):
    """--errors /dev/full (through a link, so that a rename could never replace the device itself):
    exit 3, naming the clips whose errors were lost; the device is still a device."""
    link = tmp_path / "errs.jsonl"
    link.symlink_to("/dev/full")
    out = tmp_path / "e.safetensors"
    assert run("embed", media["videos"], "--model", media["ckpt"], "--num-frames", NF, "--workers", 0, "-q",
               "--out", out, "--errors", link) == 3
    line = one_line(capsys)
    assert "No space left on device" in line and "errors of 1 failed clip(s) were not written" in line
    assert "2 ('bad.mp4')" in line and "read_embeddings(out).errors" in line
    assert os.path.islink(link) and stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert [e["index"] for e in read_embeddings(out).errors] == [2]  # kept in the output


# --------------------------------------------------------------------------------------------------
def test_a_flipped_bit_in_a_path_is_caught(done, tmp_path, capsys):
    """A shard header whose path string changed (still valid JSON, same length): read and merge refuse it."""
    out = tmp_path / "emb"
    shutil.copytree(done, out)
    shard = out / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    at = data.index(b"a.mp4", 8, 8 + n)
    data[at] ^= 0x02  # "a" -> "c"
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedOutputError, match="shard-00000.safetensors: its metadata .* fails its checksum"):
        read_embeddings(out)
    assert run("merge", out) == 3
    assert "shard-00000.safetensors" in one_line(capsys, "merge")


def test_an_edited_manifest_is_caught(done, tmp_path, capsys):
    out = tmp_path / "emb"
    shutil.copytree(done, out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_shards"] == 3 and set(man["shards"]) == {"0", "1", "2"}
    man["num_shards"] = 2
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DamagedOutputError, match="manifest.json: fails its checksum"):
        read_embeddings(out)
    assert run("merge", out) == 3
    assert "manifest.json: fails its checksum" in one_line(capsys, "merge")
    # Checksum made to fit again: the shard count still has to fit the inputs.
    from pevideo.embed.manifest import _checksum

    man["sha256"] = _checksum(man)
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DamagedOutputError, match="lists 2 shards, but 5 inputs in shards of 2 make 3"):
        read_embeddings(out)


def test_merge_refuses_what_pevideo_did_not_write(tmp_path, capsys):
    from safetensors.torch import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, foreign)
    before = foreign.read_bytes()
    assert run("merge", foreign) == 2
    assert "weights.safetensors: exists and is not an embeddings file pevideo wrote" in one_line(capsys, "merge")
    assert os.listdir(tmp_path) == ["weights.safetensors"] and foreign.read_bytes() == before


LOCKER = """
import sys, time
from pevideo.embed.layout import Layout
from pevideo.embed.merging import output_lock
output_lock(Layout.of(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_running_writer_is_seen(done, tmp_path, capsys):
    """While a run holds the output's lock: read_embeddings and merge refuse, naming its pid;
    read_embeddings(partial=True) returns what is finished, marked partial."""
    out = tmp_path / "emb"
    shutil.copytree(done, out)
    os.remove(out / "shard-00002.safetensors")  # the run is still working on it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"a run is writing this output .pid {holder.pid}"):
            read_embeddings(out)
        assert run("merge", out) == 2
        assert f"pid {holder.pid}" in one_line(capsys, "merge")
        part = read_embeddings(out, partial=True)
        assert part.partial and part.missing == [4] and part.input_index.tolist() == [0, 1, 3]
        assert [e["index"] for e in part.errors] == [2] and "partial" in repr(part)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # No writer, still unfinished: refused as such, or read partially on request.
    with pytest.raises(ValueError, match="1 of 3 shards are missing"):
        read_embeddings(out)
    assert read_embeddings(out, partial=True).missing == [4]
    full = read_embeddings(done)
    assert not full.partial and full.missing == [] and full.input_index.tolist() == [0, 1, 3, 4]
    assert merge_shards(done).num_embedded == 4
