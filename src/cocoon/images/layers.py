"""Unpack image layers into a staging root: streamed, verified, and safe against hostile tars.

A layer is untrusted input that runs as root on the host, so the unpacker
trusts nothing in it:

- The blob is streamed (file -> decompressor, decompress.py -> tar reader),
  never held in memory; the uncompressed stream is hashed on the way (the layer's diff_id)
  and counted against ``images.max_unpacked_bytes`` for the whole image,
  entries against ``images.max_entries``, and the unpacking thread's CPU
  time against ``images.max_unpack_cpu_s``. The budget's WriteGuard
  (guard.py) caps the layer's inflation ratio, keeps a free-space reserve
  on the disk, and leaves blocks of zeros unwritten (holes).
- Paths are split into components and written with ``*at`` calls relative to
  directory fds opened with ``O_NOFOLLOW | O_DIRECTORY``: a symlink is never
  followed while writing, so ``a -> /etc`` then ``a/passwd`` is refused
  instead of overwriting the host's ``/etc/passwd``. Absolute names, ``..``,
  over-long names/paths and too-deep paths are refused outright.
- A hardlink may only point at an entry already in the root, found the same
  way (no symlink on the way, no ``..``): a file, or a symlink or fifo (tar
  allows those, and layers made from real file systems have them; linking a
  symlink links the link, never what it points at). Never a directory.
- Device nodes are refused (a container gets its devices from the runtime,
  and a block device node in an image is a way to reach host disks). FIFOs
  are fine.
- Setuid/setgid/sticky bits are kept: the staging tree sits in a root-only
  0700 directory, so no host user can reach it, and the erofs image built
  from it is only ever mounted inside a guest VM, where containers expect
  ``su``/``ping``/``passwd`` to work as in docker.
- Extended attributes: only ``security.capability`` and ``user.*`` on regular
  files and directories are applied (file capabilities are what ``ping``
  needs in newer images; ``user.*`` is harmless; a directory listed again by
  a later layer has that layer's, as docker and containerd show it: each layer
  is its own overlayfs dir there, and a merged dir has the upper one's), best
  effort;
  ``trusted.*`` and ``security.selinux`` are dropped (the host's policy is
  not the guest's, and ``trusted.overlay.*`` would steer the guest's overlayfs).
- Headers are read by tarreader.py, not tarfile: in linear time, with every
  extended header, chain of them and sparse map capped, and any malformed
  field one ImageError.
- GNU sparse files (``tar --sparse``) are written with their holes as holes;
  the apparent size counts against the budget all the same.

Whiteouts follow the OCI image spec: ``.wh.<name>`` deletes ``<name>`` as the
lower layers left it, ``.wh..wh..opq`` empties its directory of everything the
lower layers put there. Both apply only to lower layers: entries of the same
layer survive whatever order the tar lists them in (we track this layer's
paths, as containerd does). Other ``.wh..wh.*`` names are AUFS metadata and
are skipped, as docker does. Nothing named ``.wh.*`` is ever created.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from cocoon.config import ImagesConfig
from cocoon.errors import ImageError
from cocoon.images.blobs import BlobFile, Readable
from cocoon.images.decompress import CHUNK, OpenedLayer
from cocoon.images.guard import BLOCK, Inflation, WriteGuard
from cocoon.images.tarreader import Member, TarReader

#: Linux NAME_MAX and PATH_MAX, in bytes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
#: Deeper paths are refused: real images stay far below, and the recursive
#: clean-ups (opaque dirs, rmtree) must stay under Python's recursion limit.
MAX_DEPTH = 256
#: Names mkfs.erofs 1.5 skips, at any depth (see erofs.py).
MKFS_SKIPPED_PREFIX = "lost+found"

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"

#: Extended attributes copied from pax ``SCHILY.xattr.*`` records.
KEPT_XATTR_PREFIXES = ("user.",)
KEPT_XATTRS = ("security.capability",)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Path_ = tuple[str, ...]


@dataclass
class Budget:
    """Caps for one image, shared by its layers: a bomb may be spread over many."""

    max_bytes: int
    max_entries: int
    #: CPU seconds of the unpacking thread, summed over the image's layers.
    max_cpu_s: float = float("inf")
    bytes: int = 0
    entries: int = 0
    #: Bytes of holes in the tree: sparse files' (in ``bytes`` too: the image
    #: holds them) and the zero blocks left unwritten.
    holes: int = 0
    cpu_s: float = 0.0
    #: Inflation ratio, free space and zero blocks as holes (guard.py).
    guard: WriteGuard = field(default_factory=WriteGuard)
    #: Why mkfs.erofs 1.5 cannot build this tree ("" if it can): see erofs.py.
    mkfs_unfit: str = ""

    @classmethod
    def from_config(cls, cfg: ImagesConfig, place: str = "") -> Budget:
        """The image's budget; ``place`` is the directory written (for errors)."""
        guard = WriteGuard.from_config(cfg, place)
        return cls(cfg.max_unpacked_bytes, cfg.max_entries, cfg.max_unpack_cpu_s, guard=guard)

    def check_cpu(self, since: float, what: str) -> None:
        """Refuse once this image's unpacking has used more CPU than allowed.

        ``since`` is the thread time when the current layer started: what counts
        is work, never waiting for a download. Every parsing cost is linear now,
        but metadata-only streams are still ~100x dearer per byte than file
        data; this bounds them, and whatever super-linear path is left unfound.
        """
        if self.cpu_s + time.thread_time() - since > self.max_cpu_s:
            raise ImageError(
                f"{what}: unpacking the image took more than {self.max_cpu_s:.0f} s of CPU "
                "(images.max_unpack_cpu_s); no real image costs that much"
            )

    def add_bytes(self, n: int, what: str) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise ImageError(
                f"{what}: the image unpacks to more than {self.max_bytes} B "
                "(images.max_unpacked_bytes); refusing a likely decompression bomb"
            )


