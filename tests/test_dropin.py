"""transformers' keyword arguments on pevideo's models, against transformers doing the same (issue 16.4).

Forward side: ``output_hidden_states`` / ``output_attentions`` / ``return_dict`` (as arguments and as config
defaults), ``position_ids``, the other TransformersKwargs; ``from_pretrained``: every keyword of
transformers' ``from_pretrained`` works the same, or is accepted with a one-time warning, or (where
ignoring it would load other weights) refused; unknown keywords raise TypeError.
"""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from _upstream import make_config, randomize, rel_err, text_inputs, upstream_model, video_inputs

import pevideo
from pevideo import dropin

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = upstream_model("tiny")
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return hf, pevideo.PeVideoModel.from_pretrained(path), path


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(dropin, "_warned", set())  # each test sees its one-time warnings


def _layout(x):
    """A nested output's structure: tuples as lists, tensors as shapes, None as None."""
    if isinstance(x, (tuple, list)):
        return [_layout(y) for y in x]
    return None if x is None else tuple(x.shape)


def _run(model, ids, am, pixels, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, pixel_values_videos=pixels, padding_mask_videos=mask, **kw)


def _close_on_real(ours, ref, mask, what, cls_token=True):
    """Hidden states (or attentions, queries on dim 2) equal upstream's at real positions: padded frames
    hold values computed from nothing (pevideo) or from padded pixels (upstream), both meaningless.
    ``cls_token``: the video tower's sequences carry the class token first (computed in both)."""
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a is None) == (b is None), (what, i)
        if a is None:
            continue
        assert a.shape == b.shape, (what, i)
        if a.dim() == 4:  # attentions (B, heads, S, S): real query rows; padded key columns are 0 in both
            real = torch.cat([torch.ones_like(mask[:, :1]), mask], 1) if cls_token else mask
            a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]
        elif a.shape[1] == mask.shape[1] + 1:  # with the class token first (it is computed in both)
            real = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
            a, b = a[real], b[real]
        else:
            a, b = a[mask], b[mask]
        assert rel_err(a, b) <= TOL, (what, i, rel_err(a, b))


MASKS = {"tail": [[1, 1, 1, 1], [1, 1, 0, 0]], "leading": [[0, 1, 1, 1], [1, 0, 1, 0]]}


@pytest.mark.parametrize("rows", sorted(MASKS))
def test_hidden_states_match_upstream(pair, rows):
    """output_hidden_states=True: every temporal layer, upstream's layout (input of layer 0, ..., and
    last_hidden_state last), equal at real frames; the text tower's as upstream's."""
    hf, ours, _ = pair
    mask = torch.tensor(MASKS[rows], dtype=torch.bool)
    pixels, _ = video_inputs(hf.config, [4, 4])
    ids, am = text_inputs(2)
    a = _run(hf, ids, am, pixels, mask, output_hidden_states=True)
    b = _run(ours, ids, am, pixels, mask, output_hidden_states=True)
    assert _layout(b.to_tuple()) == _layout(a.to_tuple())
    n_layers = hf.config.video_config.num_hidden_layers
    assert len(b.video_outputs.hidden_states) == n_layers + 1
    assert b.video_outputs.hidden_states[-1] is b.video_outputs.last_hidden_state
    _close_on_real(b.video_outputs.hidden_states, a.video_outputs.hidden_states, mask, "video hidden_states")
    _close_on_real(b.text_outputs.hidden_states, a.text_outputs.hidden_states, torch.ones(2, 7, dtype=torch.bool),
                   "text hidden_states")
    # the feature methods and the encoder alone, as the towers upstream
    with torch.no_grad():
        v = ours.get_video_features(pixels, mask, output_hidden_states=True)
        e = pevideo.PeVideoEncoder.from_pretrained(pair[2])(pixels, mask, output_hidden_states=True)
        ref_v = hf.video_encoder(pixel_values_videos=pixels, padding_mask_videos=mask, output_hidden_states=True)
        t = ours.get_text_features(ids, am, output_hidden_states=True)
        ref_t = hf.text_model(input_ids=ids, attention_mask=am, output_hidden_states=True)
    _close_on_real(v.hidden_states, ref_v.hidden_states, mask, "get_video_features")
    _close_on_real(e.hidden_states, ref_v.hidden_states, mask, "PeVideoEncoder")
    _close_on_real(t.hidden_states, ref_t.hidden_states, torch.ones(2, 7, dtype=torch.bool), "get_text_features")


