"""The README quickstart, end to end, against transformers doing the same: a drop-in replacement."""
from __future__ import annotations

import warnings

import pytest
import torch
from _media import write_checkpoint, write_video
from _upstream import rel_err

import pevideo


@pytest.mark.parametrize("fast", [False, True])
def test_quickstart_matches_transformers(tmp_path, fast):
    from _upstream import upstream_model
    from transformers import AutoTokenizer
    from transformers import PeVideoProcessor as HFProcessor
    from transformers import PeVideoVideoProcessor as HFVideoProcessor

    ckpt = write_checkpoint(tmp_path / "ckpt")
    # the preprocessing the released checkpoints configure, at this tiny model's 64 px
    video_processor = HFVideoProcessor(
        size={"height": 64, "width": 64}, do_resize=True, resample=2, do_rescale=True, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_sample_frames=True,
    )
    HFProcessor(video_processor=video_processor, tokenizer=AutoTokenizer.from_pretrained(ckpt)).save_pretrained(ckpt)
    video_path = write_video(tmp_path / "tennis.mp4", 23, height=72, width=96)
    labels = ["a person playing tennis", "a person cooking", "a cat sleeping"]

    # transformers, as its docs do it
    hf_processor = HFProcessor.from_pretrained(ckpt)
    # the same weights as the checkpoint (transformers can't reload its own checkpoint when the frame
    # head isn't 2 wide, see README's differences)
    hf_model = upstream_model("tiny", 0)
    video, _ = pevideo.load_video(video_path)
    hf_inputs = {
        **hf_processor.video_processor(video, num_frames=16, return_tensors="pt"),
        **hf_processor.tokenizer(labels, padding=True, return_tensors="pt"),
    }
    with torch.no_grad():
        want = hf_model(**hf_inputs).logits_video_text.sigmoid()

    # pevideo, the README's quickstart
    model = pevideo.PeVideoModel.from_pretrained(ckpt, fast=fast, device_map="auto")
    processor = pevideo.PeVideoProcessor.from_pretrained(ckpt)
    video_inputs = processor.video_processor(video, num_frames=16, return_tensors="pt").to(model.device)
    text_inputs = processor.tokenizer(labels, padding=True, return_tensors="pt").to(model.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", pevideo.PeVideoKernelFallbackWarning)  # tiny pooling heads: reference
        probs = model(**video_inputs, **text_inputs).logits_video_text.sigmoid()

    assert probs.shape == (1, len(labels))
    assert rel_err(probs.cpu(), want) <= (1e-4 if fast else 1e-5)
    if fast:
        assert pevideo.kernel_report(model)["frame_attention"] == "fused"
