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


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """A tiny random checkpoint (saved by transformers, with a tokenizer) and short videos, built once
    per session; tests read them and never change them. ``videos/``: a.mp4 (12 frames, 48x64),
    b.mp4 (5, 40x56), bad.mp4 (not a video), d.avi (9, mpeg4), sub/c.mkv (20, 36x36), and notes.txt
    (not an input: folders take video extensions only). ``order``: the inputs as a folder expands;
    ``good``: those that decode; ``frames``: each good one's frame count."""
    pytest.importorskip("av")
    from _media import write_checkpoint, write_corrupt, write_video

    root = tmp_path_factory.mktemp("media")
    ckpt = write_checkpoint(root / "ckpt")
    v = root / "videos"
    (v / "sub").mkdir(parents=True)
    write_video(v / "a.mp4", 12)
    write_video(v / "b.mp4", 5, 40, 56, seed=1)
    write_corrupt(v / "bad.mp4")
    write_video(v / "d.avi", 9, codec="mpeg4", seed=3)
    write_video(v / "sub" / "c.mkv", 20, 36, 36, seed=2)
    (v / "notes.txt").write_text("not a video, and not an input: folders take video extensions only\n")
    order = [str(v / n) for n in ("a.mp4", "b.mp4", "bad.mp4", "d.avi", "sub/c.mkv")]
    good = [p for p in order if "bad" not in p]
    return dict(root=root, ckpt=ckpt, videos=str(v), order=order, good=good, frames=[12, 5, 9, 20])


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any model fails the test loudly: every path to a model (the pipeline's session, the
    API, ``load_model``) goes through ``PeVideoModel.from_pretrained``."""
    from pevideo.modeling import PeVideoModel

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(PeVideoModel, "from_pretrained", boom)
