"""Checkpoints that must not load (issue 21): a tensor in two shards with different values, integer or
bool data where float weights belong, and config.json / weights index files that cannot describe a model.
Each is refused with pevideo's error naming the tensor and the files, or the file and the field; never
a raw AttributeError / ZeroDivisionError / JSONDecodeError from deep inside."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from _upstream import text_inputs, upstream_model, video_inputs
from safetensors.torch import load_file, save_file

import pevideo


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny checkpoint in several shards, and the model loaded from it."""
    path = tmp_path_factory.mktemp("sharded")
    upstream_model("tiny").save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    return path, pevideo.PeVideoModel.from_pretrained(path)


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), dst)
    return dst


def _shards(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))


KEY = "video_encoder.layers.0.mlp.up_proj.weight"


def _put_in_another_shard(path, value_change: float):
    """Store KEY a second time, in a shard other than its own, changed by ``value_change``."""
    index, files = _shards(path)
    own = index["weight_map"][KEY]
    other = next(f for f in files if f != own)
    tensor = load_file(path / own)[KEY]
    state = load_file(path / other)
    state[KEY] = tensor + value_change
    save_file(state, path / other, metadata={"format": "pt"})
    return own, other


def test_tensor_in_two_shards_with_different_values_is_refused(sharded, tmp_path):
    path, _ = sharded
    own, other = _put_in_another_shard(_copy(path, tmp_path), 1e-3)
    with pytest.raises(pevideo.CheckpointMismatchError, match="two weights files with different values") as err:
        pevideo.PeVideoModel.from_pretrained(tmp_path)
    msg = str(err.value)
    assert KEY in msg and own in msg and other in msg


def test_tensor_in_two_shards_with_the_same_values_loads(sharded, tmp_path):
    """The same bytes twice is one tensor stored twice: nothing is ambiguous, so it loads (documented)."""
    path, ref = sharded
    _put_in_another_shard(_copy(path, tmp_path), 0.0)
    m = pevideo.PeVideoModel.from_pretrained(tmp_path)
    for (k, x), (_, y) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_integer_or_bool_tensor_where_float_weights_belong_is_refused(sharded, tmp_path, dtype):
    path, _ = sharded
    _copy(path, tmp_path)
    index, _ = _shards(tmp_path)
    own = index["weight_map"][KEY]
    state = load_file(tmp_path / own)
    state[KEY] = (state[KEY] > 0).to(dtype)  # the right shape, the wrong kind of data
    save_file(state, tmp_path / own, metadata={"format": "pt"})
    with pytest.raises(pevideo.CheckpointMismatchError, match="integers or bools where the model has float") as err:
        pevideo.PeVideoModel.from_pretrained(tmp_path)
    assert KEY in str(err.value) and str(dtype).replace("torch.", "") in str(err.value) and own in str(err.value)


def test_float16_weights_still_load(sharded, tmp_path):
    """Any float dtype is weights (converted to the dtype asked for); only integers and bools are refused."""
    path, ref = sharded
    _copy(path, tmp_path)
    index, _ = _shards(tmp_path)
    own = index["weight_map"][KEY]
    state = load_file(tmp_path / own)
    state[KEY] = state[KEY].half()
    save_file(state, tmp_path / own, metadata={"format": "pt"})
    m = pevideo.PeVideoModel.from_pretrained(tmp_path, dtype="float32")
    assert torch.equal(m.state_dict()[KEY], ref.state_dict()[KEY].half().float())


def test_tied_names_with_different_values_are_refused(sharded, tmp_path):
    """Two stored tensors that map to one model tensor (PeAudioVideo's tied text tower; here by key_mapping)
    must agree; one silently winning is refused like two shards disagreeing."""
    path, ref = sharded
    _copy(path, tmp_path)
    index, files = _shards(tmp_path)
    own = index["weight_map"][KEY]
    state = load_file(tmp_path / own)
    state["tied." + KEY] = state[KEY].clone()
    save_file(state, tmp_path / own, metadata={"format": "pt"})
    m = pevideo.PeVideoModel.from_pretrained(tmp_path, key_mapping={r"^tied\.": ""})
    assert torch.equal(m.state_dict()[KEY], ref.state_dict()[KEY])
    state["tied." + KEY] += 1
    save_file(state, tmp_path / own, metadata={"format": "pt"})
    with pytest.raises(pevideo.CheckpointMismatchError, match="tied") as err:
        pevideo.PeVideoModel.from_pretrained(tmp_path, key_mapping={r"^tied\.": ""})
    assert KEY in str(err.value)


