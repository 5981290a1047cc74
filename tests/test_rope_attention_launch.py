"""rope_attention's launches: how K is rotated per shape (and that torch.compile guards on it), the
autotuning key and its policy under CUDA-graph capture, 64-bit offsets, and torch.compile tracing.

Without a GPU the kernels run under Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest
import torch

from pevideo.rope import pe_core_rope_2d, rope_1d
from pevideo_kernels import (
    ROPE_ATTENTION,
    ROPE_ATTENTION_QKVPACKED,
    ROPE_K_MODES,
    attn_args,
    default_rope_k,
    rope_attention_bwd,
    rope_attention_lse_ref,
    rope_attention_qkvpacked,
    rope_attention_ref,
    rope_k_mode,
)
from pevideo_kernels.testing import interpreter_blocks, poison_outputs

from _rope_inputs import DEV, _coords, _cu, _freqs, _rand  # noqa: E402
ON_GPU = DEV == "cuda"
_F32_TOL = 5e-5 if ON_GPU else 2e-5


# --------------------------------------------------------------------------------------------------
# ROPE_K: per shape, forced, and guarded by torch.compile
# --------------------------------------------------------------------------------------------------
def test_rope_k_mode_rejects_unknown():
    with pytest.raises(ValueError, match="rope_k mode"):
        with rope_k_mode("sideways"):
            pass
    with pytest.raises(ValueError, match="rope_k must be"):
        attn_args(rope_k="sideways")


def _frame_call(n=2, length=577, d=64, heads=16):
    """Frames of PE-Core 2D RoPE (577 tokens: CLS + 24x24; other lengths get zero coordinates)."""
    coords, freqs = pe_core_rope_2d(24, 24, d)
    coords = coords.repeat(n, 1) if length == 577 else torch.zeros(n * length, 3)
    q = torch.empty(n * length, heads, d, dtype=torch.float16)
    return (q, q, q), attn_args(coords=coords, freqs=freqs, cu_seqlens=_cu([length] * n).cpu(), max_seqlen=length)


def _temporal_call(b=8, s=17, d=128):
    coords, freqs = rope_1d(s, d)
    q = torch.empty(b, s, 14, d, dtype=torch.float16)
    return (q, q, q), attn_args(coords=coords.expand(b, s, 3), freqs=freqs, key_padding_mask=torch.ones(b, s, dtype=torch.bool),
                                rope_layout="half")


def test_rope_k_default_per_shape_and_forcing():
    """Frames (577-token segments) prerotate K, temporal clips (17 tokens) rotate it in the loop; a call's
    own rope_k beats rope_k_mode(), which beats the per-shape default; no RoPE resolves to "loop"."""
    assert default_rope_k(577) == "prerotate" and default_rope_k(17) == "loop" and default_rope_k(128) == "loop"
    frame, temporal = _frame_call(), _temporal_call()
    mode = lambda qkv, a: ROPE_ATTENTION.resolve(*qkv, a).args.rope_k  # noqa: E731
    assert mode(*frame) == "prerotate" and mode(*temporal) == "loop"
    with rope_k_mode("table"):
        assert mode(*frame) == "table" and mode(*temporal) == "table"
        assert mode(frame[0], frame[1]._replace(rope_k="loop")) == "loop"
    assert mode(frame[0], frame[1]._replace(rope_k="table")) == "table"
    q = torch.empty(2, 1, 8, 64)
    assert ROPE_ATTENTION.resolve(q, q, q, attn_args()).args.rope_k == "loop"


@pytest.mark.skipif(ON_GPU, reason="records the interpreter's per-forward passes")
def test_rope_k_switch_recompiles_under_compile(seed, monkeypatch):
    """The mode is an argument of the registered op, resolved where torch.compile traces: switching it
    later recompiles (a guard fails) and runs the new mode, instead of replaying the traced one."""
    from pevideo_kernels import _rope_attention_launch as L

    used, graphs = [], []
    real = L.rope_prepass
    monkeypatch.setattr(L, "rope_prepass", lambda mode, *a: (used.append(mode), real(mode, *a))[1])

    def backend(gm, example_inputs):
        graphs.append([a for node in gm.graph.nodes if node.op == "call_function" for a in node.args
                       if isinstance(a, str) and a in ROPE_K_MODES])
        return gm.forward

    n, heads, d = 40, 2, 16
    q, k, v = (torch.randn(n, heads, d) for _ in range(3))
    args = attn_args(coords=_coords((n,), "int32").cpu(), freqs=_freqs(d).cpu(), cu_seqlens=_cu([n]).cpu(),
                     max_seqlen=n)

    def f(q, k, v):
        return ROPE_ATTENTION.fused(ROPE_ATTENTION.resolve(q, k, v, args))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    outs = {}
    with interpreter_blocks(16, 16):
        for mode in ("table", "loop", "table"):
            with rope_k_mode(mode):
                outs.setdefault(mode, []).append(compiled(q, k, v))
    torch._dynamo.reset()
    assert graphs == [["table"], ["loop"]], graphs  # one graph per mode; the third call reuses the first
    assert used == ["table", "loop", "table"]
    ref = rope_attention_ref(q, k, v, **args.options())
    for out in (o for group in outs.values() for o in group):
        torch.testing.assert_close(out, ref, atol=_F32_TOL, rtol=_F32_TOL)


# --------------------------------------------------------------------------------------------------
# autotuning: the key, and never tuning under CUDA-graph capture
# --------------------------------------------------------------------------------------------------
def _key(call, dtype=torch.float16):
    from pevideo_kernels import _rope_attention_launch as L
    from pevideo_kernels import _rope_attention_tuning as T

    q, k, v, a, _ = ROPE_ATTENTION.resolve(*call[0], call[1])
    k2, c2, _ = L.rope_prepass(a.rope_k, k, a.coords, a.freqs, a.rope_layout, a.cu_seqlens)
    kargs, flags, *_ = L.kernel_args(q, k2, v, a._replace(coords=c2), q)
    name = T.config_set(kargs[-3], flags["BLOCK_D"], False, a.rope_k)
    return T.tuning_key(name, kargs, flags, dtype)


def test_autotuning_key_and_disk_cache():
    """The key holds what changes the best config: the length bucket (577 and 1025 tokens differ), the
    batch bucket (a 1-frame warm-up does not tune for 64 frames; 64 and 256 frames share, past the
    cap), the mode, the dtype and head_dim. Tuned configs persist in Triton's cache on disk."""
    one, many, more = (_key(_frame_call(n)) for n in (1, 64, 256))
    assert many == more and one != many
    assert _key(_frame_call(2, length=1025)) != _key(_frame_call(2))
    with rope_k_mode("table"):
        assert _key(_frame_call(64)) != many
    assert _key(_frame_call(64), torch.bfloat16) != many
    assert _key(_frame_call(64, d=32)) != many
    assert _key(_temporal_call()) != _key(_temporal_call(b=64))
    # Outside the interpreter (which turns Triton's result cache off), as a CUDA launch builds them.
    check = ("import pevideo_kernels._rope_attention_tuning as T, pevideo_kernels._patchify_triton as P; "
             "assert all(t.tuner.cache_results for t in T.FWD_LAUNCH.values()); "
             "assert P.patchify_kernel.cache_results")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


