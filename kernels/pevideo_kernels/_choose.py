"""The one place that chooses between an op's Triton kernel and its PyTorch reference.

Each op module describes itself with a :class:`KernelOp`: four functions that all take the op's
arguments exactly as its public function does. The public function (``rope_attention``,
``patchify_normalize``) is :func:`run`; ``pevideo.dispatch.Ops`` calls :func:`kernel_reason` and then
the op's ``fused`` or ``ref`` itself, to add its own policy (fallback instead of ValueError, a failing
kernel caught, the first output checked against the reference, a per-op report).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["KernelOp", "kernel_reason", "run"]


@dataclass
class KernelOp:
    """An op's interface: every function takes the arguments of the op's public function."""

    name: str
    check_args: Callable[..., None]  # raises ValueError for arguments the op does not take
    unsupported_reason: Callable[..., "str | None"]  # None if the kernel can serve checked arguments
    fused: Callable[..., torch.Tensor]  # the Triton kernel (only called when unsupported_reason is None)
    ref: Callable[..., torch.Tensor]  # the plain PyTorch definition


def kernel_reason(op: KernelOp, *args, **kwargs) -> str | None:
    """Check the arguments (ValueError if they are bad), then None if the kernel serves them, else why not."""
    op.check_args(*args, **kwargs)
    return op.unsupported_reason(*args, **kwargs)


def run(op: KernelOp, *args, **kwargs) -> torch.Tensor:
    """An op's public function: check the arguments, then run the kernel where it can, else the reference."""
    if kernel_reason(op, *args, **kwargs) is None:
        return op.fused(*args, **kwargs)
    return op.ref(*args, **kwargs)
