"""rope_attention's backward kernels against autograd through ``rope_attention_ref``.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (float32 and float16). Every
gradient buffer is filled with NaN before the launch, so a row the kernels forget cannot pass; the
inputs at padding positions (and the saved log-sum-exp of rows the forward does not compute) are NaN
too, so a kernel that reads them cannot pass either.
"""
from __future__ import annotations

import pytest
import torch

from pevideo.rope import pe_core_rope_2d
from pevideo_kernels import rope_attention, rope_attention_qkvpacked, rope_attention_ref
from pevideo_kernels.rope_attention_bwd import rope_attention_bwd, rope_attention_lse_ref
from pevideo_kernels.testing import interpreter_blocks, poison_outputs

from _rope_inputs import DEV, _coords, _cu, _freqs, _rand  # noqa: E402
ON_GPU = DEV == "cuda"

# (dtype, atol, rtol) of the kernel's gradients against float32 autograd through the reference on
# the same (rounded) inputs. float16: rotated q/k, p and dS are rounded to float16 before their dots.
_F32_TOL = 2e-4 if ON_GPU else 5e-5
DTYPES = [
    pytest.param((torch.float32, _F32_TOL, _F32_TOL), id="fp32"),
    pytest.param((torch.float16, 1e-2, 1e-2), id="fp16"),
]
LAYOUTS = ["interleaved", "half"]
# Small tiles under the interpreter: several query/key blocks and ragged last ones on short inputs.
BLOCKS = dict(block_m=16, block_n=16)


def _nan_like(t):
    return torch.full_like(t, float("nan"))


def _ref_grads(q, k, v, dout, **kw):
    """float32 autograd through the reference: (out in q's dtype, dq, dk, dv)."""
    qq, kk, vv = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = rope_attention_ref(qq, kk, vv, **kw)
    out.backward(dout.float())
    return out.detach().to(q.dtype), qq.grad, kk.grad, vv.grad


def _lse(q, k, kw):
    keys = ("coords", "freqs", "rope_layout", "cu_seqlens", "key_padding_mask", "scale")
    return rope_attention_lse_ref(q, k, **{n: kw[n] for n in keys if n in kw})


