"""rope_attention: the fused Triton kernel against the PyTorch reference, in every mode and every way of
rotating K. (The reference against a naive definition and the argument checks:
test_rope_attention_args.py; modes, tuning, 64-bit offsets, torch.compile: test_rope_attention_launch.py.)

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (float32 and float16; the
interpreter's bf16 dot is wrong); on a CUDA machine the same tests run the compiled kernel, and the
``gpu`` tests add bf16. Outputs are poisoned with NaN before each kernel launch, so a row the kernel
forgets to write cannot pass.
"""
from __future__ import annotations

import pytest
import torch

from pevideo.rope import pe_core_rope_2d, rope_1d
from pevideo_kernels import (
    ROPE_K_MODES,
    apply_rope_ref,
    interpreting,
    rope_attention,
    rope_attention_qkvpacked,
    rope_attention_ref,
    rope_attention_unsupported_reason,
    rope_k_mode,
)
from pevideo_kernels.testing import interpreter_blocks, poison_outputs

from _rope_inputs import DEV, _coords, _cu, _freqs, _rand, padding_masks  # noqa: E402
ON_GPU = DEV == "cuda"

# (dtype, atol, rtol) of the kernel against the float32 reference on the same (rounded) inputs. On a GPU
# the kernel's cos/sin are the SFU's approximations (~5e-7 absolute), hence the looser float32 bound.
_F32_TOL = 5e-5 if ON_GPU else 2e-5
DTYPES = [
    pytest.param((torch.float32, _F32_TOL, _F32_TOL), id="fp32"),
    pytest.param((torch.float16, 3e-3, 3e-3), id="fp16"),
]
LAYOUTS = ["interleaved", "half"]
# RoPE tests run every way of rotating K (ROPE_K_MODES): the frame shape's default ("prerotate") in
# both dtypes, the other candidates in fp16 (which also checks their rounding to the input dtype);
# tests take ``rope_k, tol``. (The model's tests run the per-shape defaults in float32.)
FRAME_MODE = "prerotate"
ROPE_K_TOLS = [pytest.param(FRAME_MODE, t.values[0], id=f"{FRAME_MODE}-{t.id}") for t in DTYPES] + [
    pytest.param(m, DTYPES[1].values[0], id=f"{m}-{DTYPES[1].id}") for m in ROPE_K_MODES if m != FRAME_MODE
]


@pytest.fixture(autouse=True)
def _poison_and_blocks(request):
    # Small tiles under the interpreter: more query blocks, whole K tiles and a ragged last one even
    # for the short sequences these tests can afford. (A test may nest other blocks inside.)
    callspec = getattr(request.node, "callspec", None)
    mode = callspec.params.get("rope_k") if callspec else None  # (None: the per-shape default)
    with poison_outputs(), interpreter_blocks(16, 16), rope_k_mode(mode):
        yield


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _fused(q, k, v, **kw):
    """Public entry point, asserting that it takes the kernel path (not the reference fallback)."""
    assert rope_attention_unsupported_reason(
        q, k, v, coords=kw.get("coords"), freqs=kw.get("freqs"),
        key_padding_mask=kw.get("key_padding_mask"), cu_seqlens=kw.get("cu_seqlens"),
    ) is None
    return rope_attention(q, k, v, **kw)


def _ref32(q, k, v, **kw):
    return rope_attention_ref(q.float(), k.float(), v.float(), **kw)


def _check(out, ref, like, atol, rtol):
    assert out.shape == (*like.shape[:-1], like.shape[-1])
    assert out.dtype == like.dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "NaN/inf in the output: a row was not written (or 0/0)"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# packed (cu_seqlens)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "head_dim, coord_kind, heads, kv_heads",
    [(12, "int32", 2, 2), (16, "float", 3, 1), (64, "int64", 2, 1), (80, "float", 2, 2)],
)
def test_packed(seed, rope_k, tol, layout, head_dim, coord_kind, heads, kv_heads):
    dtype, atol, rtol = tol
    lens = [0, 1, 17, 0, 37]
    n = sum(lens)
    q = _rand(n, heads, head_dim, dtype=dtype)
    k = _rand(n, kv_heads, head_dim, dtype=dtype)
    v = _rand(n, kv_heads, head_dim, dtype=dtype)
    kw = dict(coords=_coords((n,), coord_kind), freqs=_freqs(head_dim), rope_layout=layout, cu_seqlens=_cu(lens))
    out = _fused(q, k, v, **kw)
    _check(out, _ref32(q, k, v, **kw), q, atol, rtol)
    if rope_k == FRAME_MODE:  # (rope_k does not matter without RoPE)
        # the same without RoPE, and with max_seqlen given (larger than needed: extra blocks must exit)
        kw2 = dict(cu_seqlens=_cu(lens), max_seqlen=50)
        _check(_fused(q, k, v, **kw2), _ref32(q, k, v, **kw2), q, atol, rtol)


