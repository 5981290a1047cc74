"""The eager model against the real upstream (transformers + timm), float32, same weights and inputs."""
from __future__ import annotations

import json
import os

import pytest
import torch
from _upstream import CONFIGS, make_config, randomize, rel_err, text_inputs, upstream_model, video_inputs

import pevideo

TOL = 1e-5

# clip lengths (T_max = the longest); None = no padding mask at all
BATCHES = {
    "full": ([3, 3], False),
    "full-masked": ([2, 2, 2], True),
    "padded": ([4, 1, 2], True),  # one clip of a single frame
    "one-frame": ([1], False),
    "six": ([6, 5], True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(upstream model, pevideo model loaded from upstream's save_pretrained)."""
    hf = upstream_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, pevideo.PeVideoModel.from_pretrained(path), request.param


def _compare(a, b, mask):
    errs = {
        "logits_video_text": rel_err(b.logits_video_text, a.logits_video_text),
        "video_embeds": rel_err(b.video_embeds, a.video_embeds),
        "text_video_embeds": rel_err(b.text_video_embeds, a.text_video_embeds),
        "pooler_output": rel_err(b.video_outputs.pooler_output, a.video_outputs.pooler_output),
        "last_hidden_state[real]": rel_err(b.video_outputs.last_hidden_state[mask], a.video_outputs.last_hidden_state[mask]),
    }
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_matches_upstream(pair, batch):
    hf, ours, _ = pair
    lengths, masked = BATCHES[batch]
    pixels, mask = video_inputs(hf.config, lengths)
    ids, am = text_inputs(len(lengths))
    kw = {"padding_mask_videos": mask} if masked else {}
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, **kw)
        b = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, **kw)
    assert b.logits_video_text.shape == a.logits_video_text.shape
    assert b.video_outputs.last_hidden_state.shape == a.video_outputs.last_hidden_state.shape
    _compare(a, b, mask)


# Masks that are not a prefix of real frames: the class token takes frame 0's mask, so with a leading
# pad it is itself a padded position, and upstream still computes its row (keys alone are masked).
MASKS = {
    "leading": [[0, 1, 1, 1]],
    "two-leading": [[0, 0, 1, 1]],
    "hole-and-trailing": [[0, 1, 1, 0]],
    "mixed": [[0, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0]],
}


@pytest.mark.parametrize("rows", sorted(MASKS))
def test_any_mask_matches_upstream(pair, rows):
    hf, ours, _ = pair
    mask = torch.tensor(MASKS[rows], dtype=torch.bool)
    pixels, _ = video_inputs(hf.config, [mask.shape[1]] * mask.shape[0])
    ids, am = text_inputs(mask.shape[0])
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        b = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
    _compare(a, b, mask)


def test_leading_pad_pooled_output_follows_the_video(pair):
    """With frame 0 padded, the pooled output still depends on the real frames (it did not, once)."""
    _, ours, _ = pair
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    pixels, _ = video_inputs(ours.config, [4])
    changed = pixels.clone()
    changed[0, 3] = torch.randn(changed[0, 3].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours.get_video_features(pixels, mask).pooler_output
        b = ours.get_video_features(changed, mask).pooler_output
    assert rel_err(a, b) > 1e-4


def test_padded_frames_are_not_encoded(pair):
    """Padded pixels never reach the frame encoder: garbage there changes nothing, and it runs on real frames only."""
    _, ours, _ = pair
    pixels, mask = video_inputs(ours.config, [3, 1])
    seen = []
    vit = ours.video_encoder.vit
    handle = vit.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    try:
        with torch.no_grad():
            a = ours.get_video_features(pixels, mask)
            pixels[~mask] = float("nan")
            b = ours.get_video_features(pixels, mask)
    finally:
        handle.remove()
    assert seen == [4, 4]
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert torch.equal(a.last_hidden_state[mask], b.last_hidden_state[mask])


def test_feature_methods(pair):
    hf, ours, _ = pair
    pixels, mask = video_inputs(hf.config, [2, 1])
    ids, am = text_inputs(2)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        v = ours.get_video_features(pixels, padding_mask_videos=mask)
        t = ours.get_text_features(ids, attention_mask=am)
    torch.testing.assert_close(v.pooler_output, full.video_embeds, rtol=0, atol=0)
    torch.testing.assert_close(t.pooler_output, full.text_video_embeds, rtol=0, atol=0)
    assert v.last_hidden_state.shape == full.video_outputs.last_hidden_state.shape


def test_uint8_entry_matches_float_pixels(pair):
    """Normalizing inside the patchify op (uint8 frames in) = the processor's float pixels in."""
    _, ours, _ = pair
    pixels, mask = video_inputs(ours.config, [3, 1])
    g = torch.Generator().manual_seed(9)
    u8 = torch.randint(0, 256, (*pixels.shape[:2], *pixels.shape[3:], 3), generator=g, dtype=torch.uint8)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    norm = (u8.permute(0, 1, 4, 2, 3).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        a = ours.get_video_features(norm, mask)
        b = ours.get_video_features_uint8(u8, mask, image_mean=mean, image_std=std)
    assert rel_err(b.pooler_output, a.pooler_output) <= TOL
    assert rel_err(b.last_hidden_state[mask], a.last_hidden_state[mask]) <= TOL
    with pytest.raises(ValueError, match="uint8"):
        ours.get_video_features_uint8(norm, mask)


def test_roundtrip_to_transformers(pair, tmp_path):
    """What pevideo saves, transformers loads (head width included) and computes the same."""
    from transformers import PeVideoModel as HFPeVideoModel

    hf, ours, name = pair
    ours.save_pretrained(tmp_path)
    back = HFPeVideoModel.from_pretrained(tmp_path).eval()
    # the head's width as upstream built it (transformers 5.17 sizes it from num_classes, 5.25 from num_labels)
    width = hf.video_encoder.embedder.vision_model.timm_model.head.weight.shape[0]
    assert width == ours.video_encoder.vit.head.weight.shape[0]
    assert back.video_encoder.embedder.vision_model.timm_model.head.weight.shape[0] == width
    pixels, mask = video_inputs(hf.config, [3, 2])
    ids, am = text_inputs(2)
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        b = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
    _compare(a, b, mask)
    again = pevideo.PeVideoModel.from_pretrained(tmp_path)
    for (k, x), (_, y) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), k


def test_loss_uses_minus_one_off_diagonal(pair):
    _, ours, _ = pair
    pixels, _ = video_inputs(ours.config, [2, 2, 2])
    ids, am = text_inputs(3)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, return_loss=True)
    logits = out.logits_video_text.double()
    labels = 2 * torch.eye(3, dtype=torch.float64) - 1
    expected = -torch.nn.functional.logsigmoid(labels * logits).sum() / 3
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)
    upstream_style = -torch.nn.functional.logsigmoid(torch.eye(3, dtype=torch.float64) * logits).sum() / 3
    assert not torch.allclose(out.loss.double(), upstream_style)