def _run(q, k, v, *, tol, dead_q=None, dead_k=None, **kw):
    """Gradients through autograd of :func:`rope_attention` (the forward kernel storing the log-sum-exp,
    then the fused backward) against the reference's. ``dead_q`` (q.shape[:-1] bool): rows whose gradient
    must be zero and whose inputs are never needed; ``dead_k`` (k.shape[:-1] bool): padding keys. Both
    are NaN in the kernel's inputs (and ``dead_q`` rows in the incoming gradient); every output and
    gradient buffer starts as NaN (poison_outputs)."""
    _, atol, rtol = tol
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=DEV).to(q.dtype)
    out, gq, gk, gv = _ref_grads(q, k, v, dout, **kw)
    qk, kk, vk, dk_out = q.clone(), k.clone(), v.clone(), dout.clone()
    if dead_q is not None:
        qk[dead_q] = float("nan")
        dk_out[dead_q] = float("nan")
    if dead_k is not None:
        kk[dead_k] = float("nan")
        vk[dead_k] = float("nan")
    qk, kk, vk = (t.requires_grad_() for t in (qk, kk, vk))
    with poison_outputs(), interpreter_blocks(16, 16):
        got_out = rope_attention(qk, kk, vk, **kw)
        assert got_out.grad_fn is not None and "RopeAttention" in type(got_out.grad_fn).__name__
        got_out.backward(dk_out)
    live = None if dead_q is None else ~dead_q
    o = got_out.detach()
    torch.testing.assert_close(o if live is None else o[live], out if live is None else out[live],
                               atol=atol, rtol=rtol, msg=lambda m: f"out: {m}")
    dq, dk, dv = qk.grad, kk.grad, vk.grad
    for name, got, want in (("dq", dq, gq), ("dk", dk, gk), ("dv", dv, gv)):
        assert torch.isfinite(got).all(), f"NaN/inf in {name}: a row was not written, or padding was read"
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if dead_q is not None:
        assert (dq[dead_q] == 0).all()
    if dead_k is not None:
        assert (dk[dead_k] == 0).all() and (dv[dead_k] == 0).all()
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# packed (cu_seqlens)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "head_dim, coord_kind, heads, kv_heads", [(12, "int32", 2, 2), (16, "float", 4, 2), (80, "int64", 2, 1)]
)
def test_packed(seed, tol, layout, head_dim, coord_kind, heads, kv_heads):
    dtype = tol[0]
    lens = [0, 1, 17, 0, 37]  # empty segments, a single token, ragged lengths
    n = sum(lens)
    q = _rand(n, heads, head_dim, dtype=dtype)
    k, v = (_rand(n, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    kw = dict(coords=_coords((n,), coord_kind), freqs=_freqs(head_dim), rope_layout=layout, cu_seqlens=_cu(lens))
    _run(q, k, v, tol=tol, **kw)


def test_packed_no_rope_and_max_seqlen(seed):
    """Without RoPE, with a max_seqlen above the longest segment (extra blocks must exit)."""
    lens = [5, 0, 37, 16]
    n = sum(lens)
    q, k, v = (_rand(n, 2, 24, dtype=torch.float32) for _ in range(3))
    _run(q, k, v, tol=DTYPES[0].values[0], cu_seqlens=_cu(lens), max_seqlen=50, scale=0.3)


def test_packed_frame_coords(seed):
    """PE-Core 2D RoPE coordinates (class token at the origin) on two equal frames and a short one."""
    d, heads = 16, 2
    coords, freqs = pe_core_rope_2d(4, 5, d, device=DEV)  # 21 tokens per frame
    lens = [21, 21, 9]
    coords = torch.cat([coords, coords, coords[:9]])
    n = sum(lens)
    q, k, v = (_rand(n, heads, d, dtype=torch.float32) for _ in range(3))
    _run(q, k, v, tol=DTYPES[0].values[0], coords=coords, freqs=freqs, cu_seqlens=_cu(lens), max_seqlen=21)


# --------------------------------------------------------------------------------------------------
# padded (key_padding_mask) and full
# --------------------------------------------------------------------------------------------------
def _masks(b, seq):
    """Row 0: prefix of real tokens; row 1: all padding; row 2: random, not one run; row 3: a run in the
    middle; row 4: all real."""
    m = torch.zeros(b, seq, dtype=torch.bool)
    m[0, :13] = True
    m[2] = torch.rand(seq) < 0.5
    m[2, 0] = False
    m[2, 5] = True
    m[3, 17:30] = True
    m[4] = True
    return m.to(DEV)


@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("skip", [False, True])
def test_padded(seed, tol, layout, skip):
    dtype = tol[0]
    b, seq, heads, d = 5, 37, 2, 16
    q, k, v = (_rand(b, seq, heads, d, dtype=dtype) for _ in range(3))
    mask = _masks(b, seq)
    kw = dict(coords=_coords((b, seq), "float"), freqs=_freqs(d), rope_layout=layout, key_padding_mask=mask,
              skip_padded_queries=skip)
    no_key = ~mask.any(1)[:, None].expand_as(mask)
    dead_rows = (~mask | no_key) if skip else no_key  # no real key, or padded and skipped
    dq, _, _ = _run(q, k, v, tol=tol, dead_q=dead_rows[..., None].expand(b, seq, heads),
                    dead_k=(~mask)[..., None].expand(b, seq, heads), **kw)
    if not skip:  # padded query rows of a clip with real keys attend to them, as SDPA with a key mask
        assert (dq[~mask & ~no_key].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("tol", DTYPES)
def test_padded_gqa_head_dim_80(seed, tol):
    dtype = tol[0]
    b, seq, d = 5, 33, 80
    q = _rand(b, seq, 4, d, dtype=dtype)
    k, v = (_rand(b, seq, 1, d, dtype=dtype) for _ in range(2))
    mask = _masks(b, seq)
    kw = dict(coords=_coords((b, seq), "int32"), freqs=_freqs(d), key_padding_mask=mask)
    no_key = ~mask.any(1)[:, None, None].expand(b, seq, 4)
    _run(q, k, v, tol=tol, dead_q=no_key, dead_k=(~mask)[..., None], **kw)


@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_full(seed, tol, layout):
    dtype = tol[0]
    b, seq, heads, d = 2, 35, 3, 12
    q, k, v = (_rand(b, seq, heads, d, dtype=dtype) for _ in range(3))
    _run(q, k, v, tol=tol, coords=_coords((b, seq), "int64"), freqs=_freqs(d), rope_layout=layout)


def test_head_dim_256(seed):
    b, seq, d = 2, 18, 256
    q, k, v = (_rand(b, seq, 1, d, dtype=torch.float32) for _ in range(3))
    mask = torch.ones(b, seq, dtype=torch.bool, device=DEV)
    mask[1, 11:] = False
    _run(q, k, v, tol=DTYPES[0].values[0], coords=_coords((b, seq), "float"), freqs=_freqs(d), rope_layout="half",
         key_padding_mask=mask, skip_padded_queries=True, dead_q=(~mask)[..., None], dead_k=(~mask)[..., None])


@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("lq, lk, with_mask", [(7, 29, False), (7, 29, True), (7, 5, True), (1, 29, True)])
def test_cross_attention(seed, tol, lq, lk, with_mask):
    """Queries and keys of different lengths, no RoPE (e.g. attention pooling), GQA."""
    dtype = tol[0]
    b, d = 5, 16
    q = _rand(b, lq, 4, d, dtype=dtype)
    k, v = (_rand(b, lk, 2, d, dtype=dtype) for _ in range(2))
    kw = {}
    dead_q = dead_k = None
    if with_mask:
        mask = _masks(b, 37)[:, :lk].clone()
        mask[4, 0] = True
        kw["key_padding_mask"] = mask
        dead_q = ~mask.any(1)[:, None, None].expand(b, lq, 4)
        dead_k = (~mask)[..., None].expand(b, lk, 2)
    _run(q, k, v, tol=tol, dead_q=dead_q, dead_k=dead_k, **kw)


# --------------------------------------------------------------------------------------------------
# strided views: gradients straight into one qkv-shaped buffer
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tol", DTYPES)
def test_fused_qkv_padded(seed, tol):
    """q, k, v as views of one (B, L, 3, H, D) tensor; dq, dk, dv as views of one NaN-filled buffer of
    that shape: together they must equal the gradient of the fused tensor."""
    dtype, atol, rtol = tol
    b, seq, heads, d = 3, 21, 2, 16
    qkv = _rand(b, seq, 3, heads, d, dtype=dtype)
    mask = torch.ones(b, seq, dtype=torch.bool, device=DEV)
    mask[1, 15:] = False
    kw = dict(coords=_coords((b, seq), "int32"), freqs=_freqs(d), key_padding_mask=mask)
    dout = _rand(b, seq, 2 * heads, d, dtype=dtype)[:, :, ::2]  # a strided incoming gradient
    ref = qkv.detach().float().requires_grad_()
    out = rope_attention_ref(*ref.unbind(2), **kw)
    out.backward(dout.float())
    q, k, v = qkv.unbind(2)
    assert q.stride(1) == 3 * heads * d  # genuinely strided views
    dqkv = _nan_like(qkv)
    rope_attention_bwd(dout, q, k, v, out.detach().to(dtype), _lse(q, k, kw), dq=dqkv[:, :, 0], dk=dqkv[:, :, 1],
                       dv=dqkv[:, :, 2], **kw, **BLOCKS)
    assert torch.isfinite(dqkv).all()
    torch.testing.assert_close(dqkv.float(), ref.grad, atol=atol, rtol=rtol)


def test_fused_qkv_packed_gqa(seed):
    """Packed (tokens, Hq + 2 Hkv, D) fused projection split into GQA q, k, v views; half layout."""
    tol = DTYPES[0].values[0]
    _, atol, rtol = tol
    lens = [19, 0, 14]
    n, hq, hkv, d = sum(lens), 4, 2, 12
    qkv = _rand(n, hq + 2 * hkv, d, dtype=torch.float32)
    kw = dict(coords=_coords((n,), "float"), freqs=_freqs(d), rope_layout="half", cu_seqlens=_cu(lens))
    dout = _rand(n, hq, d, dtype=torch.float32)
    ref = qkv.detach().requires_grad_()
    out = rope_attention_ref(*ref.split([hq, hkv, hkv], dim=1), **kw)
    out.backward(dout)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    dqkv = _nan_like(qkv)
    dq, dk, dv = dqkv.split([hq, hkv, hkv], dim=1)
    rope_attention_bwd(dout, q, k, v, out.detach(), _lse(q, k, kw), dq=dq, dk=dk, dv=dv, **kw, **BLOCKS)
    assert torch.isfinite(dqkv).all()
    torch.testing.assert_close(dqkv, ref.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_fused_qkv_autograd_one_buffer(seed, tol, mode):
    """q, k, v packed in one qkv tensor (the model's projection output) through rope_attention_qkvpacked:
    autograd gets its gradient as one qkv-shaped buffer (the op's input is the packed tensor itself, not
    three views whose gradients autograd would zero-fill and sum), equal to the reference's."""
    dtype, atol, rtol = tol
    heads, d = 2, 16
    if mode == "packed":
        lens = [9, 0, 20]
        n = sum(lens)
        x = _rand(n, 3 * heads * d, dtype=dtype)
        kw = dict(coords=_coords((n,), "int32"), freqs=_freqs(d), cu_seqlens=_cu(lens))

        def pack(t):
            return t.view(n, 3, heads, d)
    else:
        b, seq = 3, 21
        x = _rand(b, seq, 3, heads, d, dtype=dtype)
        mask = torch.ones(b, seq, dtype=torch.bool, device=DEV)
        mask[1, 15:] = False
        kw = dict(coords=_coords((b, seq), "float"), freqs=_freqs(d), rope_layout="half", key_padding_mask=mask)

        def pack(t):
            return t
    ref = x.detach().float().requires_grad_()
    dout = _rand(*pack(x).unbind(-3)[0].shape, dtype=dtype)
    rope_attention_ref(*pack(ref).unbind(-3), **kw).backward(dout.float())
    leaf = x.detach().clone().requires_grad_()
    base = leaf * 1.0  # a non-leaf projection output, as in the model
    with poison_outputs(), interpreter_blocks(16, 16):
        out = rope_attention_qkvpacked(pack(base), **kw)
        # the op's one differentiable input is the packed tensor (``base`` or a view of it), not q, k, v
        (first, _), *rest = out.grad_fn.next_functions
        assert all(f is None for f, _ in rest)
        assert first is base.grad_fn or first.next_functions[0][0] is base.grad_fn
        out.backward(dout)
    assert torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(leaf.grad.float(), ref.grad, atol=atol, rtol=rtol)


def test_allocates_when_no_buffers(seed):
    b, seq, heads, d = 2, 17, 2, 8
    q, k, v = (_rand(b, seq, heads, d, dtype=torch.float32) for _ in range(3))
    kw = dict(coords=_coords((b, seq), "int32"), freqs=_freqs(d))
    dout = _rand(b, seq, heads, d, dtype=torch.float32)
    out, gq, gk, gv = _ref_grads(q, k, v, dout, **kw)
    with poison_outputs(), interpreter_blocks(16, 32):  # allocated buffers start as NaN
        dq, dk, dv = rope_attention_bwd(dout, q, k, v, out, _lse(q, k, kw), **kw)
    for got, want in ((dq, gq), (dk, gk), (dv, gv)):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=_F32_TOL, rtol=_F32_TOL)


def test_empty_inputs(seed):
    q = _rand(0, 2, 16, dtype=torch.float32)
    lse = torch.zeros(0, 2)
    dq, dk, dv = rope_attention_bwd(q, q, q, q, q, lse, cu_seqlens=_cu([0, 0]))
    assert dq.shape == dk.shape == dv.shape == (0, 2, 16)
    # keys of length 0 (cross attention): nothing attends, every gradient is zero
    q = _rand(2, 3, 2, 16, dtype=torch.float32)
    k = _rand(2, 0, 2, 16, dtype=torch.float32)
    dq, dk, dv = rope_attention_bwd(q, q, k, k, q, torch.zeros(2, 3, 2), dq=_nan_like(q))
    assert (dq == 0).all() and dk.shape == (2, 0, 2, 16)


# --------------------------------------------------------------------------------------------------
# the reference itself, and the log-sum-exp helper
# --------------------------------------------------------------------------------------------------
def test_reference_gradcheck(seed):
    """Pin the reference's gradients (what the kernels are checked against) by finite differences.

    The reference rotates in float32 whatever the input dtype (as the kernel does), so the RoPE cases
    take a finite-difference step well above float32 rounding; attention alone is checked at float64's
    default step."""
    d = 8
    dt = dict(dtype=torch.float64, device=DEV)
    freqs = _freqs(d)
    lens = [3, 0, 4]
    n = sum(lens)
    q, k, v = (torch.randn(n, 2, d, **dt, requires_grad=True) for _ in range(3))
    kw = dict(cu_seqlens=_cu(lens))
    assert torch.autograd.gradcheck(lambda a, b, c: rope_attention_ref(a, b, c, **kw), (q, k, v))
    kw = dict(coords=_coords((n,), "float", hi=5), freqs=freqs, cu_seqlens=_cu(lens))
    assert torch.autograd.gradcheck(lambda a, b, c: rope_attention_ref(a, b, c, **kw), (q, k, v),
                                    eps=1e-3, atol=1e-3, rtol=1e-3)
    mask = torch.tensor([[True, False, True, True], [False] * 4], device=DEV)
    q, k, v = (torch.randn(2, 4, 1, d, **dt, requires_grad=True) for _ in range(3))
    kw = dict(coords=_coords((2, 4), "int32", hi=5), freqs=freqs, rope_layout="half", key_padding_mask=mask,
              skip_padded_queries=True)
    assert torch.autograd.gradcheck(lambda a, b, c: rope_attention_ref(a, b, c, **kw), (q, k, v),
                                    eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["packed", "padded_skip", "cross"])
def test_forward_stores_lse(seed, mode):
    """The training forward's log-sum-exp (what the backward reads) equals the helper's on every row the
    forward computes; the inference forward's output is the same."""
    from pevideo_kernels import ROPE_ATTENTION, ROPE_K_MODES, attn_args
    from pevideo_kernels._rope_attention_autograd import fwd_lse_op, fwd_op

    if mode == "packed":
        lens = [0, 5, 21, 0, 9]
        n = sum(lens)
        q, k, v = _rand(n, 4, 16, dtype=torch.float32), _rand(n, 2, 16, dtype=torch.float32), _rand(n, 2, 16, dtype=torch.float32)
        kw = dict(coords=_coords((n,), "int32"), freqs=_freqs(16), cu_seqlens=_cu(lens))
        live = torch.ones(n, 4, dtype=torch.bool, device=DEV)
    elif mode == "padded_skip":
        b, seq = 5, 37
        q, k, v = (_rand(b, seq, 2, 12, dtype=torch.float32) for _ in range(3))
        mask = _masks(b, seq)
        kw = dict(coords=_coords((b, seq), "float"), freqs=_freqs(12), rope_layout="half", key_padding_mask=mask,
                  skip_padded_queries=True)
        live = (mask & mask.any(1, keepdim=True))[..., None].expand(b, seq, 2)
    else:
        q = _rand(5, 3, 2, 16, dtype=torch.float32)
        k, v = _rand(5, 29, 1, 16, dtype=torch.float32), _rand(5, 29, 1, 16, dtype=torch.float32)
        mask = _masks(5, 37)[:, :29]
        kw = dict(key_padding_mask=mask, scale=0.3)
        live = mask.any(1)[:, None, None].expand(5, 3, 2)
    modes = list(ROPE_K_MODES) if "coords" in kw else ["loop"]  # every way the forward may rotate K
    for mode in modes:
        args = ROPE_ATTENTION.resolve(q, k, v, attn_args(**kw, rope_k=mode)).args.op_args()
        with poison_outputs(), interpreter_blocks(16, 16):
            out, lse = fwd_lse_op(q, k, v, *args)
            out_inf = fwd_op(q, k, v, *args)
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
        torch.testing.assert_close(lse[live], _lse(q, k, kw)[live], atol=1e-5, rtol=1e-5, msg=lambda m: f"{mode}: {m}")
        assert torch.equal(out, out_inf), mode
        torch.testing.assert_close(out, rope_attention_ref(q, k, v, **kw), atol=1e-5, rtol=1e-5)


def test_lse_ref_matches_softmax(seed):
    """exp(scores - lse) of the helper sums to 1 over the real keys and reproduces the reference output."""
    b, seq, heads, d = 2, 9, 2, 8
    q, k, v = (torch.randn(b, seq, heads, d, device=DEV) for _ in range(3))
    mask = torch.ones(b, seq, dtype=torch.bool, device=DEV)
    mask[0, 6:] = False
    kw = dict(coords=_coords((b, seq), "int32"), freqs=_freqs(d), key_padding_mask=mask, scale=0.7)
    lse = _lse(q, k, kw)
    from pevideo_kernels import apply_rope_ref

    qr, kr = apply_rope_ref(q, kw["coords"], kw["freqs"]), apply_rope_ref(k, kw["coords"], kw["freqs"])
    s = torch.einsum("blhd,bmhd->blhm", qr, kr) * 0.7
    p = torch.exp(s - lse[..., None]).masked_fill(~mask[:, None, None, :], 0)
    torch.testing.assert_close(p.sum(-1), torch.ones_like(lse))
    torch.testing.assert_close(torch.einsum("blhm,bmhd->blhd", p, v), rope_attention_ref(q, k, v, **kw))


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def test_bad_arguments(seed):
    q = _rand(2, 5, 2, 16, dtype=torch.float32)
    lse = torch.zeros(2, 5, 2)
    with pytest.raises(ValueError, match="lse must be a float32"):
        rope_attention_bwd(q, q, q, q, q, lse.half())
    with pytest.raises(ValueError, match="lse must be a float32"):
        rope_attention_bwd(q, q, q, q, q, lse[:, :4])
    with pytest.raises(ValueError, match="dout must have shape"):
        rope_attention_bwd(q[:, :4], q, q, q, q, lse)
    with pytest.raises(ValueError, match="out has dtype"):
        rope_attention_bwd(q, q, q, q, q.half(), lse)
    with pytest.raises(ValueError, match="dk must be"):
        rope_attention_bwd(q, q, q, q, q, lse, dk=torch.empty(2, 5, 1, 16))
    with pytest.raises(ValueError, match="dq must have a contiguous last"):
        rope_attention_bwd(q, q, q, q, q, lse, dq=torch.empty(2, 5, 16, 2).transpose(-1, -2))
    with pytest.raises(ValueError, match="block sizes"):
        rope_attention_bwd(q, q, q, q, q, lse, block_m=24)
    with pytest.raises(ValueError, match="skip_padded_queries"):  # the forward's own checks apply
        rope_attention_bwd(q, q, q, q, q, lse, skip_padded_queries=True)


# --------------------------------------------------------------------------------------------------
# bf16 on a GPU (the interpreter's bf16 dot is wrong): error within 2x of PyTorch's own bf16 backward
# --------------------------------------------------------------------------------------------------
def _bf16_case(name):
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    if name == "frames":
        n, L, d = 4, 577, 64
        coords, freqs = pe_core_rope_2d(24, 24, d, device="cuda")
        cu = torch.arange(n + 1, dtype=torch.int32, device="cuda") * L
        return (r(n * L, 8, d), r(n * L, 8, d), r(n * L, 8, d)), dict(
            coords=coords.repeat(n, 1), freqs=freqs, cu_seqlens=cu, max_seqlen=L)
    b, seq = 4, 300
    mask = torch.rand(b, seq, device="cuda", generator=g) < 0.7
    return (r(b, seq, 8, 80), r(b, seq, 2, 80), r(b, seq, 2, 80)), dict(
        coords=torch.randint(0, 50, (b, seq, 3), device="cuda", generator=g, dtype=torch.int32),
        freqs=_freqs(80), rope_layout="half", key_padding_mask=mask, skip_padded_queries=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["frames", "gqa_padded"])
def test_bf16_grad_error_within_2x_of_pytorch(name):
    (q, k, v), kw = _bf16_case(name)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device="cuda").bfloat16()
    out, *ref32 = _ref_grads(qb, kb, vb, dout, **kw)
    bq, bk, bv = (t.detach().clone().requires_grad_() for t in (qb, kb, vb))
    rope_attention_ref(bq, bk, bv, **kw).backward(dout)
    lse = _lse(qb, kb, kw)
    fused = rope_attention_bwd(dout, qb, kb, vb, out, lse, **kw)
    for got, torch_bf16, want in zip(fused, (bq.grad, bk.grad, bv.grad), ref32):
        assert torch.isfinite(got).all()
        f_err, t_err = (got.float() - want), (torch_bf16.float() - want)
        assert f_err.pow(2).mean().sqrt() <= 2 * t_err.pow(2).mean().sqrt() + 1e-6
        assert f_err.abs().max() <= 2 * t_err.abs().max() + 1e-6


# --------------------------------------------------------------------------------------------------
# the benchmark's --backward path (CPU smoke: gradients and memory saved for the backward)
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(ON_GPU, reason="the CPU smoke path (on a GPU the script times instead)")
def test_bench_backward_smoke(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_rope_attention.py")
    spec = importlib.util.spec_from_file_location("bench_rope_attention_smoke", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--backward", "--smoke"]) == 0
    text = capsys.readouterr().out
    assert "smoke: ok" in text and "tower training step" in text
    mem = bench.tower_step_memory("cpu", frames=2)
    assert mem["fast_report"]["frame_attention"] == "fused"
    assert mem["attention_fast_mb"] < mem["attention_eager_mb"] and mem["fast_mb"] < mem["eager_mb"]
