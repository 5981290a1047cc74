"""pevideo's Triton kernels, one op per module, each beside its PyTorch reference.

Installed as ``pevideo_kernels``. Importing never fails: without Triton (or a GPU) every op runs its
reference, and ``*_unsupported_reason`` says why. Each op module describes itself with a
:class:`KernelOp` record (``ROPE_ATTENTION``, ``ROPE_ATTENTION_QKVPACKED``, ``PATCHIFY``): ``resolve``
(the arguments checked into one resolved call), ``unsupported_reason`` and ``fused`` (on that call)
and ``ref``; :func:`kernel_reason` / :func:`resolve` are the one place that chooses between kernel and
reference. Test hooks: :mod:`pevideo_kernels.testing`. Contributor notes (modes, tiles, the sm_90
build check): ``kernels/README.md``.
"""
from ._choose import KernelOp, kernel_reason, resolve
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
    ROPE_ATTENTION_QKVPACKED,
    ROPE_K_MODES,
    AttnArgs,
    apply_rope_ref,
    attn_args,
    debug_checks,
    default_rope_k,
    rope_attention,
    rope_attention_check_args,
    rope_attention_fused,
    rope_attention_qkvpacked,
    rope_attention_ref,
    rope_attention_unsupported_reason,
    rope_k_mode,
)
from .rope_attention_bwd import rope_attention_bwd, rope_attention_lse_ref

__all__ = [
    "HAS_TRITON",
    "TRITON_IMPORT_ERROR",
    "interpreting",
    "KernelOp",
    "kernel_reason",
    "resolve",
    "ROPE_ATTENTION",
    "ROPE_ATTENTION_QKVPACKED",
    "rope_attention",
    "rope_attention_qkvpacked",
    "rope_attention_ref",
    "rope_attention_fused",
    "rope_attention_check_args",
    "rope_attention_unsupported_reason",
    "apply_rope_ref",
    "AttnArgs",
    "attn_args",
    "ROPE_K_MODES",
    "default_rope_k",
    "rope_k_mode",
    "debug_checks",
    "rope_attention_bwd",
    "rope_attention_lse_ref",
    "PATCHIFY",
    "patchify_normalize",
    "patchify_normalize_ref",
    "patchify_normalize_fused",
    "patchify_check_args",
    "patchify_unsupported_reason",
]
