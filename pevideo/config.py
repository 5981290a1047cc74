"""Configuration handling: transformers' PeVideo configs in, the frame encoder's sizes out.

pevideo builds its modules from transformers' ``PeVideoConfig`` / ``PeVideoEncoderConfig``. The frame
encoder is timm's PE-Core ViT, named in ``vision_config.architecture`` and adjusted by
``vision_config.model_args``; :func:`vit_args` resolves both into plain sizes without importing timm.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from transformers import PeVideoConfig, PeVideoEncoderConfig

__all__ = ["VitArgs", "vit_args", "PRESETS", "load_config_dict", "config_from_dict", "checkpoint_config_dict"]


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
    import json
    import os

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r}: not a saved PE Video checkpoint")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc


def checkpoint_config_dict(d: dict, want: str) -> dict:
    """The ``want`` ("pe_video" or "pe_video_encoder") config dict inside a checkpoint's config.json.

    Accepts PeVideo, PeVideoEncoder and PeAudioVideo (e.g. facebook/pe-av-large) checkpoints.
    """
    mt = d.get("model_type")
    if mt == "pe_audio_video":
        av = d.get("audio_video_config") or {}
        if "video_config" not in av:
            raise ValueError("this pe_audio_video config has no audio_video_config.video_config")
        d = {"model_type": "pe_video", "text_config": d.get("text_config"), "video_config": av["video_config"]}
        mt = "pe_video"
    if want == "pe_video":
        if mt != "pe_video":
            raise ValueError(f"expected a pe_video (or pe_audio_video) checkpoint, config.json has model_type={mt!r}")
        return d
    if mt == "pe_video":
        d = dict(d["video_config"] or {})
        mt = d.get("model_type", "pe_video_encoder")
    if mt != "pe_video_encoder":
        raise ValueError(f"expected a PE Video checkpoint, config.json has model_type={mt!r}")
    return d


def config_from_dict(d: dict, want: str):
    """Build a transformers config from a checkpoint config dict (see :func:`checkpoint_config_dict`)."""
    d = copy.deepcopy(checkpoint_config_dict(d, want))
    cls = PeVideoConfig if want == "pe_video" else PeVideoEncoderConfig
    return cls.from_dict(d)
