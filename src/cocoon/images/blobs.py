"""Content-addressed blob storage: every byte that enters is verified by digest.

Blobs (layers, configs, manifests) live at ``<root>/sha256/<hex>``; a write goes
to ``<root>/ingest/<hex>.partial`` and is renamed into place only after its
sha256 matched, so a killed pull never leaves a half blob visible, and the
partial file lets a retry resume where the last one stopped. Registries and
archives are untrusted: sizes are bounded and digests are checked, always.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Protocol

from cocoon.errors import ImageError as ImageError  # re-exported for the images layer
from cocoon.images.guard import WriteGuard
from cocoon.util.fs import fsync_dir

CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class BlobFile(Readable, Protocol):
    """What a layer is unpacked from: an open blob (a file, or a BlobFollower)."""

    def seek(self, pos: int, whence: int = ..., /) -> int: ...

    def close(self) -> None: ...


DIGEST_RE = re.compile(r"^sha256:([a-f0-9]{64})$")


def check_digest(digest: str) -> str:
    """The hex part of a sha256 digest; the one place digests are validated."""
    m = DIGEST_RE.match(digest)
    if not m:
        raise ImageError(f"unsupported or malformed digest {digest[:80]!r} (want sha256:<64 hex>)")
    return m.group(1)


class BlobRestarted(Exception):
    """A followed blob was thrown away and is being fetched again from byte 0:
    what its reader got so far may be the discarded bytes."""


class FollowStopped(Exception):
    """Reading a blob that is still arriving was called off (the pull failed)."""


class _Progress:
    """How far a blob being written by this process has got, for its followers.

    ``fd`` reads the partial file being appended to (it stays valid across the
    rename into place); ``generation`` changes whenever that file is thrown
    away, so a follower knows its bytes no longer count.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.fd: int | None = None
        self.ino = 0
        self.size = 0
        self.generation = 0
        self.done = False

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def attach(self, path: Path, fd: int, size: int) -> None:
        """A writer (re)opened the partial ``fd`` at ``path``, ``size`` bytes long."""
        ino = os.fstat(fd).st_ino
        with self.cond:
            if self.ino != ino:  # a new file: what followers read so far no longer counts
                if self.ino:
                    self.generation += 1
                self._close()
                self.ino = ino
            if self.fd is None:
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = size
            self.done = False
            self.cond.notify_all()

    def advance(self, size: int) -> None:
        with self.cond:
            self.size = size
            self.cond.notify_all()

    def detach(self, *, done: bool = False, discarded: bool = False) -> None:
        """The writer is gone: the blob is committed, or its partial kept or thrown away."""
        with self.cond:
            self._close()
            self.done = done
            if discarded:
                self.ino = 0
                self.size = 0
                self.generation += 1
            self.cond.notify_all()


class BlobWriter:
    """Appends to a partial blob; ``commit`` verifies and publishes it."""

    def __init__(self, store: BlobStore, digest: str, expected_size: int | None) -> None:
        self.digest = digest
        self._hex = check_digest(digest)
        self._store = store
        self.expected_size = expected_size
        self.partial = store.root / "ingest" / f"{self._hex}.partial"
        self._hash = hashlib.sha256()
        self.offset = 0
        # Resume: re-hash what an earlier, interrupted writer left.
        if self.partial.exists():
            with open(self.partial, "rb") as f:
                while chunk := f.read(1 << 20):
                    self._hash.update(chunk)
                    self.offset += len(chunk)
            if expected_size is not None and self.offset > expected_size:
                self.partial.unlink()
                self._hash = hashlib.sha256()
                self.offset = 0
        guard = store.guard
        if guard is not None and expected_size is not None:
            # Room for the whole blob, up front (write() checks again as it goes:
            # other pulls and unpacks fill the same disk).
            guard.check_room(store.root, expected_size - self.offset, f"blob {digest[:19]}")
        # Unbuffered: what write() returns from is in the file, for followers to read.
        self._f = open(self.partial, "ab", buffering=0)  # noqa: SIM115 (closed by commit/abort)
        self._progress = store.progress(digest)
        self._progress.attach(self.partial, self._f.fileno(), self.offset)

    def write(self, data: bytes) -> None:
        if self.expected_size is not None and self.offset + len(data) > self.expected_size:
            self.abort(keep_partial=False)
            raise ImageError(
                f"blob {self.digest[:19]} is larger than the {self.expected_size} B announced"
            )
        if self._store.guard is not None:
            try:
                self._store.guard.charge(self._f.fileno(), len(data), f"blob {self.digest[:19]}")
            except ImageError:
                self.abort(keep_partial=False)  # the disk is full: free what it took
                raise
        view = memoryview(data)
        while view:
            view = view[self._f.write(view) or 0 :]
        self._hash.update(data)
        self.offset += len(data)
        self._progress.advance(self.offset)

    def commit(self) -> Path:
        os.fsync(self._f.fileno())
        self._f.close()
        if self.expected_size is not None and self.offset != self.expected_size:
            self.partial.unlink(missing_ok=True)
            self._progress.detach(discarded=True)
            raise ImageError(
                f"blob {self.digest[:19]}: got {self.offset} B, expected {self.expected_size} B"
            )
        got = "sha256:" + self._hash.hexdigest()
        if got != self.digest:
            self.partial.unlink(missing_ok=True)
            self._progress.detach(discarded=True)
            raise ImageError(f"digest mismatch: expected {self.digest}, content is {got}")
        final = self._store.path(self.digest)
        os.replace(self.partial, final)
        fsync_dir(final.parent)
        self._progress.detach(done=True)
        return final

    def abort(self, keep_partial: bool = True) -> None:
        """Stop writing; keep the partial file for a resume unless told otherwise."""
        with contextlib.suppress(OSError):
            self._f.close()
        if not keep_partial:
            self.partial.unlink(missing_ok=True)
        self._progress.detach(discarded=not keep_partial)


