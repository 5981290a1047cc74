"""What ``pevideo embed`` writes, under faults: weights saved again, shards copied / swapped / damaged,
temporaries of killed writers, two runs on one output, a merge after ``--keep-shards``, and OS errors
(read-only output, disk full, a file where a folder goes, a cut-short output, a garbage manifest).

A tiny random checkpoint written by transformers and five short videos written by PyAV (one corrupt).
"""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("av")

from _media import write_checkpoint  # noqa: E402

from pevideo import cli  # noqa: E402
from pevideo.embed import embed_to_file, merge_shards, read_embeddings  # noqa: E402
from pevideo.embed import merging, safeio  # noqa: E402
from pevideo.embed.layout import Layout  # noqa: E402
from pevideo.embed.manifest import ManifestMismatchError  # noqa: E402
from pevideo.embed.safeio import DamagedOutputError, OutputLockedError, StoreIOError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no preprocessor config:UserWarning")

NF = 4
ARGS = dict(num_frames=NF, shard_size=2, batch_size=2, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def done(media, tmp_path_factory):
    """A finished folder output (3 shards of 2, 2, 1 inputs) and what it reads back as."""
    out = tmp_path_factory.mktemp("done") / "emb"
    embed_to_file([media["videos"]], media["ckpt"], out, **ARGS)
    return dict(out=out, emb=read_embeddings(out))


def copy_of(done, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(done["out"], out)
    return out


def tensor_offset(path, name):
    """Where tensor ``name``'s bytes start in a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def flip(path, offset, nbytes=2):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(nbytes))
        f.seek(offset)
        f.write(bytes(b ^ 0x40 for b in data))


def embed_cli(*args):
    return cli.main(["embed", *map(str, args)])


def one_error_line(err, cmd="embed", resumable=False):
    """The one error line (no traceback; "rerun to resume" only where a rerun does resume)."""
    assert "Traceback" not in err and resumable == ("rerun the same command to resume" in err), err
    lines = [line for line in err.splitlines() if line.startswith(f"pevideo {cmd}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
def test_weights_saved_again_are_not_resumed(media, tmp_path):
    """Other weights under the same config.json: a resume (unfinished shards) and a rerun of a finished
    file are refused, naming the weights, instead of mixing old and new rows."""
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=0, tokenizer=False)
    part, full = tmp_path / "part", tmp_path / "full.safetensors"

    def stop(s):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_to_file([media["videos"]], ckpt, part, on_shard=stop, **ARGS)
    embed_to_file([media["videos"]], ckpt, full, **ARGS)
    cfg = open(os.path.join(ckpt, "config.json"), "rb").read()
    write_checkpoint(tmp_path / "ckpt", seed=1, tokenizer=False)  # other weights, same config
    assert open(os.path.join(ckpt, "config.json"), "rb").read() == cfg
    for out in (part, full):
        with pytest.raises(ManifestMismatchError, match="model weights: model.safetensors changed"):
            embed_to_file([media["videos"]], ckpt, out, **ARGS)
    # The kernels are part of it too (checked before any model is loaded).
    with pytest.raises(ManifestMismatchError, match="fast: was False, now True"):
        embed_to_file([media["videos"]], ckpt, part, fast=True, **ARGS)
    # With --overwrite the run starts over with the new weights.
    embed_to_file([media["videos"]], ckpt, full, overwrite=True, **ARGS)
    fresh = tmp_path / "fresh.safetensors"
    embed_to_file([media["videos"]], ckpt, fresh, **ARGS)
    torch.testing.assert_close(read_embeddings(full).video_embeds, read_embeddings(fresh).video_embeds)


def test_misplaced_or_damaged_shards_are_refused(done, tmp_path):
    """A shard copied over another, swapped shards, flipped bytes in input_index: read_embeddings and
    merge name the shard; a rerun writes it again; the result then equals the original."""
    base = done["out"]
    cases = {}
    out = tmp_path / "copied"
    shutil.copytree(base, out)
    shutil.copy(out / "shard-00000.safetensors", out / "shard-00001.safetensors")
    cases[out] = ("shard-00001", "holds shard 0 .inputs 0-1., not shard 1 .inputs 2-3.", [1])
    out = tmp_path / "swapped"
    shutil.copytree(base, out)
    os.replace(out / "shard-00000.safetensors", out / "tmp")
    os.replace(out / "shard-00001.safetensors", out / "shard-00000.safetensors")
    os.replace(out / "tmp", out / "shard-00001.safetensors")
    cases[out] = ("shard-00000", "holds shard 1", [0, 1])
    out = tmp_path / "flipped"
    shutil.copytree(base, out)
    flip(out / "shard-00001.safetensors", tensor_offset(out / "shard-00001.safetensors", "input_index") + 2)
    cases[out] = ("shard-00001", "input_index fails its checksum", [1])
    for out, (name, msg, _) in cases.items():
        with pytest.raises(DamagedOutputError, match=f"{name}.safetensors: {msg}") as e:
            read_embeddings(out)
        assert "\n" not in str(e.value) and "rerun" in str(e.value)
        with pytest.raises(DamagedOutputError, match=name):
            merge_shards(out)
    # A rerun (same arguments) writes the bad shard again instead of taking it.
    media_dir = os.path.dirname(done["emb"].paths[0])
    ckpt = json.load(open(base / "manifest.json"))["config"]["model"]["path"]
    for out, (name, _, redone) in cases.items():
        written = []
        with pytest.warns(UserWarning, match=f"{name}.safetensors .*it will be written again"):
            embed_to_file([media_dir], ckpt, out, on_shard=written.append, **ARGS)
        assert written == redone
        emb = read_embeddings(out)
        assert emb.input_index.tolist() == done["emb"].input_index.tolist() == [0, 1, 3, 4]
        torch.testing.assert_close(emb.video_embeds, done["emb"].video_embeds)


def test_joined_file_is_checked(done, tmp_path, monkeypatch):
    """A joined file with a flipped input_index is refused; a join whose rows do not cover every input
    once, in order, is never renamed into place."""
    man = json.load(open(done["out"] / "manifest.json"))
    media_dir, ckpt = os.path.dirname(done["emb"].paths[0]), man["config"]["model"]["path"]
    out = tmp_path / "emb.safetensors"
    embed_to_file([media_dir], ckpt, out, keep_shards=True, **ARGS)
    assert read_embeddings(out).input_index.tolist() == [0, 1, 3, 4]
    bad = tmp_path / "bad.safetensors"
    shutil.copy(out, bad)
    flip(bad, tensor_offset(bad, "input_index") + 8)
    with pytest.raises(DamagedOutputError, match="bad.safetensors: input_index fails its checksum"):
        read_embeddings(bad)

    # Shards that each pass their checks but do not fit together (a row twice): the join is refused.
    os.remove(out)
    real = merging.check_all_shards

    def doubled(layout, man, full=False, partial=False):
        parts = real(layout, man, full, partial)
        return [parts[0], parts[0], *parts[1:]] if full else parts

    monkeypatch.setattr(merging, "check_all_shards", doubled)
    with pytest.raises(DamagedOutputError, match="not strictly increasing"):
        merge_shards(out)
    assert not os.path.exists(out) and [n for n in os.listdir(tmp_path) if ".tmp." in n] == []


def test_stale_temporaries_are_removed(done, tmp_path):
    """Temporaries of killed writers of this output go at the next run; other files stay."""
    man = json.load(open(done["out"] / "manifest.json"))
    media_dir, ckpt = os.path.dirname(done["emb"].paths[0]), man["config"]["model"]["path"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "emb.safetensors"
    (tmp_path / "emb.safetensors.shards").mkdir()
    stale = [tmp_path / f".emb.safetensors.tmp.{dead}", tmp_path / f".emb.errors.jsonl.tmp.{dead}",
             tmp_path / "emb.safetensors.shards" / f".shard-00001.safetensors.tmp.{dead}",
             tmp_path / "emb.safetensors.shards" / f".shard-00002.safetensors.tmp.{os.getppid()}"]  # alive, older
    keep = [tmp_path / f".other.safetensors.tmp.{dead}", tmp_path / "notes.tmp.1"]
    for p in stale + keep:
        p.write_bytes(b"x" * 100)
    old = time.time() - 60
    os.utime(stale[-1], (old, old))
    embed_to_file([media_dir], ckpt, out, **ARGS)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert sorted(os.listdir(tmp_path)) == sorted(["emb.safetensors", "emb.errors.jsonl"] + [p.name for p in keep])


LOCKER = """
import sys, time
from pevideo.embed.layout import Layout
from pevideo.embed.merging import output_lock
output_lock(Layout.of(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_one_run_at_a_time(done, tmp_path, capsys):
    """A second run on an output in use is refused (exit 2, one line naming the holder); once the
    holder is killed (-9) its lock is recovered without clean-up."""
    man = json.load(open(done["out"] / "manifest.json"))
    media_dir, ckpt = os.path.dirname(done["emb"].paths[0]), man["config"]["model"]["path"]
    out = tmp_path / "emb.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [media_dir, "--model", ckpt, "--out", out, "--num-frames", NF, "--workers", 0, "-q"]
        assert embed_cli(*args) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "another run is writing this output" in line and f"pid {holder.pid}" in line
        with pytest.raises(OutputLockedError):
            merge_shards(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert embed_cli(*args) == 1  # the dead holder's lock is taken over; one video is corrupt
    assert not os.path.exists(str(out) + ".lock")
    assert read_embeddings(out).input_index.tolist() == [0, 1, 3, 4]
    # The store's errors cross process boundaries (torchrun ranks get rank 0's).
    for exc in (OutputLockedError("o", "busy", "wait"), StoreIOError("f", "full", "free", errno.ENOSPC),
                ManifestMismatchError("o", "  x: was 1, now 2", "use another")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)


def test_merge_keeps_shards_the_embed_run_kept(done, tmp_path):
    man = json.load(open(done["out"] / "manifest.json"))
    media_dir, ckpt = os.path.dirname(done["emb"].paths[0]), man["config"]["model"]["path"]
    out = tmp_path / "emb.safetensors"
    embed_to_file([media_dir], ckpt, out, keep_shards=True, **ARGS)
    shards = str(out) + ".shards"
    assert os.path.isdir(shards)
    os.remove(out)
    assert cli.main(["merge", str(out)]) == 1
    assert os.path.isfile(out) and os.path.isdir(shards)
    assert merge_shards(out, keep_shards=False).num_embedded == 4
    assert not os.path.exists(shards)


def fail_writes(monkeypatch, code, after=10, only=""):
    """Writes of output files (names containing ``only``) write ``after`` bytes, then fail with ``code``."""
    real = safeio._write_file

    def write(path, data):
        if only not in os.path.basename(path):
            return real(path, data)
        with open(path, "wb") as f:
            f.write(bytes(data[:after]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safeio, "_write_file", write)


def test_os_errors_are_one_line(done, tmp_path, monkeypatch, capsys):
    man = json.load(open(done["out"] / "manifest.json"))
    media_dir, ckpt = os.path.dirname(done["emb"].paths[0]), man["config"]["model"]["path"]
    base = [media_dir, "--model", ckpt, "--num-frames", NF, "--workers", 0, "--shard-size", 2, "-q"]

    # Disk full while writing a shard: one line, true advice, no big temporary left behind; then resumes.
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        fail_writes(m, errno.ENOSPC, only="shard-00001")
        assert embed_cli(*base, "--out", out) == 3
    line = one_error_line(capsys.readouterr().err, resumable=True)
    assert "shard-00001.safetensors: cannot write: No space left on device; free some space" in line
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.safetensors"]
    assert embed_cli(*base, "--out", out) == 1

    # A read-only place.
    with monkeypatch.context() as m:
        fail_writes(m, errno.EROFS)
        assert embed_cli(*base, "--out", tmp_path / "ro") == 3
    line = one_error_line(capsys.readouterr().err)
    assert "manifest.json: cannot write: Read-only file system; choose a writable --out" in line

    # --out an existing regular file (no .safetensors: a folder of shards).
    (tmp_path / "afile").write_text("mine\n")
    assert embed_cli(*base, "--out", tmp_path / "afile") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "afile: exists and is not a folder" in line
    assert (tmp_path / "afile").read_text() == "mine\n"

    # A 0-byte and a cut-short final file.
    for size in (0, 50):
        final = tmp_path / f"cut{size}.safetensors"
        final.write_bytes(open(Layout.of(done["out"]).shard(0), "rb").read()[:size])
        assert embed_cli(*base, "--out", final) == 3
        line = one_error_line(capsys.readouterr().err)
        assert f"cut{size}.safetensors: is not a complete safetensors file ({size} bytes" in line
        assert "delete it" in line
        with pytest.raises(DamagedOutputError, match=f"cut{size}"):
            read_embeddings(final)

    # A damaged manifest of pevideo's: delete the folder or --overwrite (a rerun alone would fail the same way).
    out = tmp_path / "garbage"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "pevideo.embeddings", "version": 3, "fingerp')
    assert embed_cli(*base, "--out", out) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "manifest.json: is not a pevideo manifest" in line and "--overwrite" in line
    with pytest.raises(DamagedOutputError, match="manifest"):
        read_embeddings(out)
    assert embed_cli(*base, "--out", out, "--overwrite") == 1
    assert read_embeddings(out).input_index.tolist() == [0, 1, 3, 4]
    # A manifest.json that is not pevideo's at all (a user's folder): refused, also with --overwrite.
    out = tmp_path / "users"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    for extra in ([], ["--overwrite"]):
        assert embed_cli(*base, "--out", out, *extra) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "manifest.json: exists and is not a manifest pevideo wrote; refusing to replace it" in line
    assert os.listdir(out) == ["manifest.json"] and (out / "manifest.json").read_text() == "{not json"
