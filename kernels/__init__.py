"""pevideo's Triton kernels, one op per module, each beside its PyTorch reference.

Installed as ``pevideo_kernels``. Importing never fails: without Triton (or a GPU) every op runs its
reference, and ``*_unsupported_reason`` says why.
"""
from ._triton import HAS_TRITON, TRITON_IMPORT_ERROR, interpreting
from .patchify import patchify_normalize, patchify_normalize_ref, patchify_unsupported_reason
from .rope_attention import (
    apply_rope_ref,
    pe_core_rope_2d,
    rope_1d,
    rope_attention,
    rope_attention_ref,
    rope_attention_unsupported_reason,
)

__all__ = [
    "HAS_TRITON",
    "TRITON_IMPORT_ERROR",
    "interpreting",
    "rope_attention",
    "rope_attention_ref",
    "rope_attention_unsupported_reason",
    "apply_rope_ref",
    "pe_core_rope_2d",
    "rope_1d",
    "patchify_normalize",
    "patchify_normalize_ref",
    "patchify_unsupported_reason",
]
