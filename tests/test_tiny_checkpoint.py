"""``pevideo tiny-checkpoint``: a random checkpoint that works offline, round-tripped through embed and classify."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import pevideo
from pevideo.tiny import tiny_config, write_tiny_checkpoint


def test_tiny_config_is_small_and_valid():
    cfg = tiny_config()
    assert cfg.video_config.vision_config.model_args["img_size"] == 64
    assert cfg.text_config.vocab_size == 97


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folder = write_tiny_checkpoint(root / "ckpt", video=root / "clip.mp4")
    return folder, str(root / "clip.mp4")


def test_folder_has_what_a_released_checkpoint_has(tiny):
    folder, _ = tiny
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "video_preprocessor_config.json", "tokenizer.json"} <= names
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "pe_video"


def test_transformers_loads_it(tiny):
    from transformers import AutoTokenizer
    from transformers import PeVideoModel as HFModel

    folder, _ = tiny
    hf = HFModel.from_pretrained(folder)
    ours = pevideo.PeVideoModel.from_pretrained(folder)
    sd_hf, sd = hf.state_dict(), ours.state_dict()
    shared = sorted(set(sd_hf) & set(sd))
    assert len(shared) > 20
    for k in shared:
        torch.testing.assert_close(sd_hf[k], sd[k], rtol=0, atol=0, msg=k)
    ids = AutoTokenizer.from_pretrained(folder)(["a cat sleeping", "zebra"])["input_ids"]
    assert ids[0][0] == 1 and ids[0][-1] == 2 and 3 in ids[1]  # [CLS] ... [SEP]; unknown word -> [UNK]


def test_embed_and_classify_round_trip(tiny, tmp_path, capsys):
    from pevideo.cli import main

    folder, clip = tiny
    out = tmp_path / "emb.safetensors"
    assert main(["embed", clip, "--model", folder, "--out", str(out), "--num-frames", "8", "--workers", "0"]) == 0
    emb = pevideo.read_embeddings(str(out))
    assert emb.video_embeds.shape[0] == 1 and torch.isfinite(emb.video_embeds).all()
    assert emb.video_embeds.abs().sum() > 0
    labels = ["a cat sleeping", "a person playing tennis"]
    table = tmp_path / "labels.json"
    assert main(["classify", clip, "--model", folder, "--labels", *labels, "--num-frames", "8", "--workers", "0",
                 "--out", str(table)]) == 0
    # the same numbers from Python
    model = pevideo.PeVideoModel.from_pretrained(folder)
    processor = pevideo.PeVideoProcessor.from_pretrained(folder)
    video, _ = pevideo.load_video(clip, num_frames=8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model(**processor.video_processor(video, return_tensors="pt"),
                     **processor.tokenizer(labels, padding=True, return_tensors="pt")).logits_video_text.sigmoid()[0]
    doc = json.loads(table.read_text())
    assert doc["labels"] == labels
    got = torch.tensor(doc["results"][0]["probs"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)  # the file rounds to 6 digits


def test_refuses_a_non_empty_folder(tmp_path, capsys):
    from pevideo.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    assert main(["tiny-checkpoint", str(tmp_path / "full"), "--video", "none"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
