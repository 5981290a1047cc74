"""Retrieval (pevideo.search, `pevideo search`): exact top-k equal to a brute-force reference with ties
ordered by row whatever the chunking; read from what `pevideo embed` wrote a chunk at a time, checksums
held; text queries scored through the same text tower as classify (same probabilities); the CLI's
outputs; another model refused; the FAISS index (its own marker) against the exact search."""
import json
import os

import numpy as np
import pytest
import torch

from pevideo import cli
from pevideo.retrieval import open_embeddings, search

CHUNKS = [1, 7, 64, 100_000]


def brute(x, q, k, score="cosine", scale=1.0, bias=0.0):
    """float64, every score, ordered by (score desc, row asc)."""
    x, q = x.double(), q.double()
    if score == "cosine":
        s = (q / q.norm(dim=1, keepdim=True)) @ (x / x.norm(dim=1, keepdim=True)).T
    else:
        s = q @ x.T * scale + bias
    s = s.numpy()
    order = [np.lexsort((np.arange(s.shape[1]), -row))[:k] for row in s]
    return np.array(order), np.take_along_axis(s, np.array(order), 1)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_exact_equals_brute_force(seed, chunk):
    x, q = torch.randn(1000, 24), torch.randn(6, 24)
    want_i, want_s = brute(x, q, 10)
    res = search(x, q, 10, chunk_size=chunk, device="cpu")
    assert res.indices.tolist() == want_i.tolist()
    np.testing.assert_allclose(res.scores.numpy(), want_s, rtol=0, atol=1e-5)
    assert res.paths[0] == [str(i) for i in want_i[0]] and res.input_index.tolist() == want_i.tolist()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ties_ordered_by_row(seed, chunk):
    # Rows and queries of four ±1 entries: every cosine is an exact multiple of 1/4, so ties abound and
    # any order of summation gives the same float; ties must come out by the smaller row.
    def sparse(n):
        out = torch.zeros(n, 12)
        for r in range(n):
            cols = torch.randperm(12)[:4]
            out[r, cols] = torch.randint(0, 2, (4,)).float() * 2 - 1
        return out

    x, q = sparse(300), sparse(5)
    want_i, want_s = brute(x, q, 25)
    res = search(x, q, 25, chunk_size=chunk, device="cpu")
    assert res.indices.tolist() == want_i.tolist()
    assert res.scores.tolist() == want_s.astype(np.float32).tolist()
    assert len({round(v, 6) for v in res.scores[0].tolist()}) < 25  # there were ties to order


def test_probability_and_small_sets(seed):
    x, q = torch.randn(50, 8), torch.randn(3, 8)
    want_i, want_s = brute(x, q, 5, "probability", 7.5, -3.0)
    res = search(x, q, 5, score="probability", logit_scale=7.5, logit_bias=-3.0, chunk_size=9, device="cpu")
    assert res.indices.tolist() == want_i.tolist()
    np.testing.assert_allclose(res.scores.numpy(), 1 / (1 + np.exp(-want_s)), atol=1e-6)
    # k above the number of rows: every row once; one query as a vector.
    res = search(x[:4], q[0], 10, device="cpu")
    assert res.indices.shape == (1, 4) and sorted(res.indices[0].tolist()) == [0, 1, 2, 3]
    # A damaged row (NaN, infinity) never outranks a real one (topk alone would take NaN as the largest).
    y = x.clone()
    y[3], y[8, 0] = float("nan"), float("inf")
    for kind in ("cosine", "probability"):
        res = search(y, q, 50, score=kind, logit_scale=1.0, logit_bias=0.0, chunk_size=16, device="cpu")
        assert res.indices[:, -2:].sort(1).values.tolist() == [[3, 8]] * 3
    with pytest.raises(ValueError, match="logit_scale"):
        search(x, q, 5, score="probability")
    with pytest.raises(ValueError, match="5 wide, the embeddings 8"):
        search(x, torch.randn(2, 5), 5)
    with pytest.raises(ValueError, match="NaN"):
        search(x, torch.full((1, 8), float("nan")), 5)


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    pytest.importorskip("av")
    from _media import write_checkpoint, write_corrupt, write_video

    root = tmp_path_factory.mktemp("search")
    ckpt = write_checkpoint(root / "ckpt")
    v = root / "videos"
    v.mkdir()
    for i in range(6):
        write_video(v / f"clip{i}.mp4", 6 + 3 * i, seed=i)
    write_corrupt(v / "clip9.mp4")
    out = root / "emb.safetensors"
    assert cli.main(["embed", str(v), "--model", ckpt, "--out", str(out), "--num-frames", "4", "--workers", "0",
                     "-q"]) == 1
    folder = root / "emb"
    assert cli.main(["embed", str(v), "--model", ckpt, "--out", str(folder), "--num-frames", "4", "--workers", "0",
                     "--shard-size", "3", "-q"]) == 1
    return dict(root=root, ckpt=ckpt, videos=v, out=out, folder=folder)


LABELS = ["a person playing tennis", "a cat sleeping", "a dog running"]


def test_files_read_in_chunks(media):
    from pevideo.embed import read_embeddings

    emb = read_embeddings(media["out"])
    q = torch.randn(3, emb.video_embeds.shape[1])
    want = search(emb.video_embeds, q, 4, device="cpu")
    for path in (media["out"], media["folder"]):
        src = open_embeddings(path)
        assert src.paths == emb.paths and len(src) == 6
        assert all(len(rows) <= 2 for rows, _ in src.chunks(2))
        got = search(path, q, 4, chunk_size=2, device="cpu")
        assert got.indices.tolist() == want.indices.tolist()
        assert got.paths == [[emb.paths[i] for i in row] for row in want.indices.tolist()]
        assert got.input_index.tolist() == emb.input_index[want.indices].tolist()