def test_hidden_states_on_the_fast_path(pair):
    hf, _, path = pair
    fast = pevideo.PeVideoModel.from_pretrained(path, fast=True)
    mask = torch.tensor(MASKS["leading"], dtype=torch.bool)
    pixels, _ = video_inputs(hf.config, [4, 4])
    ids, am = text_inputs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pevideo.PeVideoKernelFallbackWarning)
        b = _run(fast, ids, am, pixels, mask, output_hidden_states=True, output_attentions=True)
    a = _run(hf, ids, am, pixels, mask, output_hidden_states=True)
    global TOL
    tol, TOL = TOL, 1e-4
    try:
        _close_on_real(b.video_outputs.hidden_states, a.video_outputs.hidden_states, mask, "fast hidden_states")
    finally:
        TOL = tol
    assert len(b.video_outputs.attentions) == hf.config.video_config.num_hidden_layers


# output_hidden_states as transformers takes it: a flag, or (transformers >= 5.2x) indices of the states
# to keep; return_dict=False nests the towers' tuples. The layout (tuples, shapes, None) must be upstream's.
# (An index set without the last one, e.g. 1, fails in upstream's forward, which reads the text tower's
# last hidden state from that tuple; pevideo's reads last_hidden_state. The towers alone take it.)
LAYOUTS = [
    {}, {"return_dict": False}, {"output_hidden_states": True, "return_dict": False},
    {"output_hidden_states": [0, -1]}, {"output_hidden_states": [1, -1], "return_dict": False},
    {"output_hidden_states": -1}, {"output_hidden_states": 0}, {"output_hidden_states": False},
]


@pytest.mark.parametrize("kw", LAYOUTS, ids=[str(k) for k in LAYOUTS])
def test_output_layout_matches_upstream(pair, kw):
    hf, ours, _ = pair
    pixels, mask = video_inputs(hf.config, [3, 2])
    ids, am = text_inputs(2)
    a, b = _run(hf, ids, am, pixels, mask, **kw), _run(ours, ids, am, pixels, mask, **kw)
    assert isinstance(b, tuple) == isinstance(a, tuple)
    assert _layout(b if isinstance(b, tuple) else b.to_tuple()) == _layout(a if isinstance(a, tuple) else a.to_tuple())
    if not isinstance(a, tuple):
        assert set(b.video_outputs.keys()) == set(a.video_outputs.keys())
        assert set(b.text_outputs.keys()) == set(a.text_outputs.keys())
    for kw in (kw, {**kw, "output_hidden_states": 1} if "output_hidden_states" in kw else kw):
        with torch.no_grad():  # the video tower alone
            ea = hf.video_encoder(pixel_values_videos=pixels, padding_mask_videos=mask, **kw)
            eb = ours.video_encoder(pixels, mask, **kw)
        assert _layout(eb if isinstance(eb, tuple) else eb.to_tuple()) == _layout(
            ea if isinstance(ea, tuple) else ea.to_tuple())


def test_config_defaults_as_upstream(pair):
    """output_hidden_states / return_dict from the config when not passed: the video tower reads its own
    (video_config), forward reads the top-level return_dict, as in transformers."""
    hf, ours, _ = pair
    pixels, mask = video_inputs(hf.config, [3, 2])
    ids, am = text_inputs(2)
    try:
        for m in (hf, ours):
            m.config.video_config.output_hidden_states = True
            m.config.return_dict = False
        a, b = _run(hf, ids, am, pixels, mask), _run(ours, ids, am, pixels, mask)
        assert isinstance(b, tuple) and _layout(b) == _layout(a)
        assert len(b[-1]) == 3 and len(b[-1][2]) == hf.config.video_config.num_hidden_layers + 1
        with torch.no_grad():
            assert isinstance(ours.get_video_features(pixels, mask), tuple)
    finally:
        for m in (hf, ours):
            m.config.video_config.output_hidden_states = False
            m.config.return_dict = True


