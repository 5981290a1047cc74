"""``pevideo embed`` / ``classify`` / ``merge`` and the pipeline behind them, end to end on CPU.

A tiny random checkpoint written by transformers (plus a tiny tokenizer) and a few short videos written
by PyAV, one of them corrupt. Results are checked against the model called directly on ``load_video`` +
processor outputs.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("av")

from pevideo import cli  # noqa: E402
from pevideo.embed import (  # noqa: E402
    ManifestMismatchError,
    PipelineStats,
    classify_videos,
    embed_to_file,
    embed_videos,
    expand_inputs,
    read_embeddings,
)

NF = 4  # frames per clip in these tests
LABELS = ["a person playing tennis", "a cat sleeping", "a dog running"]
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def reference(media):
    """The model called directly: load_video + processor + get_video_features, one clip at a time."""
    import pevideo

    model = pevideo.PeVideoModel.from_pretrained(media["ckpt"])
    proc = pevideo.PeVideoVideoProcessor(size={"height": 64, "width": 64})
    out = {}
    with torch.no_grad():
        for p in media["good"]:
            frames, meta = pevideo.load_video(p, num_frames=NF)
            inputs = proc(frames, return_tensors="pt", do_sample_frames=False)
            emb = model.get_video_features(**inputs).pooler_output[0]
            pooled = model.video_encoder(**inputs).pooler_output[0]
            out[p] = dict(emb=emb, pooled=pooled, total=meta.total_num_frames, indices=meta.frames_indices)
    return dict(model=model, proc=proc, clips=out)


def embed(*args):
    return cli.main(["embed", *map(str, args)])


def check_against_reference(emb, reference, good, pooled=False):
    assert emb.paths == good
    assert emb.video_embeds.dtype == torch.float32 and emb.video_embeds.shape == (len(good), 32)
    for i, p in enumerate(good):
        ref = reference["clips"][p]
        torch.testing.assert_close(emb.video_embeds[i], ref["emb"], atol=ATOL, rtol=RTOL)
        if pooled:
            torch.testing.assert_close(emb.pooled[i], ref["pooled"], atol=ATOL, rtol=RTOL)
        assert emb.frame_counts[i].item() == ref["total"]
        assert emb.sampled_indices[i].tolist() == ref["indices"]


def read_errors(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------------
def test_embed_cli_end_to_end(media, reference, tmp_path, capsys, monkeypatch):
    import pevideo.processing

    monkeypatch.setattr(pevideo.processing, "_warned_defaults", set())  # once per process: other tests gave it
    out = tmp_path / "emb.safetensors"
    rc = embed(media["videos"], "--model", media["ckpt"], "--out", out, "--num-frames", NF, "--workers", 0,
               "--batch-size", 3, "--shard-size", 2, "--pooled")
    assert rc == 1  # one video failed, the rest is written
    err = capsys.readouterr().err
    assert "bad.mp4" in err and "4 of 5 videos embedded" in err
    # The checkpoint has no processor config: one warning naming what was assumed.
    assert err.count("has no video processor config") == 1
    assert "64x64" in err and "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in err

    emb = read_embeddings(out)
    check_against_reference(emb, reference, media["good"], pooled=True)
    assert emb.input_index.tolist() == [0, 1, 3, 4]
    assert emb.config["num_frames"] == NF and emb.config["num_inputs"] == 5
    errors = read_errors(tmp_path / "emb.errors.jsonl")
    assert [e["path"] for e in errors] == [media["order"][2]] and errors[0]["index"] == 2
    assert "cannot open as a video" in errors[0]["error"]
    assert not os.path.exists(str(out) + ".shards")  # joined, then removed
    assert sorted(os.listdir(tmp_path)) == ["emb.errors.jsonl", "emb.safetensors"]  # no temporary files left

    # The same command again: already complete, nothing encoded, same status; a lost errors file comes back.
    os.remove(tmp_path / "emb.errors.jsonl")
    mtime = os.stat(out).st_mtime_ns
    assert embed(media["videos"], "--model", media["ckpt"], "--out", out, "--num-frames", NF, "--workers", 0,
                 "--shard-size", 2, "--pooled") == 1
    assert os.stat(out).st_mtime_ns == mtime
    assert read_errors(tmp_path / "emb.errors.jsonl") == errors


def test_list_file_workers_folder_output(media, reference, tmp_path):
    """A list file (relative paths, comments, a folder) into a folder of shards, decoded by 2 workers."""
    lst = tmp_path / "list.txt"
    rel = os.path.relpath(media["videos"], tmp_path)  # relative to the list file's folder
    lst.write_text(f"# clips\n{rel}/a.mp4\n\n{rel}/b.mp4\n{rel}/missing.mp4\n{rel}/sub\n")
    out = tmp_path / "emb"
    assert embed(lst, "--model", media["ckpt"], "--out", out, "--num-frames", NF, "--workers", 2,
                 "--batch-size", 2, "--shard-size", 3, "-q") == 1
    assert sorted(os.listdir(out)) == ["errors.jsonl", "manifest.json", "shard-00000.safetensors",
                                       "shard-00001.safetensors"]
    good = [media["good"][i] for i in (0, 1, 3)]
    emb = read_embeddings(out)
    assert [os.path.normpath(p) for p in emb.paths] == good
    emb.paths = [os.path.normpath(p) for p in emb.paths]
    check_against_reference(emb, reference, good)
    errors = read_errors(out / "errors.jsonl")
    assert len(errors) == 1 and errors[0]["path"].endswith("missing.mp4") and "not found" in errors[0]["error"]


def test_expand_inputs(media, tmp_path, capsys):
    assert expand_inputs(media["videos"]) == media["order"]
    assert expand_inputs([media["order"][1], media["videos"] + "/sub"]) == [media["order"][1], media["order"][4]]
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        expand_inputs([str(tmp_path / "nope.mp4")], must_exist=True)
    with pytest.raises(ValueError, match="no videos found"):
        expand_inputs([str(tmp_path)])
    # Expanded once: an expanded list is taken as is (the CLI expands, then the pipeline), even where a
    # listed video's name looks like a list file.
    import shutil

    shutil.copy(media["order"][0], tmp_path / "odd.lst")
    (tmp_path / "list.txt").write_text("odd.lst\n")
    paths = expand_inputs([str(tmp_path / "list.txt")])
    assert paths == [str(tmp_path / "odd.lst")]
    assert expand_inputs(paths) is paths
    # On the command line a missing input is a usage error (exit 2), before any model is loaded.
    assert embed(tmp_path / "nope.mp4", "--model", media["ckpt"], "--out", tmp_path / "x.safetensors") == 2
    assert "input not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["embed", media["videos"], "--model", media["ckpt"]])  # no --out
    assert e.value.code == 2


class Interrupt(Exception):
    pass


def test_resume_after_interruption(media, reference, tmp_path):
    out = tmp_path / "emb"  # a folder: the shards stay, so a damaged one can be simulated below
    args = dict(num_frames=NF, shard_size=2, batch_size=3, num_workers=0, progress=False)

    def stop_after_first(s):
        raise Interrupt

    with pytest.raises(Interrupt):
        embed_to_file([media["videos"]], media["ckpt"], out, on_shard=stop_after_first, **args)
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.safetensors"]
    with pytest.raises(ValueError, match="2 of 3 shards are missing"):
        read_embeddings(out)
    first = os.stat(out / "shard-00000.safetensors").st_mtime_ns

    written = []
    summary = embed_to_file([media["videos"]], media["ckpt"], out, on_shard=written.append, **args)
    assert written == [1, 2] and summary.shards_skipped == 1 and summary.num_failed == 1
    assert summary.exit_status == 1 and summary.stats.clips == 2 and summary.stats.failed == 1
    assert os.stat(out / "shard-00000.safetensors").st_mtime_ns == first
    check_against_reference(read_embeddings(out), reference, media["good"])

    # A shard cut short (a disk that filled up), and a temporary file left by a killed writer.
    with open(out / "shard-00002.safetensors", "r+b") as f:
        f.truncate(20)
    (out / ".shard-00001.safetensors.tmp.123").write_bytes(b"partial")
    written.clear()
    with pytest.warns(UserWarning, match="unreadable"):
        embed_to_file([media["videos"]], media["ckpt"], out, on_shard=written.append, **args)
    assert written == [2]
    assert ".shard-00001.safetensors.tmp.123" not in os.listdir(out)
    check_against_reference(read_embeddings(out), reference, media["good"])
    assert [e["index"] for e in read_errors(out / "errors.jsonl")] == [2]


def test_different_arguments_are_refused(media, tmp_path, capsys):
    out = tmp_path / "emb.safetensors"
    base = [media["videos"], "--model", media["ckpt"], "--out", out, "--workers", 0, "-q"]
    with pytest.raises(Interrupt):
        embed_to_file([media["videos"]], media["ckpt"], out, num_frames=NF, shard_size=2, num_workers=0,
                      on_shard=lambda s: (_ for _ in ()).throw(Interrupt()))
    assert embed(*base, "--num-frames", 3, "--shard-size", 2) == 2  # unfinished shards made with 4 frames
    err = capsys.readouterr().err
    assert "different arguments" in err and "num_frames: was 4, now 3" in err
    with pytest.raises(ManifestMismatchError, match="inputs"):
        embed_to_file(media["good"][:2], media["ckpt"], out, num_frames=NF, shard_size=2, num_workers=0)
    assert embed(*base, "--num-frames", 3, "--shard-size", 2, "--overwrite") == 1
    assert read_embeddings(out).sampled_indices.shape == (4, 3)
    # And against a finished file, too.
    assert embed(*base, "--num-frames", 3, "--shard-size", 2, "--pooled") == 2
    assert "pooled: was False, now True" in capsys.readouterr().err


def test_embed_videos_api_unequal_lengths(media, reference):
    """fps sampling gives clips of different lengths in one batch; each equals the clip encoded alone."""
    import pevideo

    model, proc = reference["model"], reference["proc"]
    stats = PipelineStats()
    results = list(embed_videos(media["videos"], model, processor=proc, fps=12.0, batch_size=4, num_workers=0,
                                stats=stats))
    assert [r.path for r in results] == media["order"]
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert "bad.mp4" in results[2].error and results[2].video_embeds is None
    lengths = [len(r.frame_indices) for r in results if r.ok]
    assert len(set(lengths)) > 1
    with torch.no_grad():
        for r in results:
            if r.ok:
                frames, meta = pevideo.load_video(r.path, fps=12.0)
                assert meta.frames_indices == r.frame_indices
                ref = model.get_video_features(**proc(frames, return_tensors="pt", do_sample_frames=False))
                torch.testing.assert_close(r.video_embeds, ref.pooler_output[0], atol=ATOL, rtol=RTOL)
    assert stats.clips == 4 and stats.failed == 1 and stats.frames == sum(lengths) and 0 <= stats.wait_fraction <= 1

    # Stopping early leaves nothing behind (the decoder pool shuts down with the generator).
    gen = embed_videos(media["good"], model, processor=proc, num_frames=NF, batch_size=1, num_workers=1)
    assert next(gen).ok
    gen.close()


def test_model_object_uses_its_checkpoints_processor(media, tmp_path):
    """A model loaded with from_pretrained and passed as an object: its checkpoint's processor config is
    used, with no warning (it used to warn "no processor given" and use the defaults)."""
    import shutil
    import warnings

    import pevideo

    ckpt = tmp_path / "ckpt"
    shutil.copytree(media["ckpt"], ckpt)
    own = pevideo.PeVideoVideoProcessor(size={"height": 64, "width": 64}, image_mean=[0.4, 0.45, 0.5],
                                        image_std=[0.2, 0.25, 0.3])
    own.save_pretrained(ckpt)
    model = pevideo.PeVideoModel.from_pretrained(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = list(embed_videos(media["good"][:2], model, num_frames=NF, num_workers=0))
    with torch.no_grad():
        for r in results:
            frames, _ = pevideo.load_video(r.path, num_frames=NF)
            want = model.get_video_features(**own(frames, return_tensors="pt", do_sample_frames=False)).pooler_output[0]
            torch.testing.assert_close(r.video_embeds, want, atol=ATOL, rtol=RTOL)


def test_cli_device_and_help(media, tmp_path, capsys):
    # A device torch does not know is a usage error (one line, exit 2), not a crash with a traceback.
    assert embed(media["order"][0], "--model", media["ckpt"], "--out", tmp_path / "x", "--device", "tpu") == 2
    err = capsys.readouterr().err
    assert "'tpu'" in err and "not a device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli.main(["classify", "--help"])
    assert "tokenizer" in capsys.readouterr().out


def test_classify(media, reference, tmp_path, capsys):
    import pevideo
    from transformers import AutoTokenizer

    # The reference: the full model forward, as in upstream's quickstart.
    model, proc = reference["model"], reference["proc"]
    tok = AutoTokenizer.from_pretrained(media["ckpt"])
    text = tok(LABELS, padding=True, return_tensors="pt")
    want = {}
    with torch.no_grad():
        for p in media["good"]:
            frames, _ = pevideo.load_video(p, num_frames=NF)
            out = model(**proc(frames, return_tensors="pt", do_sample_frames=False), **text)
            want[p] = out.logits_video_text.sigmoid()[0]

    base = ["classify", media["videos"], "--model", media["ckpt"], "--num-frames", str(NF), "--workers", "0",
            "--labels", *LABELS]
    assert cli.main(base) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 5 + 4 * len(LABELS) + 1  # a path line per clip, a line per label (or the error)
    assert lines[0] == media["order"][0] and lines[1].strip().endswith(LABELS[0])
    assert "bad.mp4" in captured.err

    assert cli.main(base + ["--out", str(tmp_path / "p.csv")]) == 1
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].split(",") == ["path", *LABELS, "truncated_suspect", "error"]
    assert len(rows) == 6 and all(len(r.split(",")) == len(LABELS) + 3 for r in rows[1:] if "bad" not in r)

    assert cli.main(base + ["--out", str(tmp_path / "p.json")]) == 1
    got = json.loads((tmp_path / "p.json").read_text())
    assert got["labels"] == LABELS and [r["path"] for r in got["results"]] == media["order"]
    for r in got["results"]:
        if "bad" in r["path"]:
            assert "error" in r and "probs" not in r
        else:
            assert len(r["probs"]) == len(LABELS)
            torch.testing.assert_close(torch.tensor(r["probs"]), want[r["path"]], atol=1e-5, rtol=0)

    # Python API, with a model object and its tokenizer.
    res = list(classify_videos(media["good"][:2], model, LABELS, tokenizer=tok, processor=proc, num_frames=NF,
                               num_workers=0))
    for r in res:
        torch.testing.assert_close(r.probs, want[r.path], atol=1e-5, rtol=1e-5)
    # A model loaded from a checkpoint finds the checkpoint's tokenizer; one with no checkpoint folder needs tokenizer=.
    res = list(classify_videos(media["good"][:1], model, LABELS, processor=proc, num_frames=NF, num_workers=0))
    torch.testing.assert_close(res[0].probs, want[res[0].path], atol=1e-5, rtol=1e-5)
    import copy

    in_memory = copy.copy(model)
    del in_memory.name_or_path
    with pytest.raises(ValueError, match="tokenizer"):
        classify_videos(media["good"][:1], in_memory, LABELS, processor=proc, num_workers=0)

    # A checkpoint without a tokenizer: a usage error, before any video is decoded.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(media["ckpt"], name), bare / name)
    assert cli.main(["classify", media["order"][0], "--model", str(bare), "--labels", "a cat"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_torchrun_two_processes(media, tmp_path):
    """`torchrun --nproc-per-node 2 -m pevideo embed` (gloo on CPU): each rank its shards, rank 0 joins
    them; the result equals a single-process run's. Then `pevideo merge` joins the kept shards offline."""
    single = tmp_path / "single.safetensors"
    common = ["--model", media["ckpt"], "--num-frames", NF, "--workers", 0, "--shard-size", 1, "--device", "cpu"]
    assert embed(media["videos"], "--out", single, *common) == 1

    out = tmp_path / "dist.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pevideo",
           "embed", media["videos"], "--out", str(out), "--keep-shards", *map(str, common)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 0's status: a video failed
    assert "4 of 5 videos embedded" in proc.stderr and "5 shard(s) written" in proc.stderr
    a, b = read_embeddings(single), read_embeddings(out)
    assert b.paths == a.paths and b.input_index.tolist() == a.input_index.tolist()
    torch.testing.assert_close(b.video_embeds, a.video_embeds, atol=ATOL, rtol=RTOL)
    assert torch.equal(b.sampled_indices, a.sampled_indices) and torch.equal(b.frame_counts, a.frame_counts)
    assert b.errors == a.errors and len(b.errors) == 1
    shards = sorted(n for n in os.listdir(str(out) + ".shards") if n.startswith("shard-"))
    assert len(shards) == 5

    # Offline join of the kept shards (as after a multi-GPU run cut short before rank 0 joined them).
    os.remove(out)
    assert torch.equal(read_embeddings(out).video_embeds, b.video_embeds)  # read from the shards
    assert cli.main(["merge", str(out)]) == 1
    c = read_embeddings(out)
    assert c.paths == a.paths and torch.equal(c.video_embeds, b.video_embeds)
    assert os.path.isdir(str(out) + ".shards")  # the embed run's --keep-shards holds for merge too
    assert cli.main(["merge", str(out), "--no-keep-shards"]) == 1
    assert not os.path.exists(str(out) + ".shards")
