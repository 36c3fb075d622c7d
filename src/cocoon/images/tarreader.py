"""Tar headers read by cocoon itself: linear time, bounded memory, no recursion.

A layer is untrusted, and CPython's tarfile was not written for that. Before
3.11.10 it parses a pax header in quadratic time (CVE-2024-6232: a 1 KB gzip
blob costs twenty minutes of CPU); it recurses once per chained extended
header (a few hundred of them overflow the stack); it reads GNU sparse maps
into memory without bound; and malformed fields escape it as ValueError,
OverflowError or UnicodeError. This reader takes one 512-byte block at a time
from a forward-only stream and turns anything it does not understand into one
ImageError line. Every byte is looked at a bounded number of times, and what
it holds in memory per entry is capped (the constants below).

What it reads (the facts come from POSIX pax, GNU tar's manual, and what
docker and containerd accept, so that an image unpacks here as it does there):

- ustar, old GNU and v7 headers; octal and base-256 numbers; checksums summed
  over unsigned or signed bytes (old writers used either).
- pax extended headers (``x``, Solaris ``X``): path, linkpath, size, uid, gid,
  mtime, ``SCHILY.xattr.*`` and ``GNU.sparse.*``; other keywords are ignored.
  Values are bytes: names decode as UTF-8 with surrogateescape whatever
  ``hdrcharset`` says, which gives back the exact bytes when written.
- pax global headers (``g``) are counted and skipped: docker and containerd
  ignore them as well (``git archive`` writes one holding the commit id).
- GNU long names and link names (``L``, ``K``); they win over pax path and
  linkpath, as in Go's archive/tar.
- GNU sparse files: old GNU (``S`` and its extension blocks) and the pax
  formats 0.0, 0.1 and 1.0. Such a member carries its data map and its
  apparent size; the stream holds only the data runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cocoon.errors import ImageError

BLOCK = 512
_ZERO = bytes(BLOCK)

#: A pax header holds a path and a link path (4 KiB each at most on Linux), a
#: few xattrs (a value is at most 64 KiB) and maybe a sparse map: 1 MiB holds
#: all that with room to spare, and parsing it takes about a millisecond.
MAX_PAX_BYTES = 1 << 20
#: A real pax header has a dozen records and a few more per xattr (each one
#: costs a setxattr call). Only the 0.0 sparse format (GNU tar 1.14 to 1.15.1,
#: 2004-5) needs more, two per data run: 500 runs of it still fit.
MAX_PAX_RECORDS = 1024
#: A GNU long name or link name is a path: PATH_MAX and its NUL, doubled.
MAX_LONG_NAME_BYTES = 8 << 10
#: Extended headers before one entry: real writers chain at most a pax
#: header, a long name and a long link name (and maybe a global header). More
#: is no archive anyone wrote (tarfile recursed per header: ~400 overflowed).
MAX_META_CHAIN = 8
#: Global pax headers per archive (real archives have zero or one).
MAX_GLOBAL_HEADERS = 64
#: Data runs of one sparse file. Their map is held in memory (~100 B a run) and
#: real sparse files (lastlog, databases, disk images) have far fewer runs.
MAX_SPARSE_RUNS = 1 << 16
#: Sizes and offsets beyond this cannot be seeks or file sizes on Linux.
MAX_OFFSET = (1 << 63) - 1

# Type flags, normalised: every kind of regular file reads as REGTYPE.
REGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE = (
    b"0", b"1", b"2", b"3", b"4", b"5", b"6"
)  # fmt: skip
_AREGTYPE, _CONTTYPE, _GNU_SPARSE = b"\0", b"7", b"S"
_PAX, _SOLARIS_PAX, _PAX_GLOBAL = b"x", b"X", b"g"
_LONGNAME, _LONGLINK = b"L", b"K"
#: Types whose size field is ignored: they never carry data (as Go reads them).
_HEADER_ONLY = (LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE)

_OCTAL_DIGITS = b"01234567"
_ASCII = bytes(range(0x80))
_XATTR = b"SCHILY.xattr."
_SPARSE_OFFSET, _SPARSE_NUMBYTES = b"GNU.sparse.offset", b"GNU.sparse.numbytes"


class Source(Protocol):
    """A forward-only byte stream: ``read`` returns fewer bytes only at its end."""

    def read(self, n: int) -> bytes: ...

    def seek(self, pos: int) -> int: ...

    def tell(self) -> int: ...


@dataclass(slots=True)
class Member:
    """One archive entry, its extended headers applied."""

    name: str
    kind: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    linkname: str
    #: Bytes of data the stream holds for it, from offset_data on.
    size: int
    offset_data: int
    #: The file's apparent size: size, unless sparse.
    realsize: int = 0
    #: (offset, length) of each data run of a sparse file, in order; None if not sparse.
    sparse: list[tuple[int, int]] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def isreg(self) -> bool:
        return self.kind == REGTYPE

    def isdir(self) -> bool:
        return self.kind == DIRTYPE

    def issym(self) -> bool:
        return self.kind == SYMTYPE

    def islnk(self) -> bool:
        return self.kind == LNKTYPE

    def isfifo(self) -> bool:
        return self.kind == FIFOTYPE

    def isdev(self) -> bool:
        return self.kind in (CHRTYPE, BLKTYPE)


@dataclass
class _Meta:
    """What the extended headers before an entry said about it."""

    pax: dict[bytes, bytes] = field(default_factory=dict)
    #: Sparse 0.0's repeated offset/numbytes values, in record order.
    runs00: list[bytes] = field(default_factory=list)
    long_name: str | None = None
    long_link: str | None = None
    count: int = 0


def _text(raw: bytes) -> str:
    """Names are bytes on disk: surrogateescape gives back exactly these when written."""
    return raw.decode("utf-8", "surrogateescape")


def _octal(raw: bytes) -> int | None:
    """Octal digits, space- or NUL-terminated (some writers pad with leading spaces)."""
    digits = _cstr(raw).strip()
    if digits.translate(None, _OCTAL_DIGITS):
        return None
    return int(digits, 8) if digits else 0


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


class TarReader:
    """The members of a tar stream, one ``next()`` at a time.

    Data the caller leaves unread is skipped by the next ``next()``; a caller
    that reads it must read exactly ``size`` bytes from ``offset_data`` on.
    """

    def __init__(self, src: Source, what: str) -> None:
        self._src = src
        self._what = what
        self._next = src.tell()
        self._globals = 0

    def _err(self, at: int, msg: str) -> ImageError:
        return ImageError(f"{self._what}: corrupt tar at byte {at}: {msg}")

    def next(self) -> Member | None:
        """The next member, or None at the end of the archive."""
        if self._src.seek(self._next) != self._next:
            raise self._err(self._src.tell(), "the stream ends inside an entry's data")
        meta = _Meta()
        while True:
            at = self._src.tell()
            buf = self._src.read(BLOCK)
            if len(buf) < BLOCK or buf == _ZERO:
                if meta.count:
                    raise self._err(at, "the archive ends after an extended header")
                if buf.strip(b"\0"):
                    raise self._err(at, "the stream ends inside a header")
                # A zero block ends the archive, and so does the stream's end
                # (no end blocks at all), which Go's reader accepts as well.
                return None
            h = self._header(buf, at)
            if h.kind in (_PAX, _SOLARIS_PAX):
                self._pax(h, meta)
            elif h.kind == _PAX_GLOBAL:
                self._global(h)
            elif h.kind in (_LONGNAME, _LONGLINK):
                self._long_name(h, meta)
            else:
                m = self._member(h, buf, meta)
                self._next = m.offset_data + _padded(m.size)
                return m
            meta.count += 1
            if meta.count > MAX_META_CHAIN:
                raise self._err(at, f"more than {MAX_META_CHAIN} extended headers in a row")

    # -- one header block --------------------------------------------------------

    def _header(self, buf: bytes, at: int) -> Member:
        """The plain header fields of one block, its checksum verified."""
        self._checksum(buf, at)
        name = _cstr(buf[0:100])
        magic = buf[257:263]
        if magic == b"ustar\0":  # POSIX: a prefix holds what did not fit in name
            # star puts its times after a shorter prefix, and says so at the end.
            prefix = _cstr(buf[345:476] if buf[508:512] == b"tar\0" else buf[345:500])
            if prefix:
                name = prefix + b"/" + name
        size = self._natural(buf[124:136], at, "size")
        return Member(
            name=_text(name),
            kind=buf[156:157],
            mode=self._natural(buf[100:108], at, "mode"),
            uid=self._natural(buf[108:116], at, "uid"),
            gid=self._natural(buf[116:124], at, "gid"),
            mtime_ns=self._number(buf[136:148], at, "mtime") * 1_000_000_000,
            linkname=_text(_cstr(buf[157:257])),
            size=size,
            offset_data=at + BLOCK,
            realsize=size,
        )

    def _checksum(self, buf: bytes, at: int) -> None:
        want = _octal(buf[148:156])
        # The checksum field itself counts as eight spaces.
        unsigned = sum(buf) - sum(buf[148:156]) + 8 * 0x20
        if want == unsigned:
            return
        high = len(buf[:148].translate(None, _ASCII)) + len(buf[156:].translate(None, _ASCII))
        if want != unsigned - 0x100 * high:
            raise self._err(at, "not a tar archive" if at == 0 else "bad header checksum")

    def _number(self, raw: bytes, at: int, what: str) -> int:
        """A numeric field: octal text, or base-256 (GNU) when the first bit is set."""
        if raw[0] & 0x80:
            # Two's complement behind the marker bit; 0x40 is the sign.
            bits = 8 * len(raw) - 1
            n = int.from_bytes(raw, "big") & ((1 << bits) - 1)
            return n - (1 << bits) if raw[0] & 0x40 else n
        octal = _octal(raw)
        if octal is None:
            raise self._err(at, f"{what} field {raw!r} is not a number")
        return octal

    def _natural(self, raw: bytes, at: int, what: str) -> int:
        n = self._number(raw, at, what)
        if not 0 <= n <= MAX_OFFSET:
            raise self._err(at, f"{what} {n} is out of range")
        return n

    # -- extended headers --------------------------------------------------------

    def _meta_data(self, h: Member, cap: int, what: str) -> bytes:
        """The data of an extended header (read into memory, so capped)."""
        at = h.offset_data - BLOCK
        if h.size > cap:
            raise self._err(at, f"a {what} of {h.size} B (more than {cap} B)")
        data = self._src.read(h.size)
        if len(data) != h.size:
            raise self._err(at, f"the stream ends inside a {what}")
        self._skip(h.offset_data + _padded(h.size))
        return data

    def _skip(self, to: int) -> None:
        if self._src.seek(to) != to:
            raise self._err(self._src.tell(), "the stream ends inside an entry's data")

    def _pax(self, h: Member, meta: _Meta) -> None:
        at = h.offset_data - BLOCK
        data = self._meta_data(h, MAX_PAX_BYTES, "pax header")
        for key, value in self._pax_records(data, at):
            if key in (_SPARSE_OFFSET, _SPARSE_NUMBYTES):
                # Sparse 0.0 repeats these two in turn: their order is the map.
                if (key == _SPARSE_OFFSET) != (len(meta.runs00) % 2 == 0):
                    raise self._err(at, "GNU.sparse.offset and numbytes out of turn")
                meta.runs00.append(value)
            else:
                meta.pax[key] = value  # a later record, or header, wins

    def _pax_records(self, data: bytes, at: int) -> list[tuple[bytes, bytes]]:
        """``"<length> <keyword>=<value>\\n"`` records, in one pass over the data.

        The length counts the whole record, so each one is cut out by it:
        nothing is searched past a record's end, and the length field itself
        is searched for within the few digits MAX_PAX_BYTES can have.
        """
        digits = len(str(MAX_PAX_BYTES))
        out: list[tuple[bytes, bytes]] = []
        pos, end = 0, len(data)
        while pos < end:
            if data[pos] == 0 and not data[pos:].strip(b"\0"):
                break  # NUL padding after the last record
            sp = data.find(b" ", pos, pos + digits + 1)
            length = data[pos:sp] if sp > pos else b""
            if not length.isdigit():
                raise self._err(at, f"pax record at {pos} has no valid length")
            n = int(length)
            stop = pos + n
            if stop > end or n < len(length) + 3 or data[stop - 1] != 0x0A:
                raise self._err(at, f"pax record at {pos} has a wrong length ({n})")
            key, eq, value = data[sp + 1 : stop - 1].partition(b"=")
            if not key or not eq:
                raise self._err(at, f"pax record at {pos} has no keyword")
            out.append((key, value))
            if len(out) > MAX_PAX_RECORDS:
                raise self._err(at, f"a pax header of more than {MAX_PAX_RECORDS} records")
            pos = stop
        return out

    def _global(self, h: Member) -> None:
        """Counted and skipped, unread (see the module doc)."""
        self._globals += 1
        if self._globals > MAX_GLOBAL_HEADERS:
            at = h.offset_data - BLOCK
            raise self._err(at, f"more than {MAX_GLOBAL_HEADERS} global pax headers")
        self._skip(h.offset_data + _padded(h.size))

    def _long_name(self, h: Member, meta: _Meta) -> None:
        name = _text(_cstr(self._meta_data(h, MAX_LONG_NAME_BYTES, "GNU long name")))
        if h.kind == _LONGNAME:
            meta.long_name = name
        else:
            meta.long_link = name

    # -- the member ------------------------------------------------------------

    def _member(self, m: Member, buf: bytes, meta: _Meta) -> Member:
        """The entry with what its extended headers say applied."""
        at = m.offset_data - BLOCK
        pax = meta.pax
        if b"path" in pax:
            m.name = _text(pax[b"path"])
        if b"linkpath" in pax:
            m.linkname = _text(pax[b"linkpath"])
        if meta.long_name is not None:
            m.name = meta.long_name
        if meta.long_link is not None:
            m.linkname = meta.long_link
        if b"uid" in pax:
            m.uid = self._pax_int(pax[b"uid"], at, "uid")
        if b"gid" in pax:
            m.gid = self._pax_int(pax[b"gid"], at, "gid")
        if b"mtime" in pax:
            m.mtime_ns = self._pax_time(pax[b"mtime"], at)
        if b"size" in pax:
            m.size = self._pax_int(pax[b"size"], at, "size")
        for key, value in pax.items():
            if key.startswith(_XATTR):
                m.xattrs[_text(key[len(_XATTR) :])] = value
        self._kind(m)
        m.realsize = m.size
        if buf[156:157] == _GNU_SPARSE:
            self._old_gnu_sparse(m, buf)
        elif any(k.startswith(b"GNU.sparse.") for k in pax) or meta.runs00:
            self._pax_sparse(m, meta)
        return m

    @staticmethod
    def _kind(m: Member) -> None:
        if m.kind in (_AREGTYPE, _CONTTYPE, _GNU_SPARSE):
            # Old archives mark a directory by its name alone.
            m.kind = DIRTYPE if m.kind == _AREGTYPE and m.name.endswith("/") else REGTYPE
        if m.kind in _HEADER_ONLY:
            m.size = 0

    def _pax_int(self, raw: bytes, at: int, what: str) -> int:
        if not (raw.isdigit() and len(raw) <= 19 and int(raw) <= MAX_OFFSET):
            raise self._err(at, f"pax {what} {raw[:40]!r} is not a valid number")
        return int(raw)

    def _pax_time(self, raw: bytes, at: int) -> int:
        """Seconds with an optional fraction, maybe negative: as nanoseconds."""
        neg = raw.startswith(b"-")
        sec, _, frac = raw[neg:].partition(b".")
        if not (sec.isdigit() and len(sec) <= 19) or (frac and not frac.isdigit()):
            raise self._err(at, f"pax mtime {raw[:40]!r} is not a valid time")
        ns = int(sec) * 1_000_000_000 + int(frac[:9].ljust(9, b"0"))
        return -ns if neg else ns

    # -- sparse files ------------------------------------------------------------

    def _old_gnu_sparse(self, m: Member, buf: bytes) -> None:
        """Runs in the header (4) and in extension blocks after it (21 each)."""
        at = m.offset_data - BLOCK
        runs = self._runs(buf, 386, 4, at)
        extended = buf[482] != 0
        realsize = self._natural(buf[483:495], at, "sparse real size")
        while extended:
            ext_at = self._src.tell()
            ext = self._src.read(BLOCK)
            if len(ext) != BLOCK:
                raise self._err(ext_at, "the stream ends inside a sparse map")
            runs += self._runs(ext, 0, 21, ext_at)
            if len(runs) > MAX_SPARSE_RUNS:
                raise self._err(at, f"a sparse map of more than {MAX_SPARSE_RUNS} runs")
            extended = ext[504] != 0
        m.offset_data = self._src.tell()
        self._set_sparse(m, runs, realsize, at)

    def _runs(self, block: bytes, start: int, count: int, at: int) -> list[tuple[int, int]]:
        out = []
        for p in range(start, start + 24 * count, 24):
            if block[p] == 0:
                break  # unused slots are left zero
            out.append(
                (
                    self._natural(block[p : p + 12], at, "sparse offset"),
                    self._natural(block[p + 12 : p + 24], at, "sparse length"),
                )
            )
        return out

    def _pax_sparse(self, m: Member, meta: _Meta) -> None:
        at = m.offset_data - BLOCK
        if not m.isreg():
            raise self._err(at, "GNU sparse records on an entry that is not a file")
        pax = meta.pax
        version = (pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor"))
        if b"GNU.sparse.name" in pax:
            m.name = _text(pax[b"GNU.sparse.name"])
        if version == (b"1", b"0"):
            self._set_sparse(m, self._map_10(m, at), self._realsize(pax, at), at)
            return
        if version not in ((None, None), (b"0", b"0"), (b"0", b"1")):
            shown = b".".join(v or b"?" for v in version)
            raise self._err(at, f"GNU sparse format {shown!r} is not supported")
        realsize = self._realsize(pax, at)
        if b"GNU.sparse.map" in pax:  # 0.1: "offset,length,offset,length..."
            raw = pax[b"GNU.sparse.map"]
            if raw.count(b",") >= 2 * MAX_SPARSE_RUNS:
                raise self._err(at, f"a sparse map of more than {MAX_SPARSE_RUNS} runs")
            numbers = raw.split(b",") if raw else []
        else:  # 0.0: the offset/numbytes records in turn
            numbers = meta.runs00
        if len(numbers) % 2:
            raise self._err(at, "a sparse map with an offset but no length")
        ints = [self._pax_int(n, at, "sparse map number") for n in numbers]
        runs = list(zip(ints[0::2], ints[1::2], strict=True))
        blocks = pax.get(b"GNU.sparse.numblocks")
        if blocks is not None and self._pax_int(blocks, at, "numblocks") != len(runs):
            raise self._err(at, "GNU.sparse.numblocks does not match the map")
        self._set_sparse(m, runs, realsize, at)

    def _realsize(self, pax: dict[bytes, bytes], at: int) -> int:
        """0.x name it size, 1.0 realsize; Go takes either for both, and so do we."""
        raw = pax.get(b"GNU.sparse.realsize", pax.get(b"GNU.sparse.size"))
        if raw is None:
            raise self._err(at, "a GNU sparse file without its real size")
        return self._pax_int(raw, at, "sparse real size")

    def _map_10(self, m: Member, at: int) -> list[tuple[int, int]]:
        """Sparse 1.0 keeps its map at the start of the data: decimal numbers, one a
        line (the count of runs, then offset and length of each), NUL-padded to a block."""
        numbers: list[int] = []
        want: int | None = None  # 1 + 2 * runs, once the count is read
        tail = b""  # a number cut by the block's end
        used = 0
        while want is None or len(numbers) < want:
            if used + BLOCK > m.size:
                raise self._err(at, "the sparse map runs past the file's data")
            block = self._src.read(BLOCK)
            if len(block) != BLOCK:
                raise self._err(at, "the stream ends inside a sparse map")
            used += BLOCK
            *lines, tail = (tail + block).split(b"\n")
            for raw in lines:
                numbers.append(self._pax_int(raw, at, "sparse map number"))
                if want is None:
                    if numbers[0] > MAX_SPARSE_RUNS:
                        raise self._err(at, f"a sparse map of {numbers[0]} runs (too many)")
                    want = 1 + 2 * numbers[0]
                if len(numbers) == want:
                    break
            if (want is None or len(numbers) < want) and not _map_tail_ok(tail):
                raise self._err(at, f"sparse map number {tail[:20]!r}... is not a valid number")
        m.offset_data += used
        m.size -= used
        return list(zip(numbers[1::2], numbers[2::2], strict=True))

    def _set_sparse(self, m: Member, runs: list[tuple[int, int]], realsize: int, at: int) -> None:
        """Check the map against the data (in order, no overlap, within the file)."""
        if len(runs) > MAX_SPARSE_RUNS:
            raise self._err(at, f"a sparse map of more than {MAX_SPARSE_RUNS} runs")
        end = total = 0
        for offset, length in runs:
            if offset < end or offset + length > realsize:
                raise self._err(at, "a sparse map out of order or past the file's end")
            end = offset + length
            total += length
        if total != m.size:
            raise self._err(at, f"a sparse map of {total} B for {m.size} B of data")
        m.sparse, m.realsize = runs, realsize


def _map_tail_ok(tail: bytes) -> bool:
    """A number cut by a block's end: digits, and no more than any number below 2**63."""
    return len(tail) <= 19 and (not tail or tail.isdigit())


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK
