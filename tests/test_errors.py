"""Clear errors on bad inputs and on checkpoints that don't match."""
from __future__ import annotations

import json

import pytest
import torch
from _upstream import make_config, text_inputs, upstream_model, video_inputs
from safetensors.torch import load_file, save_file

import pevideo


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    upstream_model("tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    return pevideo.PeVideoModel.from_pretrained(saved)


def _video(model, **kw):
    return model.get_video_features(**kw)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p[0], r"\(batch, frames, 3, height, width\)"),
        (lambda p: p[:, :, :2], r"\(batch, frames, 3, height, width\)"),
        (lambda p: (p * 100).to(torch.uint8), "float tensor"),
        (lambda p: p[..., :32, :32], "takes 64x64"),
        (lambda p: p[:, :0], "empty"),
    ],
)
def test_bad_pixels(model, make, match):
    pixels, _ = video_inputs(model.config, [2, 2])
    with pytest.raises(ValueError, match=match):
        model.get_video_features(make(pixels))


def test_pixels_not_a_tensor(model):
    with pytest.raises(TypeError, match="tensor"):
        model.get_video_features([[0.0]])


def test_bad_masks(model):
    pixels, mask = video_inputs(model.config, [3, 2])
    with pytest.raises(ValueError, match="shape"):
        model.get_video_features(pixels, mask[:, :2])
    with pytest.raises(ValueError, match="bool or integer"):
        model.get_video_features(pixels, mask.float())
    with pytest.raises(ValueError, match="only 0"):
        model.get_video_features(pixels, mask.long() * 2)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"clip\(s\) \[1\]"):
        model.get_video_features(pixels, empty)
    # integer masks are fine, as upstream takes them
    with torch.no_grad():
        a = model.get_video_features(pixels, mask.long()).pooler_output
        b = model.get_video_features(pixels, mask).pooler_output
    assert torch.equal(a, b)


def test_bad_text_and_loss(model):
    pixels, _ = video_inputs(model.config, [2, 2])
    ids, am = text_inputs(2)
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=ids.float(), pixel_values_videos=pixels)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=am[:, :3], pixel_values_videos=pixels)
    ids3, am3 = text_inputs(3)
    with pytest.raises(ValueError, match="matched video/text pairs"):
        model(input_ids=ids3, attention_mask=am3, pixel_values_videos=pixels, return_loss=True)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ids, am: (ids + 97, am), r"\[0, 97\)"),  # vocab_size 97 (tests/_upstream.TEXT)
        (lambda ids, am: (ids - 50, am), r"\[0, 97\).*from -"),
        (lambda ids, am: (ids[:, :0], am[:, :0]), "empty"),
        (lambda ids, am: (ids[:0], am[:0]), "empty"),
        (lambda ids, am: (ids, am * torch.tensor([[1], [0]])), r"text\(s\) \[1\] have no token"),
    ],
)
def test_bad_text_ids(model, make, match):
    """Ids outside the vocabulary and texts without a token: a clear ValueError, not ModernBERT's IndexError."""
    ids, am = make(*text_inputs(2))
    pixels, _ = video_inputs(model.config, [2, 2])
    with pytest.raises(ValueError, match=match):
        model.get_text_features(ids, attention_mask=am)
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, attention_mask=am, pixel_values_videos=pixels)


def test_text_ids_at_the_vocabulary_edge_run(model):
    ids, am = text_inputs(2)
    ids[0, 1], ids[1, 1] = 0, 96
    with torch.no_grad():
        assert torch.isfinite(model.get_text_features(ids, attention_mask=am).pooler_output).all()


def test_missing_tensor(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(tmp_path / "model.safetensors")
    del state["video_encoder.layers.0.self_attn.q_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pevideo.CheckpointMismatchError, match="missing from the checkpoint[^$]*q_proj"):
        pevideo.PeVideoModel.from_pretrained(tmp_path)


def _copy(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())


def _edit_config(tmp_path, edit):
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))


def _built_on(monkeypatch):
    """Record the device of every PeVideoModel built (meta = shapes only, nothing allocated)."""
    built = []
    init = pevideo.PeVideoModel.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        built.append(self.text_video_logit_scale.device.type)

    monkeypatch.setattr(pevideo.PeVideoModel, "__init__", spy)
    return built


