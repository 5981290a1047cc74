"""Configuration handling: transformers' PeVideo configs in, the frame encoder's sizes out.

pevideo builds its modules from transformers' ``PeVideoConfig`` / ``PeVideoEncoderConfig``. The frame
encoder is timm's PE-Core ViT, named in ``vision_config.architecture`` and adjusted by
``vision_config.model_args``; :func:`vit_args` resolves both into plain sizes without importing timm.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

from transformers import PeVideoConfig, PeVideoEncoderConfig

from .errors import CheckpointConfigError

__all__ = ["VitArgs", "vit_args", "PRESETS", "load_config_dict", "config_from_dict", "checkpoint_config_dict",
           "validate_config_dict", "config_field_prefixes", "read_checkpoint_config"]


@dataclass(frozen=True)
class VitArgs:
    """Sizes of a PE-Core ViT frame encoder."""

    img_size: tuple[int, int]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    class_token: bool
    ref_feat_shape: tuple[int, int] | None
    rope_grid_offset: float
    rope_temperature: float = 10000.0
    attn_pool_num_heads: int = 8
    attn_pool_mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    qkv_bias: bool = True
    num_classes: int = 1024

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and row; pixels past grid * patch_size are dropped, as timm's strided conv does."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw + self.num_prefix_tokens

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # timm truncates the same way


def _p(patch, dim, depth, heads, img, ref, offset, cls=True, mlp=4.0):
    return dict(
        patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, img_size=img, ref_feat_shape=ref,
        rope_grid_offset=offset, class_token=cls, mlp_ratio=mlp,
    )


# timm's vit_pe_core_* definitions (timm/models/eva.py), img_size from each preset's input_size.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_pe_core_tiny_patch16_384": _p(16, 192, 12, 3, 384, (24, 24), 1.0),
    "vit_pe_core_small_patch16_384": _p(16, 384, 12, 6, 384, (24, 24), 1.0),
    "vit_pe_core_base_patch16_224": _p(16, 768, 12, 12, 224, (14, 14), 1.0),
    "vit_pe_core_large_patch14_336": _p(14, 1024, 24, 16, 336, (24, 24), 1.0),
    "vit_pe_core_gigantic_patch14_448": _p(14, 1536, 50, 16, 448, (32, 32), 0.0, cls=False, mlp=8960 / 1536),
}

# model_args that only matter in training (dropout, stochastic depth): accepted and ignored.
_TRAINING_ONLY = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"}
# model_args that must keep the value PE-Core uses; anything else changes the architecture.
_FIXED = {
    "in_chans": 3, "global_pool": "map", "attn_type": "rope", "use_pre_transformer_norm": True, "use_rot_pos_emb": True,
    "rope_type": "cat", "rope_grid_indexing": "xy", "qkv_fused": True, "qk_norm": False, "swiglu_mlp": False,
    "scale_mlp": False, "scale_attn_inner": False, "init_values": None, "num_reg_tokens": 0, "no_embed_class": False,
    "use_abs_pos_emb": True, "use_post_norm": False, "dynamic_img_size": False, "dynamic_img_pad": False,
    "rope_rotate_half": False, "use_fc_norm": False, "use_post_transformer_norm": True, "num_kv_heads": None,
}
_TUPLE_KEYS = {"img_size", "ref_feat_shape"}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _arch_name(architecture: str) -> str:
    # transformers allows "timm/<name>" and "<name>.<pretrained tag>"
    name = architecture.split("/")[-1].split(".")[0]
    if name not in PRESETS:
        raise ValueError(
            f"vision_config.architecture={architecture!r} is not a PE-Core ViT; pevideo supports {sorted(PRESETS)}"
        )
    return name


def vit_args(vision_config, num_classes: int | None = None) -> VitArgs:
    """Resolve ``vision_config`` (TimmWrapperConfig or dict) into :class:`VitArgs`.

    ``num_classes`` overrides the head width (pevideo takes it from the checkpoint); otherwise the width
    is ``num_labels``, as transformers builds it.
    """
    get = vision_config.get if isinstance(vision_config, dict) else (lambda k, d=None: getattr(vision_config, k, d))
    name = _arch_name(get("architecture", "vit_pe_core_large_patch14_336"))
    args = dict(PRESETS[name])
    for key, value in dict(get("model_args", None) or {}).items():
        if key in _TRAINING_ONLY:
            continue
        if key in _FIXED:
            fixed = _FIXED[key]
            if value != fixed and not (isinstance(fixed, bool) and value is fixed):
                raise ValueError(f"vision_config.model_args {key}={value!r} is not supported (PE-Core uses {fixed!r})")
            continue
        if key == "norm_layer":
            raise ValueError("vision_config.model_args norm_layer is not supported (PE-Core uses LayerNorm eps 1e-5)")
        if key == "num_classes":
            args["num_classes"] = int(value)
            continue
        if key not in VitArgs.__dataclass_fields__:
            raise ValueError(f"vision_config.model_args {key}={value!r} is not supported by pevideo's PE-Core ViT")
        args[key] = value
    if num_classes is None and "num_classes" not in args:
        if isinstance(vision_config, dict):
            num_classes = vision_config.get("num_labels") or len(vision_config.get("id2label") or {}) or 2
        else:
            num_classes = vision_config.num_labels
    if num_classes is not None:
        args["num_classes"] = int(num_classes)
    args["img_size"] = _pair(args["img_size"])
    if args.get("ref_feat_shape") is not None:
        args["ref_feat_shape"] = _pair(args["ref_feat_shape"])
    for key in ("embed_dim", "num_heads", "patch_size", "num_classes", "attn_pool_num_heads", "depth"):
        v = args.get(key, 1)
        if not _is_int(v) or v < (0 if key == "depth" else 1):
            raise ValueError(f"vision_config: {key} must be a {'non-negative' if key == 'depth' else 'positive'} "
                             f"integer, got {v!r}")
    if min(args["img_size"]) < 1:
        raise ValueError(f"vision_config: img_size must be positive, got {args['img_size']}")
    out = VitArgs(**args)
    if out.embed_dim % out.num_heads:
        raise ValueError(f"embed_dim {out.embed_dim} is not divisible by num_heads {out.num_heads}")
    if out.head_dim % 4:
        raise ValueError(f"PE-Core's 2D RoPE needs head_dim divisible by 4, got {out.head_dim}")
    # img_size need not be a multiple of patch_size: as timm (a conv with stride = patch), the grid is
    # img_size // patch_size and the trailing rows/columns of pixels are not used (see VitArgs.grid).
    if min(out.grid) < 1:
        raise ValueError(f"img_size {out.img_size} is smaller than patch_size {out.patch_size}")
    if out.embed_dim % out.attn_pool_num_heads:
        raise ValueError(f"embed_dim {out.embed_dim} is not divisible by attn_pool_num_heads {out.attn_pool_num_heads}")
    return out


# --------------------------------------------------------------------------------------------------
# Reading checkpoint configs
# --------------------------------------------------------------------------------------------------
def load_config_dict(path: str) -> dict:
    """The checkpoint folder's config.json as a dict (not JSON, or not a JSON object: CheckpointConfigError)."""
    cfg_path = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r}: not a saved PE Video checkpoint")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointConfigError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise CheckpointConfigError(f"{cfg_path}: expected a JSON object (a PE Video config), got a JSON {_json_kind(d)}")
    return d