def test_damaged_file_refused(media, tmp_path):
    import shutil

    from pevideo.embed.safeio import DamagedOutputError

    bad = tmp_path / "emb.safetensors"
    shutil.copy(media["out"], bad)
    data = bytearray(bad.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + n])["video_embeds"]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0x01  # one bit of one embedding
    bad.write_bytes(bytes(data))
    with pytest.raises(DamagedOutputError, match="checksum"):
        search(bad, torch.randn(1, 32), 3, device="cpu")


def test_text_queries_as_classify(media, tmp_path):
    from pevideo.embed import classify_videos

    want = {r.path: r.probs for r in classify_videos([media["videos"]], media["ckpt"], LABELS, num_frames=4,
                                                     num_workers=0) if r.ok}
    hits = tmp_path / "hits.json"
    assert cli.main(["search", str(media["out"]), "--text", *LABELS, "--model", media["ckpt"], "-k", "10",
                     "--score", "probability", "--out", str(hits)]) == 0
    got = json.loads(hits.read_text())
    assert got["score"] == "probability" and [q["query"] for q in got["queries"]] == LABELS
    for j, q in enumerate(got["queries"]):
        assert len(q["results"]) == 6  # every embedded clip, once
        probs = [r["score"] for r in q["results"]]
        assert probs == sorted(probs, reverse=True)
        for r in q["results"]:
            assert r["score"] == pytest.approx(float(want[r["path"]][j]), abs=2e-6)


def test_cli_video_query_and_formats(media, tmp_path, capsys):
    query = str(media["videos"] / "clip3.mp4")
    assert cli.main(["search", str(media["folder"]), "--video", query, "--model", media["ckpt"], "-k", "3",
                     "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "query,rank,index,input_index,path,cosine" and len(rows) == 4
    first = rows[1].split(",")
    assert first[4] == query and float(first[5]) == pytest.approx(1.0, abs=1e-5)  # itself, same sampling
    assert cli.main(["search", str(media["out"]), "--text", "a cat sleeping", "--model", media["ckpt"], "-k", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "a cat sleeping  (cosine)" and len(text) == 3 and text[1].lstrip().startswith("1  ")


def test_cli_refuses_other_model_and_bad_use(media, tmp_path, capsys):
    from _media import write_checkpoint

    other = write_checkpoint(tmp_path / "other", seed=1)
    assert cli.main(["search", str(media["out"]), "--text", "a cat", "--model", other]) == 2
    assert "made with another model" in capsys.readouterr().err
    assert cli.main(["search", str(media["out"]), "--video", str(media["videos"] / "clip0.mp4"), "--model",
                     media["ckpt"], "--score", "probability"]) == 2
    assert cli.main(["search", str(tmp_path / "none.safetensors"), "--text", "a", "--model", media["ckpt"]]) == 2


def test_cli_out_never_overwrites_what_pevideo_did_not_write(media, tmp_path, capsys):
    """--out is checked before anything loads: not a user's file, not an input, not inside the checkpoint;
    a table search wrote before is replaced, and the text table written to a file carries its mark."""
    base = ["search", str(media["out"]), "--text", "a cat sleeping", "--model", media["ckpt"], "-k", "2"]
    mine = tmp_path / "notes.csv"
    mine.write_text("my,own,data\n")
    assert cli.main([*base, "--out", str(mine)]) == 2
    assert mine.read_text() == "my,own,data\n" and "is not a table pevideo wrote" in capsys.readouterr().err
    query = media["videos"] / "clip3.mp4"
    before = query.read_bytes()
    assert cli.main(["search", str(media["out"]), "--video", str(query), "--model", media["ckpt"],
                     "--out", str(query)]) == 2
    assert query.read_bytes() == before
    assert cli.main([*base, "--out", str(media["out"])]) == 2  # the embeddings themselves
    assert cli.main([*base, "--out", os.path.join(media["ckpt"], "hits.csv")]) == 2
    for name in ("hits.csv", "hits.json", "hits.txt"):
        out = tmp_path / name
        assert cli.main([*base, "--out", str(out)]) == 0
        first = out.read_text()
        assert cli.main([*base, "--out", str(out)]) == 0  # its own table: replaced
        assert out.read_text() == first
    assert (tmp_path / "hits.txt").read_text().startswith("# pevideo search\n")


@pytest.mark.faiss
def test_faiss_index_against_exact(seed, tmp_path):
    from pevideo.retrieval_faiss import FaissIndex, default_factory

    centers = torch.randn(20, 16)
    x = centers[torch.randint(0, 20, (4000,))] + 0.3 * torch.randn(4000, 16)
    q = centers[:5] + 0.3 * torch.randn(5, 16)
    exact = search(x, q, 10, device="cpu")
    flat = FaissIndex.build(x, factory="Flat")
    got = search(x, q, 10, index=flat)
    assert got.indices.tolist() == exact.indices.tolist()
    ivf = FaissIndex.build(x, factory="IVF16,Flat", nprobe=16)  # every cell searched: exact again
    assert search(x, q, 10, index=ivf).indices.tolist() == exact.indices.tolist()
    ivf.save(tmp_path / "x.faiss")
    again = FaissIndex.load(tmp_path / "x.faiss", nprobe=2)
    approx = search(x, q, 10, index=again)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.indices.tolist(), exact.indices.tolist())])
    assert recall > 0.5 and again.nprobe == 2
    with pytest.raises(ValueError, match="other embeddings"):
        search(x[:100], q, 10, index=again)
    assert default_factory(100) == "Flat" and default_factory(1_000_000).startswith("IVF4096")