def test_attentions_match_upstream_eager(pair):
    """output_attentions=True: the temporal attention probabilities, as transformers' eager attention gives
    them (pevideo forms them on request, whatever the attention path); attn_implementation="eager" at
    loading makes the text tower return its own, as upstream."""
    hf, _, path = pair
    hf.set_attn_implementation("eager")
    try:
        with pytest.warns(pevideo.PeVideoCompatibilityWarning, match="text tower"):
            ours = pevideo.PeVideoModel.from_pretrained(path, attn_implementation="eager")
        assert ours.text_model.config._attn_implementation == "eager"
        mask = torch.tensor(MASKS["leading"], dtype=torch.bool)
        pixels, _ = video_inputs(hf.config, [4, 4])
        ids, am = text_inputs(2)
        a = _run(hf, ids, am, pixels, mask, output_attentions=True)
        b = _run(ours, ids, am, pixels, mask, output_attentions=True)
    finally:
        hf.set_attn_implementation("sdpa")
    assert _layout(b.to_tuple()) == _layout(a.to_tuple())
    att = b.video_outputs.attentions
    assert len(att) == hf.config.video_config.num_hidden_layers and att[0].shape == (2, 4, 5, 5)
    _close_on_real(att, a.video_outputs.attentions, mask, "video attentions")
    _close_on_real(b.text_outputs.attentions, a.text_outputs.attentions, torch.ones(2, 7, dtype=torch.bool),
                   "text attentions", cls_token=False)
    assert torch.allclose(att[0].sum(-1), torch.ones(())) and (att[0].transpose(1, 2)[~torch.cat(
        [mask[:, :1], mask], 1)] >= 0).all()
    assert (att[0][:, :, :, 1:][~mask[:, None, None, :].expand(-1, 4, 5, -1)] == 0).all()  # padded keys


def test_forward_keywords(pair):
    hf, ours, _ = pair
    pixels, mask = video_inputs(hf.config, [3, 2])
    ids, am = text_inputs(2)
    pos = torch.arange(7)[None].expand(2, 7) + 3
    a = _run(hf, ids, am, pixels, mask, position_ids=pos)
    b = _run(ours, ids, am, pixels, mask, position_ids=pos)
    assert rel_err(b.text_outputs.last_hidden_state, a.text_outputs.last_hidden_state) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no effect upstream either: accepted silently
        c = _run(ours, ids, am, pixels, mask, num_items_in_batch=4, is_causal=False, output_router_logits=True)
    assert torch.equal(c.logits_video_text, _run(ours, ids, am, pixels, mask).logits_video_text)
    with pytest.warns(pevideo.PeVideoCompatibilityWarning, match="packs the frames") as rec:
        _run(ours, ids, am, pixels, mask, cu_seq_lens_q=None)
        _run(ours, ids, am, pixels, mask, cu_seq_lens_q=None)  # once
    assert len([w for w in rec if "cu_seq_lens_q" in str(w.message)]) == 1
    for call in (lambda: _run(ours, ids, am, pixels, mask, foo=1),
                 lambda: ours.get_video_features(pixels, mask, foo=1),
                 lambda: ours.get_text_features(ids, am, foo=1),
                 lambda: ours.video_encoder(pixels, mask, foo=1)):
        with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
            call()


