"""The benchmark's own arithmetic and plumbing (speed itself is measured by `pevideo bench`, not here)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pevideo
from pevideo import bench, benchtools
from pevideo.cli import main as cli_main


def _math_sdpa(q, k, v, attn_mask=None, scale=None, **_):
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return s.softmax(-1) @ v


def test_flop_formula_matches_counted_flops(monkeypatch):
    """video_tower_flops (the useful-FLOPs numerator of every TFLOP/s we report) counts what runs."""
    import importlib

    ra = importlib.import_module("pevideo_kernels.rope_attention")  # the module, not the same-named function
    # FlopCounterMode can't see CPU SDPA; spell attention out so its matmuls are counted too.
    monkeypatch.setattr(ra.F, "scaled_dot_product_attention", _math_sdpa)
    cfg = bench.reduced_video_config()
    cfg.vision_config.model_args["depth"] = 1
    cfg.vision_config.model_args["img_size"] = 64
    m = pevideo.PeVideoEncoder(cfg, num_classes=cfg.vision_config.num_labels).eval()
    lengths = [3, 3]  # no padding: what runs is all useful
    pixels = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(pixels)
    counted = counter.get_total_flops()
    assert abs(counted - bench.video_tower_flops(cfg, lengths)) <= 1e-3 * counted


def test_bench_cli_smoke(tmp_path, capsys):
    rc = cli_main(["bench", "--preset", "tiny", "--out", str(tmp_path), "--warmup", "0", "--repeats", "3",
                   "--budget", "1", "--unequal", "3,2,1", "--tag", "smoke"])
    assert rc == 0
    report = json.loads((tmp_path / "cpu-smoke.json").read_text())
    providers = {r["provider"] for r in report["results"]}
    assert "pevideo eager" in providers and "transformers (sdpa)" in providers
    unequal = [r for r in report["results"] if r["batch"].startswith("unequal")]
    assert all(r["real_frames"] == 6 and r["padded_frames"] == 48 for r in unequal)
    assert all(r["ms"] > 0 and r["clips_per_s"] > 0 for r in report["results"])
    # min / median / max over the repeats, per provider and batch
    for r in report["results"]:
        assert r["repeats"] == 3 and 0 < r["ms_min"] <= r["ms_median"] == r["ms"] <= r["ms_max"]
        assert r["clips_per_s_min"] <= r["clips_per_s"] <= r["clips_per_s_max"]
    assert report["settings"]["interleaved"] is True
    m = report["machine"]
    assert m["cpu"] and m["cpu_cores"] >= 1 and m["torch"] == torch.__version__ and m["label"]
    assert (tmp_path / "cpu-smoke.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "clips/s" in out and "min" in out and "max" in out
    assert "| unequal 3,2,1 (6 of 48 frames real) |" in out  # the README table's rows


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--clips", "0"], "--clips"),
        (["--clips", "-4"], "--clips"),
        (["--clips", "two"], "--clips"),
        (["--clips", "1.5"], "--clips"),
        (["--clips", "1000000"], "--clips"),
        (["--repeats", "0"], "--repeats"),
        (["--warmup", "-1"], "--warmup"),
        (["--budget", "0"], "--budget"),
        (["--budget", "nan"], "--budget"),
        (["--unequal", "4,0,2"], "--unequal"),
        (["--unequal", "17"], "--unequal"),
        (["--unequal", ""], "--unequal"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bench_refuses_nonsense(argv, word, tmp_path, capsys, monkeypatch):
    """Bad numbers are a usage error (exit 2, one line on stderr), before any model is built."""
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("ran despite a bad argument"))
    rc = cli_main(["bench", "--preset", "tiny", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("pevideo bench: error:") and word in err
    assert not any(tmp_path.iterdir())


def test_interleaved_order_rotates():
    """Warm-up for each provider first, then every round times each provider once, starting one later."""
    calls, order = [], []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    t = benchtools.time_interleaved(fns, warmup=2, repeats=4, order=order)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert calls[6:] == order
    assert all(len(t[n].times_s) == 4 for n in "abc")


def test_interleaved_budget_keeps_min_repeats():
    import time

    fns = {"slow": lambda: time.sleep(0.02), "fast": lambda: None}
    t = benchtools.time_interleaved(fns, warmup=0, repeats=50, budget_s=0.001, min_repeats=3)
    assert len(t["slow"].times_s) == len(t["fast"].times_s) == 3
    assert t["slow"].min_s >= 0.015 > t["fast"].max_s


def test_timing_stats():
    t = benchtools.Timing([0.3, 0.1, 0.2, 0.5])
    assert (t.min_s, t.median_s, t.max_s) == (0.1, 0.25, 0.5)
    d = t.as_dict()
    assert d["repeats"] == 4 and d["ms_min"] == pytest.approx(100) and d["ms_median"] == pytest.approx(250)
    assert d["ms_max"] == pytest.approx(500) and t.spread == pytest.approx(1.6)


def test_json_names_the_machine(tmp_path):
    path = benchtools.write_json(str(tmp_path / "sub" / "r.json"), {"results": [1]})
    report = json.loads(open(path).read())
    m = report["machine"]
    assert m["cpu"] == benchtools.cpu_name() and m["cpu_cores"] == os.cpu_count()
    assert m["label"] and m["torch"] == torch.__version__ and "triton" in m and "gpu" in m
    assert report["results"] == [1] and report["date"]
    assert benchtools.machine_slug({"device": "cpu", "gpu": None}) == "cpu"
    assert benchtools.machine_slug({"device": "cuda", "gpu": {"name": "NVIDIA H100 80GB HBM3"}}) == "h100-80gb-hbm3"