class _TarStream:
    """The uncompressed tar stream, as the header reader's source and the file data's.

    Every byte is counted against the budget and the layer's inflation ratio,
    and hashed (the diff_id), as it arrives from the decompressor. The
    TarReader reads headers through ``read`` and skips through ``seek``
    (forward only: it is a stream); file data bypasses it: ``copy_to`` hands
    the decompressor's chunks straight to the write guard, which writes them
    to the file (memoryviews, no copies in Python; tarfile's stream mode joined
    and sliced every MiB three times over, most of this thread's time).
    """

    def __init__(self, src: Readable, budget: Budget, inflation: Inflation, what: str) -> None:
        self._budget = budget
        self._inflation = inflation
        self._what = what
        #: This thread's CPU time when the layer started (see Budget.check_cpu).
        self.started = time.thread_time()
        # Hashed here, not in the gunzip thread: inflating is the slower half of
        # the two, and this thread mostly waits on it (hashlib lets go of the GIL).
        self.hash = hashlib.sha256()
        chunk = getattr(src, "read_chunk", None)
        self._next: Callable[[], bytes] = chunk if chunk is not None else lambda: src.read(CHUNK)
        #: The current chunk and how much of it is used (bytes, not a view: the
        #: guard searches it for zero blocks).
        self._buf = b""
        self._off = 0
        self._eof = False
        self.pos = 0

    def _left(self) -> int:
        return len(self._buf) - self._off

    def _fill(self) -> bool:
        """The next chunk as the current one; False at the end of the stream."""
        if self._eof:
            return False
        data = self._next()
        if not data:
            self._eof = True
            return False
        self._budget.add_bytes(len(data), self._what)
        self._inflation.add(len(data))
        self._budget.check_cpu(self.started, self._what)
        self.hash.update(data)
        self._buf, self._off = data, 0
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = CHUNK) -> bytes:
        """``n`` bytes, fewer only at the end of the stream."""
        if n < 0:
            n = CHUNK
        if self._left() >= n:
            out = self._buf[self._off : self._off + n]
            self._off += n
            self.pos += n
            return out
        parts = []
        left = n
        while left and (self._left() or self._fill()):
            take = self._buf[self._off : self._off + left]
            parts.append(take)
            self._off += len(take)
            left -= len(take)
        self.pos += n - left
        return b"".join(parts)

    def seek(self, pos: int) -> int:
        """Skip ahead to ``pos`` (data nobody reads is still counted and hashed)."""
        if pos < self.pos:
            raise ImageError(f"{self._what}: the tar reader sought backwards ({pos} < {self.pos})")
        left = pos - self.pos
        while left and (self._left() or self._fill()):
            take = min(left, self._left())
            self._off += take
            left -= take
            self.pos += take
        return self.pos

    def copy_to(self, fd: int, n: int, offset: int) -> tuple[int, int]:
        """Write the next ``n`` bytes at ``offset`` of ``fd``, zero blocks as holes:
        (how many there were, fewer at the end; how many of them are holes)."""
        guard = self._budget.guard
        left = n
        holes = 0
        while left > 0 and (self._left() or self._fill()):
            take = min(left, self._left())
            holes += guard.write(fd, self._buf, self._off, self._off + take, offset, self._what)
            self._off += take
            offset += take
            left -= take
            self.pos += take
        return n - left, holes

    def drain(self) -> None:
        """Hash what follows the tar's end blocks too: the diff_id covers every byte."""
        self._buf, self._off = b"", 0
        while self._fill():
            self.pos += len(self._buf)
        self._buf, self._off = b"", 0


