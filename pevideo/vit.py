"""PE-Core ViT frame encoder in plain PyTorch, parameter-compatible with timm's ``vit_pe_core_*``.

Frames from all clips arrive packed as one batch; attention goes through the dispatch seam, which
applies the 2D RoPE inside the attention op (fused kernel or reference). The attention options (RoPE
coordinates, frame boundaries) are one record per frame count, built and checked once on the host:
a step of the frame encoder makes no host sync.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VitArgs
from .dispatch import AttnArgs, Ops, attn_args
from .normalization import Normalization
from .rope import pe_core_rope_2d

__all__ = ["PeCoreViT", "VisionModel"]


class PatchEmbed(nn.Module):
    """Conv2d(3, D, p, stride p, no bias) in timm's layout; run as patch rows @ flattened weight."""

    def __init__(self, a: VitArgs):
        super().__init__()
        self.proj = nn.Conv2d(3, a.embed_dim, a.patch_size, a.patch_size, bias=False)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


class Attention(nn.Module):
    def __init__(self, a: VitArgs, ops: Ops):
        super().__init__()
        self.num_heads = a.num_heads
        self.head_dim = a.head_dim
        self.qkv = nn.Linear(a.embed_dim, 3 * a.embed_dim, bias=a.qkv_bias)
        self.proj = nn.Linear(a.embed_dim, a.embed_dim)
        self._ops = ops

    def attend(self, qkv: torch.Tensor, attn: AttnArgs) -> torch.Tensor:
        """Attention over packed frames, from the qkv projection (n, L, 3·D) to (n, L, D) before ``proj``;
        ``attn``: the frames' attention options (``PeCoreViT.attn_args``)."""
        n, L, _ = qkv.shape
        # One packed qkv tensor: the op reads q, k, v in place, and its gradient is one qkv-shaped buffer.
        qkv = qkv.view(n * L, 3, self.num_heads, self.head_dim)
        return self._ops.attention_qkvpacked("frame_attention", qkv, attn).view(n, L, -1)


# A block's work outside attention, as plain functions of tensors: eager they are exactly the modules'
# math; under torch.compile (``compile=True``) every block shares one graph per function, and Inductor
# fuses the bias, residual, LayerNorm and GELU passes around cuBLAS' matmuls.
def _pre_attention(x, n1_w, n1_b, qkv_w, qkv_b, eps: float):
    return F.linear(F.layer_norm(x, (x.shape[-1],), n1_w, n1_b, eps), qkv_w, qkv_b)


def _post_attention(x, attn, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, eps: float):
    x = x + F.linear(attn, proj_w, proj_b)
    h = F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), n2_w, n2_b, eps), fc1_w, fc1_b))
    return x + F.linear(h, fc2_w, fc2_b)


EAGER_BLOCK_FNS = (_pre_attention, _post_attention)


def compiled_block_fns(**compile_kwargs):
    """``torch.compile``d block functions; dynamic shapes, so changing frame counts don't recompile."""
    kw = {"dynamic": True, **compile_kwargs}
    return torch.compile(_pre_attention, **kw), torch.compile(_post_attention, **kw)


class Block(nn.Module):
    def __init__(self, a: VitArgs, ops: Ops):
        super().__init__()
        self.norm1 = nn.LayerNorm(a.embed_dim, eps=a.norm_eps)
        self.attn = Attention(a, ops)
        self.norm2 = nn.LayerNorm(a.embed_dim, eps=a.norm_eps)
        self.mlp = Mlp(a.embed_dim, a.mlp_hidden)

    def forward(self, x, attn_options: AttnArgs, fns=EAGER_BLOCK_FNS):
        pre, post = fns
        n1, attn, n2, mlp = self.norm1, self.attn, self.norm2, self.mlp
        qkv = pre(x, n1.weight, n1.bias, attn.qkv.weight, attn.qkv.bias, n1.eps)
        out = attn.attend(qkv, attn_options)
        return post(x, out, attn.proj.weight, attn.proj.bias, n2.weight, n2.bias,
                    mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, n2.eps)


_NO_OPTIONS = AttnArgs()  # plain attention: no RoPE, no mask, default scale