def test_sharded_checkpoint_loads(tmp_path):
    hf = upstream_model("tiny", seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = pevideo.PeVideoModel.from_pretrained(tmp_path)
    pixels, mask = video_inputs(hf.config, [2, 1])
    ids, am = text_inputs(2)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        b = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
    _compare(a, b, mask)
    # and pevideo writes shards too
    ours.save_pretrained(tmp_path / "ours", max_shard_size="100KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    pevideo.PeVideoModel.from_pretrained(tmp_path / "ours")


def test_pe_audio_video_checkpoint_loads(tmp_path):
    """A PeAudioVideo checkpoint (the layout of facebook/pe-av-large) gives its video and text towers."""
    from transformers import PeAudioVideoConfig, PeAudioVideoModel

    vcfg = make_config("tiny")
    cfg = PeAudioVideoConfig(
        text_config=vcfg.text_config.to_dict(),
        audio_video_config=dict(
            video_config=vcfg.video_config.to_dict(),
            audio_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                              dac_config=dict(encoder_hidden_size=8, downsampling_ratios=[2, 2], decoder_hidden_size=8,
                                              n_codebooks=2, codebook_size=16, codebook_dim=4, hidden_size=16)),
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
        ),
    )
    torch.manual_seed(0)
    av = randomize(PeAudioVideoModel(cfg)).eval()
    av.save_pretrained(tmp_path)
    ours = pevideo.PeVideoModel.from_pretrained(tmp_path)
    assert any(k.startswith("audio") for k in ours.ignored_checkpoint_keys)
    ref = av.video_model
    pixels, mask = video_inputs(vcfg, [3, 1])
    ids, am = text_inputs(2)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        b = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
    _compare(a, b, mask)
    # its video tower alone: the text and audio towers are listed, not read
    enc = pevideo.PeVideoEncoder.from_pretrained(tmp_path)
    assert any(k.startswith("audio") for k in enc.ignored_checkpoint_keys)
    assert any(k.startswith(("text_model.", "video_model.text_model.")) for k in enc.ignored_checkpoint_keys)
    assert not any(k.startswith("video_model.video_encoder.") for k in enc.ignored_checkpoint_keys)
    with torch.no_grad():
        c = enc(pixels, padding_mask_videos=mask)
    assert rel_err(c.pooler_output, a.video_outputs.pooler_output) <= TOL


def test_encoder_alone(tmp_path):
    from transformers import PeVideoEncoder as HFEncoder

    hf = upstream_model("gigantic", seed=5)
    hf.save_pretrained(tmp_path / "full")
    enc = pevideo.PeVideoEncoder.from_pretrained(tmp_path / "full")  # the video tower of a full checkpoint
    pixels, mask = video_inputs(hf.config, [2, 3])
    with torch.no_grad():
        a = hf.video_encoder(pixel_values_videos=pixels, padding_mask_videos=mask)
        b = enc(pixels, padding_mask_videos=mask)
    assert rel_err(b.pooler_output, a.pooler_output) <= TOL
    enc.save_pretrained(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["model_type"] == "pe_video_encoder"
    back = HFEncoder.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        c = back(pixel_values_videos=pixels, padding_mask_videos=mask)
    assert rel_err(b.pooler_output, c.pooler_output) <= TOL


def test_dtype_and_device_options(tmp_path):
    hf = upstream_model("tiny", seed=4)
    hf.save_pretrained(tmp_path)
    m = pevideo.PeVideoModel.from_pretrained(tmp_path, dtype="bfloat16", device_map="auto")
    assert m.dtype == torch.bfloat16
    assert not m.training
    pixels, mask = video_inputs(hf.config, [2, 1])
    with torch.no_grad():
        out = m.get_video_features(pixels, mask)
    assert out.pooler_output.dtype == torch.bfloat16 and torch.isfinite(out.pooler_output.float()).all()
    with pytest.raises(ValueError, match="dtype"):
        pevideo.PeVideoModel.from_pretrained(tmp_path, dtype="int8")


def test_fast_without_kernels_falls_back_and_says_so(tmp_path, monkeypatch):
    """fast=True where no kernel can run: same numbers as eager, one warning with the reason."""
    import pevideo_kernels._triton as tri

    hf = upstream_model("large80", seed=6)  # every head_dim in range for the kernels
    hf.save_pretrained(tmp_path)
    monkeypatch.setattr(tri, "HAS_TRITON", False)
    monkeypatch.setattr(tri, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    fast = pevideo.PeVideoModel.from_pretrained(tmp_path, fast=True)
    eager = pevideo.PeVideoModel.from_pretrained(tmp_path)
    pixels, mask = video_inputs(hf.config, [2, 1])
    with pytest.warns(pevideo.PeVideoKernelFallbackWarning, match="Triton is not available") as rec:
        with torch.no_grad():
            a = fast.get_video_features(pixels, mask)
    assert len(rec) == 1
    report = pevideo.kernel_report(fast)
    assert set(report) == {"patchify", "frame_attention", "pool_attention", "temporal_attention"}
    assert all("Triton is not available" in r for r in report.values())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", pevideo.PeVideoKernelFallbackWarning)  # said once, not again
        with torch.no_grad():
            fast.get_video_features(pixels, mask)
            b = eager.get_video_features(pixels, mask)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=0)
    assert all(r.startswith("eager") for r in pevideo.kernel_report(eager).values())


def test_random_init_from_config_runs():
    cfg = make_config("large80")
    m = pevideo.PeVideoModel(cfg).eval()
    pixels, mask = video_inputs(cfg, [2, 1])
    ids, am = text_inputs(2)
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
    assert torch.isfinite(out.video_embeds).all() and out.video_embeds.abs().sum() > 0
    assert out.video_embeds.shape == (2, cfg.text_config.hidden_size)
    tup = m(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask, return_dict=False)
    assert isinstance(tup, tuple)


def test_config_dict_and_sizes_follow_checkpoint(tmp_path):
    """The head width comes from the checkpoint even when config.json's num_classes says otherwise."""
    hf = upstream_model("tiny", seed=7)
    hf.save_pretrained(tmp_path)
    width = hf.video_encoder.embedder.vision_model.timm_model.head.weight.shape[0]
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["video_config"]["vision_config"]["num_classes"] = width + 7  # config.json disagrees with the weights
    cfg["video_config"]["vision_config"].pop("num_labels", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = pevideo.PeVideoModel.from_pretrained(tmp_path)
    assert m.video_encoder.vit.head.weight.shape[0] == width
    assert os.path.exists(tmp_path / "model.safetensors")


# img_size not a multiple of the patch size: timm's stride-p conv makes a grid of img_size // p patches
# and never reads the trailing pixels; transformers + timm load and run such checkpoints, so must pevideo.
ODD_SIZES = {"patch16-img40": ("tiny", 40), "patch14-img32": ("large80", 32), "patch14-img44x30": ("large80", (44, 30))}


@pytest.fixture(scope="module", params=sorted(ODD_SIZES))
def odd_pair(request, tmp_path_factory):
    from transformers import PeVideoConfig, PeVideoModel

    name, size = ODD_SIZES[request.param]
    d = make_config(name).to_dict()
    d["video_config"]["vision_config"]["model_args"]["img_size"] = size
    torch.manual_seed(0)
    hf = randomize(PeVideoModel(PeVideoConfig.from_dict(d))).eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def test_img_size_not_multiple_of_patch_matches_upstream(odd_pair):
    hf, path = odd_pair
    ours = pevideo.PeVideoModel.from_pretrained(path)
    a_ = ours.video_encoder.vit.args
    assert a_.img_size[0] % a_.patch_size or a_.img_size[1] % a_.patch_size  # the case under test
    pixels, mask = video_inputs(hf.config, [3, 1])
    ids, am = text_inputs(2)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        b = ours(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        # the trailing pixels are not read, by either
        edge = pixels.clone()
        edge[..., a_.grid[0] * a_.patch_size :, :] = float("nan")
        edge[..., a_.grid[1] * a_.patch_size :] = float("nan")
        c = ours.get_video_features(edge, mask)
    _compare(a, b, mask)
    assert torch.equal(c.pooler_output, b.video_embeds)
    # a folder pevideo writes loads back
    ours.save_pretrained(path / "ours")
    again = pevideo.PeVideoModel.from_pretrained(path / "ours")
    with torch.no_grad():
        assert torch.equal(again.get_video_features(pixels, mask).pooler_output, b.video_embeds)


def test_img_size_not_multiple_of_patch_fast_and_uint8(odd_pair):
    """The fast path (patchify on the cropped view, RoPE and position grid) against eager, float and uint8 in."""
    _, path = odd_pair
    eager = pevideo.PeVideoModel.from_pretrained(path)
    fast = pevideo.PeVideoModel.from_pretrained(path, fast=True)
    pixels, mask = video_inputs(eager.config, [2, 1])
    u8 = torch.randint(0, 256, (*pixels.shape[:2], *pixels.shape[3:], 3), dtype=torch.uint8,
                       generator=torch.Generator().manual_seed(3))
    as_float = (u8.permute(0, 1, 4, 2, 3).float() / 255 - 0.5) / 0.5
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", pevideo.PeVideoKernelFallbackWarning)  # CPU without Triton: reference
        a = eager.get_video_features(pixels, mask).pooler_output
        b = fast.get_video_features(pixels, mask).pooler_output
        report = pevideo.kernel_report(fast)
        c = eager.get_video_features_uint8(u8, mask).pooler_output
        d = fast.get_video_features_uint8(u8, mask).pooler_output
        e = eager.get_video_features(as_float, mask).pooler_output
    assert rel_err(b, a) <= 1e-4 and rel_err(d, c) <= 1e-4 and rel_err(c, e) <= 1e-4
    from pevideo_kernels import HAS_TRITON, interpreting

    if HAS_TRITON and (torch.cuda.is_available() or interpreting()):
        assert report["patchify"] == "fused" and report["frame_attention"] == "fused"