def _show(name: str) -> str:
    """An untrusted name, fit for one line of an error message."""
    return repr(name if len(name) <= 200 else name[:200] + "...")


def split_path(name: str, entry: str, what: str) -> Path_:
    """A tar name as checked components; refuses anything that could leave the root."""
    if "\0" in name:
        raise ImageError(f"{what}: entry {entry}: NUL byte in path")
    if name.startswith("/"):
        raise ImageError(f"{what}: entry {entry}: absolute path")
    if len(os.fsencode(name)) > MAX_PATH_BYTES:
        raise ImageError(f"{what}: entry {entry}: path longer than {MAX_PATH_BYTES} B")
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            raise ImageError(f"{what}: entry {entry}: '..' in path")
        if len(os.fsencode(comp)) > MAX_NAME_BYTES:
            raise ImageError(f"{what}: entry {entry}: a name is longer than {MAX_NAME_BYTES} B")
        parts.append(comp)
    if len(parts) > MAX_DEPTH:
        raise ImageError(f"{what}: entry {entry}: more than {MAX_DEPTH} levels deep")
    return tuple(parts)


def _mtime_ns(m: Member) -> int:
    # pax mtimes may be negative or absurd; erofs stores u64 seconds.
    return min(max(m.mtime_ns, 0), (1 << 40) * 1_000_000_000)


def _check_ids(m: Member, entry: str, what: str) -> None:
    for kind, v in (("uid", m.uid), ("gid", m.gid)):
        if not isinstance(v, int) or not 0 <= v < 0xFFFFFFFF:
            raise ImageError(f"{what}: entry {entry}: {kind} {v!r} out of range")