class AttentionPoolLatent(nn.Module):
    """One learned latent query attends over each frame's tokens (timm's ``AttentionPoolLatent``)."""

    def __init__(self, a: VitArgs, ops: Ops):
        super().__init__()
        d = a.embed_dim
        self.num_heads = a.attn_pool_num_heads
        self.head_dim = d // self.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=a.norm_eps)
        self.mlp = Mlp(d, int(d * a.attn_pool_mlp_ratio))
        self._ops = ops

    def forward(self, x):
        n, L, d = x.shape
        q = self.q(self.latent).view(1, 1, self.num_heads, self.head_dim).expand(n, 1, self.num_heads, self.head_dim)
        kv = self.kv(x).view(n, L, 2, self.num_heads, self.head_dim)
        out = self._ops.attention("pool_attention", q, kv[:, :, 0], kv[:, :, 1], _NO_OPTIONS)
        x = self.proj(out.view(n, 1, d))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class PeCoreViT(nn.Module):
    """timm's ``Eva`` as configured by ``vit_pe_core_*``: same parameter names and shapes.

    ``forward(pixels, frame_index, norm)``: ``pixels`` (N, 3, H, W) float (normalized), or (N, H, W, 3)
    uint8 with ``norm`` a :class:`~pevideo.Normalization`; ``frame_index`` (F,) int64 or None picks
    the frames to encode (padded frames are never touched). Returns logits (F, num_classes).
    """

    def __init__(self, a: VitArgs, ops: Ops):
        super().__init__()
        self.args = a
        self._ops = ops
        d = a.embed_dim
        self.patch_embed = PatchEmbed(a)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if a.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, a.num_tokens, d))
        self.norm_pre = nn.LayerNorm(d, eps=a.norm_eps)
        self.blocks = nn.ModuleList(Block(a, ops) for _ in range(a.depth))
        self.norm = nn.LayerNorm(d, eps=a.norm_eps)
        self.attn_pool = AttentionPoolLatent(a, ops)
        self.head = nn.Linear(d, a.num_classes)
        self._attn_cache: dict = {}
        self.block_fns = EAGER_BLOCK_FNS  # or compiled_block_fns(), set by the model's ``compile`` option
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.attn_pool.latent, std=self.args.embed_dim**-0.5)

    def attn_args(self, n: int, device) -> AttnArgs:
        """The frame attention's options for n packed frames (2D RoPE coordinates, frame boundaries), built
        once per (n, device): checked on the host (``cu_seqlens`` built there), then moved to ``device``."""
        key = (n, str(device))
        hit = self._attn_cache.get(key)
        if hit is None:
            a = self.args
            coords, freqs = pe_core_rope_2d(
                *a.grid, a.head_dim, ref_feat_shape=a.ref_feat_shape, grid_offset=a.rope_grid_offset,
                temperature=a.rope_temperature, num_prefix_tokens=a.num_prefix_tokens,
            )
            L = a.num_tokens
            host = attn_args(coords=coords.repeat(n, 1), freqs=freqs,
                             cu_seqlens=torch.arange(n + 1, dtype=torch.int32) * L, max_seqlen=L)
            # (n_tokens, read on the host, stays in the record: each call checks q against it)
            hit = host._replace(coords=host.coords.to(device), freqs=host.freqs.to(device),
                                cu_seqlens=host.cu_seqlens.to(device))
            if len(self._attn_cache) > 64:  # batch sizes vary; keep the cache small
                self._attn_cache.clear()
            self._attn_cache[key] = hit
        return hit

    def embed_patches(self, pixels: torch.Tensor, frame_index: torch.Tensor | None, norm: Normalization | None = None) -> torch.Tensor:
        """Patch embedding as patchify (+ normalize, for uint8 frames) then one GEMM: (F, P, D)."""
        a = self.args
        w = self.patch_embed.proj.weight  # (D, 3, p, p) -> GEMM over (c, kh, kw) patch rows
        h, wd = a.grid[0] * a.patch_size, a.grid[1] * a.patch_size
        if tuple(a.img_size) != (h, wd):
            # img_size not a multiple of the patch: timm's stride-p conv never reads the trailing pixels;
            # pass a view cropped to the grid (no copy; patchify reads any strides).
            pixels = pixels[:, :h, :wd] if pixels.dtype == torch.uint8 else pixels[..., :h, :wd]
        rows = self._ops.patchify("patchify", pixels, a.patch_size, norm, out_dtype=w.dtype, frame_index=frame_index)
        return rows @ w.view(w.shape[0], -1).t()

    def forward_features(self, pixels: torch.Tensor, frame_index: torch.Tensor | None = None, norm: Normalization | None = None) -> torch.Tensor:
        x = self.embed_patches(pixels, frame_index, norm)  # (F, P, D)
        n = x.shape[0]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = self.norm_pre(x + self.pos_embed)
        attn = self.attn_args(n, x.device)
        for blk in self.blocks:
            x = blk(x, attn, self.block_fns)
        return self.norm(x)

    def forward(self, pixels: torch.Tensor, frame_index: torch.Tensor | None = None, norm: Normalization | None = None) -> torch.Tensor:
        return self.head(self.attn_pool(self.forward_features(pixels, frame_index, norm)))


class VisionModel(nn.Module):
    """Stands where transformers' ``TimmWrapperForImageClassification`` stands, so names line up."""

    def __init__(self, a: VitArgs, ops: Ops):
        super().__init__()
        self.timm_model = PeCoreViT(a, ops)

    def forward(self, pixels, frame_index=None, norm=None):
        return self.timm_model(pixels, frame_index, norm)