# --------------------------------------------------------------------------------------------------
# Checking a config.json before anything is built from it: every size a positive (or, for layer counts,
# non-negative) integer, every nested config an object. transformers takes such values and fails deep
# inside (ZeroDivisionError, AttributeError); here the message names the file and the field.
# --------------------------------------------------------------------------------------------------
def _json_kind(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(v), "null" if v is None else type(v).__name__)


_POS, _NONNEG, _POS_OR_NULL, _POS_NUM, _SIZE = "pos", "nonneg", "pos_or_null", "pos_num", "size"
_RULE_TEXT = {_POS: "a positive integer", _NONNEG: "a non-negative integer", _POS_OR_NULL: "a positive integer or null",
              _POS_NUM: "a positive number", _SIZE: "a positive integer or a pair of them"}
_VIDEO_FIELDS = {"hidden_size": _POS, "intermediate_size": _POS, "num_attention_heads": _POS,
                 "num_key_value_heads": _POS_OR_NULL, "head_dim": _POS_OR_NULL, "num_hidden_layers": _NONNEG,
                 "max_position_embeddings": _POS, "rms_norm_eps": _POS_NUM}
_VISION_FIELDS = {"num_labels": _POS_OR_NULL}
_VISION_ARGS = {"embed_dim": _POS, "depth": _NONNEG, "num_heads": _POS, "patch_size": _POS, "num_classes": _POS,
                "attn_pool_num_heads": _POS, "img_size": _SIZE, "ref_feat_shape": _SIZE, "mlp_ratio": _POS_NUM,
                "attn_pool_mlp_ratio": _POS_NUM, "rope_temperature": _POS_NUM, "norm_eps": _POS_NUM}
