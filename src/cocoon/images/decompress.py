"""Layer blobs opened and decompressed (gzip, zstd or none) for the unpacker.

The media type names the compression and the blob's magic bytes must agree:
a layer is untrusted, and a blob that is not what it claims is refused before
a byte of it is unpacked. Decompression never holds more than a bounded piece
in memory (``OUT_CHUNK`` per inflate call, ``ThreadedGunzip.DEPTH`` pieces
queued): the unpacker's budget (layers.py) counts every inflated byte, so a
bomb stops as soon as it passes the cap.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import zlib
from pathlib import Path

import zstandard

from cocoon.errors import ImageError
from cocoon.images.blobs import BlobFile, Readable

CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE = (b"\x50\x2a\x4d\x18", b"\x5f\x2a\x4d\x18")  # first and last of 16


def open_stream(raw: BlobFile, compression: str, what: str) -> Readable:
    """The decompressed stream of a layer blob, after checking its magic bytes
    (gzip's are checked by its thread: opening one never waits for the blob)."""
    if compression == "gzip":
        return ThreadedGunzip(raw, what)
    head = raw.read(4)
    raw.seek(0)
    if not head:
        raise ImageError(f"{what}: the layer blob is empty")
    if compression == "zstd":
        if head != ZSTD_MAGIC and head not in ZSTD_SKIPPABLE:
            raise ImageError(f"{what}: media type says zstd, but the blob is not zstd data")
        # zstandard only calls read() on it (typed as IO).
        reader: Readable = zstandard.ZstdDecompressor().stream_reader(
            raw,  # type: ignore[arg-type]
            read_across_frames=True,
        )
        return reader
    if compression == "none":
        if head[:2] == GZIP_MAGIC or head == ZSTD_MAGIC:
            raise ImageError(f"{what}: media type says plain tar, but the blob is compressed")
        return raw
    raise ImageError(f"{what}: unsupported layer compression {compression!r}")


#: Compressed bytes per read and the most one inflate call may produce: small
#: in, big out, so a well-compressed chunk needs few calls (each call copies
#: the input it did not consume) while a bomb still inflates in bounded steps.
IN_CHUNK = 256 << 10
OUT_CHUNK = 1 << 20


class ThreadedGunzip:
    """gzip decompressed by a thread ahead of the reader: zlib releases the GIL,
    so inflating overlaps the tar parsing and file writes of this thread (taking
    turns, as GzipFile does, left one of the two cores idle). Multi-member
    streams are followed; anything after the last member must be zeros."""

    DEPTH = 8

    def __init__(self, raw: Readable, what: str = "layer") -> None:
        self._raw = raw
        self._what = what
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(self.DEPTH)
        self._buf = b""
        self._eof = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            pending = self._raw.read(IN_CHUNK)
            while 0 < len(pending) < 2 and (more := self._raw.read(IN_CHUNK)):
                pending += more
            if not pending:
                raise ImageError(f"{self._what}: the layer blob is empty")
            if pending[:2] != GZIP_MAGIC:
                raise ImageError(
                    f"{self._what}: media type says gzip, but the blob is not gzip data"
                )
            d = zlib.decompressobj(wbits=31)
            while not self._stop.is_set():
                data, pending = (pending, b"") if pending else (self._raw.read(IN_CHUNK), b"")
                if not data:
                    if not d.eof:
                        raise EOFError("compressed data ended before the end of the gzip stream")
                    break
                while data and not self._stop.is_set():
                    # Bounded output per call: a bomb inflates a chunk at a time,
                    # and the reader's budget stops it; the queue bounds what waits.
                    out = d.decompress(data, OUT_CHUNK)
                    if out:
                        self._q.put(out)
                    if d.eof:
                        rest = d.unused_data
                        if rest.strip(b"\0") and rest[:2] == GZIP_MAGIC:
                            d = zlib.decompressobj(wbits=31)  # the next member
                            data = rest
                            continue
                        if rest.strip(b"\0"):
                            raise zlib.error("trailing garbage after the gzip stream")
                        break
                    data = d.unconsumed_tail
            self._q.put(None)
        except BaseException as e:  # handed to the reader, raised there
            self._q.put(e)

    def read_chunk(self) -> bytes:
        """The next inflated piece, whatever its size; b"" at the end."""
        if self._buf:
            data, self._buf = self._buf, b""
            return data
        if self._eof:
            return b""
        item = self._q.get()
        if item is None:
            self._eof = True
            return b""
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        return item

    def read(self, n: int = CHUNK) -> bytes:
        n = CHUNK if n < 0 else n
        while len(self._buf) < n and not self._eof:
            item = self._q.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                self._eof = True
                raise item
            else:
                self._buf = self._buf + item if self._buf else item
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def close(self) -> None:
        self._stop.set()
        while self._t.is_alive():
            with contextlib.suppress(queue.Empty):
                self._q.get(timeout=0.05)


class OpenedLayer:
    """A layer blob opened for unpacking: a gzip one is already being inflated by
    its thread. So the store opens layer N+1 while it applies layer N, and the
    two inflate at once (on two cores); at most the gunzip queue is held ahead.
    Closed by unpack_layer, or by ``close`` if it never gets there.
    """

    def __init__(
        self,
        blob: Path | BlobFile,
        compression: str,
        what: str,
        *,
        close_blob: bool = True,
        size: int | None = None,
    ) -> None:
        self.compression = compression
        self.what = what
        #: The blob's size, for the inflation ratio: given (a blob still
        #: arriving), or the file's; None for a stream of unknown size.
        self.size = size
        self._close_raw = close_blob or isinstance(blob, Path)
        if isinstance(blob, Path):
            try:
                self.raw: BlobFile = open(blob, "rb")  # noqa: SIM115 (closed by close)
            except FileNotFoundError:
                raise ImageError(f"{what}: blob {blob.name[:12]} is not in the store") from None
            except OSError as e:
                msg = f"{what}: cannot open blob {blob.name[:12]}: {e.strerror}"
                raise ImageError(msg) from None
        else:
            self.raw = blob
        if self.size is None:
            self.size = _file_size(self.raw)
        self._stream: Readable | None = None
        if compression == "gzip":
            self._stream = open_stream(self.raw, compression, what)

    def stream(self) -> Readable:
        if self._stream is None:
            self._stream = open_stream(self.raw, self.compression, self.what)
        return self._stream

    def close(self) -> None:
        """Stop the inflating thread, then close the blob (unless told not to)."""
        if isinstance(self._stream, ThreadedGunzip):
            self._stream.close()
        if self._close_raw:
            self.raw.close()


def _file_size(f: BlobFile) -> int | None:
    """The size of an open blob that is a file; None for other streams."""
    fileno = getattr(f, "fileno", None)
    if fileno is None:
        return None
    try:
        return os.fstat(fileno()).st_size
    except (OSError, ValueError):
        return None


def open_layer(
    blob: Path | BlobFile, compression: str, what: str = "layer", size: int | None = None
) -> OpenedLayer:
    """Open a layer blob for unpack_layer; a gzip one starts inflating now.

    ``size`` is the blob's, for one still arriving (the manifest's); a file's
    own size is used otherwise.
    """
    return OpenedLayer(blob, compression, what, size=size)