class _Recorder:
    """Stands in for the kernel and the autotuner: records launches (and, as the tuner, picks config 1)."""

    def __init__(self, configs=None):
        self.launches, self.best_config, self.configs = [], None, configs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            if self.configs is not None:
                self.best_config = self.configs[1]
        return launch


def test_tuning_never_under_capture():
    """A launch under CUDA-graph capture never benchmarks: it takes the key's tuned config, else the set's
    default, and remembers nothing; outside capture the first launch of a key tunes and later ones reuse
    it; a traced launch (torch.compile) leaves tuning to Inductor."""
    from pevideo_kernels import _rope_attention_tuning as T

    kernel = _Recorder()
    tl = T.TunedLaunch(kernel, T.CONFIG_SETS["d64_prerotate"], T.TUNING_KEY, wrap=lambda k: k)
    tuner = _Recorder(tl.configs)
    tl._make_tuner = lambda: tuner
    small, large = _key(_frame_call(1)), _key(_frame_call(64))
    flags = {"HEAD_DIM": 64}

    def launch(key, capturing, tracing=False):
        return tl(None, (), flags, key, capturing=capturing, tracing=tracing)

    assert launch(large, capturing=True) is tl.configs[0]  # capture first: the default, no tuning
    assert not tuner.launches and not tl.chosen
    assert kernel.launches[-1]["BLOCK_M"] == tl.configs[0].kwargs["BLOCK_M"]
    assert launch(small, capturing=False) is tl.configs[1]  # a 1-frame warm-up tunes its own bucket...
    assert len(tuner.launches) == 1 and set(tl.chosen) == {small}
    assert launch(large, capturing=True) is tl.configs[0]  # ...not the 64-frame one
    assert launch(large, capturing=False, tracing=True) is None and large not in tl.chosen
    assert launch(large, capturing=False) is tl.configs[1] and len(tuner.launches) == 3
    n = len(kernel.launches)
    assert launch(large, capturing=True) is tl.configs[1] and launch(large, capturing=False) is tl.configs[1]
    assert len(tuner.launches) == 3 and len(kernel.launches) == n + 2
    assert kernel.launches[-1]["num_warps"] == tl.configs[1].num_warps


