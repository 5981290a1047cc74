"""fast=True: the fused kernels inside the model against the eager path, fallbacks, and kernel_report.

On CPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU).
"""
from __future__ import annotations

import contextlib
import importlib
import warnings

import pytest
import torch
from _upstream import make_config, randomize, rel_err, video_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import pevideo
from pevideo.inputs_check import check_mask
from pevideo_kernels import HAS_TRITON, PATCHIFY, ROPE_ATTENTION, ROPE_ATTENTION_QKVPACKED, interpreting

OPS = {"patchify", "frame_attention", "pool_attention", "temporal_attention"}
KERNELS_RUN_HERE = HAS_TRITON and (torch.cuda.is_available() or interpreting())
needs_kernels = pytest.mark.skipif(not KERNELS_RUN_HERE, reason="Triton kernels can't run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(name: str, seed: int = 0):
    cfg = make_config(name)
    torch.manual_seed(seed)
    eager = randomize(pevideo.PeVideoModel(cfg), seed).eval().to(DEVICE)
    fast = pevideo.PeVideoModel(cfg, fast=True, num_classes=eager.video_encoder.vit.args.num_classes).eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast.to(DEVICE)


@pytest.fixture(scope="module")
def large80():
    return _pair("large80")  # frame head_dim 80, pool head_dim 20, temporal head_dim 40


@needs_kernels
@pytest.mark.parametrize("lengths, masked", [([3, 3], False), ([4, 1, 2], True), ([1], False), ([2, 2], True)])
def test_fast_matches_eager_fp32(large80, lengths, masked):
    eager, fast = large80
    pixels, mask = video_inputs(eager.config, lengths)
    pixels, mask = pixels.to(DEVICE), mask.to(DEVICE)
    m = mask if masked else None
    with torch.no_grad():
        a = eager.get_video_features(pixels, m)
        with warnings.catch_warnings():
            warnings.simplefilter("error", pevideo.PeVideoKernelFallbackWarning)
            b = fast.get_video_features(pixels, m)
    assert pevideo.kernel_report(fast) == dict.fromkeys(OPS, "fused")
    assert rel_err(b.pooler_output, a.pooler_output) <= 1e-4
    assert rel_err(b.last_hidden_state[mask], a.last_hidden_state[mask]) <= 1e-4


@needs_kernels
@pytest.mark.parametrize("rows", [[[0, 1, 1, 1]], [[0, 0, 1, 1]], [[0, 1, 1, 0], [1, 1, 0, 1]]])
def test_fast_matches_eager_any_mask(large80, rows):
    """Masks with leading pads and holes: every temporal query row is computed (the class token's too)."""
    eager, fast = large80
    mask = torch.tensor(rows, dtype=torch.bool, device=DEVICE)
    pixels, _ = video_inputs(eager.config, [mask.shape[1]] * mask.shape[0])
    pixels = pixels.to(DEVICE)
    with torch.no_grad():
        a = eager.get_video_features(pixels, mask)
        b = fast.get_video_features(pixels, mask)
    assert pevideo.kernel_report(fast)["temporal_attention"] == "fused"
    assert rel_err(b.pooler_output, a.pooler_output) <= 1e-4
    assert rel_err(b.last_hidden_state[mask], a.last_hidden_state[mask]) <= 1e-4


@needs_kernels
def test_fast_uint8_entry(large80):
    eager, fast = large80
    pixels, mask = video_inputs(eager.config, [2, 1])
    u8 = torch.randint(0, 256, (*pixels.shape[:2], *pixels.shape[3:], 3), dtype=torch.uint8)
    with torch.no_grad():
        a = eager.get_video_features_uint8(u8.to(DEVICE), mask.to(DEVICE))
        b = fast.get_video_features_uint8(u8.to(DEVICE), mask.to(DEVICE))
    assert pevideo.kernel_report(fast)["patchify"] == "fused"
    assert rel_err(b.pooler_output, a.pooler_output) <= 1e-4


@needs_kernels
def test_unsupported_shape_falls_back_per_op():
    """The tiny config's pooling heads are 4 wide, below the kernel's range: that op alone falls back."""
    eager, fast = _pair("tiny", seed=1)
    pixels, mask = video_inputs(eager.config, [2, 1])
    with pytest.warns(pevideo.PeVideoKernelFallbackWarning, match="pool_attention.*head_dim"):
        with torch.no_grad():
            b = fast.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
    report = pevideo.kernel_report(fast)
    assert report["pool_attention"].startswith("unsupported by the kernel")
    assert {k for k, v in report.items() if v == "fused"} == OPS - {"pool_attention"}
    with torch.no_grad():
        a = eager.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
    assert rel_err(b.pooler_output, a.pooler_output) <= 1e-4


@needs_kernels
def test_kernel_error_falls_back(large80, monkeypatch):
    eager, fast = _pair("large80", seed=2)

    def boom(*a, **k):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(ROPE_ATTENTION, "fused", boom)
    monkeypatch.setattr(ROPE_ATTENTION_QKVPACKED, "fused", boom)  # (the frame attention's packed qkv)
    pixels, mask = video_inputs(eager.config, [2, 1])
    with pytest.warns(pevideo.PeVideoKernelFallbackWarning, match="simulated compile failure"):
        with torch.no_grad():
            b = fast.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
    report = pevideo.kernel_report(fast)
    assert report["patchify"] == "fused"
    assert all("simulated compile failure" in report[op] for op in OPS - {"patchify"})
    with torch.no_grad():
        a = eager.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
    torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=0, atol=0)


