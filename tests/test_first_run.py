"""A new user's first commands, run as they run them: from the repository root, as subprocesses.

transformers 5.25 imports Hugging Face's ``kernels`` library; ``python -m``, ``python -c``, pytest and a
script saved in the root all put the root first on ``sys.path``, where a ``kernels`` *package* would
shadow that library (it once did: every test failed to collect). The project's ``kernels/`` folder
holds ``pevideo_kernels/`` and has no ``__init__.py``, so it can only be a namespace candidate, which a
regular package later on ``sys.path`` beats. These tests put a stand-in ``kernels`` package *after* the
root on ``sys.path`` -- where an installed library sits -- and check that it wins, whatever is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A folder holding a regular ``kernels`` package that says who it is (stands in for Hugging Face's)."""
    site = tmp_path_factory.mktemp("site")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("WHO = 'the installed kernels library'\n")
    return str(site)


def _run(args, stand_in=None, cwd=ROOT, timeout=300):
    env = dict(os.environ)
    if stand_in is not None:  # after whatever the environment already has (e.g. the tree's kernels/ folder)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), stand_in) if p)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_no_kernels_package_in_the_tree():
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py")), (
        "kernels/__init__.py makes the folder a package that shadows Hugging Face's kernels from the repo root")
    assert not os.path.exists(os.path.join(ROOT, "kernels.py"))
    assert os.path.isfile(os.path.join(ROOT, "kernels", "pevideo_kernels", "__init__.py"))


def test_installed_kernels_library_wins_from_the_root(stand_in):
    out = _run(["-c", "import kernels; print(kernels.WHO)"], stand_in)
    assert out.strip() == "the installed kernels library"


def test_import_pevideo_and_transformers_from_the_root():
    # with the environment's real packages: transformers 5.25+ imports Hugging Face's kernels here
    code = ("import importlib.util, pevideo, pevideo_kernels, transformers.activations;"
            "print(pevideo.__file__); print(pevideo_kernels.__file__);"
            "spec = importlib.util.find_spec('kernels');"
            "print(spec.origin if spec is not None else None)")
    pe, pk, origin = _run(["-c", code]).split("\n")[:3]
    assert pe == os.path.join(ROOT, "pevideo", "__init__.py"), pe
    assert pk == os.path.join(ROOT, "kernels", "pevideo_kernels", "__init__.py"), pk
    # `kernels` is the installed library (a file in site-packages, which may sit in a venv inside the
    # tree) or, where none is installed, at most the tree's empty namespace folder (origin None), never a
    # module of the tree's kernels/ folder
    assert origin == "None" or not origin.startswith(os.path.join(ROOT, "kernels") + os.sep), origin


def test_cli_help_from_the_root():
    out = _run(["-m", "pevideo", "--help"])
    for command in ("bench", "embed", "classify", "merge", "tiny-checkpoint"):
        assert command in out


def test_pytest_of_one_file_from_the_root():
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_tiny_checkpoint.py", "-k", "config"])
    assert " passed" in out


def test_wheel_installs_pevideo_kernels_not_kernels(tmp_path):
    """A regular (non-editable) install: the wheel's top-level packages are pevideo and pevideo_kernels."""
    try:
        import setuptools

        isolation = [] if int(setuptools.__version__.split(".")[0]) < 77 else ["--no-build-isolation"]
    except ImportError:
        isolation = []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(tmp_path), ROOT],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = [p for p in tmp_path.iterdir() if p.suffix == ".whl"]
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"pevideo", "pevideo_kernels"}, top
    assert "pevideo_kernels/rope_attention.py" in names and "pevideo/embed/reading.py" in names
    # installed into a folder of its own and imported from elsewhere, it is the whole library
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    code = ("import pevideo, pevideo_kernels, transformers.activations;"
            "assert pevideo.__file__.startswith(%r), pevideo.__file__;"
            "assert pevideo_kernels.__file__.startswith(%r)" % (str(site), str(site)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
