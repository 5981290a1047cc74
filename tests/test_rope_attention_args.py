"""rope_attention's arguments: the reference against a naive float64 definition, every argument check,
the packed (cu_seqlens) contract and its debug checks, and the one resolved record per call that the
autograd context keeps (the backward checks nothing again).
"""
from __future__ import annotations

import pytest
import torch

from pevideo.rope import pe_core_rope_2d, rope_1d
from pevideo_kernels import (
    apply_rope_ref,
    attn_args,
    debug_checks,
    rope_attention,
    rope_attention_qkvpacked,
    rope_attention_ref,
)
from pevideo_kernels.testing import interpreter_blocks, poison_outputs

from _rope_inputs import DEV, _coords, _cu, _freqs, _rand, padding_masks  # noqa: E402
ON_GPU = DEV == "cuda"
LAYOUTS = ["interleaved", "half"]


# --------------------------------------------------------------------------------------------------
# the reference against a naive float64 definition
# --------------------------------------------------------------------------------------------------
def _rotate_naive(x, coords, freqs, layout):
    """x (L, H, D) float64: explicit 2x2 rotation per pair, angle computed in float32 as specified."""
    d = x.shape[-1]
    c = coords.to(torch.float32)
    out = x.clone()
    for j in range(d // 2):
        ang = c[:, 0] * freqs[0, j] + c[:, 1] * freqs[1, j] + c[:, 2] * freqs[2, j]  # float32
        a = ang.double()
        rot = torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)  # (L,2,2)
        i0, i1 = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, j + d // 2)
        pair = torch.stack([x[..., i0], x[..., i1]], -1)  # (L, H, 2)
        turned = torch.einsum("lij,lhj->lhi", rot, pair)
        out[..., i0], out[..., i1] = turned[..., 0], turned[..., 1]
    return out


