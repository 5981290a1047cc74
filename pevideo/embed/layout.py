"""Where an embedding run's files go (:class:`Layout`), and the one check, made before any work, that
writing them destroys nothing of the user's (:func:`plan_output`).

For ``out="emb.safetensors"``: the file itself, its shards in ``emb.safetensors.shards/`` while the run
works, ``emb.errors.jsonl`` and the lock ``emb.safetensors.lock``. For ``out="emb"``: a folder holding
``manifest.json``, ``shard-00000.safetensors``, ..., ``errors.jsonl`` and ``.pevideo.lock``.

Refused (:class:`OutputPathError`, exit 2), whatever ``--overwrite`` says: an output or errors file that
is one of the run's inputs (a video, a list file, an input folder), lies inside the checkpoint folder,
is another output of the same run, or is not a file name (``emb.safetensors/``, an existing folder);
and an existing file at one of those places that pevideo did not write (proved by its metadata: a
pevideo embeddings file, a pevideo manifest, a pevideo errors file). A device or FIFO given as the
errors file (``/dev/stderr``) is written in place, never replaced.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .records import FORMAT
from .safeio import OutputPathError, is_regular_or_absent

__all__ = ["Layout", "plan_output", "check_table_path", "refuse_conflicts", "refuse_foreign", "is_pevideo_file",
           "is_errors_file", "is_manifest_file", "SHARD_NAME"]

SHARD_NAME = re.compile(r"shard-([0-9]+)\.safetensors")
_SEPS = ("/", os.sep)


@dataclass(frozen=True)
class Layout:
    final: str | None  # the single output file, or None when the shards are the output
    work: str  # folder holding manifest.json and the shards
    errors: str  # the errors file (JSONL)

    @classmethod
    def of(cls, out, errors=None) -> "Layout":
        out = os.fspath(out)
        if out.endswith(".safetensors"):
            default_errors = out[: -len(".safetensors")] + ".errors.jsonl"
            return cls(out, out + ".shards", os.fspath(errors) if errors else default_errors)
        return cls(None, out, os.fspath(errors) if errors else os.path.join(out, "errors.jsonl"))

    @property
    def out(self) -> str:
        """What the user named: the one file, or the folder."""
        return self.final or self.work

    @property
    def manifest(self) -> str:
        return os.path.join(self.work, "manifest.json")

    @property
    def lock(self) -> str:
        """``X.safetensors.lock`` beside a one-file output; ``FOLDER/.pevideo.lock`` in a folder output."""
        return self.final + ".lock" if self.final is not None else os.path.join(self.work, ".pevideo.lock")

    def shard(self, s: int) -> str:
        return os.path.join(self.work, f"shard-{s:05d}.safetensors")


# --------------------------------------------------------------------------------------------------
def _name_rules(p: str) -> None:
    """``X.safetensors`` is one file, any other name a folder of shards; refuse names that would not be
    what they say."""
    if not p:
        raise OutputPathError("--out", "is empty")
    bare = p.rstrip("/" + os.sep)
    if bare != p and bare.endswith(".safetensors"):
        raise OutputPathError(p, "ends with a slash, but a .safetensors output is one file",
                              "drop the slash for one file, or the .safetensors suffix for a folder of shards")
    if p.endswith(".safetensors"):
        if os.path.isdir(p):
            raise OutputPathError(p, "is a folder; a .safetensors output is one file",
                                  "drop the suffix for a folder of shards")
        return
    if p.endswith(_SEPS) or os.path.isdir(p):
        return  # a folder, said so
    if os.path.exists(p):
        raise OutputPathError(p, "exists and is not a folder; the output is X.safetensors (one file) or a folder",
                              "give another --out")
    ext = os.path.splitext(os.path.basename(p))[1]
    if ext:
        raise OutputPathError(p, f"a {ext} name would become a folder of shards; the output is X.safetensors "
                              f"(one file) or a folder", f"a name without an extension, or ending with / as in {p}/")


def _real(p: str) -> str:
    return os.path.normcase(os.path.realpath(p))


def _same(a: str, b: str) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    real, top = _real(path), _real(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _inputs_hit(paths: list[str], inputs) -> tuple[str, str] | None:
    """(output path, input) for the first of ``paths`` that is one of the run's inputs (a video, a list
    file, an input folder). One pass over the inputs comparing file names; only inputs of the same name
    are looked up on disk, so a million inputs cost a string pass, not a million stats."""
    if not inputs:
        return None
    by_name: dict[str, list[str]] = {}
    for path in paths:
        for name in {os.path.basename(path.rstrip("/" + os.sep)), os.path.basename(_real(path))}:
            by_name.setdefault(name, []).append(path)
    for p in (*inputs, *getattr(inputs, "sources", ())):
        p = os.fspath(p)
        for path in by_name.get(os.path.basename(p.rstrip("/" + os.sep)), ()):
            if _same(p, path):
                return path, p
    return None


def refuse_conflicts(named: list[tuple[str, str]], inputs, checkpoint) -> None:
    """Refuse any of ``named`` ((what, path)) that is an input or lies inside the checkpoint folder."""
    hit = _inputs_hit([p for _, p in named], inputs)
    if hit is not None:
        what = next(w for w, p in named if p == hit[0])
        raise OutputPathError(hit[0], f"{what} would be written over an input of this run ({hit[1]})",
                              "give another path")
    for what, path in named:
        if checkpoint is not None and _inside(path, checkpoint):
            raise OutputPathError(path, f"{what} would be written inside the checkpoint folder {checkpoint}",
                                  "give a path outside it")


# --------------------------------------------------------------------------------------------------
def is_pevideo_file(path: str) -> bool | None:
    """True: a safetensors file pevideo wrote (its metadata says so); False: a complete file that is
    not; None: not readable as safetensors (empty, cut short: it proves nothing either way)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except OSError:
        raise
    except Exception:
        return None