# ----------------------------------------------------------------------------------------------------
# from_pretrained
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reloadable(tmp_path_factory):
    """A checkpoint transformers itself can reload (a frame head 2 wide, its num_labels default), in the
    layouts from_pretrained's keywords pick: variant, subfolder, .bin, renamed keys."""
    from safetensors.torch import save_file
    from transformers import PeVideoConfig, PeVideoModel

    d = make_config("tiny").to_dict()
    d["video_config"]["vision_config"]["num_labels"] = 2
    torch.manual_seed(0)
    hf = randomize(PeVideoModel(PeVideoConfig.from_dict(d))).eval()
    base = tmp_path_factory.mktemp("reloadable")
    hf.save_pretrained(base)
    hf.save_pretrained(base / "variant", variant="v1")
    hf.save_pretrained(base / "outer" / "sub")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for name in ("bin", "renamed"):
        (base / name).mkdir()
        shutil.copy(base / "config.json", base / name)
    torch.save(state, base / "bin" / "pytorch_model.bin")
    save_file({"model." + k: v for k, v in state.items()}, base / "renamed" / "model.safetensors", metadata={"format": "pt"})
    return hf, base


# keyword arguments -> (folder under the checkpoint, what to check): "same" = transformers and pevideo
# load the same model (outputs compared); "warns" = pevideo warns once and loads what it loads without.
SAME = {
    "plain": ("", {}),
    "low_cpu_mem_usage": ("", {"low_cpu_mem_usage": True}),
    "trust_remote_code": ("", {"trust_remote_code": True}),
    "torch_dtype": ("", {"torch_dtype": torch.float32}),
    "dtype": ("", {"dtype": "float32"}),
    "dtype over torch_dtype": ("", {"dtype": torch.float32, "torch_dtype": torch.bfloat16}),
    "torch_dtype bf16": ("", {"torch_dtype": torch.bfloat16}),
    "local_files_only": ("", {"local_files_only": True}),
    "revision": ("", {"revision": "main"}),
    "use_safetensors": ("", {"use_safetensors": True}),
    "weights_only": ("bin", {"weights_only": False}),
    "disable_mmap": ("", {"disable_mmap": True}),
    "variant": ("variant", {"variant": "v1"}),
    "subfolder": ("outer", {"subfolder": "sub"}),
    "bin": ("bin", {"use_safetensors": False}),
    "key_mapping": ("renamed", {"key_mapping": {r"^model\.": ""}}),
    "output_loading_info": ("", {"output_loading_info": True}),
    "return_dict": ("", {"return_dict": False}),
    "output_hidden_states": ("", {"output_hidden_states": True}),
    "adapter_kwargs": ("", {"adapter_kwargs": {"revision": "main"}}),
    "experts_implementation": ("", {"experts_implementation": "eager"}),
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_from_pretrained_keyword_as_upstream(reloadable, name):
    from transformers import PeVideoModel

    hf, base = reloadable
    sub, kw = SAME[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = PeVideoModel.from_pretrained(base / sub, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pevideo.PeVideoCompatibilityWarning)  # works: no warning
        b = pevideo.PeVideoModel.from_pretrained(base / sub, **kw)
    assert isinstance(b, tuple) == isinstance(a, tuple)
    if isinstance(a, tuple):
        assert {k: sorted(v) for k, v in b[1].items()} == {k: sorted(v) for k, v in a[1].items()}
        a, b = a[0], b[0]
    theirs = a.state_dict()
    for k, v in b.state_dict().items():  # the same tensors loaded where transformers loads them
        assert torch.equal(v, theirs[k]), k
    assert b.config.return_dict == a.config.return_dict and b.config.output_hidden_states == a.config.output_hidden_states
    if name == "return_dict":  # and what the config changes, changes the same
        pixels, mask = video_inputs(hf.config, [3, 1])
        ids, am = text_inputs(2)
        oa, ob = _run(a.eval(), ids, am, pixels, mask), _run(b, ids, am, pixels, mask)
        assert isinstance(oa, tuple) and isinstance(ob, tuple) and _layout(ob) == _layout(oa)
        assert rel_err(ob[0], oa[0]) <= TOL


def test_from_pretrained_config_and_state_dict(reloadable):
    from transformers import PeVideoModel

    hf, base = reloadable
    pixels, mask = video_inputs(hf.config, [3, 1])
    ids, am = text_inputs(2)
    want = _run(hf, ids, am, pixels, mask).logits_video_text
    for kw in ({"config": hf.config}, {"config": str(base)}):
        assert rel_err(_run(pevideo.PeVideoModel.from_pretrained(base, **kw), ids, am, pixels, mask).logits_video_text,
                       want) <= TOL
    sd = hf.state_dict()
    m = pevideo.PeVideoModel.from_pretrained(None, config=hf.config, state_dict=sd)
    assert rel_err(_run(m, ids, am, pixels, mask).logits_video_text, want) <= TOL
    # what transformers refuses, pevideo refuses
    for kw, err in (({"state_dict": sd}, ValueError), ({"config": hf.config, "return_dict": False}, TypeError)):
        with pytest.raises(err):
            PeVideoModel.from_pretrained(base, **kw)
        with pytest.raises(err):
            pevideo.PeVideoModel.from_pretrained(base, **kw)
    with pytest.raises(ValueError, match="config= and state_dict="):
        pevideo.PeVideoModel.from_pretrained(None, state_dict=sd)


NOT_APPLICABLE = {
    "ignore_mismatched_sizes": True, "max_memory": {"cpu": "1GB"}, "offload_folder": "off", "offload_buffers": True,
    "use_kernels": True, "kernel_config": {"x": 1}, "kernels_mode": "inference", "allow_all_kernels": True,
    "fusion_config": {"x": True}, "distributed_config": object(), "device_mesh": object(), "tp_plan": "auto",
    "tp_size": 2, "quantization_config": {"load_in_8bit": True},
}


@pytest.mark.parametrize("name", sorted(NOT_APPLICABLE))
def test_from_pretrained_keyword_that_cannot_apply_warns_once(pair, name):
    hf, ref, path = pair
    with pytest.warns(pevideo.PeVideoCompatibilityWarning, match=f"{name}=.*has no effect: ") as rec:
        m = pevideo.PeVideoModel.from_pretrained(path, **{name: NOT_APPLICABLE[name]})
        pevideo.PeVideoModel.from_pretrained(path, **{name: NOT_APPLICABLE[name]})
    assert len([w for w in rec if name in str(w.message)]) == 1
    for (k, x), (_, y) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(x, y), k
    with warnings.catch_warnings():  # transformers' default value: nothing to say
        warnings.simplefilter("error", pevideo.PeVideoCompatibilityWarning)
        dropin._warned.clear()
        pevideo.PeVideoModel.from_pretrained(path, **{name: False if name in ("ignore_mismatched_sizes",
                                                                              "offload_buffers", "allow_all_kernels")
                                                      else None})


def test_from_pretrained_refusals(pair, tmp_path):
    _, _, path = pair
    with pytest.raises(pevideo.UsageError, match="not GGUF"):
        pevideo.PeVideoModel.from_pretrained(path, gguf_file="model.gguf")
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        pevideo.PeVideoModel.from_pretrained(path, foo=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        pevideo.PeVideoEncoder.from_pretrained(path, foo=1)
    for f in os.listdir(path):
        shutil.copy(os.path.join(path, f), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(pevideo.UsageError, match="PEFT adapter"):
        pevideo.PeVideoModel.from_pretrained(tmp_path)
    with pytest.warns(pevideo.PeVideoCompatibilityWarning, match="no effect"):
        pevideo.PeVideoEncoder.from_pretrained(path, attn_implementation="sdpa")


def test_hub_keywords_reach_the_download(pair, monkeypatch):
    import huggingface_hub

    _, _, path = pair
    seen = {}

    def fake_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(path.parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    tq = object()
    m = pevideo.PeVideoModel.from_pretrained(
        "someone/pe-tiny", revision="abc", cache_dir="/tmp/c", token="t", local_files_only=True, force_download=True,
        proxies={"https": "p"}, tqdm_class=tq, subfolder=path.name)
    assert seen["repo_id"] == "someone/pe-tiny"
    assert {k: seen[k] for k in ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies",
                                 "tqdm_class")} == dict(revision="abc", cache_dir="/tmp/c", token="t",
                                                        local_files_only=True, force_download=True,
                                                        proxies={"https": "p"}, tqdm_class=tq)
    assert all(p.startswith(path.name + "/") for p in seen["allow_patterns"])
    assert m.name_or_path == os.path.join(str(path.parent), path.name)
