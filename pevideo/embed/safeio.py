"""Writing an embedding run's output safely: one run at a time per output (a lock), files that appear
whole or not at all (a temporary name, then a rename), leftovers of crashed writers removed, and OS
errors turned into one-line :class:`StoreError` messages that name the file, the cause and what to do."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import stat
import time

from ..errors import PevideoError, UsageError

__all__ = [
    "StoreError", "StoreIOError", "OutputPathError", "OutputLockedError", "DamagedOutputError",
    "OutputLock", "atomic_write_bytes", "atomic_write_text", "remove_stale_temporaries", "io_errors", "tmp_name",
    "lock_holder", "is_regular_or_absent",
]


class StoreError(PevideoError):
    """A problem with an output's files. ``str(exc)`` is one line: ``<path>: <cause>; <advice>``.

    ``exit_status`` is what ``pevideo embed`` / ``merge`` exit with: 2 when the run was refused before
    it did anything (fix the command or the output), 3 for a runtime / IO problem."""

    exit_status = 3

    def __init__(self, path, cause: str, advice: str = ""):
        self.path = os.fspath(path)
        self.cause = " ".join(str(cause).split("\n"))  # one line, whatever the cause's text held
        self.advice = advice
        super().__init__(f"{self.path}: {self.cause}" + (f"; {advice}" if advice else ""))

    def __reduce__(self):  # picklable (torchrun ranks receive rank 0's errors)
        return type(self), (self.path, self.cause, self.advice)


class StoreIOError(StoreError):
    """The OS refused a read or write (read-only place, disk full, ...); ``errno`` is the OS error number."""

    def __init__(self, path, cause: str, advice: str = "", errno_: int | None = None):
        super().__init__(path, cause, advice)
        self.errno = errno_

    def __reduce__(self):
        return type(self), (self.path, self.cause, self.advice, self.errno)


class OutputPathError(StoreError, UsageError):
    """An output path that cannot be written as asked (a file where a folder goes, an input, a file
    pevideo did not write, a place inside the checkpoint, ...): refused before any work."""

    exit_status = 2


class OutputLockedError(StoreError):
    """Another run is writing the same output (it holds the output's lock file)."""

    exit_status = 2


class DamagedOutputError(StoreError):
    """An output file is unreadable, cut short, misplaced or fails its checksum."""


# --------------------------------------------------------------------------------------------------
def _advice_for(err: OSError, doing: str) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space, then rerun the same command to resume (finished shards are kept)"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "choose a writable --out" if doing == "write" else "check the file's permissions"
    return "fix the cause, then rerun the same command to resume (finished shards are kept)"


@contextlib.contextmanager
def io_errors(path, doing: str = "write"):
    """OS errors inside become a one-line :class:`StoreIOError` naming ``path``."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        where = exc.filename if exc.filename else path
        cause = f"cannot {doing}: {exc.strerror or exc}"
        raise StoreIOError(where, cause, _advice_for(exc, doing), exc.errno) from exc


def tmp_name(path: str) -> str:
    """Where ``path`` is written before it is renamed into place: ``.<name>.tmp.<pid>`` beside it."""
    return f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp.{os.getpid()}"


def _write_file(path: str, data) -> None:
    """Write and flush to disk (the one place output bytes are written; tests make it fail)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def is_regular_or_absent(path: str) -> bool:
    """Whether ``path`` is a regular file (or a symbolic link to one) or nothing yet: a place a
    temporary file can be renamed over. A device, a FIFO (``/dev/stderr``, ``/dev/full``) is written
    in place instead; renaming over it would replace the device itself."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return True  # let the write itself say what is wrong


def atomic_write_bytes(path: str, data) -> None:
    """Write under a temporary name, flush to disk, then rename: a reader sees a complete file or none.
    A failed write removes its temporary (a disk that filled up is not kept filled). A path that is
    not a regular file (a device, a FIFO) is written in place, never replaced."""
    if not is_regular_or_absent(path):
        with io_errors(path), open(path, "wb") as f:
            f.write(data)
            f.flush()
        return
    tmp = tmp_name(path)
    with io_errors(path):
        try:
            _write_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str, names: tuple[str, ...], before_ns: int) -> list[str]:
    """Remove ``.<name>.tmp.<pid>`` files of the given names (``shard-*`` as a pattern) in ``folder``
    that a crashed or killed writer left: written before ``before_ns`` (when this run took the output's
    lock, so by an older run of this output) or by a process that is gone. Returns the removed paths."""
    if not os.path.isdir(folder):
        return []
    alts = "|".join(re.escape(n).replace(r"\*", r"[0-9]+") for n in names)
    pattern = re.compile(rf"^\.(?:{alts})\.tmp\.([0-9]+)$")
    removed = []
    for name in os.listdir(folder):
        m = pattern.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        p = os.path.join(folder, name)
        try:
            st = os.stat(p)
            if st.st_mtime_ns < before_ns or not _alive(int(m.group(1))):
                os.remove(p)
                removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
_held: dict[str, list] = {}  # lock file -> [fd, depth]: this process's locks (re-entered, not re-taken)


class OutputLock:
    """An exclusive lock on one output: a POSIX lock (``fcntl.lockf``, which network file systems honour
    too) on a lock file holding the owner's pid, host and start time. The system drops it when its
    process dies (decoding worker processes do not inherit it), so a killed run's lock is recovered by
    the next run without any clean-up; the file itself is removed when the lock is released. Only
    this class opens the lock file: closing any descriptor of it would drop a POSIX lock.

    Re-entrant within a process (``merge_shards`` called by ``embed_to_file`` under the same lock)."""

    def __init__(self, path: str, out: str, check=None):
        self.path, self.out, self.check = path, out, check
        self.acquired_ns = 0
        self._mine = False

    def acquire(self) -> None:
        """Take the lock (after ``check()``, when given); OutputLockedError when another process has it."""
        if self.check is not None:
            self.check()
        key = os.path.abspath(self.path)
        if key in _held:
            _held[key][1] += 1
            self._mine = True
            self.acquired_ns = os.stat(key).st_mtime_ns
            return
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): unlocked, as before
            self.acquired_ns = time.time_ns()
            return
        with io_errors(self.path):
            parent = os.path.dirname(key)
            os.makedirs(parent, exist_ok=True)
            while True:
                fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        os.close(fd)
                        raise
                    holder = _holder(fd)
                    os.close(fd)
                    raise OutputLockedError(self.out, f"another run is writing this output ({holder})",
                                            f"wait for it to finish, or use another --out (lock file {key})") from None
                except BaseException:
                    os.close(fd)
                    raise
                # The previous holder removes the file as it lets go: a lock on a removed file is no lock.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(key))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            if not _lock_content_ok(fd):
                os.close(fd)
                raise OutputPathError(key, "exists and is not a pevideo lock file; refusing to replace it",
                                      "move it away, or give another --out")
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            try:
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(info) + "\n").encode())
                os.fsync(fd)
                self.acquired_ns = os.fstat(fd).st_mtime_ns
            except BaseException:
                os.close(fd)  # lets go of the lock
                raise
        _held[key] = [fd, 1]
        self._mine = True

    def release(self) -> None:
        """Let go (a no-op when this object holds nothing, e.g. on torchrun ranks other than 0)."""
        if not self._mine:
            return
        self._mine = False
        key = os.path.abspath(self.path)
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        with contextlib.suppress(OSError):
            os.remove(key)  # while still holding it: a waiting run then sees a fresh file
        os.close(entry[0])

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def lock_time(path: str) -> int:
    """When this process took the lock at ``path`` (the lock file's modification time, in the file
    system's clock like the temporaries' times); 0 when it holds no lock there."""
    entry = _held.get(os.path.abspath(path))
    if entry is None:
        return 0
    try:
        return os.fstat(entry[0]).st_mtime_ns
    except OSError:
        return 0


def _lock_content_ok(fd: int) -> bool:
    """An empty file or one holding a lock's JSON (pid, host, started): one pevideo made."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        return True
    if not data.strip():
        return True
    try:
        info = json.loads(data.decode())
    except ValueError:
        return False
    return isinstance(info, dict) and "pid" in info


def lock_holder(path: str) -> str | None:
    """Who holds the lock at ``path`` ("pid N on HOST, since ..."), or None when no run does. Looks
    without taking it for longer than the look (a shared lock, released at once); this process's own
    lock counts as held."""
    key = os.path.abspath(path)
    if key in _held:
        return f"pid {os.getpid()} (this process)"
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no run holds it
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return _holder(fd)
            return None
        return None
    finally:
        os.close(fd)  # also lets go of the shared lock


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "owner unknown"
    text = f"pid {info['pid']} on {info.get('host', '?')}, since {info.get('started', '?')}"
    if info.get("host") == socket.gethostname() and not _alive(int(info["pid"])):
        text += "; that process has exited, retry"
    return text