@needs_kernels
def test_wrong_kernel_output_is_caught(monkeypatch):
    """A kernel that runs but computes garbage is checked against the reference on first use and switched
    off; the check's reference output is the op's output (the reference runs once per call, not twice)."""
    eager, fast = _pair("large80", seed=3)
    real, real_ref, ref_calls = PATCHIFY.fused, PATCHIFY.ref, []
    monkeypatch.setattr(PATCHIFY, "fused", lambda *a, **k: real(*a, **k) * 1.5)
    monkeypatch.setattr(PATCHIFY, "ref", lambda *a, **k: (ref_calls.append(1), real_ref(*a, **k))[1])
    pixels, mask = video_inputs(eager.config, [2, 2])
    with pytest.warns(pevideo.PeVideoKernelFallbackWarning, match="patchify.*disagreed"):
        with torch.no_grad():
            b = fast.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
            c = fast.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))  # stays off, no new warning
    assert len(ref_calls) == 2, ref_calls  # one per call (the first one's for the check, and returned)
    assert "disagreed" in pevideo.kernel_report(fast)["patchify"]
    with torch.no_grad():
        a = eager.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
    assert rel_err(b.pooler_output, a.pooler_output) <= 1e-4
    assert torch.equal(b.pooler_output, c.pooler_output)


