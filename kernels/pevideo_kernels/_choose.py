"""The one place that chooses between an op's Triton kernel and its PyTorch reference.

Each op module describes itself with a :class:`KernelOp`. ``resolve`` takes the op's arguments, checks
them (ValueError) and returns the resolved call -- one record -- that ``unsupported_reason`` and
``fused`` take; ``ref`` takes the arguments as ``resolve`` does. The public function (``rope_attention``,
``patchify_normalize``) is :func:`run`; ``pevideo.dispatch.Ops`` calls :func:`resolve` and then the
op's ``fused`` or ``ref`` itself, to add its own policy (fallback instead of ValueError, a failing
kernel caught, the first output checked against the reference, a per-op report).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["KernelOp", "resolve", "kernel_reason", "run"]


@dataclass
class KernelOp:
    """An op's interface (see the module docstring)."""

    name: str
    resolve: Callable[..., Any]  # the op's arguments -> the resolved call; ValueError for bad arguments
    unsupported_reason: Callable[[Any], "str | None"]  # None if the kernel can serve the resolved call
    fused: Callable[[Any], torch.Tensor]  # the Triton kernel on the resolved call
    ref: Callable[..., torch.Tensor]  # the plain PyTorch definition, on the op's arguments


def resolve(op: KernelOp, *args, **kwargs) -> tuple[Any, "str | None"]:
    """(the resolved call, None if the kernel serves it else why not); ValueError for bad arguments."""
    call = op.resolve(*args, **kwargs)
    return call, op.unsupported_reason(call)


def kernel_reason(op: KernelOp, *args, **kwargs) -> str | None:
    """Check the arguments (ValueError if they are bad), then None if the kernel serves them, else why not."""
    return resolve(op, *args, **kwargs)[1]


def run(op: KernelOp, *args, **kwargs) -> torch.Tensor:
    """An op's public function: check the arguments, then run the kernel where it can, else the reference."""
    call, reason = resolve(op, *args, **kwargs)
    return op.fused(call) if reason is None else op.ref(*args, **kwargs)
