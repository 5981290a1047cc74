"""The Ray Data stage (pevideo.ray_data, `pevideo embed --engine ray`) on a local Ray instance, CPU only.

Same numbers as `pevideo embed` on the same inputs (embeddings, frame indices, errors); a decode worker
and an encoder actor killed mid-run (failures injected here) still end with every input exactly once;
a rerun skips what is written, redoes what a killed writer left unreadable, and duplicated rows are
counted once; a five-line pipeline of a user's own reads back the same; `pevideo merge` of the folder.
Run alone with `python -m pytest -q -m ray` (needs `pip install -e '.[test,ray]'`).
"""
import glob
import os
import shutil
import sys

import pytest
import torch

pytest.importorskip("av")
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore:.*no video processor config:UserWarning")]

from _media import write_checkpoint, write_corrupt, write_video  # noqa: E402

from pevideo import cli  # noqa: E402
from pevideo.embed import read_embeddings  # noqa: E402

NF = 4
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    # The test's own stage subclasses travel by value (Ray's workers do not have tests/ on their path).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    import pevideo

    @ray.remote
    def where():
        import pevideo as p

        return p.__file__

    # Workers must run this checkout's pevideo, not another install of it.
    assert ray.get(where.remote()) == pevideo.__file__
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    ckpt = write_checkpoint(root / "ckpt")
    v = root / "videos"
    v.mkdir()
    write_video(v / "a.mp4", 12)
    write_video(v / "b.mp4", 5, 40, 56, seed=1)
    write_corrupt(v / "bad.mp4")
    write_video(v / "c.mkv", 20, 36, 36, seed=2)
    write_video(v / "d.avi", 9, codec="mpeg4", seed=3)
    return dict(root=root, ckpt=ckpt, videos=str(v))


@pytest.fixture(scope="module")
def local(media):
    """What `pevideo embed` (no Ray) writes for these inputs."""
    out = media["root"] / "local.safetensors"
    assert cli.main(["embed", media["videos"], "--model", media["ckpt"], "--out", str(out), "--num-frames", str(NF),
                     "--workers", "0", "--pooled", "-q"]) == 1
    return read_embeddings(out)


@pytest.fixture(scope="module")
def ray_out(media, ray_local):
    out = media["root"] / "ray"
    rc = cli.main(["embed", media["videos"], "--model", media["ckpt"], "--out", str(out), "--num-frames", str(NF),
                   "--pooled", "--engine", "ray", "--shard-size", "2", "--batch-size", "2"])
    assert rc == 1  # bad.mp4 failed; the job did not
    return out


def same(a, b, pooled=True):
    assert a.paths == b.paths and len(a.paths) == 4
    assert a.input_index.tolist() == b.input_index.tolist()
    assert a.errors == b.errors and len(a.errors) == 1 and "bad.mp4" in a.errors[0]["path"]
    assert a.warnings == b.warnings
    assert torch.equal(a.sampled_indices, b.sampled_indices)
    assert torch.equal(a.source_frame_counts, b.source_frame_counts)
    assert torch.equal(a.sampled_frame_counts, b.sampled_frame_counts)
    torch.testing.assert_close(a.video_embeds, b.video_embeds, atol=ATOL, rtol=RTOL)
    if pooled:
        torch.testing.assert_close(a.pooled, b.pooled, atol=ATOL, rtol=RTOL)


def test_engine_ray_equals_embed(media, local, ray_out):
    emb = read_embeddings(ray_out)
    same(emb, local)
    assert emb.config["num_frames"] == NF and emb.config["num_inputs"] == 5
    assert emb.config["model"] == local.config["model"] and emb.config["processor"] == local.config["processor"]
    import pyarrow.parquet as pq

    files = glob.glob(str(ray_out / "*.parquet"))
    assert len(files) >= 2  # --shard-size 2: several files
    schema = pq.read_schema(files[0])
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[32]"
    assert [n for n in schema.names] == ["path", "input_index", "frame_indices", "source_frame_count", "embedding",
                                         "pooled", "fingerprint", "error", "truncated_suspect"]
    with open(ray_out / "errors.jsonl") as f:
        assert len(f.readlines()) == 1