@needs_kernels
def test_training_step_uses_fused_backward():
    """With autograd on, attention runs the fused kernel and its fused backward: one training step of a
    tiny model gives the eager path's gradients for every parameter. The tiny pooling heads (4 wide,
    below the kernel's range) are a genuinely unsupported case: that op alone falls back, with its reason."""
    eager, fast = _pair("tiny", seed=4)
    pixels, mask = video_inputs(eager.config, [3, 1, 2])
    pixels, mask = pixels.to(DEVICE), mask.to(DEVICE)
    gen = torch.Generator().manual_seed(0)

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model.get_video_features(pixels, mask).pooler_output
        target = torch.randn(out.shape, generator=gen.manual_seed(0)).to(out.device)
        loss = ((out - target) ** 2).mean() + out[:, :5].sum()  # (a non-uniform incoming gradient)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with pytest.warns(pevideo.PeVideoKernelFallbackWarning, match="pool_attention.*head_dim") as rec:
        loss_f, grads_f = step(fast)
    assert not any("require grad" in str(w.message) for w in rec)
    report = pevideo.kernel_report(fast)
    assert report["pool_attention"].startswith("unsupported by the kernel")
    assert {k for k, v in report.items() if v == "fused"} == OPS - {"pool_attention"}
    loss_e, grads_e = step(eager)
    assert rel_err(loss_f, loss_e) <= 1e-5
    assert grads_f.keys() == grads_e.keys() and len(grads_e) > 10
    # the attention blocks' q/k/v projections get their gradient through the fused backward
    assert any(".attn.qkv.weight" in n for n in grads_e)
    for name, g in grads_e.items():
        assert torch.isfinite(grads_f[name]).all(), name
        assert rel_err(grads_f[name], g) <= 1e-4, name


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@needs_kernels
def test_training_attention_saves_no_rotated_copies_or_scores(monkeypatch):
    """Activation memory of attention in one training step, counted exactly: every tensor autograd saves
    inside each attention op (torch.autograd.graph.saved_tensors_hooks). The fused path saves at most
    q, k, v, out, the float32 log-sum-exp and the small coords/mask tensors -- no rotated q/k copy, no
    N x N scores; the eager path saves more (the bound can fail)."""
    eager, fast = _pair("tiny", seed=6)
    pixels, mask = video_inputs(eager.config, [3, 1, 2])
    saved: dict[str, list[tuple[int, int]]] = {}
    Ops = pevideo.dispatch.Ops
    real = {name: getattr(Ops, name) for name in ("attention", "attention_qkvpacked")}

    def counting(name):
        def run(self, op, *tensors_and_args):
            *tensors, args = tensors_and_args
            got = []

            def pack(t):
                got.append(t)
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = real[name](self, op, *tensors, args)
            lse_bytes = 4 * out[..., 0].numel()
            small = _storage_bytes([args.coords, args.freqs, args.cu_seqlens, args.key_padding_mask, args.key_ranges])
            bound = _storage_bytes(tensors) + out.numel() * out.element_size() + lse_bytes + small
            saved.setdefault(op, []).append((_storage_bytes(got), bound))
            return out
        return run

    for name in real:
        monkeypatch.setattr(Ops, name, counting(name))
    for model in (fast, eager):
        saved.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pevideo.PeVideoKernelFallbackWarning)  # (tiny pooling heads)
            model.get_video_features(pixels.to(DEVICE), mask.to(DEVICE)).pooler_output.sum().backward()
        fused_ops = {op for op, r in pevideo.kernel_report(model).items() if r == "fused"}
        if model is fast:
            assert {"frame_attention", "temporal_attention"} <= fused_ops
            for op in fused_ops & set(saved):
                for got, bound in saved[op]:
                    assert 0 < got <= bound, (op, got, bound)
        else:
            assert not fused_ops
            frame = saved["frame_attention"]
            assert all(got > bound for got, bound in frame), frame


