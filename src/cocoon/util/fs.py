"""File-system helpers: atomic replace, so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import fcntl
import os
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
