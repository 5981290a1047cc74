"""PeVideoVideoProcessor / PeVideoProcessor against transformers' processors (saved by them, loaded by ours).

Comparisons with transformers need torchvision (a test extra); the rest runs without it.
"""
import importlib.util

import numpy as np
import pytest
import torch

from pevideo.processing import Normalization, PeVideoProcessor, PeVideoVideoProcessor
from pevideo.resize import resize_uint8
from pevideo_kernels import patchify_normalize_ref

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_upstream = pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' processor needs torchvision")

S = 32
CONFIG = dict(
    size={"height": S, "width": S}, do_resize=True, resample=2, do_rescale=True, do_normalize=True,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_sample_frames=True,
)
SIZES = [(48, 64), (17, 23), (100, 37), (32, 32), (31, 33), (9, 7), (64, 64), (33, 100)]  # down, up, odd, same


def _upstream_classes():
    from transformers.models.pe_video.processing_pe_video import PeVideoProcessor as UpstreamProcessor
    from transformers.models.pe_video.video_processing_pe_video import PeVideoVideoProcessor as UpstreamVideoProcessor

    return UpstreamProcessor, UpstreamVideoProcessor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """transformers' processor saved with save_pretrained, and ours loaded from the same directory."""
    if not HAS_TORCHVISION:
        pytest.skip("transformers' processor needs torchvision")
    d = tmp_path_factory.mktemp("proc")
    upstream = _upstream_classes()[1](**CONFIG)
    upstream.save_pretrained(d)
    return upstream, PeVideoVideoProcessor.from_pretrained(d)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Ours alone (no torchvision needed), through its own save/load."""
    d = tmp_path_factory.mktemp("ours")
    PeVideoVideoProcessor(**CONFIG).save_pretrained(d)
    return PeVideoVideoProcessor.from_pretrained(d)


def clip(t, h, w, gen):
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=gen).numpy()


def levels(pixel_values):
    """Undo (x/255 − 0.5)/0.5: back to uint8 levels (exact for outputs of uint8 input)."""
    return (pixel_values.double() * 127.5 + 127.5).round().to(torch.int16)


def assert_matches_upstream(got, want):
    # <= 1 uint8 level before normalization, close after (on one machine they are bit-identical).
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (levels(got) - levels(want)).abs().max() <= 1
    torch.testing.assert_close(got, want, rtol=0, atol=1 / 127.5 + 1e-6)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("t,n", [(6, 4), (1, 1), (5, None), (3, 7)])
def test_matches_upstream_on_random_frames(saved, seed, h, w, t, n):
    upstream, ours = saved
    gen = torch.Generator().manual_seed(h * 1000 + w)
    v = clip(t, h, w, gen)
    kw = {"num_frames": n} if n else {"do_sample_frames": False}
    if n == 1:  # upstream divides by zero; frame 0 is what the formula means
        theirs = upstream(v[:1], do_sample_frames=False, return_tensors="pt")
    else:
        theirs = upstream(v, return_tensors="pt", **kw)
    got = ours(v, return_tensors="pt", **kw)
    assert_matches_upstream(got["pixel_values_videos"], theirs["pixel_values_videos"])
    assert got["padding_mask_videos"].dtype == torch.bool and got["padding_mask_videos"].all()


def test_batch_of_unequal_clips(saved, seed):
    upstream, ours = saved
    gen = torch.Generator().manual_seed(1)
    clips = [clip(t, h, w, gen) for t, (h, w) in zip([5, 2, 7, 1], SIZES)]
    theirs = upstream(clips, do_sample_frames=False, return_tensors="pt")
    got = ours(clips, do_sample_frames=False, return_tensors="pt")
    assert got["pixel_values_videos"].shape == (4, 7, 3, S, S)
    assert_matches_upstream(got["pixel_values_videos"], theirs["pixel_values_videos"])
    assert torch.equal(got["padding_mask_videos"], theirs["padding_mask_videos"])
    assert (got["pixel_values_videos"][3, 1:] == 0).all()  # padded frames are zeros


def test_mask_always_present(ours, seed):
    gen = torch.Generator().manual_seed(2)
    out = ours([clip(4, 20, 20, gen), clip(4, 40, 30, gen)], num_frames=3, return_tensors="pt")
    assert out["padding_mask_videos"].shape == (2, 3) and out["padding_mask_videos"].all()
    out = ours(clip(4, 20, 20, gen), return_tensors="np", num_frames=2)
    assert isinstance(out["pixel_values_videos"], np.ndarray) and out["padding_mask_videos"].shape == (1, 2)
    out = ours(clip(4, 20, 20, gen), num_frames=2)  # no return_tensors: a list per clip, as upstream
    assert isinstance(out["pixel_values_videos"], list) and out["pixel_values_videos"][0].shape == (2, 3, S, S)
    assert "padding_mask_videos" not in out
    moved = ours(clip(2, 20, 20, gen), return_tensors="pt").to("cpu")
    assert moved["pixel_values_videos"].dtype == torch.float32


@pytest.mark.parametrize(
    "options",
    [
        {"do_normalize": False},
        {"do_rescale": False},
        {"do_rescale": False, "do_normalize": False},
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        {"resample": 3},
        {"size": {"height": 24, "width": 40}},
        {"do_center_crop": True, "crop_size": {"height": 20, "width": 40}},
    ],
    ids=lambda o: "-".join(o),
)
def test_options_match_upstream(saved, seed, options):
    upstream, ours = saved
    gen = torch.Generator().manual_seed(3)
    clips = [clip(3, 48, 64, gen), clip(2, 17, 23, gen)]
    theirs = upstream(clips, do_sample_frames=False, return_tensors="pt", **options)["pixel_values_videos"]
    got = ours(clips, do_sample_frames=False, return_tensors="pt", **options)["pixel_values_videos"]
    assert got.dtype == theirs.dtype
    if got.dtype == torch.uint8:
        assert (got.int() - theirs.int()).abs().max() <= 1
    else:
        torch.testing.assert_close(got, theirs, rtol=1e-6, atol=1e-5)


def test_input_forms(saved, seed):
    upstream, ours = saved
    gen = torch.Generator().manual_seed(4)
    v = clip(4, 30, 40, gen)
    want = ours(v, return_tensors="pt")["pixel_values_videos"]
    t = torch.from_numpy(v)
    for form in (t, t.permute(0, 3, 1, 2), list(v), [list(t)], v[None], t[None]):
        assert torch.equal(ours(form, return_tensors="pt")["pixel_values_videos"], want)
    gray = v[..., :1]
    theirs = upstream(gray, input_data_format="channels_last", do_sample_frames=False, return_tensors="pt")
    got = ours(gray, return_tensors="pt")["pixel_values_videos"]
    assert_matches_upstream(got, theirs["pixel_values_videos"])


def test_fps_sampling_with_metadata(saved, seed):
    upstream, ours = saved
    gen = torch.Generator().manual_seed(5)
    v = clip(30, 20, 20, gen)
    meta = {"total_num_frames": 30, "fps": 10.0}
    theirs = upstream(v, fps=4, video_metadata=meta, return_tensors="pt")  # num_frames unset: fps rule
    got = ours(v, fps=4, video_metadata=meta, return_tensors="pt", return_metadata=True)
    assert got["video_metadata"][0].frames_indices == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert_matches_upstream(got["pixel_values_videos"], theirs["pixel_values_videos"])
    with pytest.raises(ValueError, match="frame rate"):
        ours(v, fps=4)


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    pytest.importorskip("av")
    from _media import write_video

    d = tmp_path_factory.mktemp("vids")
    return [write_video(d / "a.mp4", 24), write_video(d / "b.mp4", 11, seed=1), write_video(d / "c.mkv", 11, seed=2)]


@pytest.mark.parametrize("n", [4, 16])
def test_paths_as_input(saved, video_files, n):
    from transformers.video_utils import load_video as upstream_load

    from pevideo.video import load_video

    upstream, ours = saved
    mp4s = [str(p) for p in video_files[:2]]
    theirs = upstream([upstream_load(p, backend="pyav")[0] for p in mp4s], num_frames=n, return_tensors="pt")
    got = ours(mp4s, num_frames=n, return_tensors="pt", return_metadata=True)
    assert torch.equal(got["pixel_values_videos"], theirs["pixel_values_videos"])
    assert [m.total_num_frames for m in got["video_metadata"]] == [24, 11]
    single = ours(video_files[0], num_frames=n, return_tensors="pt")["pixel_values_videos"]
    assert torch.equal(single, got["pixel_values_videos"][:1])
    # Matroska gives no frame count (transformers' own loader fails on it); frames are counted
    mkv = ours(video_files[2], num_frames=n, return_tensors="pt", return_metadata=True)
    assert mkv["video_metadata"][0].total_num_frames == 11
    frames, _ = load_video(video_files[2])
    assert torch.equal(mkv["pixel_values_videos"], ours(frames, num_frames=n, return_tensors="pt")["pixel_values_videos"])


def test_fps_on_paths_follows_upstream_rule(ours, video_files):
    got = ours(str(video_files[0]), fps=5, return_tensors="pt", return_metadata=True)
    assert got["video_metadata"][0].frames_indices == [0, 6, 12, 18]  # int(24/25·5) = 4 frames at i·24//4


@needs_upstream
def test_config_layouts_and_defaults(tmp_path, seed):
    # transformers' nested processor_config.json (written by the processor with a tokenizer) ...
    tok = _tiny_tokenizer(tmp_path / "tok")
    up = _upstream_classes()[0](video_processor=_upstream_classes()[1](**CONFIG, num_frames=3), tokenizer=tok)
    up.save_pretrained(tmp_path / "both")
    ours = PeVideoVideoProcessor.from_pretrained(tmp_path / "both")
    assert ours.size == {"height": S, "width": S} and ours.num_frames == 3 and ours.do_sample_frames
    # ... a bare preprocessor_config.json, and the keys it leaves out mean what they mean upstream
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text('{"size": {"height": 16, "width": 16}, "do_resize": true}')
    old = PeVideoVideoProcessor.from_pretrained(tmp_path / "old")
    v = clip(2, 20, 20, torch.Generator().manual_seed(6))
    out = old(v, return_tensors="pt")["pixel_values_videos"]
    assert out.dtype == torch.uint8 and out.shape == (1, 2, 3, 16, 16)  # no rescale/normalize configured
    assert PeVideoVideoProcessor.from_pretrained(tmp_path / "old", size=24).size == 24
    # our save is readable by transformers
    ours.save_pretrained(tmp_path / "ours")
    back = _upstream_classes()[1].from_pretrained(tmp_path / "ours")
    assert back.size.height == S and back.num_frames == 3
    with pytest.raises(OSError, match="no video processor config"):
        PeVideoVideoProcessor.from_pretrained(tmp_path / "tok")


def test_to_patches_matches_processor(ours, seed):
    # The fused path (resize uint8 where the frames are, then one normalize+patchify kernel) gives
    # exactly the processor's values; on CPU it is the same code, so equality is exact.
    gen = torch.Generator().manual_seed(7)
    clips = [clip(5, 48, 64, gen), clip(2, 17, 23, gen), clip(3, 32, 32, gen)]
    patches, lengths = ours.to_patches(clips, 16, num_frames=4)
    out = ours(clips, num_frames=4, return_tensors="pt")
    pv, mask = out["pixel_values_videos"], out["padding_mask_videos"]
    want = patchify_normalize_ref(pv.flatten(0, 1), 16)[mask.flatten()]
    assert torch.equal(lengths, torch.tensor([4, 4, 4]))
    assert patches.shape == (12, 4, 768) and torch.equal(patches, want)
    patches, lengths = ours.to_patches(clips, 8, do_sample_frames=False, out_dtype=torch.float16)
    out = ours(clips, do_sample_frames=False, return_tensors="pt")
    want = patchify_normalize_ref(out["pixel_values_videos"].flatten(0, 1), 8, out_dtype=torch.float16)
    assert torch.equal(lengths, torch.tensor([5, 2, 3]))
    assert torch.equal(patches, want[out["padding_mask_videos"].flatten()])


@needs_upstream
def test_resize_uint8_matches_torchvision(seed):
    import torchvision.transforms.v2.functional as tvF

    gen = torch.Generator().manual_seed(8)
    for h, w in SIZES:
        x = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=gen)
        for size in [(S, S), (21, 50)]:
            assert torch.equal(resize_uint8(x, size), tvF.resize(x, list(size), antialias=True))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "videos,kwargs,match",
    [
        (np.zeros((0, 8, 8, 3), np.uint8), {}, "no frames"),
        ([], {}, "no videos"),
        ([np.zeros((2, 8, 8, 3), np.uint8), []], {}, "video 1 has no frames"),
        (np.zeros((2, 8, 8, 4), np.uint8), {}, "RGB"),
        (np.zeros((2, 8, 8, 3), np.float32), {}, "uint8"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.int64), {}, "uint8"),
        (np.zeros((8, 8), np.uint8), {}, "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"num_frames": 2, "fps": 1}, "not both"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"num_frames": 0}, "num_frames"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"num_frames": 2, "do_sample_frames": False}, "contradicts"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"frames": 2}, "unknown options"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"return_tensors": "tf"}, "return_tensors"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"video_metadata": {"total_num_frames": 5, "fps": 1}}, "5 frames"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"resample": 0}, "resample"),
        ("/does/not/exist.mp4", {}, "exist.mp4"),
        (42, {}, "videos must be"),
    ],
)
def test_bad_input_raises(ours, videos, kwargs, match):
    kwargs = {"return_tensors": "pt", **kwargs}
    with pytest.raises((ValueError, NotImplementedError, FileNotFoundError), match=match):
        ours(videos, **kwargs)


def test_mixed_sizes_without_resize_raise(ours):
    clips = [np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 9, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="different frame sizes"):
        ours(clips, do_resize=False, return_tensors="pt")


BAD_NORMALIZATION = [
    dict(std=0.0),
    dict(std=(0.5, 0.0, 0.5)),
    dict(std=(0.5, -0.5, 0.5)),
    dict(std=float("nan")),
    dict(std=(0.5, float("inf"), 0.5)),
    dict(mean=(0.5, float("nan"), 0.5)),
    dict(std=(0.5, 0.5)),
    dict(mean=(0.1, 0.2, 0.3, 0.4)),
    dict(rescale=0.0),
    dict(rescale=float("nan")),
]
_NORM_TO_PROCESSOR = {"mean": "image_mean", "std": "image_std", "rescale": "rescale_factor"}


@pytest.mark.parametrize("bad", BAD_NORMALIZATION)
def test_bad_normalization_raises(bad):
    """std 0 / negative / NaN / inf, non-finite means, a wrong channel count: a clear ValueError, from the
    record and from the processor that owns one (NaN std used to pass the processor's check)."""
    with pytest.raises(ValueError, match="image_std|image_mean|rescale_factor"):
        Normalization(**bad)
    with pytest.raises(ValueError, match="image_std|image_mean|rescale_factor"):
        PeVideoVideoProcessor(**{_NORM_TO_PROCESSOR[k]: v for k, v in bad.items()})


def test_processor_normalization_record():
    proc = PeVideoVideoProcessor(image_mean=[0.48, 0.46, 0.41], image_std=0.25, rescale_factor=1 / 127)
    assert proc.normalization == Normalization(mean=(0.48, 0.46, 0.41), std=(0.25, 0.25, 0.25), rescale=1 / 127)
    off = PeVideoVideoProcessor(do_normalize=False, do_rescale=False, image_std=0)  # unused settings: not checked
    assert off.normalization == Normalization(mean=None, std=None, rescale=1.0)


def test_resize_frames_and_output_size(seed):
    """Workers' step: the processor's resize (and crop) as uint8 channels-last, no normalization; the
    output size is known from the settings alone."""
    x = torch.randint(0, 256, (3, 37, 53, 3), dtype=torch.uint8).numpy()
    for kw, size in [({"size": {"height": 24, "width": 40}}, (24, 40)),
                     ({"size": {"height": 24, "width": 40}, "do_center_crop": True,
                       "crop_size": {"height": 20, "width": 18}}, (20, 18)),
                     ({"size": {"height": 37, "width": 53}}, (37, 53))]:
        proc = PeVideoVideoProcessor(**kw)
        got = proc.resize_frames(x)
        want = proc(x, do_sample_frames=False, do_rescale=False, do_normalize=False,
                    input_data_format="channels_last")["pixel_values_videos"][0].permute(0, 2, 3, 1)
        assert proc.output_size == size
        assert got.dtype == torch.uint8 and tuple(got.shape) == (3, *size, 3) and torch.equal(got, want)
    assert PeVideoVideoProcessor(do_resize=False).output_size is None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import pevideo
    from _media import write_checkpoint

    return pevideo.PeVideoModel.from_pretrained(write_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.mark.parametrize("bad", BAD_NORMALIZATION[:7])
def test_uint8_entry_refuses_bad_normalization(tiny_model, bad):
    """image_std=0 / NaN used to give NaN embeddings silently."""
    u8 = torch.randint(0, 256, (1, 2, 64, 64, 3), dtype=torch.uint8)
    kwargs = {_NORM_TO_PROCESSOR[k]: v for k, v in bad.items()}
    with pytest.raises(ValueError, match="image_std|image_mean"), torch.no_grad():
        tiny_model.get_video_features_uint8(u8, **kwargs)


def test_uint8_entry_takes_the_processors_record(tiny_model, seed):
    proc = PeVideoVideoProcessor(size={"height": 64, "width": 64}, image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    frames = torch.randint(0, 256, (3, 50, 70, 3), dtype=torch.uint8).numpy()
    with torch.no_grad():
        want = tiny_model.get_video_features(**proc(frames, return_tensors="pt", do_sample_frames=False)).pooler_output
        got = tiny_model.get_video_features_uint8(proc.resize_frames(frames)[None], None, proc.normalization)
    torch.testing.assert_close(got.pooler_output, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        tiny_model.get_video_features_uint8(proc.resize_frames(frames)[None], None, proc.normalization, image_std=0.5)
    with pytest.raises(TypeError, match="Normalization"):
        tiny_model.get_video_features_uint8(proc.resize_frames(frames)[None], None, {"mean": 0.5})


def test_checkpoint_without_processor_files(tmp_path):
    """A folder as model.save_pretrained writes it (no processor config, no tokenizer): the video processor
    falls back to PE Video's preprocessing at the checkpoint's frame size with ONE warning naming what was
    assumed (it used to raise OSError); PeVideoProcessor says where a tokenizer comes from."""
    import warnings

    from _media import write_checkpoint, write_tokenizer

    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        proc = PeVideoVideoProcessor.from_pretrained(ckpt)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "has no video processor config" in msgs[0]
    assert "64x64" in msgs[0] and "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in msgs[0] and "save_pretrained" in msgs[0]
    assert proc.output_size == (64, 64) and proc.normalization == Normalization()

    with pytest.raises(ValueError, match="no tokenizer.*AutoTokenizer.from_pretrained"):
        PeVideoProcessor.from_pretrained(ckpt)
    write_tokenizer(ckpt)
    full = PeVideoProcessor.from_pretrained(ckpt)  # README's quickstart on such a folder
    assert full.video_processor.output_size == (64, 64) and full.tokenizer is not None

    proc.save_pretrained(ckpt)  # the fix the warning gives: no warning any more
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PeVideoProcessor.from_pretrained(ckpt).video_processor.to_dict() == proc.to_dict()

    with pytest.raises(OSError, match="no video processor config"):  # not a checkpoint at all
        PeVideoVideoProcessor.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------
# PeVideoProcessor: video processor + tokenizer
# --------------------------------------------------------------------------------------------------
def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "person", "playing", "tennis", "cat", "sleeping", "cooking"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(path)
    return fast


@needs_upstream
def test_processor_text_and_videos(tmp_path, seed):
    UpstreamProcessor, UpstreamVideoProcessor = _upstream_classes()
    tok = _tiny_tokenizer(tmp_path / "tok")
    UpstreamProcessor(video_processor=UpstreamVideoProcessor(**CONFIG), tokenizer=tok).save_pretrained(tmp_path / "p")
    upstream = UpstreamProcessor.from_pretrained(tmp_path / "p")
    ours = PeVideoProcessor.from_pretrained(tmp_path / "p")
    labels = ["a person playing tennis", "a cat sleeping", "cooking"]
    gen = torch.Generator().manual_seed(9)
    clips = [clip(6, 40, 30, gen), clip(3, 24, 24, gen)]
    got = ours(text=labels, videos=clips, padding=True, return_tensors="pt", num_frames=4)
    theirs_text = upstream.tokenizer(labels, padding=True, return_tensors="pt")
    theirs_video = upstream.video_processor(clips, num_frames=4, return_tensors="pt")
    assert set(got) == {"input_ids", "attention_mask", "pixel_values_videos", "padding_mask_videos"}
    assert torch.equal(got["input_ids"], theirs_text["input_ids"])
    assert torch.equal(got["attention_mask"], theirs_text["attention_mask"])
    assert_matches_upstream(got["pixel_values_videos"], theirs_video["pixel_values_videos"])
    assert set(ours(text=labels, padding=True, return_tensors="pt")) == {"input_ids", "attention_mask"}
    assert ours.video_processor(clips[0], num_frames=2, return_tensors="pt")["pixel_values_videos"].shape == (1, 2, 3, S, S)
    with pytest.raises(ValueError, match="text, videos"):
        ours()
    ours.save_pretrained(tmp_path / "again")
    assert PeVideoProcessor.from_pretrained(tmp_path / "again").video_processor.size == ours.video_processor.size


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_processing_matches_upstream_on_gpu(saved, seed):
    upstream, ours = saved
    gen = torch.Generator().manual_seed(10)
    clips = [clip(5, 48, 64, gen), clip(2, 17, 23, gen)]
    theirs = upstream(clips, do_sample_frames=False, return_tensors="pt", device="cuda")
    got = ours(clips, do_sample_frames=False, return_tensors="pt", device="cuda")
    assert got["pixel_values_videos"].is_cuda
    assert torch.equal(got["pixel_values_videos"], theirs["pixel_values_videos"])
    cpu = ours(clips, do_sample_frames=False, return_tensors="pt")["pixel_values_videos"]
    assert_matches_upstream(got["pixel_values_videos"].cpu(), cpu)


@pytest.mark.gpu
def test_gpu_to_patches(ours, seed):
    gen = torch.Generator().manual_seed(11)
    clips = [clip(5, 48, 64, gen), clip(2, 17, 23, gen)]
    patches, lengths = ours.to_patches(clips, 16, device="cuda", do_sample_frames=False)
    out = ours(clips, do_sample_frames=False, return_tensors="pt", device="cuda")
    want = patchify_normalize_ref(out["pixel_values_videos"].flatten(0, 1), 16)[out["padding_mask_videos"].flatten()]
    assert torch.equal(patches, want)
