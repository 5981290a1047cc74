"""The benchmark's own arithmetic and plumbing (speed itself is measured by `pevideo bench`, not here)."""
from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

import pevideo
from pevideo import bench
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
    rc = cli_main(["bench", "--preset", "tiny", "--out", str(tmp_path), "--warmup", "0", "--repeats", "1",
                   "--budget", "1", "--unequal", "3,2,1", "--tag", "smoke"])
    assert rc == 0
    report = json.loads((tmp_path / "cpu-smoke.json").read_text())
    providers = {r["provider"] for r in report["results"]}
    assert "pevideo eager" in providers and "transformers (sdpa)" in providers
    unequal = [r for r in report["results"] if r["batch"].startswith("unequal")]
    assert all(r["real_frames"] == 6 and r["padded_frames"] == 48 for r in unequal)
    assert all(r["ms"] > 0 and r["clips_per_s"] > 0 for r in report["results"])
    assert (tmp_path / "cpu-smoke.png").stat().st_size > 0
    assert "clips/s" in capsys.readouterr().out
