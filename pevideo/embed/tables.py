"""What ``pevideo classify`` prints or writes (a text table, CSV, JSON), the output file it writes
(checked before any work, written whole), and how file names that are not plain text are written.

File names are bytes; a name that is not UTF-8, or holds a newline or another control character,
cannot go into a table (or one line on stderr) as it is. In a table such a name (and one starting with
a double quote) is written as its JSON string, ``"..."`` with ``\\n`` / ``\\udcff`` escapes, as the
embeddings file's metadata holds every name: ``json.loads(cell) if cell.startswith('"') else cell``
gives the name back, ``os.fsencode(name)`` its bytes. In the JSON output every name is a JSON string
already. On stderr such characters are shown escaped (``\\n``, ``\\xff``), one line per message.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import unicodedata

__all__ = ["path_cell", "printable", "TableOutput", "table_format", "render", "is_table", "TEXT_MARK"]

TEXT_MARK = "# pevideo classify"  # first line of a text table written to a file: proves it pevideo's
_ODD = ("Cc", "Cs", "Zl", "Zp")  # control characters, undecodable bytes (surrogates), line separators


def _odd(text: str) -> bool:
    return any(unicodedata.category(ch) in _ODD for ch in text)


def path_cell(path: str) -> str:
    """``path`` as a table cell: as it is when it is plain text, else its JSON string (module docstring)."""
    return json.dumps(path) if path.startswith('"') or _odd(path) else path


def printable(text: str) -> str:
    """``text`` on one line: control characters and undecodable bytes escaped (``\\n``, ``\\xff``)."""
    if not _odd(text):
        return text
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif unicodedata.category(ch) in _ODD:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def render(fmt: str, results, labels, to_file: bool) -> str:
    if fmt == "csv":
        return _as_csv(results, labels)
    if fmt == "json":
        return _as_json(results, labels)
    return _as_text(results, labels, to_file)


def _as_text(results, labels, to_file: bool) -> str:
    width = max(len(label) for label in labels)
    lines = [TEXT_MARK] if to_file else []
    for r in results:
        lines.append(path_cell(r.path))
        if not r.ok:
            # In a file, the reason; on stdout, a mark (the reason is on stderr already).
            lines.append(f"  error: {printable(r.error)}" if to_file else "  not scored (could not be read; see stderr)")
            continue
        if r.truncated_suspect:
            lines.append(f"  warning: {printable(r.truncated_suspect)}")
        for label, p in zip(labels, r.probs.tolist()):
            lines.append(f"  {p:.4f}  {label:<{width}}".rstrip())
    return "\n".join(lines) + "\n"


def _as_csv(results, labels) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", *labels, "truncated_suspect", "error"])
    for r in results:
        probs = [f"{p:.6g}" for p in r.probs.tolist()] if r.ok else [""] * len(labels)
        suspect = printable(r.truncated_suspect or "")
        w.writerow([path_cell(r.path), *probs, suspect, printable(r.error or "")])
    return buf.getvalue()


def _as_json(results, labels) -> str:
    rows = []
    for r in results:
        row = {"index": r.index, "path": r.path}
        if r.ok:
            row["probs"] = [round(p, 6) for p in r.probs.tolist()]
            if r.truncated_suspect:
                row["truncated_suspect"] = r.truncated_suspect
        else:
            row["error"] = r.error
        rows.append(row)
    return json.dumps({"labels": labels, "results": rows}, indent=2) + "\n"  # ASCII: names escaped


def is_table(path: str) -> bool:
    """A table ``pevideo classify`` wrote (CSV with its header, its JSON, or a text table with its mark)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline().rstrip("\n")
            if head == TEXT_MARK or (head.startswith("path,") and head.endswith(",error")):
                return True
            if head.strip() != "{":
                return False
            f.seek(0)
            data = json.load(f)
        return isinstance(data, dict) and set(data) == {"labels", "results"}
    except (ValueError, UnicodeDecodeError):
        return False


def table_format(fmt: str | None, out: str | None) -> str:
    """``--format``, else the one ``--out``'s suffix names (``.csv``, ``.json``), else the text table."""
    return fmt or {".csv": "csv", ".json": "json"}.get(os.path.splitext(out or "")[1].lower(), "text")


class TableOutput:
    """Where a table goes, opened before the work starts (so that an unwritable place fails first, not
    after every clip is scored): standard output (``path`` None), or an output file -- a temporary file
    beside it, renamed into place by :meth:`commit`. A device or FIFO (``/dev/stdout``) is written in
    place instead, never replaced. As a context manager, leaving removes an uncommitted temporary."""

    def __init__(self, path: str | None):
        from .safeio import is_regular_or_absent, remove_stale_temporaries, tmp_name

        self.path = path
        self.tmp = None
        if path is None or not is_regular_or_absent(path):
            return
        folder = os.path.dirname(os.path.abspath(path))
        tmp = tmp_name(os.path.abspath(path))
        try:
            # What an earlier, killed run of this output left (a writer that is gone), then our own.
            remove_stale_temporaries(folder, (os.path.basename(path),), before_ns=0)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:  # name the output, not the temporary name
            raise type(exc)(exc.errno, f"cannot write here ({exc.strerror})", path) from None
        os.close(fd)
        self.tmp = tmp

    @property
    def to_file(self) -> bool:
        return self.path is not None

    def __enter__(self) -> "TableOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def commit(self, text: str) -> None:
        if self.path is None:
            sys.stdout.write(text)
            return
        if self.tmp is None:  # a device or FIFO
            with open(self.path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.write(text)
            return
        with open(self.tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
        os.chmod(self.tmp, 0o666 & ~_umask())  # created 0600 until whole; then like any other output
        os.replace(self.tmp, self.path)
        self.tmp = None

    def close(self) -> None:
        if self.tmp is not None and os.path.exists(self.tmp):
            os.remove(self.tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
