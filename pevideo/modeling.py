"""PE Video in plain PyTorch: transformers' ``PeVideoEncoder`` / ``PeVideoModel``, same weights and outputs.

Differences from transformers are deliberate and listed in README.md ("Differences from transformers").
The main one for speed: padded frames are never run through the frame encoder. The real frames of all
clips are packed into one batch; the temporal transformer then sees zeros at padded positions (which
upstream masks out anyway, so real outputs are unchanged).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, PeVideoConfig, PeVideoEncoderConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.pe_video.modeling_pe_video import PeVideoOutput

from .config import vit_args
from .dispatch import AttnArgs, Ops, attn_args
from .dropin import OutputOptions, attention_probs, check_forward_kwargs, text_tower_kwargs
from .inputs_check import check_mask, check_pixels, check_text, check_uint8_videos, resolve_normalization
from .loading import PretrainedMixin
from .normalization import Normalization
from .rope import rope_1d
from .temporal import PatchEmbedder, RMSNorm
from .vit import VisionModel, compiled_block_fns

__all__ = ["PeVideoEncoder", "PeVideoModel", "PeVideoOutput", "kernel_report"]


# --------------------------------------------------------------------------------------------------
# Temporal encoder pieces (names as in transformers' modeling_pe_video)
# --------------------------------------------------------------------------------------------------
class Embedder(nn.Module):
    def __init__(self, config: PeVideoEncoderConfig, ops: Ops, num_classes: int | None):
        super().__init__()
        a = vit_args(config.vision_config, num_classes)
        self.vision_model = VisionModel(a, ops)
        self.proj = nn.Linear(a.num_classes, config.hidden_size, bias=False)
        self.data_proj = nn.Linear(config.hidden_size, config.hidden_size)


class EncoderAttention(nn.Module):
    def __init__(self, config: PeVideoEncoderConfig, ops: Ops):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self._ops = ops

    def forward(self, x, attn: AttnArgs, probs: list | None = None):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if probs is not None:  # output_attentions: computed apart, the op itself never forms them
            probs.append(attention_probs(q, k, attn.coords, attn.freqs, attn.key_padding_mask))
        out = self._ops.attention("temporal_attention", q, k, v, attn)
        return self.o_proj(out.view(b, s, -1))


class EncoderMLP(nn.Module):
    def __init__(self, config: PeVideoEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: PeVideoEncoderConfig, ops: Ops):
        super().__init__()
        self.self_attn = EncoderAttention(config, ops)
        self.mlp = EncoderMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, attn: AttnArgs, probs: list | None = None):
        x = x + self.self_attn(self.input_layernorm(x), attn, probs)
        return x + self.mlp(self.post_attention_layernorm(x))


def _rope_theta(config: PeVideoEncoderConfig) -> float:
    rp = config.rope_parameters or {}
    rope_type = rp.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"video_config.rope_parameters rope_type={rope_type!r} is not supported (only 'default')")
    return float(rp.get("rope_theta", getattr(config, "default_theta", 20000)))


def kernel_report(model: nn.Module) -> dict[str, str]:
    """Op name -> "fused", or the reason the op ran its PyTorch reference, as of the model's last forward."""
    ops = getattr(model, "_ops", None)
    if not isinstance(ops, Ops):
        raise TypeError("kernel_report takes a pevideo PeVideoModel or PeVideoEncoder")
    return dict(ops.report)


