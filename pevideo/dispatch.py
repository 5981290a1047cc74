"""The one seam between pevideo's modules and its kernels.

Modules call :class:`Ops` methods by op name; each call picks the fused Triton kernel or its PyTorch
reference and records why. With ``fast=False`` everything runs the reference (the eager path). With
``fast=True`` an op falls back to its reference where the kernel can't serve (no Triton, CPU tensors
outside the interpreter, a dtype or head_dim it doesn't take, inputs requiring grad through an op with
no fused backward, or a kernel that fails to build or run) and warns once per op and reason. Attention
has a fused backward: with inputs requiring grad (training) it runs the kernel with autograd; only
patchify (forward-only; its uint8 input never needs grad) and attention whose coords/freqs require grad
fall back then. ``pevideo.kernel_report(model)`` reads the
record of the last forward.

Attention takes its options as one :class:`pevideo_kernels.AttnArgs` (``pevideo_kernels.attn_args``),
which the model builds once per batch and every layer reuses: per call only q, k, v are checked
(metadata, no host sync), so a frame-encoder step can run under CUDA-graph capture. Each op's first
fused output (per dtype and device) is checked against its reference, which reads results on the
host: run one batch before capturing (capturing an unchecked op raises).
"""
from __future__ import annotations

import warnings

import torch

from pevideo_kernels import (
    PATCHIFY,
    ROPE_ATTENTION,
    ROPE_ATTENTION_QKVPACKED,
    AttnArgs,
    KernelOp,
    attn_args,
    patchify_normalize,
    resolve,
)

from .normalization import Normalization

# patchify_normalize: for the processor's clip -> patch rows path (outside a model, so no Ops record);
# attn_args / AttnArgs: the attention options the model builds once per batch.
__all__ = ["Ops", "FUSED", "PeVideoKernelFallbackWarning", "patchify_normalize", "attn_args", "AttnArgs"]

FUSED = "fused"
_NO_NORM = Normalization(mean=None, std=None, rescale=1 / 255)  # the kernel's own default for uint8
EAGER = "eager (fast=False)"


class PeVideoKernelFallbackWarning(RuntimeWarning):
    """A fused kernel could not serve an op in a fast model; its PyTorch reference ran instead."""


def _disagreement(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None if a fused output agrees with its reference to within its dtype's noise, else why not."""
    if out.shape != ref.shape:
        return f"the kernel's output has shape {tuple(out.shape)}, the reference's {tuple(ref.shape)}"
    o, r = out.float(), ref.float()
    if not torch.equal(torch.isfinite(o), torch.isfinite(r)):
        return "the kernel's output has non-finite values where the reference has none (or the reverse)"
    fin = torch.isfinite(r)
    if not fin.any():
        return None
    err = (o[fin] - r[fin]).abs().max().item()
    mag = r[fin].abs().max().item()
    tol = 1e-3 if out.dtype == torch.float32 else 5e-2
    if err > tol * max(mag, 1e-6):
        return f"the kernel's first output disagreed with the reference (max error {err:.3g} for magnitude {mag:.3g})"
    return None


class Ops:
    """Per-model kernel dispatcher. ``report`` maps op name to "fused" or the reason it isn't."""

    def __init__(self, fast: bool = False, verify: bool = True):
        self.fast = bool(fast)
        # Check each op's first fused output (per dtype and device) against its reference, so a kernel
        # that runs but computes garbage (a miscompile, a new GPU) is caught and switched off, not used.
        self.verify = bool(verify)
        self.report: dict[str, str] = {}
        self._warned: set[tuple[str, str]] = set()
        self._checked: dict[tuple, str | None] = {}

    def reset(self) -> None:
        self.report = {}

    def warn_fallbacks(self) -> None:
        """Warn, once per op and reason over the model's life, about ops that ran their reference."""
        new = [(op, r) for op, r in self.report.items() if r not in (FUSED, EAGER) and (op, r) not in self._warned]
        if not new:
            return
        self._warned.update(new)
        lines = "\n".join(f"  {op}: {r}" for op, r in new)
        warnings.warn(
            f"pevideo fast=True: these ops ran their PyTorch reference (eager path) instead of a fused kernel:\n{lines}",
            PeVideoKernelFallbackWarning,
            stacklevel=3,
        )

    # -- bookkeeping -------------------------------------------------------------------------------
    def _fallback(self, op: str, reason: str) -> None:
        self.report[op] = reason

    def _run(self, op: str, kop: KernelOp, *args, **kwargs) -> torch.Tensor:
        """Run ``kop`` on these arguments as fused or reference, record which under ``op``, return the output."""
        if not self.fast:
            self.report[op] = EAGER
            return kop.ref(*args, **kwargs)
        try:
            call, reason = resolve(kop, *args, **kwargs)  # the same choice as the public function makes
        except ValueError as exc:  # a shape/dtype the kernel doesn't take: the reference still does
            reason = f"unsupported by the kernel ({exc})"
        if reason is None:
            try:
                out = kop.fused(call)
            except Exception as exc:  # a kernel that fails to compile or launch must not sink the model
                msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                reason = f"the kernel failed ({type(exc).__name__}: {msg})"
            else:
                key = (op, out.dtype, out.device.type)
                if self.verify and key not in self._checked:
                    if out.is_cuda and torch.cuda.is_current_stream_capturing():
                        raise RuntimeError(
                            f"pevideo fast=True: {op}'s kernel has not been checked against its reference yet, "
                            "which needs the host; run one batch before capturing a CUDA graph")
                    with torch.no_grad():  # (a check, not part of the graph)
                        ref = kop.ref(*args, **kwargs)
                    self._checked[key] = _disagreement(out.detach(), ref)
                    if self._checked[key] is not None:
                        self._fallback(op, self._checked[key])
                        # the check's reference is the output, unless autograd needs its graph
                        return kop.ref(*args, **kwargs) if out.requires_grad else ref
                reason = self._checked.get(key)
                if reason is None:
                    self.report[op] = FUSED
                    return out
        self._fallback(op, reason)
        return kop.ref(*args, **kwargs)

    # -- ops ---------------------------------------------------------------------------------------
    def attention(self, op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttnArgs) -> torch.Tensor:
        """:func:`pevideo_kernels.rope_attention` on q, k, v with the options ``args``, recorded under ``op``."""
        return self._run(op, ROPE_ATTENTION, q, k, v, args)

    def attention_qkvpacked(self, op: str, qkv: torch.Tensor, args: AttnArgs) -> torch.Tensor:
        """:func:`pevideo_kernels.rope_attention_qkvpacked` (q, k, v = ``qkv.unbind(-3)``; with autograd
        their gradient is one qkv-shaped buffer), recorded under ``op``."""
        return self._run(op, ROPE_ATTENTION_QKVPACKED, qkv, args)

    def patchify(
        self,
        op: str,
        frames: torch.Tensor,
        patch_size: int,
        norm: Normalization | None = None,
        out_dtype: torch.dtype | None = None,
        frame_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`pevideo_kernels.patchify_normalize` with the :class:`~pevideo.Normalization` record
        ``norm`` (for uint8 frames; None for float frames, already normalized), recorded under ``op``."""
        n = (norm or _NO_NORM).as_kwargs()
        return self._run(op, PATCHIFY, frames, patch_size, n["mean"], n["std"], n["rescale"], out_dtype, frame_index)
