"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before any
kernel module is imported (Triton reads it at @triton.jit time).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def seed():
    """Seed torch's generators; tests that draw random inputs take this fixture."""
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bf16 kernel checks run only there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