def is_errors_file(path: str) -> bool:
    """A file pevideo's errors file could be: empty, or JSON lines each an object with an index and a path."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                e = json.loads(line)
                if not (isinstance(e, dict) and "index" in e and "path" in e):
                    return False
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def is_manifest_file(path: str) -> bool:
    """A pevideo manifest, possibly damaged: it names pevideo's format (a user's own manifest.json won't)."""
    with open(path, "rb") as f:
        return f'"{FORMAT}"'.encode() in f.read(1 << 20)


def refuse_foreign(path: str, what: str, advice: str = "remove it yourself, or give another path") -> None:
    raise OutputPathError(path, f"exists and is not {what} pevideo wrote; refusing to replace it", advice)


def _check_existing(layout: Layout) -> None:
    """Existing files at the run's places: pevideo's own (resumed, or replaced with --overwrite), or refused."""
    if layout.final is not None and os.path.isfile(layout.final) and os.path.getsize(layout.final) > 0:
        ours = is_pevideo_file(layout.final)
        if ours is None:  # cut short or not safetensors: say so (a rerun would not fix it)
            from .records import read_header

            read_header(layout.final)
        if not ours:
            refuse_foreign(layout.final, "an embeddings file")
    if os.path.isfile(layout.errors) and not is_errors_file(layout.errors):
        refuse_foreign(layout.errors, "an errors file")
    if os.path.isdir(layout.work):
        has_manifest = os.path.isfile(layout.manifest)
        if has_manifest and not is_manifest_file(layout.manifest):
            refuse_foreign(layout.manifest, "a manifest", "this folder holds other files: give another --out")
        if not has_manifest:  # no manifest to prove the shards ours: each must prove itself
            for name in os.listdir(layout.work):
                p = os.path.join(layout.work, name)
                if SHARD_NAME.fullmatch(name) and os.path.isfile(p) and os.path.getsize(p) > 0 and not is_pevideo_file(p):
                    refuse_foreign(p, "a shard", "this folder holds other files: give another --out")


def plan_output(out, errors=None, *, inputs=None, checkpoint: str | None = None) -> Layout:
    """The run's :class:`Layout`, checked once before any work (see the module docstring); raises
    :class:`OutputPathError` (exit 2) naming the path and the reason, or :class:`DamagedOutputError`
    (exit 3) for an output file of pevideo's that is cut short. ``inputs``: the run's inputs (a
    :class:`~pevideo.embed.inputs.VideoPaths` also carries the list files and folders they came from);
    ``checkpoint``: the checkpoint folder, if any."""
    p = os.fspath(out)
    _name_rules(p)
    layout = Layout.of(p, errors)
    if layout.final is not None and os.path.exists(layout.work) and not os.path.isdir(layout.work):
        raise OutputPathError(layout.work, "is not a folder (the shards of this output go there)",
                              "move it away, or give another --out")
    e = layout.errors
    if not e or e.endswith(_SEPS) or os.path.isdir(e):
        raise OutputPathError(e or "--errors", "is not a file name (the errors file is one file)", "give a file name")
    others = [layout.lock, layout.manifest, layout.work] + ([layout.final] if layout.final else [])
    clash = next((o for o in others if _same(e, o)), None)
    if clash is None and _inside(e, layout.work) and SHARD_NAME.fullmatch(os.path.basename(e)):
        clash = e
    if clash is not None:
        raise OutputPathError(e, f"the errors file would be written over another output of this run ({clash})",
                              "give another --errors")
    refuse_conflicts([("the output", layout.out), ("the errors file", e)], inputs, checkpoint)
    _check_existing(layout)
    return layout


def check_table_path(path: str, *, inputs=None, checkpoint: str | None = None, owned=None) -> None:
    """``pevideo classify --out``: a file name, not an input, not inside the checkpoint, and an
    existing regular file only when ``owned(path)`` says pevideo wrote it (a table it made)."""
    p = os.fspath(path)
    if not p or p.endswith(_SEPS) or os.path.isdir(p):
        raise OutputPathError(p or "--out", "is not a file name (the table is one file)", "give a file name")
    refuse_conflicts([("the table", p)], inputs, checkpoint)
    if os.path.isfile(p) and os.path.getsize(p) > 0 and is_regular_or_absent(p) and owned is not None and not owned(p):
        refuse_foreign(p, "a table")

