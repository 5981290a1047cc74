"""Building tiny random upstream (transformers + timm) PE Video checkpoints for the tests."""
from __future__ import annotations

import torch
from transformers import PeVideoConfig

TEXT = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=97,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2,
    local_attention=8,
)

# (name, vision architecture, model_args, head width, temporal sizes). Head dims other than 64 on purpose.
CONFIGS = {
    "tiny": ("vit_pe_core_tiny_patch16_384", dict(embed_dim=32, depth=2, num_heads=2, img_size=64), 24,
             dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=12)),
    "large80": ("vit_pe_core_large_patch14_336", dict(embed_dim=160, depth=2, num_heads=2, img_size=56), 16,
                dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, head_dim=40)),
    "gigantic": ("vit_pe_core_gigantic_patch14_448", dict(embed_dim=48, depth=2, num_heads=4, img_size=42), 12,
                 dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, head_dim=16)),
    # the released large preset's 577 tokens per frame, with small widths
    "large577": ("vit_pe_core_large_patch14_336", dict(embed_dim=32, depth=1, num_heads=2), 8,
                 dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16)),
}


def make_config(name: str) -> PeVideoConfig:
    arch, model_args, width, temporal = CONFIGS[name]
    vision = dict(architecture=arch, model_args=model_args, num_labels=width)
    return PeVideoConfig(text_config=dict(TEXT), video_config=dict(vision_config=vision, **temporal))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so that no output is trivially zero or symmetric (upstream inits some to 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        # Larger q/k weights sharpen attention, so positions (RoPE) and masks visibly matter.
        std = 0.3 if (".qkv." in name or "q_proj" in name or "k_proj" in name) else 0.05
        noise = torch.randn(p.shape, generator=g) * std
        if name.endswith("logit_scale"):
            p.fill_(2.5)
        elif name.endswith("logit_bias"):
            p.fill_(-1.5)
        else:
            p.add_(noise.to(p.dtype))
    return model


def upstream_model(name: str, seed: int = 0):
    """A transformers PeVideoModel with random weights for config ``name``, in float32 eval mode."""
    from transformers import PeVideoModel

    torch.manual_seed(seed)
    return randomize(PeVideoModel(make_config(name)), seed).eval()


def video_inputs(config: PeVideoConfig, lengths: list[int], t_max: int | None = None, seed: int = 1):
    """Random normalized pixels (B, T, 3, S, S) and a padding mask for clips of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    mw = config.video_config.vision_config.model_args or {}
    from pevideo.config import vit_args

    h, w = vit_args(config.video_config.vision_config).img_size
    t = t_max or max(lengths)
    pixels = torch.randn(len(lengths), t, 3, h, w, generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    del mw
    return pixels, mask


def text_inputs(n: int, length: int = 7, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TEXT["vocab_size"], (n, length), generator=g)
    ids[:, 0] = TEXT["cls_token_id"]
    am = torch.ones(n, length, dtype=torch.long)
    if n > 1:
        am[-1, length - 2 :] = 0
        ids[-1, length - 2 :] = TEXT["pad_token_id"]
    return ids, am


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
