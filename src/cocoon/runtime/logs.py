"""Container logs on the host in the CRI format kubelet and crictl read.

One line per entry: ``<RFC3339 UTC, ns> <stdout|stderr> <F|P> <bytes>``, where
``P`` marks a piece of a line longer than MAX_LINE (or cut at the end of the
stream) and ``F`` its last piece. Written by the container's monitor as output
arrives (so whatever the VM printed before a crash is there), rotated at a size
limit: ``container.log`` is the newest file, ``container.log.1`` the one before.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: A longer line is split into P pieces (containerd uses 16 KiB too).
MAX_LINE = 16 << 10
DEFAULT_MAX_BYTES = 10 << 20
DEFAULT_MAX_FILES = 3
STREAMS = ("stdout", "stderr")
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (MAX_LINE + 1))


def timestamp(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


class CriLogWriter:
    def __init__(self, path: Path, *, max_bytes: int, max_files: int) -> None:
        if max_bytes < 4096 or max_files < 1:
            raise ValueError("log max-size must be >= 4k and max-file >= 1")
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._partial = {s: b"" for s in STREAMS}
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def write(self, stream: str, data: bytes) -> None:
        """Log ``data``; a line still open at the end waits for its newline."""
        buf = self._partial[stream] + data
        cut = buf.rfind(b"\n") + 1
        body, rest = buf[:cut], buf[cut:]
        head = f"{timestamp(time.time_ns())} {stream} ".encode()
        out = []
        if body:
            if len(body) > MAX_LINE and _LONG_LINE.search(body):
                for line in body[:-1].split(b"\n"):
                    out += self._pieces(head, line)
            else:  # the common case, at C speed: 100 MB of short lines is millions
                full = head + b"F "
                out.append(full + body[:-1].replace(b"\n", b"\n" + full) + b"\n")
        while len(rest) >= MAX_LINE:
            out.append(head + b"P " + rest[:MAX_LINE] + b"\n")
            rest = rest[MAX_LINE:]
        self._partial[stream] = rest
        if out:
            self._emit(b"".join(out))

    @staticmethod
    def _pieces(head: bytes, line: bytes) -> list[bytes]:
        out = []
        while len(line) > MAX_LINE:
            out.append(head + b"P " + line[:MAX_LINE] + b"\n")
            line = line[MAX_LINE:]
        out.append(head + b"F " + line + b"\n")
        return out

    def end(self, stream: str) -> None:
        """The stream ended: an unterminated last line is logged as a partial."""
        rest, self._partial[stream] = self._partial[stream], b""
        if rest:
            self._emit(f"{timestamp(time.time_ns())} {stream} P ".encode() + rest + b"\n")

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(data)
        if self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.max_files == 1:
            os.truncate(self.path, 0)
        else:
            for n in range(self.max_files - 1, 0, -1):
                src = self.path if n == 1 else rotated(self.path, n - 1)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(src, rotated(self.path, n))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = 0

    def close(self) -> None:
        for s in STREAMS:
            self.end(s)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


@dataclass
class Entry:
    time: str
    stream: str
    full: bool  # F: this piece ends a line
    content: bytes


def parse(line: bytes) -> Entry | None:
    """One CRI line (without its newline); None for anything malformed."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or parts[1] not in (b"stdout", b"stderr") or parts[2] not in (b"F", b"P"):
        return None
    content = parts[3] if len(parts) == 4 else b""
    return Entry(parts[0].decode(), parts[1].decode(), parts[2] == b"F", content)


def log_files(path: Path) -> list[Path]:
    """Oldest first: the rotated files, then the current one."""
    olds = []
    n = 1
    while rotated(path, n).exists():
        olds.append(rotated(path, n))
        n += 1
    return [*reversed(olds), path]


def read_entries(path: Path) -> Iterator[Entry]:
    yield from snapshot(path)[0]


def snapshot(path: Path) -> tuple[list[Entry], int, int]:
    """Every entry now on disk, plus where the current file's complete lines end
    and its inode: the point ``follow`` takes over from without gap or overlap."""
    entries: list[Entry] = []
    offset = ino = 0
    for p in log_files(path):
        try:
            f = open(p, "rb")  # noqa: SIM115
        except FileNotFoundError:
            continue
        with f:
            data = f.read()
            if p == path:
                ino = os.fstat(f.fileno()).st_ino
        end = data.rfind(b"\n") + 1
        if p == path:
            offset = end
        for line in data[:end].split(b"\n")[:-1]:
            if (e := parse(line)) is not None:
                entries.append(e)
    return entries, offset, ino


def tail(entries: list[Entry], lines: int) -> list[Entry]:
    """The entries making up the last ``lines`` lines (docker's --tail)."""
    if lines < 0:
        return entries
    count = 0
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].full or i == len(entries) - 1:
            count += 1
            if count > lines:
                return entries[i + 1 :]
    return entries


def follow(
    path: Path, running: Callable[[], bool], offset: int = 0, ino: int = 0, poll_s: float = 0.1
) -> Iterator[Entry]:
    """Entries appended to the current file from ``offset`` on (if it is still
    inode ``ino``, else from its start), across rotations, until the writer is
    gone (``running()`` false) and everything is read."""
    f = None
    buf = b""
    last_pass = False  # the writer is gone: one more read, then stop
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115
                except FileNotFoundError:
                    if not running():
                        return
                    time.sleep(poll_s)
                    continue
                if os.fstat(f.fileno()).st_ino == ino:
                    f.seek(offset)
                ino = os.fstat(f.fileno()).st_ino
            chunk = f.read(1 << 20)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if (e := parse(line)) is not None:
                        yield e
                continue
            try:
                rotated_away = os.stat(path).st_ino != ino
            except FileNotFoundError:
                rotated_away = True
            if rotated_away:  # the old file is complete: go on with the new one from 0
                f.close()
                try:
                    f = open(path, "rb")  # noqa: SIM115
                    ino = os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    f = None
                    if not running():
                        return
                continue
            if last_pass:
                return
            if not running():
                last_pass = True
                continue
            time.sleep(poll_s)
    finally:
        if f is not None:
            f.close()
