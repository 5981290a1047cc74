"""The Triton kernels build for Hopper (sm_90) as a launch builds them: every autotune config, for the
model's real shapes, every RoPE candidate; the frame shape's default configs fit 2 CTAs per SM and the
backward kernels hold each score once, without spills.

The interpreter tests never run Triton's GPU compiler; this does (ahead of time, no GPU needed), so a
kernel that only the GPU compiler rejects fails here rather than on a user's machine, and so does a
config that spills or a 16-bit frame config that misses Hopper's wgmma. The per-build resource table
(registers, spills, shared memory, wgmma, exp2 per score) is printed (``pytest -s`` or ``-rP`` shows it).
It runs under ``PYTHONSAFEPATH=1`` (which leaves the script's folder off sys.path), so it works however
Python is started.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pevideo_kernels import HAS_TRITON

HERE = os.path.dirname(__file__)
# Hopper: 64K registers and 228 KB shared memory per SM (1 KB of it reserved per CTA). Two CTAs of 8 warps
# fit when each thread holds at most 128 registers and each CTA at most 113 KB.
TWO_CTAS_REGS, TWO_CTAS_SMEM = 128, 113 * 1024


def _fields(line: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", line.split("|", 1)[1]))


def _spills(f: dict) -> bool:
    return f["spill_st"] != "0" or f["spill_ld"] != "0"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONSAFEPATH"] = "1"  # (the script finds its sibling module anyway)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_build_for_gpu.py"), "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=1200,
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
    # every RoPE candidate built for the frame shape, with its per-forward pass; "prerotate" its default
    for mode in ("loop", "prerotate", "table"):
        assert any("frames bfloat16" in line and f"rope_k={mode}" in line for line in attn), mode
    assert any("frames bfloat16" in line and "rope_k=prerotate*" in line for line in attn)
    assert any("temporal s=17" in line and "rope_k=loop*" in line for line in attn)
    assert any(line.startswith("ok rope_rotate") for line in attn)
    assert any(line.startswith("ok rope_table") for line in attn)
    for line in attn:
        f = _fields(line)
        assert int(f["regs"]) > 0, line
        # the fast-trig range reduction rounds without FRND (SFU pipe, beside cos/sin)
        assert f["frnd"] == "0", line
        if "frames" in line or "temporal" in line:
            assert not _spills(f), f"spills: {line}"
        if line.startswith("ok rope_attention frames") and ("bfloat16" in line or "float16" in line):
            assert f["wgmma"] == "yes", f"no wgmma: {line}"
            if "rope_k=prerotate*" in line:  # the frame shape's default configs: 2 CTAs per SM
                assert int(f["regs"]) <= TWO_CTAS_REGS and int(f["smem"]) <= TWO_CTAS_SMEM, f"not 2 CTAs/SM: {line}"
    # the backward: no spills (head_dim 256's dK half excepted: 8 registers, kernels/README.md); the frame
    # tiles (head_dim 64) exponentiate every score once (no score held by two threads)
    bwd = [line for line in lines if line.startswith("ok rope_attn_bwd")]
    assert len(bwd) >= 12
    for line in bwd:
        f = _fields(line)
        if " d256 " in line:
            assert int(f["spill_st"]) <= 16, f"spills: {line}"
        else:
            assert not _spills(f), f"spills: {line}"
        if "frames torch.bfloat16" in line:
            assert float(f["ex2_per_score"]) == 1.0, f"a score's exp2 computed more than once: {line}"
            assert f["wgmma"] == "yes", f"no wgmma: {line}"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_build_check_lists_jobs_from_anywhere(tmp_path):
    """Started from another directory with PYTHONSAFEPATH=1 (no script folder, no cwd on sys.path), the
    build check still imports its sibling module and lists the backward kernels' jobs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONSAFEPATH"] = "1"
    proc = subprocess.run([sys.executable, os.path.abspath(os.path.join(HERE, "_build_for_gpu.py")), "--list",
                           "--only", "rope_attn_bwd"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith("rope_attn_bwd_dkdv frames") for line in proc.stdout.splitlines()), proc.stdout
