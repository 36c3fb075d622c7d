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
from pathlib import Path
from typing import Protocol

from cocoon.errors import ImageError as ImageError  # re-exported for the images layer
from cocoon.util.fs import fsync_dir

CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


DIGEST_RE = re.compile(r"^sha256:([a-f0-9]{64})$")


def check_digest(digest: str) -> str:
    """The hex part of a sha256 digest; the one place digests are validated."""
    m = DIGEST_RE.match(digest)
    if not m:
        raise ImageError(f"unsupported or malformed digest {digest[:80]!r} (want sha256:<64 hex>)")
    return m.group(1)


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
        self._f = open(self.partial, "ab")  # noqa: SIM115 (closed by commit/abort)

    def write(self, data: bytes) -> None:
        if self.expected_size is not None and self.offset + len(data) > self.expected_size:
            self.abort(keep_partial=False)
            raise ImageError(
                f"blob {self.digest[:19]} is larger than the {self.expected_size} B announced"
            )
        self._f.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def commit(self) -> Path:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.expected_size is not None and self.offset != self.expected_size:
            self.partial.unlink(missing_ok=True)
            raise ImageError(
                f"blob {self.digest[:19]}: got {self.offset} B, expected {self.expected_size} B"
            )
        got = "sha256:" + self._hash.hexdigest()
        if got != self.digest:
            self.partial.unlink(missing_ok=True)
            raise ImageError(f"digest mismatch: expected {self.digest}, content is {got}")
        final = self._store.path(self.digest)
        os.replace(self.partial, final)
        fsync_dir(final.parent)
        return final

    def abort(self, keep_partial: bool = True) -> None:
        """Stop writing; keep the partial file for a resume unless told otherwise."""
        with contextlib.suppress(OSError):
            self._f.close()
        if not keep_partial:
            self.partial.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("sha256", "ingest"):
            (root / d).mkdir(parents=True, exist_ok=True, mode=0o700)

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
