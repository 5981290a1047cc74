"""pevideo's Triton kernels, one op per module, each beside its PyTorch reference.

Installed as ``pevideo_kernels``. Importing never fails: without Triton (or a GPU) every op runs its
reference, and ``*_unsupported_reason`` says why. Each op module has the same interface, a
:class:`KernelOp` record (``ROPE_ATTENTION``, ``PATCHIFY``): ``check_args``, ``unsupported_reason``,
``fused`` and ``ref``, all taking the public function's arguments; :func:`kernel_reason` is the one
place that chooses between kernel and reference. Test hooks: :mod:`pevideo_kernels.testing`.
"""
from ._choose import KernelOp, kernel_reason
from ._triton import HAS_TRITON, TRITON_IMPORT_ERROR, interpreting
from .patchify import (
    PATCHIFY,
    patchify_check_args,
    patchify_normalize,
    patchify_normalize_fused,
    patchify_normalize_ref,
    patchify_unsupported_reason,
)
from .rope_attention import (
    ROPE_ATTENTION,
    apply_rope_ref,
    rope_attention,
    rope_attention_check_args,
    rope_attention_fused,
    rope_attention_ref,
    rope_attention_unsupported_reason,
)
from .rope_attention_bwd import rope_attention_bwd, rope_attention_lse_ref

__all__ = [
    "HAS_TRITON",
    "TRITON_IMPORT_ERROR",
    "interpreting",
    "KernelOp",
    "kernel_reason",
    "ROPE_ATTENTION",
    "rope_attention",
    "rope_attention_ref",
    "rope_attention_fused",
    "rope_attention_check_args",
    "rope_attention_unsupported_reason",
    "apply_rope_ref",
    "rope_attention_bwd",
    "rope_attention_lse_ref",
    "PATCHIFY",
    "patchify_normalize",
    "patchify_normalize_ref",
    "patchify_normalize_fused",
    "patchify_check_args",
    "patchify_unsupported_reason",
]