_TEXT_FIELDS = {"hidden_size": _POS, "intermediate_size": _POS, "num_attention_heads": _POS, "num_hidden_layers": _NONNEG,
                "vocab_size": _POS, "max_position_embeddings": _POS, "local_attention": _POS,
                "global_attn_every_n_layers": _POS, "norm_eps": _POS_NUM}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _value_ok(v, rule: str) -> bool:
    if rule == _POS_OR_NULL and v is None:
        return True
    if rule in (_POS, _POS_OR_NULL):
        return _is_int(v) and v > 0
    if rule == _NONNEG:
        return _is_int(v) and v >= 0
    if rule == _POS_NUM:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and v != float("inf")
    if rule == _SIZE:
        if isinstance(v, (list, tuple)):
            return len(v) == 2 and all(_is_int(x) and x > 0 for x in v)
        return _is_int(v) and v > 0
    raise AssertionError(rule)


def config_field_prefixes(d: dict, want: str) -> tuple[str, str | None]:
    """Where the video tower's and the text tower's configs sit in a checkpoint's config.json, as dotted
    field paths ("" = the top level; None = not loaded for ``want``)."""
    mt = d.get("model_type")
    video = {"pe_audio_video": "audio_video_config.video_config", "pe_video": "video_config"}.get(mt, "")
    return video, ("text_config" if want == "pe_video" else None)


def _sub(d: dict, at: str, source: str):
    """The object at dotted path ``at`` of ``d`` (None where a step is missing or null)."""
    cur, walked = d, []
    for step in [x for x in at.split(".") if x]:
        walked.append(step)
        cur = cur.get(step)
        if cur is None:
            return None
        if not isinstance(cur, dict):
            raise CheckpointConfigError(f"{source}: field {'.'.join(walked)} must be a JSON object, got a JSON {_json_kind(cur)}")
    return cur


def _check_fields(obj: dict, at: str, rules: dict, source: str) -> None:
    for name, rule in rules.items():
        if name in obj and not _value_ok(obj[name], rule):
            field = f"{at}.{name}" if at else name
            raise CheckpointConfigError(f"{source}: field {field} must be {_RULE_TEXT[rule]}, got {json.dumps(obj[name])}")


