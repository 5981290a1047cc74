"""compile=True: the frame encoder's non-attention work through torch.compile (Inductor), same results."""
from __future__ import annotations

import pytest
import torch
from _upstream import make_config, randomize, rel_err, video_inputs

import pevideo


@pytest.mark.parametrize("fast", [False, True])
def test_compiled_blocks_match_eager(fast):
    cfg = make_config("large80")
    torch.manual_seed(0)
    eager = randomize(pevideo.PeVideoModel(cfg, num_classes=16)).eval()
    comp = pevideo.PeVideoModel(cfg, fast=fast, compile=True, num_classes=16).eval()
    comp.load_state_dict(eager.state_dict())
    assert comp.video_encoder.vit.block_fns is not eager.video_encoder.vit.block_fns
    for lengths in ([3, 3], [4, 1, 2], [2, 2, 2, 1]):  # frame counts change: dynamic shapes, no failure
        pixels, mask = video_inputs(cfg, lengths)
        with torch.no_grad():
            a = eager.get_video_features(pixels, mask)
            b = comp.get_video_features(pixels, mask)
        assert rel_err(b.pooler_output, a.pooler_output) <= 1e-4
        assert rel_err(b.last_hidden_state[mask], a.last_hidden_state[mask]) <= 1e-4