# --------------------------------------------------------------------------------------------------
# Public models
# --------------------------------------------------------------------------------------------------
class PeVideoEncoder(PretrainedMixin, nn.Module):
    """PE Video's video tower: per-frame PE-Core ViT, then a temporal transformer over the clip.

    ``forward(pixel_values_videos, padding_mask_videos=None)``:
      * ``pixel_values_videos``: (batch, frames, 3, S, S) float, normalized as the processor returns.
      * ``padding_mask_videos``: (batch, frames) bool or 0/1 ints, True/1 = real frame. Optional.
    Returns ``BaseModelOutputWithPooling`` with ``last_hidden_state`` (batch, frames, hidden) and
    ``pooler_output`` (batch, hidden). Padded frames are never encoded; the temporal transformer sees a
    zero vector at their positions, so the rows of ``last_hidden_state`` at padded frames hold values
    computed from that zero input. They mean nothing (upstream's hold values computed from the padded
    pixels, which mean nothing either): mask them out. Real rows and ``pooler_output`` equal upstream's.
    """

    config_class = PeVideoEncoderConfig
    _config_kind = "pe_video_encoder"

    @property
    def fast(self) -> bool:
        """Whether the fused kernels run: ``Ops.fast``, the one place it is stored."""
        return self._ops.fast

    def __init__(
        self,
        config: PeVideoEncoderConfig,
        fast: bool = False,
        *,
        compile: bool = False,
        num_classes: int | None = None,
        _ops: Ops | None = None,
    ):
        super().__init__()
        if isinstance(config, dict):
            config = PeVideoEncoderConfig(**config)
        self.config = config
        self.compiled = bool(compile)
        self._ops = _ops if _ops is not None else Ops(fast)
        self.embedder = Embedder(config, self._ops, num_classes)
        self.patch_embedder = PatchEmbedder(config.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(config, self._ops) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self._rope_theta = _rope_theta(config)
        self._head_dim = self.layers[0].self_attn.head_dim if len(self.layers) else 0
        self._rope_cache: dict = {}
        #: encode at most this many frames per frame-encoder call (bounds activation memory); None = all
        self.frame_batch_size: int | None = None
        self._init_temporal()
        if compile:
            # The frame encoder's blocks outside attention; attention stays the dispatched op.
            self.vit.block_fns = compiled_block_fns()

    @torch.no_grad()
    def _init_temporal(self):
        std = self.config.initializer_range
        for name, m in self.named_modules():
            if name.startswith("embedder.vision_model"):
                continue
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def vit(self):
        return self.embedder.vision_model.timm_model

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    def encode_frames(self, pixels: torch.Tensor, frame_index: torch.Tensor | None, norm: Normalization | None = None) -> torch.Tensor:
        """Frame encoder on ``pixels`` (N, 3, S, S) float, or (N, S, S, 3) uint8 with ``norm``, at
        ``frame_index`` (F,): returns the (F, hidden) inputs of the temporal transformer."""
        vit = self.vit
        if pixels.device != self.device:
            pixels = pixels.to(self.device, non_blocking=True)
        if frame_index is not None and frame_index.device != pixels.device:
            frame_index = frame_index.to(pixels.device)
        n = pixels.shape[0] if frame_index is None else frame_index.numel()
        step = self.frame_batch_size or n
        if step >= n:
            logits = vit(pixels, frame_index, norm)
        else:
            idx = frame_index if frame_index is not None else torch.arange(n, device=pixels.device)
            logits = torch.cat([vit(pixels, idx[i : i + step], norm) for i in range(0, n, step)])
        feats = F.normalize(logits, dim=-1)
        return self.embedder.data_proj(self.embedder.proj(feats))

    def _temporal_rope(self, b: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """1D RoPE coords (b, s, 3) and freqs for the temporal transformer, cached per shape and device."""
        key = (b, s, str(device))
        hit = self._rope_cache.get(key)
        if hit is None:
            coords, freqs = rope_1d(s, self._head_dim, theta=self._rope_theta)
            # A stride-0 view over the batch: one row of coords, which the kernel's cos/sin table shares.
            hit = (coords.to(device).expand(b, s, 3), freqs.to(device))
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = hit
        return hit

    def _run(self, frames, b: int, t: int, mask, real, norm, opts: OutputOptions | None = None):
        if mask is not None and real.numel() == b * t:
            real = None  # nothing is padding: skip the gather and scatter
        emb = self.encode_frames(frames, real, norm)
        if real is not None:
            # Padded positions get zeros; the temporal block masks them out of every real output.
            full = emb.new_zeros(b * t, emb.shape[-1])
            emb = full.index_copy(0, real.to(emb.device), emb)
        x = emb.view(b, t, -1)
        if mask is not None:
            mask = mask.to(x.device)
        x, mask = self.patch_embedder(x, mask)
        coords, freqs = self._temporal_rope(b, x.shape[1], x.device)
        attn = attn_args(coords=coords, freqs=freqs, key_padding_mask=mask)  # once for all layers
        opts = opts or OutputOptions(self.config, len(self.layers))
        for layer in self.layers:
            opts.layer_input(x)
            x = layer(x, attn, opts.attentions)
        x = self.output(self.norm(x))
        lhs = x[:, 1:]
        out = opts.finish(BaseModelOutputWithPooling(last_hidden_state=lhs, pooler_output=x[:, 0]), lhs)
        self._ops.warn_fallbacks()
        return out

    def forward(self, pixel_values_videos: torch.Tensor, padding_mask_videos: torch.Tensor | None = None,
                return_dict: bool | None = None, output_hidden_states=None, output_attentions: bool | None = None,
                **kwargs):
        """``output_hidden_states`` / ``output_attentions`` / ``return_dict`` as transformers' (defaults from
        the config): hidden states of every temporal layer, (batch, frames + 1, hidden) with the class token
        first, the last one ``last_hidden_state``; attentions (batch, heads, frames + 1, frames + 1)."""
        check_forward_kwargs(f"{type(self).__name__}.forward", kwargs)
        self._ops.reset()
        pv = pixel_values_videos
        check_pixels(pv, self.vit.args.img_size)
        b, t = pv.shape[:2]
        mask, real = check_mask(padding_mask_videos, b, t, pv.device)
        opts = OutputOptions(self.config, len(self.layers), output_hidden_states, output_attentions)
        out = self._run(pv.reshape(b * t, *pv.shape[2:]), b, t, mask, real, None, opts)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict is not False else out.to_tuple()

    def forward_uint8(
        self,
        videos: torch.Tensor,
        padding_mask_videos: torch.Tensor | None = None,
        normalization: Normalization | None = None,
        *,
        image_mean=None,
        image_std=None,
        rescale_factor: float | None = None,
        output_hidden_states=None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """:meth:`forward` on resized uint8 frames ``videos`` (batch, frames, S, S, 3), normalizing inside
        the patchify op: ``(x * rescale - mean) / std`` per channel, as the processor would. Saves
        building (and copying to the GPU) a float32 ``pixel_values_videos``.

        ``normalization``: a :class:`pevideo.processing.Normalization` (``processor.normalization``);
        default PE Video's. Or give ``image_mean`` / ``image_std`` / ``rescale_factor`` instead. Checked:
        a zero, negative or non-finite std (or a wrong number of channels) raises ValueError."""
        norm = resolve_normalization(normalization, image_mean, image_std, rescale_factor)
        self._ops.reset()
        check_uint8_videos(videos, self.vit.args.img_size)
        b, t = videos.shape[:2]
        mask, real = check_mask(padding_mask_videos, b, t, videos.device)
        opts = OutputOptions(self.config, len(self.layers), output_hidden_states, output_attentions)
        return self._run(videos.reshape(b * t, *videos.shape[2:]), b, t, mask, real, norm, opts)


class ContrastiveHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x):
        return self.proj(self.layer_norm(x))


class PeVideoModel(PretrainedMixin, nn.Module):
    """PE Video: video tower + ModernBERT text tower + contrastive heads, as transformers' ``PeVideoModel``.

    ``forward(input_ids, pixel_values_videos, attention_mask=None, padding_mask_videos=None,
    return_loss=None)`` returns transformers' ``PeVideoOutput``: ``logits_video_text`` (videos, texts),
    ``text_video_embeds`` (texts, D), ``video_embeds`` (videos, D), ``text_outputs``, ``video_outputs``
    (``last_hidden_state``, ``pooler_output``; see :class:`PeVideoEncoder` for padded rows) and ``loss``.
    Build with ``PeVideoModel(config, fast=...)`` or ``PeVideoModel.from_pretrained(path, fast=...)``.
    """

    config_class = PeVideoConfig
    _config_kind = "pe_video"

    @property
    def fast(self) -> bool:
        """Whether the fused kernels run: ``Ops.fast``, the one place it is stored."""
        return self._ops.fast

    def __init__(self, config: PeVideoConfig, fast: bool = False, *, compile: bool = False, num_classes: int | None = None):
        super().__init__()
        if isinstance(config, dict):
            config = PeVideoConfig(**config)
        self.config = config
        self._ops = Ops(fast)
        self.text_model = AutoModel.from_config(config.text_config)
        self.video_encoder = PeVideoEncoder(
            config.video_config, fast, compile=compile, num_classes=num_classes, _ops=self._ops
        )
        text_hidden = config.text_config.hidden_size
        self.text_video_head = ContrastiveHead(text_hidden, text_hidden)
        self.video_head = ContrastiveHead(config.video_config.hidden_size, text_hidden)
        self.text_video_logit_scale = nn.Parameter(torch.zeros(1))
        self.text_video_logit_bias = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.video_head.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.video_head.proj.weight.dtype

    def get_video_features(self, pixel_values_videos, padding_mask_videos=None, return_dict: bool | None = None,
                           output_hidden_states=None, output_attentions: bool | None = None, **kwargs):
        """Video tower outputs with ``pooler_output`` replaced by the video embedding (videos, D)."""
        check_forward_kwargs("get_video_features", kwargs)
        out = self.video_encoder(pixel_values_videos, padding_mask_videos, return_dict=True,
                                 output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        out.pooler_output = self.video_head(out.pooler_output)
        return out if self._return_dict(return_dict) else out.to_tuple()

    def get_video_features_uint8(self, videos, padding_mask_videos=None, normalization=None, *, image_mean=None,
                                 image_std=None, rescale_factor=None, output_hidden_states=None, output_attentions=None):
        """:meth:`get_video_features` on resized uint8 frames (batch, frames, S, S, 3), normalized by
        ``normalization`` (``processor.normalization``); see :meth:`PeVideoEncoder.forward_uint8`. The
        video encoder's own pooled output (before the head) stays at ``encoder_pooler_output``."""
        out = self.video_encoder.forward_uint8(videos, padding_mask_videos, normalization, image_mean=image_mean,
                                               image_std=image_std, rescale_factor=rescale_factor,
                                               output_hidden_states=output_hidden_states,
                                               output_attentions=output_attentions)
        out.encoder_pooler_output = out.pooler_output
        out.pooler_output = self.video_head(out.pooler_output)
        return out

    def get_text_features(self, input_ids, attention_mask=None, return_dict: bool | None = None,
                          output_hidden_states=None, output_attentions: bool | None = None, **kwargs):
        """Text tower outputs with ``pooler_output`` = the text embedding (texts, D) of token 0.

        (Upstream's in-``__init__`` draft applied the head to every token; this returns what
        ``forward`` uses as ``text_video_embeds``.)
        """
        extra = check_forward_kwargs("get_text_features", kwargs)
        self._ops.reset()
        out = self._text(input_ids, attention_mask, text_tower_kwargs(output_hidden_states, output_attentions, extra, False))
        out.pooler_output = self.text_video_head(out.last_hidden_state[:, 0])
        return out if self._return_dict(return_dict) else out.to_tuple()

    def _return_dict(self, return_dict) -> bool:
        return (self.config.return_dict if return_dict is None else return_dict) is not False

    def _text(self, input_ids, attention_mask, tower_kwargs: dict):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor (texts, tokens), got {shape}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        check_text(input_ids, attention_mask, self.config.text_config.vocab_size)
        dev = self.device
        return self.text_model(
            input_ids=input_ids.to(dev), attention_mask=None if attention_mask is None else attention_mask.to(dev),
            return_dict=True, **tower_kwargs,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values_videos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        padding_mask_videos: torch.Tensor | None = None,
        return_loss: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states=None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> PeVideoOutput:
        extra = check_forward_kwargs(f"{type(self).__name__}.forward", kwargs)
        video_outputs = self.video_encoder(pixel_values_videos, padding_mask_videos, return_dict=True,
                                           output_hidden_states=output_hidden_states,
                                           output_attentions=output_attentions)
        text_outputs = self._text(input_ids, attention_mask,
                                  text_tower_kwargs(output_hidden_states, output_attentions, extra, True))
        video_embeds = self.video_head(video_outputs.pooler_output)
        text_video_embeds = self.text_video_head(text_outputs.last_hidden_state[:, 0])
        logits = video_embeds @ text_video_embeds.t()
        logits = logits * self.text_video_logit_scale + self.text_video_logit_bias
        loss = None
        if return_loss:
            n_v, n_t = logits.shape
            if n_v != n_t:
                raise ValueError(f"return_loss needs matched video/text pairs; got {n_v} videos and {n_t} texts")
            # Sigmoid loss: +1 for matching pairs, -1 for every other pair (upstream used 0 there).
            labels = 2 * torch.eye(n_v, device=logits.device, dtype=logits.dtype) - 1
            loss = -F.logsigmoid(labels * logits).sum() / n_v
        out = PeVideoOutput(
            loss=loss,
            logits_video_text=logits,
            text_video_embeds=text_video_embeds,
            video_embeds=video_embeds,
            text_outputs=text_outputs,
            video_outputs=video_outputs,
        )
        return out if self._return_dict(return_dict) else out.to_tuple()