# --------------------------------------------------------------------------------------------------
# 64-bit offsets: a token index times a stride past 2^31 elements
# --------------------------------------------------------------------------------------------------
def _sparse_buffer(nbytes: int):
    """An anonymous private mapping that reserves nothing (MAP_NORESERVE): untouched pages cost no memory."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    try:
        return mmap.mmap(-1, nbytes, flags=flags)
    except (OSError, OverflowError) as exc:  # e.g. strict overcommit (vm.overcommit_memory=2)
        pytest.skip(f"cannot map {nbytes / 2**30:.0f} GiB of address space: {exc}")


@pytest.mark.skipif(ON_GPU or not sys.platform.startswith("linux"), reason="CPU interpreter on Linux")
def test_offsets_past_2_31_elements(seed):
    """Views whose token stride times token index passes 2^31 elements (a 272-token segment with a stride
    just below 2^23; in the model, ~700K packed tokens of a fused qkv): every kernel -- the forward in
    each mode with its per-forward pass, both backward kernels -- reads and writes the right rows.
    With 32-bit products the interpreter, like a GPU, reads and writes 2^32 elements too low: inside
    this mapping, so the test fails instead of crashing."""
    T_, H, D = 272, 2, 16
    S = (1 << 23) - 16  # the token stride, in elements (the kernels take strides below 2^23)
    assert (T_ - 1) * S >= 1 << 31
    span16, span32 = T_ * S * 2, T_ * S * 4
    head = 1 << 32  # bytes below the first view: a wrapped fp16 offset lands at most 2^31 elements low
    buf = _sparse_buffer(head + 2 * span16 + span32)
    # one storage for all views (two frombuffer storages of one mapping would make the interpreter copy
    # one onto the other, touching every page)
    u8 = torch.frombuffer(buf, dtype=torch.uint8)
    f16, f32 = u8.view(torch.float16), u8.view(torch.float32)
    qkv = f16.as_strided((T_, 3, H, D), (S, H * D, D, 1), head // 2)
    dqkv = f16.as_strided((T_, 3, H, D), (S, H * D, D, 1), (head + span16) // 2)
    coords = f32.as_strided((T_, 3), (S, 1), (head + 2 * span16) // 4)
    vals = torch.randn(T_, 3, H, D).half()
    c = torch.randint(0, 24, (T_, 3)).float()
    qkv.copy_(vals)
    coords.copy_(c)
    kw = dict(freqs=_freqs(D).cpu(), cu_seqlens=_cu([T_]).cpu(), max_seqlen=T_)
    ref = rope_attention_ref(*vals.float().unbind(1), coords=c, **kw).half()
    with poison_outputs(), interpreter_blocks(64, 64):
        for mode in ROPE_K_MODES:
            out = rope_attention_qkvpacked(qkv, coords=coords, rope_k=mode, **kw)
            torch.testing.assert_close(out, ref, atol=3e-3, rtol=3e-3, msg=lambda m: f"forward, {mode}: {m}")
        x = vals.float().requires_grad_()
        dout = torch.randn(T_, H, D).half()
        rope_attention_ref(*x.unbind(1), coords=c, **kw).backward(dout.float())
        q, k, v = qkv.unbind(1)
        lse = rope_attention_lse_ref(q, k, coords=c, **{n: kw[n] for n in ("freqs", "cu_seqlens")})
        rope_attention_bwd(dout, q, k, v, out, lse, coords=coords, dq=dqkv[:, 0], dk=dqkv[:, 1], dv=dqkv[:, 2], **kw)
    torch.testing.assert_close(dqkv.float(), x.grad, atol=1e-2, rtol=1e-2, msg=lambda m: f"backward: {m}")
    del qkv, dqkv, coords, f16, f32, u8


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
@poison_outputs(ON_GPU)  # (off on CPU: keep the traced graph minimal)
def test_torch_compile(seed):
    """The op is a torch.library.triton_op, so torch.compile traces the launch (no graph break)."""
    d, heads = 16, 2
    lens = [5, 20]
    n = sum(lens)
    q, k, v = (torch.randn(n, heads, d, device=DEV) for _ in range(3))
    coords, freqs = _coords((n,), "int32"), _freqs(d)
    cu = _cu(lens)

    def f(q, k, v):
        return torch.ops.pevideo.rope_attention(q * 2, k, v, coords, freqs, "interleaved", cu, 20, None, 0.25, False,
                                                "prerotate", None)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager" if not ON_GPU else "inductor", fullgraph=True)
    out = compiled(q, k, v)
    ref = rope_attention_ref(q * 2, k, v, coords=coords, freqs=freqs, cu_seqlens=cu, scale=0.25)
    torch.testing.assert_close(out, ref, atol=_F32_TOL, rtol=_F32_TOL)


@poison_outputs(ON_GPU)
def test_torch_compile_backward(seed):
    """Forward and fused backward under torch.compile (fullgraph): resolving the call, the autograd
    Function around the two registered ops; its gradients are the reference's."""
    d, heads = 16, 2
    lens = [5, 20]
    n = sum(lens)
    qkv = torch.randn(n, 3 * heads * d, device=DEV)
    # (the options record is built outside: reading cu_seqlens' values on the host does not trace)
    args = attn_args(coords=_coords((n,), "int32"), freqs=_freqs(d), cu_seqlens=_cu(lens), max_seqlen=20)

    def f(x):
        return ROPE_ATTENTION_QKVPACKED.fused(ROPE_ATTENTION_QKVPACKED.resolve(x.view(n, 3, heads, d), args))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager" if not ON_GPU else "inductor", fullgraph=True)
    x1, x2 = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    g = torch.randn(n, heads, d, device=DEV)
    compiled(x1).backward(g)
    q, k, v = x2.view(n, 3, heads, d).unbind(1)
    rope_attention_ref(q, k, v, **args.options()).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=_F32_TOL, rtol=_F32_TOL)
