"""Parquet embeddings read back (pevideo.embed.parquet): one row per input whatever was written twice,
a run's manifest checked (missing inputs, rows of another run, other inputs), chunks for search.
No Ray here: the rows are made with the same table builder the encode stage uses."""
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray  # pyarrow comes with the ray extra

from pevideo.embed.encode import ClipResult  # noqa: E402
from pevideo.embed.safeio import DamagedOutputError  # noqa: E402
from pevideo.embed import read_embeddings  # noqa: E402
from pevideo.embed.reading import ShardsMissingError  # noqa: E402

D = 6
PATHS = ["v0.mp4", "v1.mp4", "v2.mp4"]


def clip(i, seed, error=None):
    g = torch.Generator().manual_seed(seed)
    if error:
        return ClipResult(index=i, path=PATHS[i], error=error)
    return ClipResult(index=i, path=PATHS[i], video_embeds=torch.randn(D, generator=g), frame_count=10 + i,
                      frame_indices=list(range(0, 2 * (i + 1), 2)))


def write(path, results, fp="fp"):
    import pyarrow.parquet as pq

    from pevideo.embed.parquet import results_table

    pq.write_table(results_table(results, fp, D), path)


def test_duplicates_resolved_once(tmp_path):
    pytest.importorskip("pyarrow")
    from pevideo.embed.parquet import scan

    a = [clip(0, 1, error="v0.mp4: timed out"), clip(1, 2), clip(2, 3, error="v2.mp4: not a video")]
    b = [clip(1, 4), clip(0, 5), clip(2, 6, error="v2.mp4: still not a video")]
    write(tmp_path / "a.parquet", a)
    write(tmp_path / "b.parquet", b)
    sc = scan(tmp_path)
    assert sc.input_index.tolist() == [0, 1, 2] and sc.duplicates == 3
    emb = read_embeddings(tmp_path)
    assert emb.paths == ["v0.mp4", "v1.mp4"] and emb.input_index.tolist() == [0, 1]
    # Input 0: the retry that got through, not the failure; input 1: the first file's row.
    assert torch.equal(emb.video_embeds[0], b[1].video_embeds)
    assert torch.equal(emb.video_embeds[1], a[1].video_embeds)
    assert emb.errors == [{"index": 2, "path": "v2.mp4", "error": "v2.mp4: not a video"}]  # the first file's
    assert emb.sampled_indices.tolist() == [[0, -1], [0, 2]]
    assert emb.source_frame_counts.tolist() == [10, 11] and emb.sampled_frame_counts.tolist() == [1, 2]
    assert read_embeddings(tmp_path / "b.parquet").paths == ["v0.mp4", "v1.mp4"]  # one file reads too


def test_two_models_in_one_folder_refused(tmp_path):
    write(tmp_path / "a.parquet", [clip(0, 1)], fp="one")
    write(tmp_path / "b.parquet", [clip(1, 2)], fp="other")
    with pytest.raises(DamagedOutputError, match="2 different models"):
        read_embeddings(tmp_path)


def manifest(folder, n=3, paths=PATHS):
    from pevideo.embed.parquet import inputs_sha256, row_fingerprint, write_manifest

    config = {"model": "m", "num_frames": 4, "num_inputs": n, "inputs_sha256": inputs_sha256(paths[:n]),
              "shard_size": 2}
    write_manifest(folder, config)
    return row_fingerprint(config)


def test_manifest_checks(tmp_path):
    fp = manifest(tmp_path)
    write(tmp_path / "a.parquet", [clip(0, 1), clip(1, 2)], fp=fp)
    with pytest.raises(ShardsMissingError, match="1 of 3 videos are not written yet"):
        read_embeddings(tmp_path)
    write(tmp_path / "b.parquet", [clip(2, 3)], fp=fp)
    emb = read_embeddings(tmp_path)
    assert emb.paths == PATHS and emb.config["num_inputs"] == 3
    write(tmp_path / "c.parquet", [clip(2, 3)], fp="another run")
    with pytest.raises(DamagedOutputError, match="c.parquet.*another run"):
        read_embeddings(tmp_path)
    (tmp_path / "c.parquet").unlink()
    # A complete set of rows, but not the run's inputs in order (a path swapped in).
    bad = clip(2, 3)
    bad.path = "elsewhere.mp4"
    write(tmp_path / "b.parquet", [bad], fp=fp)
    with pytest.raises(DamagedOutputError, match="paths are not the run's inputs"):
        read_embeddings(tmp_path)


def test_cut_short_file_named(tmp_path):
    write(tmp_path / "a.parquet", [clip(0, 1)])
    (tmp_path / "b.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:50])
    with pytest.raises(DamagedOutputError, match="b.parquet: is not a complete pevideo Parquet file"):
        read_embeddings(tmp_path)
    from pevideo.embed.parquet import scan

    sc = scan(tmp_path, skip_damaged=True)
    assert [f for f, _ in sc.damaged] == [str(tmp_path / "b.parquet")] and len(sc) == 1


def test_chunks_cover_rows_once(tmp_path):
    from pevideo.embed.parquet import iter_embedding_chunks, scan

    a = [clip(1, 2), clip(0, 1, error="x")]
    b = [clip(0, 5), clip(1, 4), clip(2, 6)]
    write(tmp_path / "a.parquet", a)
    write(tmp_path / "b.parquet", b)
    emb = read_embeddings(tmp_path)
    got = np.zeros((3, D), np.float32)
    seen = []
    for rows, e in iter_embedding_chunks(scan(tmp_path), 1):
        assert len(rows) <= 1
        got[rows] = e
        seen += rows.tolist()
    assert sorted(seen) == [0, 1, 2]
    assert np.array_equal(got, emb.video_embeds.numpy())


def test_manifest_written_is_json(tmp_path):
    manifest(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["format"] == "pevideo.embeddings.parquet" and man["config"]["num_inputs"] == 3


def test_warnings_read_back(tmp_path):
    a = clip(0, 1)
    a.truncated_suspect = "v0.mp4: ends inside a transport packet"
    write(tmp_path / "a.parquet", [a, clip(1, 2)])
    emb = read_embeddings(tmp_path)
    assert emb.warnings == [{"index": 0, "path": "v0.mp4", "truncated_suspect": a.truncated_suspect}]
