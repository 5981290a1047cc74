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


# Tests of an optional extra: skipped where it is not installed, unless PEVIDEO_REQUIRE_EXTRAS=1 (the CI step
# that installs the extras sets it, so that a failed install fails instead of skipping them).
EXTRAS = {"ray": ("ray", "pyarrow"), "faiss": ("faiss",)}


def _missing(modules):
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items):
    for marker, modules in EXTRAS.items():
        missing = _missing(modules)
        if not missing:
            continue
        if os.environ.get("PEVIDEO_REQUIRE_EXTRAS") == "1":
            raise pytest.UsageError(f"PEVIDEO_REQUIRE_EXTRAS=1 but {', '.join(missing)} is not installed "
                                    f"(pip install -e '.[test,{marker}]')")
        skip = pytest.mark.skip(reason=f"needs pevideo[{marker}] ({', '.join(missing)} not installed)")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bf16 kernel checks run only there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
