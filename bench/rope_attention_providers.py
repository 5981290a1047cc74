"""The compiled competitors of bench_rope_attention.py: RoPE + FlexAttention (both compiled; a block mask
for key padding, equal-length packed frames as a plain batch) and flash-attn's rotary + varlen attention
(if importable). Each takes a bench_rope_attention ``Case`` and returns a zero-argument callable."""
from __future__ import annotations

import torch

__all__ = ["prov_flex", "prov_flash_attn"]


def prov_flex(c, compile_kw=None):
    """RoPE (compiled) + FlexAttention (compiled); ``compile_kw`` goes to both torch.compile calls."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from pevideo_kernels import apply_rope_ref

    coords, freqs, layout = c.kw["coords"], c.kw["freqs"], c.kw["rope_layout"]
    kw = {"dynamic": False, **(compile_kw or {})}
    rope = torch.compile(lambda x: apply_rope_ref(x, coords, freqs, layout), **kw)
    flex = torch.compile(flex_attention, **kw)
    dev = c.q.device
    if c.packed and all(n == c.lens[0] for n in c.lens):  # equal segments (frames): a plain batch, no mask
        nseg, n = len(c.lens), c.lens[0]

        def run(q=c.q, k=c.k, v=c.v):  # (--backward calls it on its own leaves)
            q, k = rope(q), rope(k)
            q, k, v = (x.unflatten(0, (nseg, n)).transpose(1, 2) for x in (q, k, v))
            return flex(q, k, v).transpose(1, 2).flatten(0, 1)
    elif c.packed:  # one long sequence, attention within documents (the mask is built densely: small T only)
        total = c.q.shape[0]
        doc = torch.repeat_interleave(torch.arange(len(c.lens), device=dev), torch.tensor(c.lens, device=dev))

        def mask_mod(b, h, qi, ki):
            return doc[qi] == doc[ki]

        block_mask = create_block_mask(mask_mod, 1, None, total, total, device=dev)

        def run(q=c.q, k=c.k, v=c.v):
            q, k = rope(q), rope(k)
            q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
            return flex(q, k, v, block_mask=block_mask)[0].transpose(0, 1)
    else:
        b, length = c.mask.shape
        key_ok = c.mask

        def mask_mod(bi, h, qi, ki):
            return key_ok[bi, ki]

        block_mask = create_block_mask(mask_mod, b, None, length, length, device=dev)

        def run(q=c.q, k=c.k, v=c.v):
            q, k = rope(q), rope(k)
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            return flex(q, k, v, block_mask=block_mask).transpose(1, 2)
    return run


def prov_flash_attn(c):
    from flash_attn import flash_attn_varlen_func
    from flash_attn.layers.rotary import apply_rotary_emb

    coords, freqs = c.kw["coords"], c.kw["freqs"]
    interleaved = c.kw["rope_layout"] == "interleaved"
    lmax = max(c.lens)
    # flash-attn's rotary takes cos/sin per position within a sequence: every sequence here has the
    # same coordinates at the same position, so the first sequence's table serves all.
    pos_coords = coords[:lmax] if c.packed else coords[0, :lmax]
    ang = (pos_coords.float()[:, :, None] * freqs[None]).sum(1)  # (lmax, D/2)
    cos, sin = ang.cos(), ang.sin()
    dev = c.q.device
    cu = torch.tensor([0, *torch.tensor(c.lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    if c.packed:
        q, k, v = c.q, c.k, c.v
    else:  # flash-attn is varlen-only here: the padded inputs are packed once, outside the timing
        q, k, v = c.q[c.mask], c.k[c.mask], c.v[c.mask]
    try:
        apply_rotary_emb(q[:1].unsqueeze(0), cos[:1], sin[:1], interleaved=interleaved)
    except Exception:  # noqa: BLE001  (older versions want cos/sin in x's dtype)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def run():
        qr = apply_rotary_emb(q, cos, sin, interleaved=interleaved, cu_seqlens=cu, max_seqlen=lmax)
        kr = apply_rotary_emb(k, cos, sin, interleaved=interleaved, cu_seqlens=cu, max_seqlen=lmax)
        return flash_attn_varlen_func(qr, kr, v, cu, cu, lmax, lmax)

    def real(out):
        return out

    run.real = real  # already packed real tokens
    return run