# ----------------------------------------------------------------------------------------------------
# config.json and the weights index
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    upstream_model("tiny").save_pretrained(path)
    return path


def _with_config(single, tmp_path, edit):
    _copy(single, tmp_path)  # (a folder of the checkpoint's files, config.json then edited)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg = edit(cfg) or cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def _set(path: str, value):
    def edit(cfg):
        *parents, last = path.split(".")
        d = cfg
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return edit


BAD_CONFIGS = {
    "list": (lambda c: [c], "config.json: expected a JSON object .*got a JSON list"),
    "string": (lambda c: "pe_video", "config.json: expected a JSON object .*got a JSON string"),
    "vision num_heads 0": (_set("video_config.vision_config.model_args.num_heads", 0),
                           r"field video_config\.vision_config\.model_args\.num_heads must be a positive integer, got 0"),
    "vision num_heads -2": (_set("video_config.vision_config.model_args.num_heads", -2), "num_heads must be a positive integer, got -2"),
    "vision num_heads 2.5": (_set("video_config.vision_config.model_args.num_heads", 2.5), "num_heads must be a positive integer, got 2.5"),
    "vision num_heads str": (_set("video_config.vision_config.model_args.num_heads", "2"), "num_heads must be a positive integer, got \"2\""),
    "vision num_heads true": (_set("video_config.vision_config.model_args.num_heads", True), "num_heads must be a positive integer, got true"),
    "vision patch_size 0": (_set("video_config.vision_config.model_args.patch_size", 0), r"model_args\.patch_size must be"),
    "vision embed_dim null": (_set("video_config.vision_config.model_args.embed_dim", None), r"model_args\.embed_dim must be"),
    "vision img_size 0": (_set("video_config.vision_config.model_args.img_size", [64, 0]), r"model_args\.img_size must be"),
    "vision depth -1": (_set("video_config.vision_config.model_args.depth", -1), r"model_args\.depth must be a non-negative"),
    "vision heads don't divide": (_set("video_config.vision_config.model_args.num_heads", 5), r"config\.json.*divisible by num_heads 5"),
    "model_args a list": (_set("video_config.vision_config.model_args", [1]), r"field video_config\.vision_config\.model_args must be a JSON object"),
    "vision_config a string": (_set("video_config.vision_config", "x"), r"field video_config\.vision_config must be a JSON object"),
    "video_config a list": (_set("video_config", [1]), r"field video_config must be a JSON object"),
    "text_config a number": (_set("text_config", 3), r"field text_config must be a JSON object"),
    "temporal heads 0": (_set("video_config.num_attention_heads", 0), r"field video_config\.num_attention_heads must be a positive"),
    "temporal hidden -48": (_set("video_config.hidden_size", -48), r"field video_config\.hidden_size must be a positive"),
    "temporal kv heads 0": (_set("video_config.num_key_value_heads", 0), r"video_config\.num_key_value_heads must be a positive integer or null"),
    "temporal kv heads 3": (_set("video_config.num_key_value_heads", 3), r"video_config\.num_attention_heads \(4\) must be a multiple"),
    "temporal head_dim odd": (_set("video_config.head_dim", 11), r"video_config\.head_dim gives a head_dim of 11"),
    "temporal layers 1.5": (_set("video_config.num_hidden_layers", 1.5), r"video_config\.num_hidden_layers must be a non-negative"),
    "temporal eps 0": (_set("video_config.rms_norm_eps", 0), r"video_config\.rms_norm_eps must be a positive number"),
    "text heads 0": (_set("text_config.num_attention_heads", 0), r"field text_config\.num_attention_heads must be a positive"),
    "text heads don't divide": (_set("text_config.num_attention_heads", 3), r"text_config\.hidden_size \(32\) must be a multiple"),
    "text vocab 0": (_set("text_config.vocab_size", 0), r"text_config\.vocab_size must be a positive"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_naming_file_and_field(single, tmp_path, name):
    edit, match = BAD_CONFIGS[name]
    path = _with_config(single, tmp_path, edit)
    for cls in (pevideo.PeVideoModel, pevideo.PeVideoEncoder):
        if cls is pevideo.PeVideoEncoder and "text" in name:
            continue  # the encoder does not read the text tower's config
        with pytest.raises(pevideo.CheckpointConfigError, match=match) as err:
            cls.from_pretrained(path)
        msg = str(err.value)
        assert str(path / "config.json") in msg and "\n" not in msg
        assert isinstance(err.value, ValueError) and isinstance(err.value, pevideo.UsageError)  # CLI: exit 2


def test_encoder_checkpoint_fields_are_named_at_the_top_level(single, tmp_path):
    enc = pevideo.PeVideoEncoder.from_pretrained(single)
    enc.save_pretrained(tmp_path / "enc")
    path = _with_config(tmp_path / "enc", tmp_path / "bad", _set("vision_config.model_args.num_heads", 0))
    with pytest.raises(pevideo.CheckpointConfigError, match=r"field vision_config\.model_args\.num_heads must be"):
        pevideo.PeVideoEncoder.from_pretrained(path)


GARBAGE_INDEX = {
    "not json": ("{weight_map: ", "not valid JSON"),
    "a list": ("[1, 2]", "expected a JSON object with a 'weight_map', got a JSON list"),
    "no weight_map": ('{"metadata": {}}', "field 'weight_map' must map tensor names to shard files, got nothing"),
    "weight_map a list": ('{"weight_map": ["a"]}', "field 'weight_map' .* got a JSON list"),
    "empty weight_map": ('{"weight_map": {}}', "field 'weight_map' .* got an empty object"),
    "file a number": ('{"weight_map": {"a": 3}}', r"field weight_map\['a'\] must name a shard file .* got 3"),
    "file outside": ('{"weight_map": {"a": "../x.safetensors"}}', r"weight_map\['a'\] must name a shard file inside"),
    "absolute file": ('{"weight_map": {"a": "/etc/passwd"}}', r"weight_map\['a'\] must name a shard file inside"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE_INDEX))
def test_garbage_index_is_one_line_naming_file_and_field(sharded, tmp_path, name):
    text, match = GARBAGE_INDEX[name]
    _copy(sharded[0], tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(pevideo.CheckpointConfigError, match=match) as err:
        pevideo.PeVideoModel.from_pretrained(tmp_path)
    assert str(tmp_path / "model.safetensors.index.json") in str(err.value) and "\n" not in str(err.value)


def test_good_checkpoints_still_load_and_match(sharded):
    """The checks refuse nothing a normal checkpoint holds (and cost no read of the data before the fit check)."""
    path, m = sharded
    hf = upstream_model("tiny")
    pixels, mask = video_inputs(hf.config, [2, 1])
    ids, am = text_inputs(2)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
        b = m(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask)
    torch.testing.assert_close(b.logits_video_text, a.logits_video_text, rtol=1e-5, atol=1e-5)


def test_cli_reports_a_bad_config_in_one_line(single, tmp_path):
    """pevideo embed with such a checkpoint: exit 2, one line naming config.json and the field."""
    import subprocess
    import sys

    path = _with_config(single, tmp_path / "ckpt", _set("video_config.vision_config.model_args.num_heads", 0))
    video = tmp_path / "a.mp4"
    video.write_bytes(b"not decoded: the checkpoint is refused first")
    r = subprocess.run([sys.executable, "-m", "pevideo", "embed", str(video), "--model", str(path), "--out",
                        str(tmp_path / "out.safetensors"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if "error" in x]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "config.json" in lines[0] and "model_args.num_heads" in lines[0], r.stderr