class BlobFollower:
    """Reads a blob from byte 0 while this process's BlobWriter may still be
    writing it: a read waits for bytes that are not there yet.

    The bytes are not verified yet when they are read: the reader's work must
    only count once the blob is committed (the pull that wrote it succeeded).
    If the partial is thrown away (a resume the registry refused, a resumed
    blob that failed verification) reading raises BlobRestarted; once ``stop``
    is set it raises FollowStopped. A blob already in the store is just read.
    """

    def __init__(self, store: BlobStore, digest: str, stop: threading.Event) -> None:
        self._store = store
        self._digest = digest
        self._stop = stop
        self._p = store.progress(digest)
        self._fd: int | None = None
        self._complete = False  # reading the published blob: no waiting
        self._end = 0
        self._generation = 0
        self.pos = 0

    def _attach(self) -> bool:
        """Under the condition: an fd on the blob if there is one to read yet."""
        final = self._store.path(self._digest)
        try:
            fd = os.open(final, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            self._fd, self._complete, self._end = fd, True, os.fstat(fd).st_size
            return True
        if self._p.fd is None:
            return False
        self._fd = os.dup(self._p.fd)
        self._generation = self._p.generation
        return True

    def _available(self) -> int:
        """Bytes readable at pos now; waits for more, 0 only at the end of the blob."""
        if self._complete:
            return self._end - self.pos
        p = self._p
        with p.cond:
            while True:
                if self._stop.is_set():
                    raise FollowStopped(self._digest)
                if self._fd is not None or self._attach():
                    if self._complete:
                        return self._end - self.pos
                    if p.generation != self._generation:
                        raise BlobRestarted(self._digest)
                    if p.size > self.pos or p.done:
                        return p.size - self.pos
                # The timeout only bounds a missed wake-up; writes and stop() notify.
                p.cond.wait(1.0)

    def read(self, n: int = -1) -> bytes:
        if self._stop.is_set():
            raise FollowStopped(self._digest)
        n = CHUNK if n < 0 else n
        avail = self._available()
        if avail <= 0 or n == 0:
            return b""
        assert self._fd is not None
        data = os.pread(self._fd, min(n, avail), self.pos)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < 0:
            raise OSError("BlobFollower seeks only to absolute positions")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BlobFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobStore:
    def __init__(self, root: Path, guard: WriteGuard | None = None) -> None:
        self.root = root
        #: Keeps the free-space reserve as blobs are written (guard.py).
        self.guard = guard
        for d in ("sha256", "ingest"):
            (root / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        #: Blobs written or followed by this process (BlobWriter -> BlobFollower).
        self._progress: dict[str, _Progress] = {}
        self._progress_lock = threading.Lock()

    def progress(self, digest: str) -> _Progress:
        with self._progress_lock:
            p = self._progress.get(digest)
            if p is None:
                p = self._progress[digest] = _Progress()
            return p

    def follow(self, digest: str, stop: threading.Event) -> BlobFollower:
        """Read ``digest`` from byte 0 as it arrives (see BlobFollower)."""
        check_digest(digest)
        return BlobFollower(self, digest, stop)

    def wake_followers(self) -> None:
        """Make every waiting follower look at its stop event now."""
        with self._progress_lock:
            progress = list(self._progress.values())
        for p in progress:
            with p.cond:
                p.cond.notify_all()

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / check_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def writer(self, digest: str, expected_size: int | None = None) -> BlobWriter:
        return BlobWriter(self, digest, expected_size)

    def put(self, digest: str, data: bytes) -> Path:
        """Store a small blob held in memory (manifests, configs), verified."""
        if self.has(digest):
            return self.path(digest)
        w = self.writer(digest, len(data))
        w.write(data)
        return w.commit()

    def ingest(self, src: Readable, max_size: int) -> tuple[str, int]:
        """Store a stream nobody announced a digest for (docker-save layers); (digest, size).

        The digest is computed while copying, so the blob is still stored
        under what its bytes hash to; the copy goes to ingest/ first and is
        renamed into place whole, like every other blob.
        """
        fd, tmp = tempfile.mkstemp(prefix="anon-", suffix=".partial", dir=self.root / "ingest")
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := src.read(CHUNK):
                    n += len(chunk)
                    if n > max_size:
                        raise ImageError(f"blob is larger than the {max_size} B allowed")
                    if self.guard is not None:
                        self.guard.charge(f.fileno(), len(chunk), "blob")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            final = self.path(digest)
            if final.is_file():
                os.unlink(tmp)
            else:
                os.replace(tmp, final)
                fsync_dir(final.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return digest, n

    def read(self, digest: str, max_size: int) -> bytes:
        p = self.path(digest)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is not in the store") from None
        if size > max_size:
            raise ImageError(f"blob {digest[:19]} is {size} B, more than {max_size} B allowed")
        return p.read_bytes()

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def digests(self) -> list[str]:
        return sorted("sha256:" + p.name for p in (self.root / "sha256").iterdir())
