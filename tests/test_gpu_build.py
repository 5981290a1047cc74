"""The Triton kernels build for Hopper (sm_90): every autotune config, for the model's real shapes.

The interpreter tests never run Triton's GPU compiler; this does (ahead of time, no GPU needed), so a
kernel that only the GPU compiler rejects fails here rather than on a user's machine.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pevideo_kernels import HAS_TRITON

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_build_for_gpu.py"), "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(lines) >= 40 and all(line.startswith("ok ") for line in lines), proc.stdout[-4000:]
    assert any("rope_attention frames" in line for line in lines)
    assert any(line.startswith("ok patchify") for line in lines)