@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
@interpreter_blocks(64, 64)
def test_packed_frame_length(seed, rope_k, tol):
    """A PE-like 577-token frame (1 CLS + 24x24 patches, PE-Core 2D RoPE) next to a ragged segment."""
    dtype, atol, rtol = tol
    d, heads = 16, 2
    coords, freqs = pe_core_rope_2d(24, 24, d, device=DEV)
    lens = [577, 33]
    n = sum(lens)
    coords = torch.cat([coords, coords[:33]])
    q, k, v = (_rand(n, heads, d, dtype=dtype) for _ in range(3))
    kw = dict(coords=coords, freqs=freqs, cu_seqlens=_cu(lens), max_seqlen=577)
    _check(_fused(q, k, v, **kw), _ref32(q, k, v, **kw), q, atol, rtol)


def test_packed_empty(seed):
    q = _rand(0, 2, 16, dtype=torch.float32)
    out = _fused(q, q, q, cu_seqlens=_cu([0, 0]))
    assert out.shape == (0, 2, 16)


# --------------------------------------------------------------------------------------------------
# padded (key_padding_mask) and full
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim, coord_kind, skip", [(16, "int32", False), (64, "float", False), (16, "float", True)])
def test_padded(seed, rope_k, tol, layout, head_dim, coord_kind, skip):
    dtype, atol, rtol = tol
    b, seq, heads = 5, 40, 2
    q, k, v = (_rand(b, seq, heads, head_dim, dtype=dtype) for _ in range(3))
    mask = padding_masks(b, seq)
    kw = dict(coords=_coords((b, seq), coord_kind), freqs=_freqs(head_dim), rope_layout=layout, key_padding_mask=mask,
              skip_padded_queries=skip)
    out = _fused(q, k, v, **kw)
    _check(out, _ref32(q, k, v, **kw), q, atol, rtol)
    assert (out[1] == 0).all(), "a row with no real key must be zeros"
    has_keys = mask.any(1)[:, None].expand_as(mask)
    if skip:
        assert (out[~mask] == 0).all(), "skip_padded_queries: padded query rows must be zeros"
    else:  # every query row with a real key is computed, padded ones included (as SDPA with a key mask)
        assert (out[~mask & has_keys].abs().sum(-1) > 0).all()
    assert (out[mask].abs().sum(-1) > 0).all()


def test_padded_rows_match_sdpa_key_mask(seed):
    """Default padded mode = SDPA with a key-padding mask, padded query rows included."""
    b, seq, heads, d = 5, 19, 2, 16
    q, k, v = (_rand(b, seq, heads, d, dtype=torch.float32) for _ in range(3))
    mask = padding_masks(b, seq)
    out = _fused(q, k, v, key_padding_mask=mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]
    ).transpose(1, 2)
    real = mask.any(1)
    torch.testing.assert_close(out[real], sdpa[real], atol=_F32_TOL, rtol=_F32_TOL)
    assert (out[~real] == 0).all()


@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
@pytest.mark.parametrize("skip", [False, True])
def test_padded_garbage_in_padding(seed, rope_k, tol, skip):
    """Padding tokens may hold anything, NaN included: real rows must not see it. With
    skip_padded_queries, padded query rows are not read at all (zeros out)."""
    dtype, atol, rtol = tol
    b, seq, heads, d = 5, 33, 2, 16
    q, k, v = (_rand(b, seq, heads, d, dtype=dtype) for _ in range(3))
    mask = padding_masks(b, seq)
    kw = dict(coords=_coords((b, seq), "int32"), freqs=_freqs(d), key_padding_mask=mask, skip_padded_queries=skip)
    ref = _ref32(q, k, v, **kw)
    for t in ((q, k, v) if skip else (k, v)):
        t[~mask] = float("nan")
    _check(_fused(q, k, v, **kw), ref, q, atol, rtol)


@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_full(seed, rope_k, tol, layout):
    dtype, atol, rtol = tol
    b, seq, heads, d = 2, 37, 2, 16
    q, k, v = (_rand(b, seq, heads, d, dtype=dtype) for _ in range(3))
    kw = dict(coords=_coords((b, seq), "float"), freqs=_freqs(d), rope_layout=layout)
    _check(_fused(q, k, v, **kw), _ref32(q, k, v, **kw), q, atol, rtol)
    _check(_fused(q, k, v), _ref32(q, k, v), q, atol, rtol)


