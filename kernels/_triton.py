"""Whether a Triton kernel can run on given tensors, and if not, a reason a user can read.

Nothing here fails at import: without Triton every op runs its PyTorch reference.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional at run time.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising anything else
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "interpreting", "device_reason", "grad_reason"]


# Triton decides at @triton.jit time whether a kernel is interpreted, so read the switch once, at import,
# together with the kernels: setting TRITON_INTERPRET later does not turn already-built kernels into
# interpreted ones.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def interpreting() -> bool:
    """True when Triton's interpreter was on (TRITON_INTERPRET=1) as pevideo_kernels was imported."""
    return _INTERPRET


def device_reason(*tensors: torch.Tensor | None) -> str | None:
    """None if a Triton kernel can run on these tensors' device, else why not."""
    if not HAS_TRITON:
        return f"Triton is not available ({TRITON_IMPORT_ERROR})"
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        return (
            f"tensors are on {t.device.type}; the Triton kernels run on CUDA devices "
            "(or on CPU under TRITON_INTERPRET=1)"
        )
    return None


def grad_reason(*tensors: torch.Tensor | None) -> str | None:
    """None unless autograd would need to flow through the (forward-only) kernel."""
    if not torch.is_grad_enabled():
        return None
    if any(t is not None and t.requires_grad for t in tensors):
        return "inputs require grad and the kernel is forward-only (autograd runs through the reference)"
    return None