class _Unpacker:
    """One layer onto one root. Holds the root's fd and this layer's bookkeeping."""

    def __init__(self, root_fd: int, budget: Budget, what: str, root_len: int = 0) -> None:
        self.root_fd = root_fd
        #: Bytes of the root's path: mkfs.erofs 1.5 fails on full paths of PATH_MAX.
        self.root_len = root_len
        self.budget = budget
        self.what = what
        self.chown = os.geteuid() == 0
        #: Paths this layer wrote (and their ancestors): whiteouts spare them.
        self.created: set[Path_] = set()
        #: Directories emptied of the lower layers' entries (see _prune_once).
        self.pruned: set[Path_] = set()
        #: Directory mtimes, applied when the layer is done (writing inside bumps them).
        #: (One per directory: the last entry for it wins, as it would applied in order.)
        self.dir_times: dict[Path_, int] = {}

    # -- helpers -------------------------------------------------------------

    def _err(self, entry: str, msg: str) -> ImageError:
        return ImageError(f"{self.what}: entry {entry}: {msg}")

    def _mark(self, parts: Path_) -> None:
        while parts and parts not in self.created:
            self.created.add(parts)
            parts = parts[:-1]

    def open_dir(self, parts: Path_, create: bool, entry: str) -> int | None:
        """An fd on root/parts, walked one component at a time without following symlinks.

        Missing directories are made (0755, as docker does) when ``create``,
        else None is returned. A symlink or non-directory on the way is an error:
        writing through it could land outside the root.
        """
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    self._mark(parts[: i + 1])
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = _show("/".join(parts[: i + 1]))
                        msg = f"{where} is a symlink or not a directory; not writing through it"
                        raise self._err(entry, msg) from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _lstat(dfd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, dfd: int, name: str) -> None:
        st = self._lstat(dfd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)  # fd-based: never follows a symlink out
        else:
            os.unlink(name, dir_fd=dfd)

    def _prune_once(self, dfd: int, prefix: Path_) -> None:
        """_prune, unless prefix or a directory above it was pruned in this layer.

        After a prune, only this layer's entries are left below, so another
        opaque marker there has nothing to do; re-listing the directory for
        each one made N markers in a directory of N files cost N² lstat calls
        (a layer of a few MB, hours of CPU).
        """
        if any(prefix[:i] in self.pruned for i in range(len(prefix) + 1)):
            return
        self._prune(dfd, prefix)
        self.pruned.add(prefix)

    def _prune(self, dfd: int, prefix: Path_) -> None:
        """Delete what lower layers left under prefix; keep what this layer wrote."""
        for name in os.listdir(dfd):
            p = (*prefix, name)
            if p not in self.created:
                self._remove(dfd, name)
                continue
            if p in self.pruned:
                continue  # done already, by a marker of its own
            st = self._lstat(dfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self._prune(cfd, p)
                finally:
                    os.close(cfd)

    def _owner_mode(self, fd: int, m: Member) -> None:
        if self.chown:
            os.fchown(fd, m.uid, m.gid)
        # After chown, which clears setuid/setgid: the bits are kept (see module doc).
        os.fchmod(fd, m.mode & 0o7777)

    # -- entries -------------------------------------------------------------

    def entry(self, stream: _TarStream, m: Member) -> None:
        entry = _show(m.name)
        self.budget.entries += 1
        if self.budget.entries > self.budget.max_entries:
            cap = self.budget.max_entries
            raise self._err(entry, f"the image has more than {cap} entries (images.max_entries)")
        # An entry costs an inode and often a block: the reserve counts it so.
        self.budget.guard.charge(self.root_fd, BLOCK, self.what)
        parts = split_path(m.name, entry, self.what)
        _check_ids(m, entry, self.what)
        for comp in parts[:-1]:
            if comp.startswith(WHITEOUT_META_PREFIX):
                return  # inside AUFS metadata (.wh..wh.plnk/...): skipped, as docker does
            if comp.startswith(WHITEOUT_PREFIX):
                raise self._err(entry, "a whiteout name used as a directory")
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, entry)
            return
        if not self.budget.mkfs_unfit:
            self.budget.mkfs_unfit = self._mkfs_unfit(parts)
        if m.isreg():
            self._charge(m, entry)
            self._file(stream, m, parts, entry)
        elif m.isdir():
            self._dir(m, parts, entry)
        elif m.issym():
            self._symlink(m, parts, entry)
        elif m.islnk():
            self._hardlink(m, parts, entry)
        elif m.isfifo():
            self._fifo(m, parts, entry)
        elif m.isdev():
            raise self._err(entry, "device nodes are refused in image layers")
        else:
            raise self._err(entry, f"unsupported tar entry type {m.kind!r}")

    def _mkfs_unfit(self, parts: Path_) -> str:
        """Why mkfs.erofs 1.5 could not build a tree with this path in it ("" if it can)."""
        for comp in parts:
            if len(os.fsencode(comp)) == MAX_NAME_BYTES:
                return f"a name of {MAX_NAME_BYTES} B"
            if comp.startswith(MKFS_SKIPPED_PREFIX):
                return f"a name beginning with {MKFS_SKIPPED_PREFIX}"
        full = self.root_len + sum(len(os.fsencode(c)) + 1 for c in parts)
        if full >= MAX_PATH_BYTES:
            return f"a path of {full} B in the staging dir"
        return ""

    def _charge(self, m: Member, entry: str) -> None:
        """A file's apparent size against the budget before any of it is written: a
        sparse file's holes cost no stream bytes, yet the image built from the tree
        (and whoever copies the file) pays for them, so they count like data."""
        if self.budget.bytes + m.realsize > self.budget.max_bytes:
            raise self._err(
                entry,
                f"{m.realsize} B would take the image over {self.budget.max_bytes} B "
                "(images.max_unpacked_bytes)",
            )
        holes = m.realsize - m.size
        self.budget.bytes += holes
        self.budget.holes += holes
        if m.sparse is not None:
            # A data run costs a seek and a write call, as an entry costs a create:
            # a file of many runs counts as that many entries.
            self.budget.entries += len(m.sparse)
            if self.budget.entries > self.budget.max_entries:
                raise self._err(
                    entry,
                    f"{len(m.sparse)} sparse data runs take the image over "
                    f"{self.budget.max_entries} entries (images.max_entries)",
                )

    def _whiteout(self, parts: Path_, entry: str) -> None:
        parent, base = parts[:-1], parts[-1]
        if base == OPAQUE_MARKER:
            dfd = self.open_dir(parent, True, entry)
            assert dfd is not None
            try:
                self._prune_once(dfd, parent)
            finally:
                os.close(dfd)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): skipped, as docker does
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise self._err(entry, "malformed whiteout")
        dfd = self.open_dir(parent, False, entry)
        if dfd is None:
            return  # nothing below to hide
        try:
            tparts = (*parent, target)
            if tparts not in self.created:
                self._remove(dfd, target)
            else:
                st = self._lstat(dfd, target)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    cfd = os.open(target, _DIR_FLAGS, dir_fd=dfd)
                    try:
                        self._prune_once(cfd, tparts)
                    finally:
                        os.close(cfd)
        finally:
            os.close(dfd)

    def _in_parent(self, parts: Path_, entry: str, fn: Callable[[int, str], None]) -> None:
        """Run fn(parent_fd, name) after replacing whatever was at parts (but a dir by a dir)."""
        if not parts:
            raise self._err(entry, "only a directory may stand for the root")
        dfd = self.open_dir(parts[:-1], True, entry)
        assert dfd is not None
        try:
            fn(dfd, parts[-1])
        finally:
            os.close(dfd)
        self._mark(parts)

    def _file(self, stream: _TarStream, m: Member, parts: Path_, entry: str) -> None:
        if stream.tell() != m.offset_data:  # the reader and we disagree on where the data is
            raise self._err(entry, f"data at {m.offset_data}, stream at {stream.tell()}")

        def create(dfd: int, name: str) -> None:
            self._remove(dfd, name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
            try:
                self._data(stream, fd, m, entry)
                self._owner_mode(fd, m)
                self._xattrs(fd, m)
                ns = _mtime_ns(m)
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)

        self._in_parent(parts, entry, create)

    def _data(self, stream: _TarStream, fd: int, m: Member, entry: str) -> None:
        """The file's data; a sparse file's runs each at its offset, the holes
        between them left unwritten (holes on disk, not blocks of zeros), and so
        are the zero blocks of any file (see guard.py)."""
        runs = [(0, m.size)] if m.sparse is None else m.sparse
        holes = 0
        for offset, length in runs:
            written, zeros = stream.copy_to(fd, length, offset)
            if written != length:
                at = f" at {offset}" if m.sparse is not None else ""
                raise self._err(entry, f"truncated: {written} of {length} B{at}")
            holes += zeros
        self.budget.holes += holes
        if m.sparse is not None or holes:
            os.ftruncate(fd, m.realsize)  # it may end in a hole

    def _xattrs(self, fd: int, m: Member, *, relisted: bool = False) -> None:
        """The entry's kept xattrs on ``fd``; for a directory a lower layer made
        (``relisted``), the kept ones this layer does not list go."""
        if relisted:
            for name in os.listxattr(fd):
                if _kept_xattr(name) and name not in m.xattrs:
                    with contextlib.suppress(OSError):
                        os.removexattr(fd, name)
        for name, value in m.xattrs.items():
            if "\0" in name:
                continue  # not a name the kernel can take
            if _kept_xattr(name):
                # Best effort: a file system without user xattrs, or a malformed
                # capability, costs the attribute, not the image.
                with contextlib.suppress(OSError):
                    os.setxattr(fd, name, value)

    def _dir(self, m: Member, parts: Path_, entry: str) -> None:
        if not parts:  # "./": the root's own owner, mode, xattrs and time
            self._owner_mode(self.root_fd, m)
            self._xattrs(self.root_fd, m, relisted=True)
            self.dir_times[()] = _mtime_ns(m)
            return

        def create(dfd: int, name: str) -> None:
            st = self._lstat(dfd, name)
            relisted = st is not None and stat.S_ISDIR(st.st_mode)
            if not relisted:
                self._remove(dfd, name)
                os.mkdir(name, 0o700, dir_fd=dfd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                self._owner_mode(fd, m)
                self._xattrs(fd, m, relisted=relisted)
            finally:
                os.close(fd)

        self._in_parent(parts, entry, create)
        self.dir_times[parts] = _mtime_ns(m)

    def _symlink(self, m: Member, parts: Path_, entry: str) -> None:
        target = m.linkname
        if not target or "\0" in target or len(os.fsencode(target)) > MAX_PATH_BYTES:
            raise self._err(entry, "empty, NUL-bearing or over-long symlink target")

        def create(dfd: int, name: str) -> None:
            self._remove(dfd, name)
            # The target is stored, never resolved: it may point anywhere.
            os.symlink(target, name, dir_fd=dfd)
            if self.chown:
                os.chown(name, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
            ns = _mtime_ns(m)
            os.utime(name, ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)

        self._in_parent(parts, entry, create)

    def _hardlink(self, m: Member, parts: Path_, entry: str) -> None:
        tparts = split_path(m.linkname, entry, self.what)
        if not tparts or tparts == parts:
            raise self._err(entry, f"bad hardlink target {_show(m.linkname)}")
        tdfd = self.open_dir(tparts[:-1], False, entry)
        if tdfd is None:
            raise self._err(entry, f"hardlink target {_show(m.linkname)} does not exist")
        try:
            st = self._lstat(tdfd, tparts[-1])
            if st is None:
                raise self._err(entry, f"hardlink target {_show(m.linkname)} does not exist")
            if stat.S_ISDIR(st.st_mode):
                raise self._err(entry, f"hardlink target {_show(m.linkname)} is a directory")

            def create(dfd: int, name: str) -> None:
                self._remove(dfd, name)
                os.link(tparts[-1], name, src_dir_fd=tdfd, dst_dir_fd=dfd, follow_symlinks=False)

            self._in_parent(parts, entry, create)
        finally:
            os.close(tdfd)

    def _fifo(self, m: Member, parts: Path_, entry: str) -> None:
        def create(dfd: int, name: str) -> None:
            self._remove(dfd, name)
            os.mkfifo(name, 0o600, dir_fd=dfd)
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dfd)
            try:
                self._owner_mode(fd, m)
                ns = _mtime_ns(m)
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)

        self._in_parent(parts, entry, create)

    def finish(self) -> None:
        """Directory mtimes last: every write inside a directory bumped its mtime."""
        for parts, ns in self.dir_times.items():
            try:
                fd = self.open_dir(parts, False, "")
            except ImageError:
                continue  # replaced by a symlink later in this layer
            if fd is None:
                continue
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)