# --------------------------------------------------------------------------------------------------
# strides, GQA, cross attention, scale
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_qkv_packed(seed, rope_k, tol, layout):
    """q, k, v as views of one (tokens, 3, heads, head_dim) projection output: no copies needed."""
    dtype, atol, rtol = tol
    lens, heads, d = [19, 0, 30], 2, 16
    n = sum(lens)
    qkv = _rand(n, 3, heads, d, dtype=dtype)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    kw = dict(coords=_coords((n,), "int32")[:, [2, 0, 1]], freqs=_freqs(d), rope_layout=layout, cu_seqlens=_cu(lens))
    out = _fused(q, k, v, **kw)
    _check(out, _ref32(q, k, v, **kw), q, atol, rtol)
    # the same as one packed tensor (flash-attn's qkvpacked form): the same launch, the same bits
    assert torch.equal(rope_attention_qkvpacked(qkv, **kw), out)


@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
def test_strided_qkv_padded(seed, rope_k, tol):
    dtype, atol, rtol = tol
    b, seq, heads, d = 5, 24, 2, 12
    qkv = _rand(b, seq, 3, heads, d, dtype=dtype)
    q, k, v = qkv.unbind(2)
    mask = padding_masks(b, seq)
    # coords and mask as strided views too
    coords = _coords((b, seq * 2), "float")[:, ::2]
    kw = dict(coords=coords, freqs=_freqs(d), key_padding_mask=mask, rope_layout="half")
    out = _fused(q, k, v, **kw)
    _check(out, _ref32(q, k, v, **kw), q, atol, rtol)
    assert torch.equal(rope_attention_qkvpacked(qkv, **kw), out)


@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_padded(seed, rope_k, tol, kv_heads):
    dtype, atol, rtol = tol
    b, seq, heads, d = 5, 21, 4, 16
    q = _rand(b, seq, heads, d, dtype=dtype)
    k, v = (_rand(b, seq, kv_heads, d, dtype=dtype) for _ in range(2))
    kw = dict(coords=_coords((b, seq), "int64"), freqs=_freqs(d), key_padding_mask=padding_masks(b, seq))
    _check(_fused(q, k, v, **kw), _ref32(q, k, v, **kw), q, atol, rtol)


@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("lq", [1, 3])
@interpreter_blocks(16, 64)
def test_cross_attention(seed, tol, with_mask, lq):
    """PE's attention pooling: one latent query per frame over a frame's 577 tokens, 8 heads."""
    dtype, atol, rtol = tol
    b, lk, heads, d = 3, 577, 8, 16
    q = _rand(b, lq, heads, d, dtype=dtype)
    k, v = (_rand(b, lk, heads, d, dtype=dtype) for _ in range(2))
    kw = {}
    if with_mask:
        mask = torch.ones(b, lk, dtype=torch.bool, device=DEV)
        mask[1] = False  # no real key: zeros
        mask[2, 100:] = False
        kw["key_padding_mask"] = mask
    out = _fused(q, k, v, scale=0.2, **kw)
    _check(out, _ref32(q, k, v, scale=0.2, **kw), q, atol, rtol)
    if with_mask:
        assert (out[1] == 0).all()


@pytest.mark.parametrize("rope_k, tol", ROPE_K_TOLS)
def test_scale_and_identity_rope(seed, rope_k, tol):
    """Given scale is used; all-zero coords are the identity (same as no RoPE)."""
    dtype, atol, rtol = tol
    lens, heads, d = [9, 26], 2, 16
    n = sum(lens)
    q, k, v = (_rand(n, heads, d, dtype=dtype) for _ in range(3))
    cu = _cu(lens)
    out = _fused(q, k, v, cu_seqlens=cu, scale=0.05)
    _check(out, _ref32(q, k, v, cu_seqlens=cu, scale=0.05), q, atol, rtol)
    assert not torch.allclose(out.float(), _ref32(q, k, v, cu_seqlens=cu), atol=atol, rtol=rtol)
    zero = torch.zeros(n, 3, dtype=torch.int32, device=DEV)
    same = _fused(q, k, v, coords=zero, freqs=_freqs(d), cu_seqlens=cu, scale=0.05)
    # (not bitwise: the RoPE path's dot runs over the pairs, not in head_dim order, for "half")
    torch.testing.assert_close(same, out, atol=atol / 10, rtol=rtol / 10)