def killing(cls, marker, when):
    """``cls`` whose worker process dies (os._exit) the first time ``when(batch)`` holds."""

    def __call__(self, batch):
        if when(batch) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return cls.__call__(self, batch)

    return type("Killing" + cls.__name__, (cls,), {"__call__": __call__})


def test_workers_killed_mid_run(media, local, ray_local, tmp_path):
    from pevideo.embed.parquet import scan
    from pevideo.embed.ray_run import embed_with_ray
    from pevideo.ray_data import Decode, Encode

    dec_mark, enc_mark = str(tmp_path / "decode-killed"), str(tmp_path / "encode-killed")
    decode = killing(Decode, dec_mark, lambda b: any(str(p).endswith("c.mkv") for p in b["path"]))
    encode = killing(Encode, enc_mark, lambda b: any(str(p).endswith("d.avi") for p in b["path"]))
    out = tmp_path / "out"
    summary = embed_with_ray([media["videos"]], media["ckpt"], out, num_frames=NF, pooled=True, shard_size=1,
                             batch_size=1, decode_cls=decode, encode_cls=encode)
    assert os.path.exists(dec_mark) and os.path.exists(enc_mark)  # both really died
    assert (summary.num_inputs, summary.num_embedded, summary.num_failed) == (5, 4, 1)
    sc = scan(out)
    assert sorted(sc.input_index.tolist()) == [0, 1, 2, 3, 4]  # every input once (duplicates resolved)
    same(read_embeddings(out), local)


