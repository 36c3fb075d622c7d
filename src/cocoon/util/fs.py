"""File-system helpers: atomic replace, so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cocoon.errors import StateError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Write to a temp file beside ``path`` and rename it over.

    ``durable`` fsyncs file and directory (needed under the data dir; under
    /run, a tmpfs, it buys nothing).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def locked_file(path: Path, timeout_s: float, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the block, waiting at most ``timeout_s``.

    Polls with LOCK_NB rather than blocking, so a stuck holder becomes the
    one-line StateError ``busy`` instead of a hung command.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateError(busy) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


class LifeLock:
    """An flock held by one process for as long as it lives: whether anybody
    holds it is the liveness test (no pid that could be recycled)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def take(self) -> bool:
        """Hold the lock until release() or death; False if someone else holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def adopt(self, fd: int) -> None:
        self.release()
        self._fd = fd

    def hand_over(self) -> int:
        """Stop holding the lock here without releasing it: the returned fd
        carries it (to another process, over SCM_RIGHTS)."""
        assert self._fd is not None, "not held"
        fd, self._fd = self._fd, None
        return fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held(self) -> bool:
        """True if some live process (possibly this one) holds the lock."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def wait_released(self, timeout_s: float | None) -> bool:
        """Block until nobody holds the lock (True) or ``timeout_s`` passes (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.held():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    top = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) < 5:
                continue
            mp = _unescape_mountinfo(fields[4])
            if mp == top or mp.startswith(top.rstrip("/") + "/"):
                out.append(mp)
    return out