@needs_kernels
def test_grad_falls_back_where_no_fused_backward(large80, monkeypatch):
    """Where the fused backward can't serve (here: it is reported missing), attention falls back to its
    reference with a readable reason, and gradients still flow."""
    ra = importlib.import_module("pevideo_kernels.rope_attention")  # (the module; the package exports the function)

    eager, fast = _pair("large80", seed=5)
    monkeypatch.setattr(ra, "BWD_KERNEL_MISSING", "simulated: no backward")
    pixels, mask = video_inputs(eager.config, [2, 1])
    with pytest.warns(pevideo.PeVideoKernelFallbackWarning, match="require grad.*simulated: no backward"):
        out = fast.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
    out.pooler_output.sum().backward()
    assert "simulated: no backward" in pevideo.kernel_report(fast)["frame_attention"]
    grad = fast.video_encoder.vit.blocks[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():  # without autograd the kernel serves again
        fast.get_video_features(pixels.to(DEVICE), mask.to(DEVICE))
    assert pevideo.kernel_report(fast)["frame_attention"] == "fused"


# --------------------------------------------------------------------------------------------------
# no host sync on the launch path (CUDA graphs)
# --------------------------------------------------------------------------------------------------
_READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
_READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2", "unique_dim"}


class _ReadOps(TorchDispatchMode):
    """aten ops that read tensor values on the host (each a device sync on a GPU), from C++ too."""

    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _READ_OPS:
            self.reads.append(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Every read of tensor values on the host inside: Python-level (Tensor.item, .tolist, bool(t), ...,
    seen inside registered ops too) and aten-level. On a GPU each would be a sync."""
    reads = []
    for name in _READ_METHODS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _r=real, **k: (reads.append(_n), _r(self, *a, **k))[1])
    try:
        with _ReadOps(reads):
            yield reads
    finally:
        monkeypatch.undo()


@needs_kernels
def test_frame_encoder_step_reads_nothing_on_the_host(large80, monkeypatch):
    """Issue 18: a frame-encoder step on the fast path -- patchify, every block's attention, the pooling
    attention -- reads no tensor value on the host (no .item(), .tolist(), bool(t), nonzero...), so it can
    run under CUDA-graph capture. The mask is checked once per batch, before it, on the host-side mask;
    the attention options are built and checked once per frame count; the first-output checks run on
    the first batch."""
    _, fast = large80
    pixels, mask = video_inputs(fast.config, [3, 1, 2])
    b, t = mask.shape
    _, real = check_mask(mask, b, t, DEVICE)  # (once per batch)
    frames = pixels.reshape(b * t, *pixels.shape[2:]).to(DEVICE)
    vit = fast.video_encoder.vit
    with torch.no_grad():
        fast._ops.reset()
        first = vit(frames, real)  # the first batch: tuning, the first-output checks (host reads)
        with host_reads(monkeypatch) as reads:
            again = vit(frames, real)
    assert reads == [], f"host reads in a frame-encoder step: {reads}"
    assert pevideo.kernel_report(fast) == dict.fromkeys({"patchify", "frame_attention", "pool_attention"}, "fused")
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.gpu
def test_frame_encoder_replays_in_a_cuda_graph():
    """The fast frame encoder captured in a CUDA graph (after one warm-up batch) replays with the fused
    ops and gives the eager step's result on new pixels; an eager step makes no sync."""
    eager, fast = _pair("large80", seed=7)
    pixels, mask = video_inputs(eager.config, [3, 1, 2])
    b, t = mask.shape
    _, real = check_mask(mask, b, t, "cuda")
    frames = pixels.reshape(b * t, *pixels.shape[2:]).cuda()
    vit = fast.video_encoder.vit
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                vit(frames, real)  # tuning and the first-output checks happen here
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.set_sync_debug_mode("error")
        try:
            vit(frames, real)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = vit(frames, real)
        frames.copy_(torch.randn_like(frames))
        graph.replay()
        torch.cuda.synchronize()
        want = vit(frames, real)
    assert set(pevideo.kernel_report(fast).values()) == {"fused"}
    torch.testing.assert_close(static_out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_bf16_fast_on_pe_av_large_architecture():
    """bf16 fast vs float32 eager on the pe-av-large video tower (random weights): cosine similarity of
    video_embeds >= 0.999 and error within 2x of bf16 eager's."""
    from _upstream import TEXT
    from transformers import PeVideoConfig

    from pevideo.bench import pe_av_large_video_config

    cfg = PeVideoConfig(text_config=dict(TEXT), video_config=pe_av_large_video_config().to_dict())
    torch.manual_seed(0)
    ref = pevideo.PeVideoModel(cfg, num_classes=1024).eval().cuda()
    eager16 = pevideo.PeVideoModel(cfg, num_classes=1024).eval()
    fast16 = pevideo.PeVideoModel(cfg, fast=True, num_classes=1024).eval()
    for m in (eager16, fast16):
        m.load_state_dict(ref.state_dict())
        m.to("cuda", torch.bfloat16)
    lengths = [16, 12, 8, 4, 2, 1]
    pixels = torch.randn(len(lengths), 16, 3, 336, 336).clamp(-1, 1).cuda()
    mask = (torch.arange(16)[None] < torch.tensor(lengths)[:, None]).cuda()
    with torch.no_grad():
        a = ref.get_video_features(pixels, mask).pooler_output.float()
        e = eager16.get_video_features(pixels.bfloat16(), mask).pooler_output.float()
        f = fast16.get_video_features(pixels.bfloat16(), mask).pooler_output.float()
    assert set(pevideo.kernel_report(fast16).values()) == {"fused"}
    cos = torch.nn.functional.cosine_similarity(f, a, dim=-1)
    assert cos.min() >= 0.999
    assert (f - a).abs().max() <= 2 * (e - a).abs().max()