@pytest.mark.skipif(ON_GPU, reason="replaces the interpreter's launch")
@pytest.mark.parametrize("rope_k", list(ROPE_K_MODES))
def test_rope_k_coords_shared_over_batch(seed, rope_k):
    """Coordinates expanded over the batch (stride 0, as one clip shape's coords are): "table" then
    computes one set of cos/sin rows for all batch rows; every candidate matches the reference."""
    b, seq, heads, d = 3, 21, 2, 16
    q, k, v = (_rand(b, seq, heads, d, dtype=torch.float16) for _ in range(3))
    coords = _coords((1, seq), "float").expand(b, seq, 3)
    mask = torch.ones(b, seq, dtype=torch.bool, device=DEV)
    mask[1, 15:] = False
    kw = dict(coords=coords, freqs=_freqs(d), key_padding_mask=mask, rope_layout="half")
    _check(_fused(q, k, v, **kw), _ref32(q, k, v, **kw), q, 3e-3, 3e-3)


@pytest.mark.parametrize("rope_k", ["prerotate", "table"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_prepass_scratch(seed, rope_k, layout):
    """The per-forward passes fill their scratch buffers as the kernel reads them: rotated K, pairs
    interleaved and rounded to K's dtype, zero past head_dim ("prerotate"); per-token cos and sin of
    float32 angles, cos 1 / sin 0 past head_dim / 2 ("table")."""
    from pevideo_kernels import _rope_attention_launch as ra

    n, heads, d = 37, 2, 12  # head_dim 12: 6 pairs in a 16-wide tile
    k = _rand(n, heads, d, dtype=torch.float16)
    coords, freqs = _coords((n,), "float"), _freqs(d)
    k2, c2, (kernel, grid, args, flags) = ra.rope_prepass(rope_k, k, coords, freqs, layout, _cu([n]))
    with poison_outputs(False):
        (k2 if rope_k == "prerotate" else c2).fill_(float("nan"))
        kernel[grid](*args, **flags)
    if rope_k == "prerotate":
        assert c2 is coords and k2.shape == (n, heads, 32) and k2.dtype == k.dtype
        rot = apply_rope_ref(k, coords, freqs, layout).float()
        pairs = (rot[..., 0::2], rot[..., 1::2]) if layout == "interleaved" else rot.chunk(2, -1)
        want = torch.zeros(n, heads, 16, 2, device=DEV)
        want[..., : d // 2, 0], want[..., : d // 2, 1] = pairs
        torch.testing.assert_close(k2.float(), want.flatten(-2), atol=1e-3, rtol=0)
    else:
        assert k2 is k and c2.shape == (n, 2, 16) and c2.dtype == torch.float32
        ang = (coords[:, :, None] * freqs[None]).sum(1)
        torch.testing.assert_close(c2[:, 0, : d // 2], ang.cos(), atol=1e-5, rtol=0)
        torch.testing.assert_close(c2[:, 1, : d // 2], ang.sin(), atol=1e-5, rtol=0)
        assert (c2[:, 0, d // 2:] == 1).all() and (c2[:, 1, d // 2:] == 0).all()



def test_poison_hook_shows_unwritten_outputs(seed, monkeypatch):
    """The testing hook the tests above rely on: with poison_outputs(), what the kernel skips is NaN."""
    from pevideo_kernels import _rope_attention_launch as tri

    class _WritesNothing:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tri, "rope_attn_fwd", _WritesNothing())
    q = _rand(1, 5, 2, 16, dtype=torch.float32)
    assert rope_attention(q, q, q).isnan().all()


@pytest.mark.skipif(not (ON_GPU or interpreting()), reason="the kernels can't run here")
def test_requires_grad_runs_fused_backward(seed):
    """Inputs requiring grad run the kernel with its fused backward; only coords or freqs requiring grad
    (the kernel path gives them no gradient) route to the reference, with a reason."""
    q = torch.randn(1, 5, 2, 16, device=DEV, requires_grad=True)
    assert rope_attention_unsupported_reason(q, q, q) is None
    out = rope_attention(q, q.detach(), q.detach())
    assert "RopeAttention" in type(out.grad_fn).__name__
    out.sum().backward()  # (an expanded, stride-0 incoming gradient)
    g = q.grad.clone()
    q.grad = None
    rope_attention_ref(q, q.detach(), q.detach()).sum().backward()
    torch.testing.assert_close(g, q.grad, atol=_F32_TOL, rtol=_F32_TOL)

    coords = torch.randint(0, 5, (1, 5, 3), device=DEV).float()
    freqs = _freqs(16).requires_grad_()
    reason = rope_attention_unsupported_reason(q, q, q, coords=coords, freqs=freqs)
    assert reason is not None and "freqs require grad" in reason
    rope_attention(q, q, q, coords=coords, freqs=freqs).sum().backward()
    assert freqs.grad is not None and freqs.grad.abs().sum() > 0  # the reference gives freqs their gradient
    with torch.no_grad():
        assert rope_attention_unsupported_reason(q, q, q, coords=coords, freqs=freqs) is None
    # no double backward through the fused op: it raises rather than give a wrong second derivative
    w = torch.randn(1, 5, 2, 16, device=DEV, requires_grad=True)
    (g,) = torch.autograd.grad((rope_attention(q, q, q) * w).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()



@pytest.mark.skipif(not interpreting(), reason="only the interpreter is probed")
def test_an_interpreter_that_cannot_run_the_kernels_routes_to_the_reference(seed, monkeypatch):
    """Triton 3.6's interpreter fails on NumPy >= 2.4; the probe's reason, not an InterpreterError, reaches
    the caller, and the reference's output comes back. Where this environment's interpreter works (CI
    pins NumPy below 2.4 for Triton 3.6), the probe says so, so the other tests really ran the kernels."""
    from pevideo_kernels import _triton

    assert _triton.interpreter_reason() is None
    broken = "Triton 3.6.0's interpreter with NumPy 2.5.5 cannot run the kernels (...)"
    monkeypatch.setattr(_triton, "_INTERPRETER_REASON", [broken])
    q, k, v = (_rand(2, 9, 2, 16, dtype=torch.float32) for _ in range(3))
    assert rope_attention_unsupported_reason(q, k, v) == broken
    torch.testing.assert_close(rope_attention(q, k, v), rope_attention_ref(q, k, v), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# bf16 on a GPU: the kernel's error against float32 within 2x of PyTorch's own bf16 error
# --------------------------------------------------------------------------------------------------
def _errors(out, ref32):
    diff = (out.float() - ref32).abs()
    return diff.max().item(), diff.pow(2).mean().sqrt().item()


def _bf16_case(name):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    if name == "frames":  # PE-L frames: 577 tokens, 16 heads, head_dim 64, packed, 2D RoPE
        coords, freqs = pe_core_rope_2d(24, 24, 64, device="cuda")
        f = 8
        q, k, v = r(f * 577, 16, 64), r(f * 577, 16, 64), r(f * 577, 16, 64)
        return (q, k, v), dict(coords=coords.repeat(f, 1), freqs=freqs, cu_seqlens=_cu([577] * f), max_seqlen=577)
    if name == "temporal":  # up to 17 tokens per clip, 14 heads, head_dim 128, padded, 1D RoPE (half)
        b, seq = 16, 17
        coords, freqs = rope_1d(seq, 128, device="cuda")
        lens = torch.randint(1, seq + 1, (b,), generator=g, device="cuda")
        mask = torch.arange(seq, device="cuda")[None] < lens[:, None]
        return (r(b, seq, 14, 128), r(b, seq, 14, 128), r(b, seq, 14, 128)), dict(
            coords=coords.expand(b, seq, 3), freqs=freqs, rope_layout="half", key_padding_mask=mask)
    if name == "pooling":  # one latent query over 577 tokens, 8 heads
        return (r(8, 1, 8, 128), r(8, 577, 8, 128), r(8, 577, 8, 128)), {}
    if name == "gqa_nonprefix":
        b, seq = 4, 300
        mask = torch.rand(b, seq, device="cuda", generator=g) < 0.7
        return (r(b, seq, 8, 80), r(b, seq, 2, 80), r(b, seq, 2, 80)), dict(
            coords=torch.randint(0, 50, (b, seq, 3), device="cuda", generator=g, dtype=torch.int32),
            freqs=_freqs(80), key_padding_mask=mask)
    raise AssertionError(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["frames", "temporal", "pooling", "gqa_nonprefix"])
def test_bf16_error_within_2x_of_pytorch(name):
    (q, k, v), kw = _bf16_case(name)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref32 = rope_attention_ref(qb.float(), kb.float(), vb.float(), **kw)
    fused = _fused(qb, kb, vb, **kw)
    torch_bf16 = rope_attention_ref(qb, kb, vb, **kw)
    assert torch.isfinite(fused).all()
    fmax, frms = _errors(fused, ref32)
    tmax, trms = _errors(torch_bf16, ref32)
    assert frms <= 2 * trms + 1e-6, (frms, trms)
    assert fmax <= 2 * tmax + 1e-6, (fmax, tmax)
