"""patchify_normalize: the Triton kernel (interpreted on CPU) against the reference, and the reference
against torch's own unfold and the upstream patch-embedding conv."""
import pytest
import torch
import torch.nn.functional as F

from pevideo.dispatch import Ops
from pevideo.normalization import Normalization
from pevideo_kernels import patchify_normalize, patchify_normalize_ref, patchify_unsupported_reason
from pevideo_kernels.patchify import KERNEL_MISSING
from pevideo_kernels.testing import poison_outputs

needs_kernel = pytest.mark.skipif(KERNEL_MISSING is not None, reason=f"Triton kernel not available ({KERNEL_MISSING})")

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _frames(dtype, n, h, w, gen=None):
    """uint8 (N, H, W, 3) or float (N, 3, H, W) frames."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    return (torch.randn(n, 3, h, w, generator=gen) * 2).to(dtype)


def _assert_same(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.is_contiguous()
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        # Triton's interpreter truncates float32 -> bfloat16 instead of rounding to nearest even
        # (GPUs round); allow that one ulp here, the GPU test checks exact equality.
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,h,w", [(14, 28, 42), (8, 32, 24), (16, 32, 48), (3, 9, 6)])
def test_ref_matches_unfold(seed, p, h, w):
    x = _frames(torch.float32, 3, h, w)
    ref = patchify_normalize_ref(x, p)
    want = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # features (c, kh, kw), patches row-major
    assert torch.equal(ref, want)
    u8 = _frames(torch.uint8, 2, h, w)
    ref = patchify_normalize_ref(u8, p, MEAN, STD)
    xf = (u8.permute(0, 3, 1, 2).float() - 127.5) / 127.5
    assert torch.equal(ref, F.unfold(xf, kernel_size=p, stride=p).transpose(1, 2))


@pytest.mark.parametrize("p,h,w", [(14, 28, 42), (16, 32, 32)])
def test_ref_times_flattened_conv_weight_is_the_patch_embedding(seed, p, h, w):
    # Upstream embeds patches with Conv2d(3, D, p, stride p, no bias); its weight flattened to (D, 3·p·p)
    # times our patch rows must be that conv.
    x = _frames(torch.uint8, 2, h, w)
    conv = torch.nn.Conv2d(3, 20, p, stride=p, bias=False).double()
    pix = ((x.permute(0, 3, 1, 2).float() - 127.5) / 127.5).double()
    want = conv(pix).flatten(2).transpose(1, 2)
    got = patchify_normalize_ref(x, p, MEAN, STD).double() @ conv.weight.reshape(20, -1).T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_ref_normalization_is_upstreams_fused_float32_math():
    # transformers folds rescale into mean/std: (x - mean/rescale) / (std/rescale), in float32.
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    mean, std = IMAGENET
    got = patchify_normalize_ref(x, 16, mean, std)
    m = torch.tensor(mean) * (1.0 / (1 / 255))
    s = torch.tensor(std) * (1.0 / (1 / 255))
    want = (x.permute(0, 3, 1, 2).to(torch.float32) - m[:, None, None]) / s[:, None, None]
    assert torch.equal(got, want.reshape(1, 3, 1, 16, 1, 16).permute(0, 2, 4, 1, 3, 5).reshape(1, 1, 768))
    assert torch.equal(patchify_normalize_ref(x, 16), (x.permute(0, 3, 1, 2).float() * (1 / 255)).reshape(1, 1, 768))


# --------------------------------------------------------------------------------------------------
# Kernel vs reference (interpreter on CPU, compiled on GPU)
# --------------------------------------------------------------------------------------------------
CASES = [  # (patch, H, W)
    (14, 28, 42),  # the large model's patch size; a row (1764 outputs) spans two programs
    (16, 32, 48),
    (8, 24, 40),
    (3, 9, 15),
    (1, 2, 3),
]


@needs_kernel
@pytest.mark.parametrize("p,h,w", CASES)
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["none", "half", "imagenet"])
def test_kernel_matches_ref(seed, p, h, w, in_dtype, norm):
    x = _frames(in_dtype, 3, h, w)
    mean, std = {"none": (None, None), "half": (MEAN, STD), "imagenet": IMAGENET}[norm]
    out_dtype = torch.float32 if in_dtype == torch.uint8 else in_dtype
    got = patchify_normalize(x, p, mean, std, out_dtype=out_dtype)
    _assert_same(got, patchify_normalize_ref(x, p, mean, std, out_dtype=out_dtype))


@needs_kernel
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_kernel_out_dtypes(seed, out_dtype):
    x = _frames(torch.uint8, 2, 28, 42)
    got = patchify_normalize(x, 14, MEAN, STD, out_dtype=out_dtype)
    _assert_same(got, patchify_normalize_ref(x, 14, MEAN, STD, out_dtype=out_dtype))
    assert got.dtype == (out_dtype or torch.float32)


@needs_kernel
@pytest.mark.parametrize("idx", [[5, 0, 3, 3], [1], [6, 4, 2, 0], []])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32])
def test_frame_index_picks_frames(seed, idx, in_dtype):
    x = _frames(in_dtype, 7, 28, 42)
    fi = torch.tensor(idx, dtype=torch.int64)
    for index in (fi, fi.to(torch.int32)):
        got = patchify_normalize(x, 14, MEAN, STD, frame_index=index)
        _assert_same(got, patchify_normalize_ref(x, 14, MEAN, STD, frame_index=index))
        assert got.shape == (len(idx), 6, 588)


@needs_kernel
def test_padded_frames_are_never_read(seed):
    # A padded (B, T, 3, S, S) batch viewed as (B·T, 3, S, S), real frames picked by index: NaN in
    # the padding must not reach the output, and the real frames come out packed in order.
    b, t, s = 3, 4, 28
    batch = torch.randn(b, t, 3, s, s)
    lengths = [4, 1, 2]
    for i, n in enumerate(lengths):
        batch[i, n:] = float("nan")
    real = torch.cat([torch.arange(n) + i * t for i, n in enumerate(lengths)])
    got = patchify_normalize(batch.view(b * t, 3, s, s), 14, frame_index=real)
    assert not got.isnan().any()
    want = torch.cat([patchify_normalize_ref(batch[i, :n], 14) for i, n in enumerate(lengths)])
    assert torch.equal(got, want)


def _strided_inputs():
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (5, 3, 30, 44), dtype=torch.uint8, generator=g)
    f32 = torch.randn(2, 3, 3, 32, 46, generator=g)
    return {
        "u8_from_chw": u8[..., :28, :42].permute(0, 2, 3, 1),  # channels-first memory, cropped
        "u8_every_other_frame": torch.randint(0, 256, (6, 28, 42, 3), dtype=torch.uint8, generator=g)[::2],
        "u8_cropped_hwc": torch.randint(0, 256, (2, 31, 45, 3), dtype=torch.uint8, generator=g)[:, 1:29, 2:44],
        "f32_batch_view": f32[..., 2:30, 1:43].flatten(0, 1),  # (B, T, 3, S, S) cropped, viewed as (B·T, ...)
        "f32_channels_last": torch.randn(3, 3, 28, 42, generator=g).contiguous(memory_format=torch.channels_last),
        "f16_transposed_hw": torch.randn(3, 3, 42, 28, generator=g).half().transpose(2, 3),
    }


@needs_kernel
@pytest.mark.parametrize("name", list(_strided_inputs()))
def test_any_input_strides(name):
    x = _strided_inputs()[name]
    assert not x.is_contiguous()
    out_dtype = torch.float16 if x.dtype == torch.float16 else torch.float32
    got = patchify_normalize(x, 14, MEAN, STD, out_dtype=out_dtype)
    _assert_same(got, patchify_normalize_ref(x, 14, MEAN, STD, out_dtype=out_dtype))
    idx = torch.tensor([x.shape[0] - 1, 0])
    _assert_same(
        patchify_normalize(x, 14, out_dtype=out_dtype, frame_index=idx),
        patchify_normalize_ref(x, 14, out_dtype=out_dtype, frame_index=idx),
    )


@needs_kernel
@pytest.mark.parametrize("p,h,w", CASES)
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32])
def test_every_output_element_written(seed, p, h, w, in_dtype):
    # The launcher fills its output with NaN before the kernel runs; the kernel must overwrite all of it.
    x = _frames(in_dtype, 4, h, w)
    idx = torch.tensor([3, 1, 1])
    with poison_outputs():
        out = patchify_normalize(x, p, MEAN, STD, frame_index=idx)
    assert not out.isnan().any()
    assert torch.equal(out, patchify_normalize_ref(x, p, MEAN, STD, frame_index=idx))


@needs_kernel
def test_registered_as_a_torch_op(seed):
    x = _frames(torch.uint8, 2, 28, 28)
    got = torch.ops.pevideo.patchify_normalize(x, None, 14, 1.0, [127.5] * 3, [127.5] * 3, True, torch.float32)
    assert torch.equal(got, patchify_normalize_ref(x, 14, MEAN, STD))


def test_dispatch():
    x = torch.zeros(1, 28, 28, 3, dtype=torch.uint8)
    if KERNEL_MISSING is None and not torch.cuda.is_available():
        assert patchify_unsupported_reason(x) is None  # interpreter: CPU tensors take the kernel
    y = torch.zeros(1, 3, 28, 28, requires_grad=True)
    if KERNEL_MISSING is None and not torch.cuda.is_available():
        assert "grad" in patchify_unsupported_reason(y)
    out = patchify_normalize(y, 14)  # differentiable through the reference
    out.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "frames,kwargs,match",
    [
        (torch.zeros(1, 28, 30, 3, dtype=torch.uint8), {}, "not divisible"),
        (torch.zeros(1, 3, 27, 28), {}, "not divisible"),
        (torch.zeros(1, 28, 28, 4, dtype=torch.uint8), {}, r"\(N, H, W, 3\)"),
        (torch.zeros(1, 28, 28, dtype=torch.uint8), {}, r"\(N, H, W, 3\)"),
        (torch.zeros(1, 4, 28, 28), {}, r"\(N, 3, H, W\)"),
        (torch.zeros(1, 3, 28, 28, dtype=torch.int32), {}, "dtype"),
        (torch.zeros(1, 3, 28, 28, dtype=torch.float64), {}, "dtype"),
        (torch.zeros(1, 3, 28, 28), {"patch_size": 0}, "patch_size"),
        (torch.zeros(1, 3, 28, 28), {"mean": (0.5, 0.5)}, "3 values"),
        (torch.zeros(1, 3, 28, 28), {"mean": MEAN}, "together"),
        (torch.zeros(1, 3, 28, 28), {"mean": MEAN, "std": (0.5, 0.0, 0.5)}, "non-zero"),
        (torch.zeros(1, 28, 28, 3, dtype=torch.uint8), {"rescale": 0.0}, "rescale"),
        (torch.zeros(1, 3, 28, 28), {"out_dtype": torch.int8}, "out_dtype"),
        (torch.zeros(2, 3, 28, 28), {"frame_index": torch.tensor([0.0])}, "frame_index"),
        (torch.zeros(2, 3, 28, 28), {"frame_index": torch.tensor([[0]])}, "frame_index"),
        (torch.zeros(2, 3, 28, 28), {"frame_index": torch.tensor([0, 2])}, r"\[0, 2\)"),
        (torch.zeros(2, 3, 28, 28), {"frame_index": torch.tensor([-1])}, r"\[0, 2\)"),
        ([[0]], {}, "tensor"),
    ],
)
def test_bad_input_raises(frames, kwargs, match):
    kwargs = dict(kwargs)
    p = kwargs.pop("patch_size", 14)
    with pytest.raises(ValueError, match=match):
        patchify_normalize(frames, p, **kwargs)


@needs_kernel
def test_ops_checks_frame_index_values_like_the_public_function():
    """The model's path (Ops) makes the same checks as patchify_normalize: an out-of-range frame index
    never reaches the kernel (which would read out of bounds); the reference then raises."""
    x = _frames(torch.uint8, 2, 28, 28)
    ops = Ops(fast=True)
    with pytest.raises(IndexError):
        ops.patchify("patchify", x, 14, Normalization(MEAN, STD), frame_index=torch.tensor([0, 2]))
    assert "frame_index values must be in [0, 2)" in ops.report["patchify"]


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernel, bf16 exact, large frames
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_gpu_exact(seed, out_dtype, in_dtype):
    x = _frames(in_dtype, 2 * 8, 336, 336).cuda()
    idx = torch.tensor([0, 1, 2, 8, 9, 15], device="cuda")
    for kw in ({}, {"mean": MEAN, "std": STD}, {"frame_index": idx}):
        got = patchify_normalize(x, 14, out_dtype=out_dtype, **kw)
        assert torch.equal(got, patchify_normalize_ref(x, 14, out_dtype=out_dtype, **kw))
    xv = x.view(2, 8, *x.shape[1:]).flatten(0, 1)
    assert torch.equal(patchify_normalize(xv, 14, MEAN, STD, out_dtype), patchify_normalize_ref(xv, 14, MEAN, STD, out_dtype))


@pytest.mark.gpu
def test_gpu_compiles():
    x = torch.randint(0, 256, (4, 224, 224, 3), dtype=torch.uint8, device="cuda")
    f = torch.compile(lambda t: patchify_normalize(t, 16, MEAN, STD, out_dtype=torch.bfloat16).float().sum(-1))
    torch.testing.assert_close(f(x), patchify_normalize_ref(x, 16, MEAN, STD, out_dtype=torch.bfloat16).float().sum(-1))
