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

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "interpreting", "interpreter_reason", "device_reason", "grad_reason", "runtime_reason", "register_op", "LAUNCH"]


# Triton decides at @triton.jit time whether a kernel is interpreted, so read the switch once, at import,
# together with the kernels: setting TRITON_INTERPRET later does not turn already-built kernels into
# interpreted ones.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def interpreting() -> bool:
    """True when Triton's interpreter was on (TRITON_INTERPRET=1) as pevideo_kernels was imported."""
    return _INTERPRET


_INTERPRETER_REASON: list = []  # filled once, by the first interpreted launch's check


def interpreter_reason() -> str | None:
    """None if Triton's interpreter can run pevideo's kernels here, else why not (probed once).

    The kernels loop over key tiles with bounds loaded from memory (segment starts, mask spans). Triton
    3.6's interpreter turns such a loaded value into a Python int through a one-element NumPy array,
    which NumPy 2.4 and later refuse ("only 0-dimensional arrays can be converted to Python scalars").
    Compiled (GPU) kernels are unaffected.
    """
    if not _INTERPRETER_REASON:
        _INTERPRETER_REASON.append(_probe_interpreter())
    return _INTERPRETER_REASON[0]


def _probe_interpreter() -> str | None:
    @triton.jit
    def loaded_bound(x_ptr, n_ptr, out_ptr, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, tl.load(n_ptr), BLOCK):
            acc += tl.load(x_ptr + start + tl.arange(0, BLOCK))
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    x = torch.arange(32, dtype=torch.float32)
    out = torch.empty(16)
    try:
        loaded_bound[(1,)](x, torch.tensor([32], dtype=torch.int32), out, BLOCK=16)
        if torch.equal(out, x[:16] + x[16:]):
            return None
        problem = "computed a wrong sum"
    except Exception as exc:  # noqa: BLE001  any failure of the interpreter is a reason to use the reference
        problem = f"failed: {type(exc).__name__}: {exc}"
    import numpy

    return (f"Triton {triton.__version__}'s interpreter with NumPy {numpy.__version__} cannot run the kernels "
            f"(a loop bound loaded from memory {problem}); under TRITON_INTERPRET use numpy<2.4 or a newer Triton")


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
            reason = interpreter_reason()
            if reason is not None:
                return reason
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


def runtime_reason(kernel_missing: str | None, tensors, grad_tensors) -> str | None:
    """An op's reason not to run its kernel on (checked) arguments: the device, autograd, or no kernel.

    ``kernel_missing`` is why the op's Triton module did not import (None when it did); ``tensors`` are
    all tensor arguments (None allowed), ``grad_tensors`` those autograd could flow through.
    """
    reason = device_reason(*tensors)
    if reason is None:
        reason = grad_reason(*grad_tensors)
    if reason is None and kernel_missing is not None:
        reason = f"the Triton kernel could not be built ({kernel_missing})"
    return reason


def register_op(qualname: str, launcher, fake=None):
    """``launcher`` registered as ``torch.ops.<qualname>`` (what callers should run), else ``launcher``.

    Registered with ``torch.library.triton_op``, so ``torch.compile`` traces the launch. Under
    TRITON_INTERPRET with a ``fake`` (shape-only) given, an opaque ``custom_op`` instead: interpreted
    kernels can't be traced (wrap_triton would run them on fake tensors). Where the name is taken
    already -- by a second copy of this package, e.g. ``kernels/`` imported as ``kernels`` from a source
    checkout (transformers probes for a ``kernels`` package) -- the op would run the other copy's
    launcher, so this copy calls its own launcher directly.
    """
    ns, name = qualname.split("::")
    if hasattr(getattr(torch.ops, ns), name):
        return launcher
    try:
        if fake is None or not interpreting():
            return torch.library.triton_op(qualname, launcher, mutates_args=())
        op = torch.library.custom_op(qualname, launcher, mutates_args=())
        op.register_fake(fake)
        return op
    except Exception:  # noqa: BLE001  a torch that can't register it: launch directly
        return launcher


class _LaunchHooks:
    """Launcher switches for tests; set them only through :mod:`pevideo_kernels.testing`."""

    poison: bool = False  # fill outputs with NaN before each launch, so unwritten elements show up
    # rope_attention's (BLOCK_M, BLOCK_N) under TRITON_INTERPRET, where autotuning is far too slow
    interpret_blocks: tuple[int, int] = (64, 64)


LAUNCH = _LaunchHooks()