def _kept_xattr(name: str) -> bool:
    return name in KEPT_XATTRS or name.startswith(KEPT_XATTR_PREFIXES)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def unpack_layer(
    blob: Path | BlobFile | OpenedLayer,
    compression: str,
    root: Path,
    budget: Budget,
    *,
    diff_id: str | None = None,
    what: str = "layer",
) -> str:
    """Apply one layer blob on top of ``root``; return its diff_id.

    ``compression`` is the media type's ("none", "gzip", "zstd"); the blob's
    magic bytes must agree. With ``diff_id``, a mismatch raises ImageError:
    the caller must then discard ``root`` (the tree is already written).
    Any refusal leaves ``root`` partly written and nothing outside it touched.
    ``blob`` is a path, an open file (the caller's to close), or an OpenedLayer
    (closed here).
    """
    layer = (
        blob
        if isinstance(blob, OpenedLayer)
        else OpenedLayer(blob, compression, what, close_blob=False)
    )
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as e:
        layer.close()
        raise ImageError(f"{what}: cannot open staging root {root}: {e.strerror}") from None
    current = ""
    try:
        budget.guard.check_room(root_fd, 0, what)
        inflation = budget.guard.inflation(layer.size, what)
        reader = _TarStream(layer.stream(), budget, inflation, what)
        un = _Unpacker(root_fd, budget, what, len(os.fsencode(str(root))))
        members = TarReader(reader, what)
        while (m := members.next()) is not None:
            current = m.name
            un.entry(reader, m)
            budget.check_cpu(reader.started, what)
        current = ""
        reader.drain()
        un.finish()
        budget.cpu_s += time.thread_time() - reader.started
    except (EOFError, zlib.error, zstandard.ZstdError, OSError) as e:
        at = f" (at entry {_show(current)})" if current else ""
        raise ImageError(f"{what}: corrupt or unwritable layer{at}: {e}") from e
    finally:
        layer.close()
        os.close(root_fd)
    got = "sha256:" + reader.hash.hexdigest()
    if diff_id is not None and got != diff_id:
        raise ImageError(
            f"{what}: uncompressed content is {got}, but the image config says {diff_id} "
            "(corrupt or tampered layer)"
        )
    return got