def test_a_file_that_always_kills_its_decoder_is_that_files_error(media, local, ray_local, tmp_path):
    """Ray Data tries a failed task without end: a file that crashes the decoder process each time would
    hold the job forever. Bounded: it ends as that file's error, the others embedded as without it."""
    from pevideo.embed.parquet import scan
    from pevideo.embed.ray_run import TASK_TRIES, embed_with_ray
    from pevideo.ray_data import Decode

    deaths = tmp_path / "deaths"
    deaths.mkdir()

    class Crashing(Decode):
        def __call__(self, batch):
            given = batch["error"] if "error" in batch else [""] * len(batch["path"])
            if any(str(p).endswith("c.mkv") and not e for p, e in zip(batch["path"], given)):  # decoding it
                if len(os.listdir(deaths)) >= 10:  # tried without end: end the job (a failure), not the test run
                    raise RuntimeError("the crashing file was tried 10 times")
                (deaths / str(os.getpid())).touch()
                os._exit(1)
            return Decode.__call__(self, batch)

    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="a worker that died 3 times"):
        summary = embed_with_ray([media["videos"]], media["ckpt"], out, num_frames=NF, pooled=True, shard_size=1,
                                 batch_size=2, decode_cls=Crashing)
    assert len(os.listdir(deaths)) == 2 * TASK_TRIES  # a batch's tries, then the file's alone: bounded
    assert (summary.num_inputs, summary.num_embedded, summary.num_failed) == (5, 3, 2)
    assert sorted(scan(out).input_index.tolist()) == [0, 1, 2, 3, 4]
    emb, want = read_embeddings(out), local
    (crashed,) = [e for e in emb.errors if e["path"].endswith("c.mkv")]
    assert "its Ray task failed in both passes" in crashed["error"] and "c.mkv" in crashed["error"]
    keep = [i for i, p in enumerate(want.paths) if not p.endswith("c.mkv")]
    assert emb.paths == [want.paths[i] for i in keep]
    torch.testing.assert_close(emb.video_embeds, want.video_embeds[keep], atol=ATOL, rtol=RTOL)
    import json

    with open(out / "errors.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert sorted(os.path.basename(e["path"]) for e in logged) == ["bad.mp4", "c.mkv"]


@pytest.mark.parametrize("fails, calls, raised", [
    ({}, [([0, 1, 2, 3], 2, None)], False),  # nothing lost: one pass
    ({1: 2, 3: 1}, [([0, 1, 2, 3], 2, None), ([1, 3], 1, None), ([1], 1, {1: "x"})], False),  # 1 kills its decoder
    ({1: 2, 3: 2}, [([0, 1, 2, 3], 2, None), ([1, 3], 1, None)], True),  # every retry failed: not one file
    ({2: 2}, [([0, 1, 2, 3], 2, None), ([2], 1, None), ([2], 1, {2: "x"})], False),  # one lost, alone
])
def test_failed_tasks_are_retried_per_video_then_blamed_on_one_file_only(fails, calls, raised, tmp_path):
    """``fails``: input -> passes whose task it fails (2: both). Only a video that fails alone, or beside
    videos that then succeed, is written as its error; the context's errored-block budget is restored."""
    pytest.importorskip("ray")
    from ray.data import DataContext

    from pevideo.embed.ray_run import RayTasksFailedError, run_passes

    seen, before = [], DataContext.get_current().max_errored_blocks

    def run_pass(todo, decode_batch, errors=None):
        assert DataContext.get_current().max_errored_blocks == -1  # a dropped task does not end the job
        seen.append((list(todo), decode_batch, errors and {i: "x" for i in errors}))
        if errors:
            assert all("its Ray task failed in both passes" in e and f"v{i}.mp4" in e for i, e in errors.items())
            return []
        return [i for i in todo if fails.get(i, 0) >= len(seen)]

    paths = [f"v{i}.mp4" for i in range(4)]
    if raised:
        with pytest.warns(UserWarning, match="trying them again"), pytest.raises(RayTasksFailedError, match="of 2 videos failed again"):
            run_passes(run_pass, [0, 1, 2, 3], paths, str(tmp_path))
    else:
        with warnings_if(len(calls) > 1):
            run_passes(run_pass, [0, 1, 2, 3], paths, str(tmp_path))
    assert seen == calls
    assert DataContext.get_current().max_errored_blocks == before


def warnings_if(expected):
    import contextlib
    import warnings

    if expected:
        return pytest.warns(UserWarning, match="trying them again")
    ctx = contextlib.ExitStack()
    ctx.enter_context(warnings.catch_warnings())
    warnings.simplefilter("error")
    return ctx


def test_rerun_skips_written_and_resolves_duplicates(media, local, ray_out, ray_local, tmp_path):
    from pevideo.embed.ray_run import embed_with_ray

    out = tmp_path / "ray"
    shutil.copytree(ray_out, out)
    files = sorted(glob.glob(str(out / "*.parquet")))
    import pyarrow.parquet as pq

    gone = pq.read_table(files[0]).num_rows
    os.remove(files[0])  # a part never written (the job was killed before)
    shutil.copy(files[1], out / "zz-retried.parquet")  # a part written twice (a retried write)
    with open(files[1], "rb") as f:
        (out / "zz-cut.parquet").write_bytes(f.read()[:100])  # a writer killed mid-file
    with pytest.raises(Exception, match="zz-cut.parquet"):
        read_embeddings(out)
    with pytest.warns(UserWarning, match="zz-cut.parquet.*embedded again"):
        summary = embed_with_ray([media["videos"]], media["ckpt"], out, num_frames=NF, pooled=True, shard_size=2,
                                 batch_size=2)
    assert not os.path.exists(out / "zz-cut.parquet")
    assert summary.stats.clips + summary.stats.failed == gone  # only the missing part was redone
    assert summary.done_before == 5 - gone and summary.duplicates == pq.read_table(files[1]).num_rows
    assert (summary.num_embedded, summary.num_failed) == (4, 1)  # never double-counted
    same(read_embeddings(out), local)

    # Nothing left to do: no Ray work at all, the same answer.
    again = embed_with_ray([media["videos"]], media["ckpt"], out, num_frames=NF, pooled=True, shard_size=2,
                           batch_size=2)
    assert again.stats.clips == 0 and again.done_before == 5

    # Other arguments on the same folder are refused, as `pevideo embed` refuses them.
    from pevideo.embed.manifest import ManifestMismatchError

    with pytest.raises(ManifestMismatchError, match="num_frames"):
        embed_with_ray([media["videos"]], media["ckpt"], out, num_frames=NF + 1, pooled=True)

    # merge: one file, one row per input, in input order; it reads back the same.
    assert cli.main(["merge", str(out)]) == 1
    assert sorted(n for n in os.listdir(out) if n.endswith(".parquet")) == ["embeddings.parquet"]
    assert pq.read_table(out / "embeddings.parquet").column("input_index").to_pylist() == [0, 1, 2, 3, 4]
    same(read_embeddings(out), local)


def test_five_line_pipeline(media, local, ray_local, tmp_path):
    from ray.data import ActorPoolStrategy

    import pevideo.ray_data as prd

    ds = prd.video_dataset(media["videos"])
    ds = ds.map_batches(prd.Decode(media["ckpt"], num_frames=NF), batch_size=2, num_cpus=1)
    ds = ds.map_batches(prd.Encode, fn_constructor_args=(media["ckpt"],), fn_constructor_kwargs={"pooled": True},
                        batch_size=4, compute=ActorPoolStrategy(size=1), num_cpus=1)
    ds.write_parquet(str(tmp_path / "mine"))
    emb = read_embeddings(tmp_path / "mine")  # no manifest: rows deduplicated, one model checked
    same(emb, local)
    assert set(emb.config) == {"fingerprint"}


def test_engine_ray_usage_errors(media, tmp_path, capsys):
    base = ["embed", media["videos"], "--model", media["ckpt"], "--engine", "ray"]
    assert cli.main([*base, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "folder of Parquet files" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "emb.npy")]) == 2
    assert "looks like a file" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "y"), "--keep-shards"]) == 2
    assert cli.main([*base, "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert not os.path.exists(tmp_path / "y")


def test_engine_ray_never_writes_over_a_users_files(media, ray_local, tmp_path, capsys):
    """The Ray engine's output checks are `pevideo embed`'s: not inside the checkpoint, no errors file over
    an input, and --overwrite removes only files that prove themselves pevideo's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = ["embed", media["videos"], "--model", media["ckpt"], "--engine", "ray", "--num-frames", str(NF), "-q"]
    assert cli.main([*base, "--out", os.path.join(media["ckpt"], "emb")]) == 2
    assert "inside the checkpoint" in capsys.readouterr().err
    video = os.path.join(media["videos"], "a.mp4")
    before = open(video, "rb").read()
    assert cli.main([*base, "--out", str(tmp_path / "e"), "--errors", video]) == 2
    assert "over an input" in capsys.readouterr().err
    assert open(video, "rb").read() == before and not os.path.exists(tmp_path / "e")
    mine = tmp_path / "mine"
    mine.mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), mine / "data.parquet")
    assert cli.main([*base, "--out", str(mine), "--overwrite"]) == 2
    assert "not a file of a `pevideo embed --engine ray` run" in capsys.readouterr().err
    (mine / "errors.jsonl").write_text("my notes\n")
    assert cli.main([*base, "--out", str(mine), "--overwrite"]) == 2
    assert "not an errors file pevideo wrote" in capsys.readouterr().err
    assert pq.read_table(mine / "data.parquet").to_pydict() == {"a": [1, 2]}
    assert (mine / "errors.jsonl").read_text() == "my notes\n"


def test_search_reads_parquet(media, local, ray_out, capsys):
    from pevideo.retrieval import search

    q = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    a = search(local, q, 4, device="cpu")
    b = search(ray_out, q, 4, chunk_size=1, device="cpu")
    assert a.paths == b.paths and a.indices.tolist() == b.indices.tolist()
    assert a.input_index.tolist() == b.input_index.tolist()
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    assert cli.main(["search", str(ray_out), "--text", "a cat sleeping", "--model", media["ckpt"], "-k", "4",
                     "--format", "json"]) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in got["queries"][0]["results"]][:1] != [] and len(got["queries"][0]["results"]) == 4
