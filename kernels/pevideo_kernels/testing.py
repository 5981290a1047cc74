"""Testing hooks for the kernels' launchers, for tests and benchmarks (not for the hot path).

    from pevideo_kernels.testing import interpreter_blocks, poison_outputs

    with poison_outputs(), interpreter_blocks(16, 16):
        out = rope_attention(q, k, v, cu_seqlens=cu)   # every element the kernel skips is NaN

Both are context managers that restore the previous setting on exit, and nest.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ._triton import LAUNCH

__all__ = ["poison_outputs", "interpreter_blocks"]


@contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Launchers fill their outputs with NaN before the kernel runs, so an element it does not write
    fails any finiteness or closeness check (``enabled=False`` switches it off inside an outer one)."""
    before = LAUNCH.poison
    LAUNCH.poison = bool(enabled)
    try:
        yield
    finally:
        LAUNCH.poison = before


@contextmanager
def interpreter_blocks(block_m: int, block_n: int) -> Iterator[None]:
    """rope_attention's (BLOCK_M, BLOCK_N) tile under TRITON_INTERPRET (default 64 x 64; compiled GPU
    launches autotune and ignore it). Small tiles reach more code paths (several query blocks, whole K
    tiles and a ragged last one) with inputs small enough for the interpreter."""
    for b in (block_m, block_n):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"interpreter block sizes must be powers of two >= 16, got {(block_m, block_n)}")
    before = LAUNCH.interpret_blocks
    LAUNCH.interpret_blocks = (block_m, block_n)
    try:
        yield
    finally:
        LAUNCH.interpret_blocks = before
