"""The Triton kernels build for Hopper (sm_90) as a launch builds them: every autotune config, for the
model's real shapes, every RoPE candidate.

The interpreter tests never run Triton's GPU compiler; this does (ahead of time, no GPU needed), so a
kernel that only the GPU compiler rejects fails here rather than on a user's machine, and so does a
config that spills or a 16-bit frame config that misses Hopper's wgmma. The per-build resource table
(registers, spills, shared memory, wgmma) is printed (``pytest -s`` or ``-rP`` shows it).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pevideo_kernels import HAS_TRITON

HERE = os.path.dirname(__file__)


def _fields(line: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", line.split("|", 1)[1]))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_build_for_gpu.py"), "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(lines) >= 60 and all(line.startswith("ok ") for line in lines), proc.stdout[-4000:]
    assert any(line.startswith("ok patchify") for line in lines)
    # the training kernels (tests/_build_bwd_for_gpu.py): both backward kernels, the forward storing lse
    for kernel in ("rope_attn_bwd_dq frames", "rope_attn_bwd_dkdv frames", "rope_attention+lse frames"):
        assert any(line.startswith(f"ok {kernel}") for line in lines), kernel
    attn = [line for line in lines if line.startswith(("ok rope_attention", "ok rope_rotate", "ok rope_table"))]
    # every RoPE candidate built for the frame shape, with its per-forward pass
    for mode in ("loop", "prerotate", "table"):
        assert any("frames bfloat16" in line and f"rope_k={mode}" in line for line in attn), mode
    assert any(line.startswith("ok rope_rotate") for line in attn)
    assert any(line.startswith("ok rope_table") for line in attn)
    for line in attn:
        f = _fields(line)
        assert int(f["regs"]) > 0, line
        # the fast-trig range reduction rounds without FRND (SFU pipe, beside cos/sin)
        assert f["frnd"] == "0", line
        if "frames" in line or "temporal" in line:
            assert f["spill_st"] == "0" and f["spill_ld"] == "0", f"spills: {line}"
        if line.startswith("ok rope_attention frames") and ("bfloat16" in line or "float16" in line):
            assert f["wgmma"] == "yes", f"no wgmma: {line}"