def validate_config_dict(d, source: str, want: str) -> None:
    """Refuse (:class:`CheckpointConfigError`, naming ``source`` and the field) a config.json that cannot
    describe the ``want`` ("pe_video" / "pe_video_encoder") model: not an object, a nested config that is
    not an object, a size that is zero, negative or not an integer, heads that do not divide."""
    if not isinstance(d, dict):
        raise CheckpointConfigError(f"{source}: expected a JSON object (a PE Video config), got a JSON {_json_kind(d)}")
    try:
        checkpoint_config_dict(d, want)  # the model_type and the layout first
    except CheckpointConfigError as exc:
        raise CheckpointConfigError(f"{source}: {exc}") from None
    video_at, text_at = config_field_prefixes(d, want)
    video = _sub(d, video_at, source)
    if video is not None:
        _check_fields(video, video_at, _VIDEO_FIELDS, source)
        vat = f"{video_at}.vision_config" if video_at else "vision_config"
        vision = _sub(d, vat, source)
        if vision is not None:
            _check_fields(vision, vat, _VISION_FIELDS, source)
            margs = _sub(d, vat + ".model_args", source)
            if margs is not None:
                _check_fields(margs, vat + ".model_args", _VISION_ARGS, source)
        heads, kv = video.get("num_attention_heads"), video.get("num_key_value_heads")
        if _is_int(heads) and _is_int(kv) and heads % kv:
            raise CheckpointConfigError(f"{source}: field {video_at + '.' if video_at else ''}num_attention_heads ({heads}) "
                                        f"must be a multiple of num_key_value_heads ({kv})")
        hd, hs = video.get("head_dim"), video.get("hidden_size")
        eff = hd if hd is not None else (hs // heads if _is_int(hs) and _is_int(heads) else None)
        if _is_int(eff) and eff % 2:
            which = "head_dim" if hd is not None else "hidden_size / num_attention_heads"
            raise CheckpointConfigError(f"{source}: field {video_at + '.' if video_at else ''}{which} gives a head_dim of {eff}; "
                                        "the temporal RoPE needs an even head_dim")
    if text_at is not None:
        text = _sub(d, text_at, source)
        if text is not None:
            _check_fields(text, text_at, _TEXT_FIELDS, source)
            hs, heads = text.get("hidden_size"), text.get("num_attention_heads")
            if _is_int(hs) and _is_int(heads) and hs % heads:
                raise CheckpointConfigError(f"{source}: field {text_at}.hidden_size ({hs}) must be a multiple of "
                                            f"{text_at}.num_attention_heads ({heads})")


def read_checkpoint_config(path: str, want: str) -> dict:
    """The ``want`` config dict of the checkpoint folder ``path``'s config.json, checked by
    :func:`validate_config_dict` (a bad one raises CheckpointConfigError naming the file and the field)."""
    d = load_config_dict(path)
    validate_config_dict(d, path if os.path.isfile(path) else os.path.join(path, "config.json"), want)
    return checkpoint_config_dict(d, want)


def checkpoint_config_dict(d: dict, want: str) -> dict:
    """The ``want`` ("pe_video" or "pe_video_encoder") config dict inside a checkpoint's config.json.

    Accepts PeVideo, PeVideoEncoder and PeAudioVideo (e.g. facebook/pe-av-large) checkpoints.
    """
    mt = d.get("model_type")
    if mt == "pe_audio_video":
        av = d.get("audio_video_config")
        if not isinstance(av, dict) or not isinstance(av.get("video_config"), dict):
            raise CheckpointConfigError("this pe_audio_video config has no audio_video_config.video_config object")
        d = {"model_type": "pe_video", "text_config": d.get("text_config"), "video_config": av["video_config"]}
        mt = "pe_video"
    if want == "pe_video":
        if mt != "pe_video":
            raise CheckpointConfigError(f"expected a pe_video (or pe_audio_video) checkpoint, config.json has model_type={mt!r}")
        return d
    if mt == "pe_video":
        vc = d.get("video_config")
        if vc is not None and not isinstance(vc, dict):
            raise CheckpointConfigError(f"field video_config must be a JSON object, got a JSON {_json_kind(vc)}")
        d = dict(vc or {})
        mt = d.get("model_type", "pe_video_encoder")
    if mt != "pe_video_encoder":
        raise CheckpointConfigError(f"expected a PE Video checkpoint, config.json has model_type={mt!r}")
    return d


def config_from_dict(d: dict, want: str, **overrides):
    """Build a transformers config from a checkpoint config dict (see :func:`checkpoint_config_dict`).

    ``overrides``: from_pretrained's keyword arguments that name config attributes (``return_dict=False``,
    ...), applied as transformers applies them; with any, returns ``(config, unused keyword arguments)``."""
    d = copy.deepcopy(checkpoint_config_dict(d, want))
    cls = PeVideoConfig if want == "pe_video" else PeVideoEncoderConfig
    if overrides:
        return cls.from_dict(d, return_unused_kwargs=True, **overrides)
    return cls.from_dict(d)