def test_mismatched_config(saved, tmp_path, monkeypatch):
    _copy(saved, tmp_path)
    _edit_config(tmp_path, lambda c: c["video_config"].update(intermediate_size=80))
    built = _built_on(monkeypatch)
    with pytest.raises(pevideo.CheckpointMismatchError) as err:
        pevideo.PeVideoModel.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "wrong shape" in msg and "gate_proj" in msg and "(64, 48) vs model (80, 48)" in msg
    assert built == ["meta"]  # checked against the shapes alone, before allocating the model


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["video_config"]["vision_config"]["model_args"].update(depth=10000),
         "says 10000 frame-encoder blocks .*the checkpoint has 2"),
        (lambda c: c["video_config"]["vision_config"]["model_args"].update(depth=3),
         "says 3 frame-encoder blocks .*the checkpoint has 2"),
        (lambda c: c["video_config"].update(num_hidden_layers=10000), "says 10000 temporal layers .*the checkpoint has 2"),
        (lambda c: (c["text_config"].pop("layer_types", None), c["text_config"].update(num_hidden_layers=3)),
         "says 3 text layers .*the checkpoint has 2"),
    ],
)
def test_layer_count_checked_before_building(saved, tmp_path, monkeypatch, edit, match):
    """A config with far more layers than the checkpoint fails before any module is built."""
    import pevideo.vit

    _copy(saved, tmp_path)
    _edit_config(tmp_path, edit)
    built = _built_on(monkeypatch)
    blocks = []
    block_init = pevideo.vit.Block.__init__
    monkeypatch.setattr(pevideo.vit.Block, "__init__", lambda self, *a, **kw: (blocks.append(1), block_init(self, *a, **kw)))
    with pytest.raises(pevideo.CheckpointMismatchError, match=match):
        pevideo.PeVideoModel.from_pretrained(tmp_path)
    assert built == [] and blocks == []


def test_unexpected_tensor(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(tmp_path / "model.safetensors")
    state["video_encoder.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pevideo.CheckpointMismatchError, match="not in the model"):
        pevideo.PeVideoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("cls", ["PeVideoModel", "PeVideoEncoder"])
def test_stray_top_level_tensor_raises(saved, tmp_path, cls):
    """One rule: a tensor the model has no place for raises, at the top level as under video_encoder.*
    (it was ignored silently there); tensors of towers not built are listed, not loaded."""
    _copy(saved, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["extra.weight"] = torch.randn(3, 3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pevideo.CheckpointMismatchError, match=r"not in the model[^$]*extra\.weight"):
        getattr(pevideo, cls).from_pretrained(tmp_path)


def test_towers_not_built_are_listed(saved):
    enc = pevideo.PeVideoEncoder.from_pretrained(saved)
    ignored = enc.ignored_checkpoint_keys
    assert ignored and all(k.startswith(("text_model.", "text_video_head.", "video_head.", "text_video_logit_"))
                           for k in ignored)
    assert any(k.startswith("text_model.layers.") for k in ignored)
    assert pevideo.PeVideoModel.from_pretrained(saved).ignored_checkpoint_keys == []


def test_bad_folders(tmp_path, saved):
    with pytest.raises(FileNotFoundError):
        pevideo.PeVideoModel.from_pretrained(tmp_path / "nope", local_files_only=True)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        pevideo.PeVideoModel.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pevideo.PeVideoModel.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        pevideo.PeVideoModel.from_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        pevideo.PeVideoModel.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="could not read weights"):
        pevideo.PeVideoModel.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize(
    "vision, match",
    [
        (dict(architecture="vit_base_patch16_224"), "not a PE-Core ViT"),
        (dict(architecture="vit_pe_core_tiny_patch16_384", model_args=dict(qk_norm=True)), "qk_norm"),
        (dict(architecture="vit_pe_core_tiny_patch16_384", model_args=dict(embed_dim=30, num_heads=3)), "divisible by 4"),
        (dict(architecture="vit_pe_core_tiny_patch16_384", model_args=dict(img_size=8)), "smaller than patch_size"),
        (dict(architecture="vit_pe_core_tiny_patch16_384", model_args=dict(foo=1)), "foo"),
    ],
)
def test_unsupported_vision_configs(vision, match):
    cfg = make_config("tiny")
    from transformers import PeVideoConfig

    d = cfg.to_dict()
    d["video_config"]["vision_config"] = vision
    with pytest.raises(ValueError, match=match):
        pevideo.PeVideoModel(PeVideoConfig.from_dict(d))
