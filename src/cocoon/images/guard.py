"""What writing untrusted, decompressed input may cost the host's disk.

A hostile registry can hand over an 11 MiB gzip layer that inflates to 11 GiB
of zeros: within any sane cap on unpacked bytes, and before these guards it
cost 2 GiB of disk in 6 s. An unpacker (of layers here; of image archives or
function code archives elsewhere) consults one WriteGuard for all of its
writes:

- **Inflation.** Each compressed stream may inflate to at most
  ``max_ratio`` times its compressed size once past ``ratio_floor`` bytes, so
  small real layers (whatever their ratio) and big real layers (a few times
  their size) pass, and a bomb is refused after a bounded amount of output.
- **Free space.** The file system written to keeps ``max(min_free_bytes,
  min_free_percent)`` of its space, and that percentage of its inodes, free:
  checked with fstatvfs before anything is written and every
  ``CHECK_EVERY`` bytes after (a call costs ~1 µs; the overshoot between two
  checks is tiny beside the reserve).
- **Holes.** A file-aligned block of zeros is never written: the file gets a
  hole there (the caller truncates the file to its size at the end), so a
  bomb of zeros costs no disk even before it is refused, and files padded
  with zeros cost only their data. Reading a hole gives zeros, so the content
  is the same; mkfs.erofs reads them as zeros too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cocoon.config import ImagesConfig
from cocoon.errors import ImageError

#: The unit of holes: the block size of every file system the store lives on
#: (ext4, xfs, btrfs, tmpfs pages). A zero run shorter than this, or not
#: aligned to it in the file, is written as data.
BLOCK = 4096
_ZERO_BLOCK = bytes(BLOCK)
#: Zero runs are measured in these steps first (fewer comparisons per MiB).
_ZERO_STEP = bytes(64 << 10)
#: Bytes written (or entries made, at a block each) between two fstatvfs calls.
CHECK_EVERY = 16 << 20
_MIB = 1 << 20


@dataclass(frozen=True)
class GuardLimits:
    """The guard's bounds; the defaults are images.*'s (see config.py for why)."""

    max_ratio: float = 80.0
    ratio_floor: int = 512 << 20
    min_free_bytes: int = 1 << 30
    min_free_percent: float = 5.0

    @classmethod
    def from_config(cls, cfg: ImagesConfig) -> GuardLimits:
        return cls(
            cfg.max_inflation_ratio,
            cfg.inflation_floor_bytes,
            cfg.min_free_bytes,
            cfg.min_free_percent,
        )


def _mib(n: float) -> str:
    return f"{n / _MIB:.0f} MiB"


class Inflation:
    """One compressed stream's output, checked against its ratio as it grows.

    The bound is the whole blob's size times the ratio, not the bytes read so
    far: a real layer may start with a file of zeros and still inflate only a
    few times its size overall. The compressed size is the blob's (a pull's
    is the manifest's, which the digest check at the end holds it to).
    """

    def __init__(self, limits: GuardLimits, compressed: int | None, what: str) -> None:
        self.compressed = compressed
        self.limit = (
            max(limits.ratio_floor, int(limits.max_ratio * compressed))
            if compressed is not None
            else None
        )
        self.ratio = limits.max_ratio
        self.what = what
        self.bytes = 0

    def add(self, n: int) -> None:
        self.bytes += n
        if self.limit is not None and self.bytes > self.limit:
            raise ImageError(
                f"{self.what}: {_mib(self.compressed or 0)} of compressed data inflate "
                f"to more than {_mib(self.limit)} (over {self.ratio:g} times, "
                "images.max_inflation_ratio); refusing a likely decompression bomb"
            )


def _zero_end(buf: bytes, i: int, end: int) -> int:
    """Where the run of zero blocks starting at ``i`` ends (block steps only)."""
    step = len(_ZERO_STEP)
    while i + step <= end and buf.startswith(_ZERO_STEP, i):
        i += step
    while i + BLOCK <= end and buf.startswith(_ZERO_BLOCK, i):
        i += BLOCK
    return i


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _candidates(buf: bytes, first: int, n: int) -> bytes:
    """One byte per aligned block of ``buf`` from ``first`` on: zero where the
    block's first and last bytes both are (the only blocks that may be all zero).

    Two strided slices and an OR of two big ints, all in C: ~10 µs per MiB,
    where ``bytes.find`` of a zero block cost ~0.2 ms (two-way search) and
    10x that on data of short zero runs (binaries).
    """
    stop = first + n * BLOCK
    heads = int.from_bytes(buf[first:stop:BLOCK], "little")
    tails = int.from_bytes(buf[first + BLOCK - 1 : stop : BLOCK], "little")
    return (heads | tails).to_bytes(n, "little")


def _zeros(buf: bytes, a: int, b: int) -> bool:
    return buf.count(0, a, b) == b - a


def write_holes(fd: int, buf: bytes, start: int, end: int, offset: int) -> int:
    """Write ``buf[start:end]`` at ``offset`` of ``fd`` (a new file: what is never
    written reads as zeros), but no block of zeros; the bytes left unwritten.

    Skipped: every block-aligned (in the file) zero block, and a zero piece of
    a block at either end of the chunk, so a block that two chunks share is a
    hole when both its pieces are zeros (and reads as zeros in any case). Only
    blocks whose first and last bytes are zero are compared whole
    (``startswith``: a memcmp, no copy), and a zero run is measured in big
    steps, so data without zero blocks costs two strided reads of the chunk.
    The file's size is the caller's to set when it ends in a hole.
    """
    view = memoryview(buf)
    first = min(end, start + (-offset) % BLOCK)  # the first block boundary of the file
    n = (end - first) // BLOCK
    tail = first + n * BLOCK  # where the last, partial block begins
    done = start  # buf[start:done] is written or skipped
    holes = 0
    if _zeros(buf, start, first):
        holes, done = first - start, first
    if n > 0:
        maybe = _candidates(buf, first, n)
        i = maybe.find(0)
        while i >= 0:
            j = first + i * BLOCK
            if not buf.startswith(_ZERO_BLOCK, j):
                i = maybe.find(0, i + 1)
                continue
            e = _zero_end(buf, j, end)
            if j > done:
                _pwrite_all(fd, view[done:j], offset + done - start)
            holes += e - j
            done = e
            i = maybe.find(0, (e - first) // BLOCK)
    stop = end
    if tail >= done and _zeros(buf, tail, end):
        holes += end - tail
        stop = tail
    if stop > done:
        _pwrite_all(fd, view[done:stop], offset + done - start)
    return holes


class WriteGuard:
    """The guards one unpack consults: see the module doc.

    ``place`` names the file system in errors (the directory being filled).
    One guard serves one unpack (an image's layers, one after the other).
    """

    def __init__(self, limits: GuardLimits | None = None, place: str = "") -> None:
        self.limits = limits or GuardLimits()
        self.place = place or "the file system being written"
        #: Bytes of data written, and of zeros left as holes, through ``write``.
        self.written = 0
        self.holes = 0
        self._unchecked = 0

    @classmethod
    def from_config(cls, cfg: ImagesConfig, place: str = "") -> WriteGuard:
        return cls(GuardLimits.from_config(cfg), place)

    def inflation(self, compressed: int | None, what: str) -> Inflation:
        """A meter for one compressed stream of ``compressed`` bytes (None: unknown,
        no ratio cap)."""
        return Inflation(self.limits, compressed, what)

    def reserve(self, st: os.statvfs_result) -> tuple[int, int]:
        """(bytes, inodes) this file system keeps free."""
        pct = self.limits.min_free_percent / 100
        return (
            max(self.limits.min_free_bytes, int(st.f_blocks * st.f_frsize * pct)),
            int(st.f_files * pct),
        )

    def check_room(self, where: int | str | os.PathLike[str], need: int, what: str) -> None:
        """Refuse unless ``need`` more bytes leave the reserve free on the file
        system of ``where`` (an fd or a path)."""
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        keep, keep_inodes = self.reserve(st)
        if free - need < keep:
            more = f", and {_mib(need)} more are needed" if need else ""
            raise ImageError(
                f"{what}: only {_mib(free)} left on the file system of {self.place}{more}; "
                f"cocoon keeps {_mib(keep)} free there (images.min_free_bytes, "
                "images.min_free_percent): free some space (cocoon rmi unused images, "
                "cocoon gc) and try again"
            )
        if st.f_files and st.f_favail < keep_inodes:
            raise ImageError(
                f"{what}: only {st.f_favail} inodes left on the file system of {self.place}; "
                f"cocoon keeps {keep_inodes} free there (images.min_free_percent): "
                "remove files there (cocoon rmi unused images, cocoon gc) and try again"
            )

    def charge(self, fd: int, n: int, what: str) -> None:
        """``n`` bytes are about to be used where ``fd`` lives: check the reserve
        once every CHECK_EVERY of them."""
        self._unchecked += n
        if self._unchecked >= CHECK_EVERY:
            self._unchecked = 0
            self.check_room(fd, 0, what)

    def write(self, fd: int, buf: bytes, start: int, end: int, offset: int, what: str) -> int:
        """``buf[start:end]`` at ``offset`` of ``fd`` with its zero blocks as holes,
        the reserve checked on the way; the bytes left as holes."""
        holes = write_holes(fd, buf, start, end, offset)
        data = end - start - holes
        self.written += data
        self.holes += holes
        self.charge(fd, data, what)
        return holes
