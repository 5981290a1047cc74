"""Which videos a run embeds: files, folders and list files expanded, once, into an ordered path list."""
from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["expand_inputs", "VideoPaths", "VIDEO_EXTENSIONS", "LIST_EXTENSIONS"]

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .flv .wmv .3gp .3g2 .ogv .gif .mxf".split()
)
LIST_EXTENSIONS = (".txt", ".lst", ".list")


class VideoPaths(list):
    """The result of :func:`expand_inputs`: video paths, already expanded. Given to the pipeline's
    functions, it is taken as is rather than expanded again. ``sources``: what was given (files,
    folders, list files), so that no output is written over one of them."""

    sources: tuple[str, ...] = ()


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike], *, must_exist: bool = False) -> VideoPaths:
    """Video paths from files, folders and list files, in order.

    * a folder: the video files under it (by extension, see ``VIDEO_EXTENSIONS``), recursively, sorted
      by path; hidden files and folders are skipped;
    * a ``.txt`` / ``.lst`` / ``.list`` file: one path per line (blank lines and lines starting with
      ``#`` skipped); relative paths are relative to the list file's folder; folders listed expand;
    * anything else: a video file, taken as is.

    A missing video is that video's error when it is decoded; with ``must_exist`` (the CLI's choice:
    a typo on the command line should not start a long run) a missing input named directly raises
    FileNotFoundError. Raises ValueError when nothing is found. A :class:`VideoPaths` (what this
    returns) is returned as is.
    """
    if isinstance(inputs, VideoPaths):
        return inputs
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out: list[str] = []
    for item in inputs:
        p = os.fspath(item)
        if must_exist and not os.path.exists(p):
            raise FileNotFoundError(f"input not found: {p}")
        if os.path.isdir(p):
            out.extend(_walk(p))
        elif p.lower().endswith(LIST_EXTENSIONS) and os.path.isfile(p):
            out.extend(_read_list(p))
        else:
            out.append(p)
    if not out:
        raise ValueError(f"no videos found in {[os.fspath(i) for i in inputs]}")
    result = VideoPaths(out)
    result.sources = tuple(os.fspath(i) for i in inputs)
    return result


def _walk(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS:
                found.append(os.path.join(root, f))
    # Sort by path components so that "a/b.mp4" < "a-c.mp4" regardless of the separator's code point.
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _read_list(list_file: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(list_file))
    out = []
    with open(list_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = line if os.path.isabs(line) else os.path.join(base, line)
            out.extend(_walk(p) if os.path.isdir(p) else [p])
    return out