def _attend_naive(q, k, v, scale, key_ok):
    """One sequence, float64: q (Lq, H, D), k/v (Lk, Hkv, D); rows with no real key are zeros."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = torch.zeros(q.shape, dtype=torch.float64)
    if not key_ok.any():
        return out
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s[..., key_ok]
    p = torch.softmax(s, -1)
    return torch.einsum("hqk,khd->qhd", p, v[key_ok])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_naive_packed(seed, layout):
    lens, heads, kvh, d = [3, 0, 11, 6], 4, 2, 12
    n = sum(lens)
    q = torch.randn(n, heads, d)
    k, v = torch.randn(2, n, kvh, d).unbind(0)
    coords, freqs = _coords((n,), "float").cpu(), _freqs(d).cpu()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ref = rope_attention_ref(q, k, v, coords=coords, freqs=freqs, rope_layout=layout, cu_seqlens=cu, scale=0.3)
    qr = _rotate_naive(q.double(), coords, freqs, layout)
    kr = _rotate_naive(k.double(), coords, freqs, layout)
    naive = torch.zeros(n, heads, d, dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            naive[a:b] = _attend_naive(qr[a:b], kr[a:b], v[a:b].double(), 0.3, torch.ones(b - a, dtype=torch.bool))
    torch.testing.assert_close(ref.double(), naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_naive_padded(seed, layout):
    b, seq, heads, d = 5, 30, 2, 16
    q, k, v = torch.randn(3, b, seq, heads, d).unbind(0)
    mask = padding_masks(b, seq).cpu()
    coords = _coords((b, seq), "int32").cpu()
    coords2d, freqs = pe_core_rope_2d(2, 3, d)  # real PE-Core frequencies this time
    ref = rope_attention_ref(q, k, v, coords=coords, freqs=freqs, rope_layout=layout, key_padding_mask=mask)
    skip = rope_attention_ref(q, k, v, coords=coords, freqs=freqs, rope_layout=layout, key_padding_mask=mask,
                              skip_padded_queries=True)
    for i in range(b):
        qr = _rotate_naive(q[i].double(), coords[i], freqs, layout)
        kr = _rotate_naive(k[i].double(), coords[i], freqs, layout)
        naive = _attend_naive(qr, kr, v[i].double(), d**-0.5, mask[i])  # every query row, keys masked
        torch.testing.assert_close(ref[i].double(), naive, atol=1e-5, rtol=1e-5)
        naive[~mask[i]] = 0
        torch.testing.assert_close(skip[i].double(), naive, atol=1e-5, rtol=1e-5)
    # cross attention (no RoPE): rows with no real key are zeros
    qc = torch.randn(b, 2, heads, d)
    refc = rope_attention_ref(qc, k, v, key_padding_mask=mask)
    for i in range(b):
        naive = _attend_naive(qc[i].double(), k[i].double(), v[i].double(), d**-0.5, mask[i])
        torch.testing.assert_close(refc[i].double(), naive, atol=1e-5, rtol=1e-5)


def test_rope_1d_is_standard_rope(seed):
    """rope_1d + 'half' layout is transformers' rotate_half RoPE."""
    d, n = 16, 7
    coords, freqs = rope_1d(n, d)
    x = torch.randn(n, 1, d)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(n).float()[:, None] * inv
    emb = torch.cat([ang, ang], -1)[:, None]
    rot_half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    want = x * emb.cos() + rot_half * emb.sin()
    torch.testing.assert_close(apply_rope_ref(x, coords, freqs, "half"), want, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _bad_cases():
    t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
    q3, q4 = t(10, 2, 16), t(2, 5, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    c3, f = torch.zeros(10, 3), torch.zeros(3, 8)
    m = torch.ones(2, 5, dtype=torch.bool)
    return [
        ("not a tensor", ([1.0], q3, q3), {}),
        ("int dtype", (t(10, 2, 16, dt=torch.int32),) * 3, {"cu_seqlens": cu}),
        ("float64", (t(10, 2, 16, dt=torch.float64),) * 3, {"cu_seqlens": cu}),
        ("dtype mismatch", (q3, q3.half(), q3), {"cu_seqlens": cu}),
        ("last dim strided", (t(10, 2, 32)[..., ::2], q3, q3), {"cu_seqlens": cu}),
        ("head_dim too small", (t(10, 2, 4),) * 3, {"cu_seqlens": cu}),
        ("head_dim too large", (t(1, 2, 2, 264),) * 3, {}),
        ("head_dim mismatch", (q3, t(10, 2, 8), t(10, 2, 8)), {"cu_seqlens": cu}),
        ("k/v shape mismatch", (q3, q3, t(10, 1, 16)), {"cu_seqlens": cu}),
        ("heads not a multiple", (t(10, 3, 16), q3, q3), {"cu_seqlens": cu}),
        ("k rank differs", (q3, t(10, 1, 2, 16), t(10, 1, 2, 16)), {"cu_seqlens": cu}),
        ("both modes", (q3, q3, q3), {"cu_seqlens": cu, "key_padding_mask": torch.ones(1, 10, dtype=torch.bool)}),
        ("packed needs 3-D", (q4, q4, q4), {"cu_seqlens": cu}),
        ("packed token mismatch", (q3, t(9, 2, 16), t(9, 2, 16)), {"cu_seqlens": cu}),
        ("cu_seqlens int64", (q3, q3, q3), {"cu_seqlens": cu.long()}),
        ("cu_seqlens 2-D", (q3, q3, q3), {"cu_seqlens": cu[None]}),
        ("cu_seqlens one entry", (q3, q3, q3), {"cu_seqlens": cu[:1]}),
        ("cu_seqlens not from 0", (q3, q3, q3), {"cu_seqlens": torch.tensor([1, 4, 10], dtype=torch.int32)}),
        ("cu_seqlens decreasing", (q3, q3, q3), {"cu_seqlens": torch.tensor([0, 6, 4, 10], dtype=torch.int32)}),
        ("cu_seqlens wrong end", (q3, q3, q3), {"cu_seqlens": torch.tensor([0, 4, 9], dtype=torch.int32)}),
        ("max_seqlen too small", (q3, q3, q3), {"cu_seqlens": cu, "max_seqlen": 5}),
        ("packed coords shape", (q3, q3, q3), {"cu_seqlens": cu, "coords": torch.zeros(9, 3), "freqs": f}),
        ("batched needs 4-D", (q3, q3, q3), {}),
        ("batch mismatch", (q4, t(1, 5, 2, 16), t(1, 5, 2, 16)), {}),
        ("rope needs same length", (q4, t(2, 6, 2, 16), t(2, 6, 2, 16)), {"coords": torch.zeros(2, 5, 3), "freqs": f}),
        ("mask not bool", (q4, q4, q4), {"key_padding_mask": m.int()}),
        ("mask shape", (q4, q4, q4), {"key_padding_mask": m[:, :4]}),
        ("batched coords shape", (q4, q4, q4), {"coords": torch.zeros(2, 4, 3), "freqs": f}),
        ("coords without freqs", (q3, q3, q3), {"cu_seqlens": cu, "coords": c3}),
        ("freqs without coords", (q3, q3, q3), {"cu_seqlens": cu, "freqs": f}),
        ("coords float64", (q3, q3, q3), {"cu_seqlens": cu, "coords": c3.double(), "freqs": f}),
        ("odd head_dim with rope", (t(10, 2, 15),) * 3, {"cu_seqlens": cu, "coords": c3, "freqs": torch.zeros(3, 7)}),
        ("freqs shape", (q3, q3, q3), {"cu_seqlens": cu, "coords": c3, "freqs": torch.zeros(3, 16)}),
        ("freqs dtype", (q3, q3, q3), {"cu_seqlens": cu, "coords": c3, "freqs": f.double()}),
        ("bad layout", (q3, q3, q3), {"cu_seqlens": cu, "rope_layout": "rotate_half"}),
        ("scale zero", (q3, q3, q3), {"cu_seqlens": cu, "scale": 0.0}),
        ("scale nan", (q3, q3, q3), {"cu_seqlens": cu, "scale": float("nan")}),
        ("skip without mask", (q4, q4, q4), {"skip_padded_queries": True}),
        ("skip packed", (q3, q3, q3), {"cu_seqlens": cu, "skip_padded_queries": True}),
        ("skip not bool", (q4, q4, q4), {"key_padding_mask": m, "skip_padded_queries": 1}),
        ("rope_k unknown", (q3, q3, q3), {"cu_seqlens": cu, "rope_k": "sideways"}),
        ("max_seqlen negative", (q3, q3, q3), {"cu_seqlens": cu, "max_seqlen": -1}),
    ]


@pytest.mark.parametrize("args, kwargs", [pytest.param(a, k, id=name) for name, a, k in _bad_cases()])
def test_bad_arguments(args, kwargs):
    with pytest.raises(ValueError):
        rope_attention(*args, **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="device mismatches need a CUDA device")
@pytest.mark.parametrize("which", ["k", "cu_seqlens", "mask", "coords", "freqs"])
def test_bad_devices(which):
    q = torch.zeros(10, 2, 16, device="cuda")
    kw = dict(cu_seqlens=torch.tensor([0, 10], dtype=torch.int32, device="cuda"),
              coords=torch.zeros(10, 3, device="cuda"), freqs=torch.zeros(3, 8, device="cuda"))
    k = q
    if which == "k":
        k = q.cpu()
    elif which == "mask":
        q = k = q.reshape(1, 10, 2, 16)
        kw = dict(key_padding_mask=torch.ones(1, 10, dtype=torch.bool))
    else:
        kw[which] = kw[which].cpu()
    with pytest.raises(ValueError):
        rope_attention(q, k, k if which != "k" else k, **kw)



def test_qkvpacked_bad_shapes():
    for bad in (torch.zeros(10, 2, 16), torch.zeros(10, 4, 2, 16), torch.zeros(2, 5, 2, 2, 16)):
        with pytest.raises(ValueError, match="qkv must be"):
            rope_attention_qkvpacked(bad)


def test_options_checked_once_against_each_call():
    """One record of options serves calls with different q (the model: every layer); what needs q is
    checked per call against the record, the host-read end of cu_seqlens included."""
    args = attn_args(cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    assert args.n_tokens == 10 and args.max_seqlen == 6
    from pevideo_kernels import ROPE_ATTENTION

    call = ROPE_ATTENTION.resolve(torch.zeros(10, 2, 16), torch.zeros(10, 1, 16), torch.zeros(10, 1, 16), args)
    assert call.args.scale == 16 ** -0.5 and call.args.rope_k == "loop" and call.args.max_seqlen == 6
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        ROPE_ATTENTION.resolve(*torch.zeros(3, 9, 2, 16).unbind(0), args)


@pytest.mark.skipif(not ON_GPU, reason="the unchecked case is a CUDA cu_seqlens")
def test_cu_seqlens_contract_on_gpu():
    """On a GPU with max_seqlen given, cu_seqlens' values are the caller's promise (reading them would
    sync); debug_checks() reads and checks them anyway."""
    q = torch.zeros(10, 2, 16, device="cuda")
    bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32, device="cuda")
    assert attn_args(cu_seqlens=bad, max_seqlen=6).n_tokens is None  # (not read)
    with debug_checks(), pytest.raises(ValueError, match="non-decreasing"):
        rope_attention(q, q, q, cu_seqlens=bad, max_seqlen=6)
    with pytest.raises(ValueError, match="non-decreasing"):  # max_seqlen missing: read (a sync) and checked
        rope_attention(q, q, q, cu_seqlens=bad)


def test_debug_checks_switch():
    from pevideo_kernels import _rope_attention_args as A

    before = A._DEBUG[0]
    with debug_checks():
        assert A._DEBUG[0] is True
        with debug_checks(False):
            assert A._DEBUG[0] is False
    assert A._DEBUG[0] == before


@pytest.mark.skipif(not (ON_GPU or __import__("pevideo_kernels").interpreting()), reason="the kernels can't run here")
def test_autograd_keeps_the_resolved_record(seed, monkeypatch):
    """The options are checked and resolved once, in the forward; the autograd context keeps the resolved
    record (scale a float, max_seqlen an int, the mode a name) and the backward checks nothing again."""
    from pevideo_kernels import _rope_attention_args as A

    checks = []
    real = A._check_qkv
    monkeypatch.setattr(A, "_check_qkv", lambda *t: (checks.append(1), real(*t))[1])
    lens, heads, d = [9, 0, 20], 2, 16
    n = sum(lens)
    qkv = _rand(n, 3, heads, d, dtype=torch.float32).requires_grad_()
    kw = dict(coords=_coords((n,), "int32"), freqs=_freqs(d), cu_seqlens=_cu(lens))
    with poison_outputs(), interpreter_blocks(16, 16):
        out = rope_attention_qkvpacked(qkv, **kw)
        assert len(checks) == 1
        rec = out.grad_fn.args
        assert rec.scale == d ** -0.5 and rec.max_seqlen == 20 and rec.rope_k == "loop"
        out.backward(torch.ones_like(out))
    assert len(checks) == 1, "the backward ran the argument check again"
    x = qkv.detach().clone().requires_grad_()
    rope_attention_ref(*x.unbind(1), **kw).backward(torch.ones_like(out))
    torch.testing.assert_close(qkv.grad, x.grad, atol=5e-5, rtol=5e-5)


# the layers of the op (issue 22): every import at the top and downward, _rope_attention_launch
# imported in one place
_LAYERS = {  # module -> the package modules it may import
    "rope_attention": {"_choose", "_rope_attention_args", "_triton", "_rope_attention_autograd"},
    "rope_attention_bwd": {"_rope_attention_args", "_triton", "rope_attention"},
    "_rope_attention_args": set(),
    "_rope_attention_autograd": {"_rope_attention_args", "_rope_attention_launch", "_triton"},
    "_rope_attention_launch": {"_rope_attention_args", "_rope_attention_bwd_triton", "_rope_attention_triton",
                               "_rope_attention_tuning", "_triton"},
    "_rope_attention_tuning": {"_rope_attention_triton"},
    "_rope_attention_bwd_triton": {"_rope_attention_triton"},
    "_rope_attention_triton": set(),
}


def test_module_layers():
    import ast
    import os

    import pevideo_kernels

    root = os.path.dirname(pevideo_kernels.__file__)
    importers = {}
    for name, allowed in _LAYERS.items():
        tree = ast.parse(open(os.path.join(root, f"{name}.py")).read())
        first_def = min(n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
        seen = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                mods = [node.module] if node.module else [a.name for a in node.names]
                assert node.lineno < first_def, f"{name}.py imports {mods} below its first definition"
                seen.update(m.split(".")[0] for m in mods)
        assert seen <= allowed, f"{name}.py imports {sorted(seen - allowed)}"
        for m in seen:
            importers.setdefault(m, set()).add(name)
    assert importers["_rope_attention_launch"] == {"_rope_attention_autograd"}
