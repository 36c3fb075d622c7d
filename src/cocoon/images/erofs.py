"""cocoon's own erofs writer, for the trees mkfs.erofs 1.5 cannot build right.

mkfs.erofs 1.5 is Debian 12's (newer ones need a newer libc), and valid
images meet three of its bugs (read in its source):

- A name of 255 bytes (NAME_MAX; erofs allows it) is cut to 254 when the
  directory is read (``erofs_d_alloc`` copies ``EROFS_NAME_LEN - 1`` bytes),
  then the cut name is looked up: "Could not format the device: No such file
  or directory".
- Every entry whose name begins with ``lost+found`` is skipped, at any depth
  (upstream stopped that in 1.6).
- A path of PATH_MAX bytes or more, the staging dir's prefix included, fails
  the build.

The unpacker flags such a tree, and the store builds its image here instead:
the same on-disk format (uncompressed, 4 KiB blocks), which the guest kernel
mounts like every other image, so nothing downstream knows the difference.
Facts about the format come from erofs_fs.h and the kernel's reader; the
layout is this module's own:

- block 0: the superblock at byte 1024;
- from byte 1152, the inodes (``meta_blkaddr`` 0, nid = byte offset / 32,
  the root's first: its nid must fit 16 bits): 64-byte extended inodes (u32
  ids, ns mtimes, u64 sizes), each with its xattrs inline and, when it fits
  in the inode's block, the last partial block of its data (tail packing,
  as mkfs does: a small file costs no block of its own); an inode and its
  xattrs never cross a block boundary;
- then the data blocks of files, directories and long symlinks, contiguous
  per inode (FLAT_PLAIN, or FLAT_INLINE with the tail in the inode's block).

File data is copied with copy_file_range over the source's data ranges only
(SEEK_DATA/SEEK_HOLE): holes in the tree, sparse files' and the zero blocks
the unpacker left unwritten, stay holes in the image file: sparse on the
host, zeros to the guest. No chunk-based layout is needed for them.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import uuid as uuid_mod
from dataclasses import dataclass, field

from cocoon.errors import ImageError

BLOCK = 4096
_MAGIC = 0xE0F5E1E2
_SUPER_OFFSET = 1024
_META_START = _SUPER_OFFSET + 128
_SLOT = 32  # nid granularity
_INODE_SIZE = 64
_XATTR_HEADER = 12
_DIRENT = 12
#: Data layouts (i_format bits 1-3); bit 0 set: an extended inode.
_FLAT_PLAIN, _FLAT_INLINE = 0, 2
_EXTENDED = 1
_NAME_MAX = 255
#: Ids of the xattr name prefixes erofs stores (the rest of the name follows).
_XATTR_INDEX = {"user.": 1, "trusted.": 4, "security.": 6}
_FT = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(eq=False)
class _Node:
    """One inode of the tree (a hardlinked file is one node under several names)."""

    st: os.stat_result
    xattrs: bytes
    #: Directories: (name, child) sorted by name, as erofs wants them.
    children: list[tuple[bytes, _Node]] = field(default_factory=list)
    parent: _Node | None = None
    #: Symlinks: the target.
    target: bytes = b""
    size: int = 0
    #: Bytes of the last, partial block (0 if none): inline when it fits.
    tail: int = 0
    layout: int = _FLAT_PLAIN
    nid: int = 0
    blkaddr: int = 0
    nlink: int = 1
    #: The file's data was copied (a hardlinked file is met more than once).
    written: bool = False

    @property
    def fmt(self) -> int:
        return stat.S_IFMT(self.st.st_mode)

    @property
    def isize(self) -> int:
        return _INODE_SIZE + len(self.xattrs)

    @property
    def blocks(self) -> int:
        """Data blocks outside the metadata area."""
        inline = self.tail if self.layout == _FLAT_INLINE else 0
        return -(-(self.size - inline) // BLOCK)


def _xattr_body(fd: int) -> bytes:
    """The inline xattr body of the open file ``fd``: the xattrs the unpacker
    keeps (see layers.py), never one the host's file system added (a label)."""
    # (the unpacker, zstandard and all, only where an image is built)
    from cocoon.images.layers import KEPT_XATTR_PREFIXES, KEPT_XATTRS

    names = sorted(
        n for n in os.listxattr(fd) if n in KEPT_XATTRS or n.startswith(KEPT_XATTR_PREFIXES)
    )
    entries = []
    for name in names:
        prefix = next(p for p in _XATTR_INDEX if name.startswith(p))
        suffix = os.fsencode(name[len(prefix) :])
        value = os.getxattr(fd, name)
        if len(suffix) > 0xFF or len(value) > 0xFFFF:
            raise ImageError(f"xattr {name[:60]!r} is too long for erofs")
        e = struct.pack("<BBH", len(suffix), _XATTR_INDEX[prefix], len(value)) + suffix + value
        entries.append(e + bytes(-len(e) % 4))
    if not entries:
        return b""
    return bytes(_XATTR_HEADER) + b"".join(entries)


class _Builder:
    def __init__(self, out_fd: int, what: str) -> None:
        self.out = out_fd
        self.what = what
        self.nodes: list[_Node] = []
        self.by_ino: dict[tuple[int, int], _Node] = {}

    # -- pass 1: the tree ----------------------------------------------------

    def scan(self, dfd: int, node: _Node) -> None:
        """Children of the directory ``dfd`` (``node``), recursively, by dir fds:
        no path is ever built, so no depth or length is too much."""
        names = sorted(os.listdir(dfd), key=os.fsencode)
        for name in names:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            key = (st.st_dev, st.st_ino)
            child = self.by_ino.get(key) if not stat.S_ISDIR(st.st_mode) else None
            if child is None:
                child = self._node(dfd, name, st)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    self.by_ino[key] = child
            bname = os.fsencode(name)
            if len(bname) > _NAME_MAX:
                raise ImageError(f"a name is longer than {_NAME_MAX} B")
            node.children.append((bname, child))
            if stat.S_ISDIR(st.st_mode):
                child.parent = node
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self.scan(cfd, child)
                finally:
                    os.close(cfd)

    def _node(self, dfd: int, name: str, st: os.stat_result) -> _Node:
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFLNK:
            node = _Node(st, b"", target=os.fsencode(os.readlink(name, dir_fd=dfd)))
            node.size = len(node.target)
        elif fmt in (stat.S_IFREG, stat.S_IFDIR):
            fd = os.open(name, _DIR_FLAGS if fmt == stat.S_IFDIR else _FILE_FLAGS, dir_fd=dfd)
            try:
                node = _Node(st, _xattr_body(fd))
            finally:
                os.close(fd)
            node.size = st.st_size if fmt == stat.S_IFREG else 0
        else:
            node = _Node(st, b"")
        self.nodes.append(node)
        return node

    def root(self, root_fd: int) -> _Node:
        st = os.fstat(root_fd)
        node = _Node(st, _xattr_body(root_fd))
        self.nodes.append(node)
        node.parent = node
        self.scan(root_fd, node)
        return node

    # -- layout --------------------------------------------------------------

    @staticmethod
    def _entries(node: _Node) -> list[tuple[bytes, _Node]]:
        assert node.parent is not None
        return sorted([(b".", node), (b"..", node.parent), *node.children])

    @staticmethod
    def _dir_blocks(entries: list[tuple[bytes, _Node]]) -> list[list[tuple[bytes, _Node]]]:
        """Entries cut into blocks: each block holds whole dirents and names."""
        blocks: list[list[tuple[bytes, _Node]]] = [[]]
        used = 0
        for e in entries:
            need = _DIRENT + len(e[0])
            if used + need > BLOCK:
                blocks.append([])
                used = 0
            blocks[-1].append(e)
            used += need
        return blocks

    def _sizes(self) -> None:
        for node in self.nodes:
            if node.fmt == stat.S_IFDIR:
                blocks = self._dir_blocks(self._entries(node))
                last = sum(_DIRENT + len(n) for n, _ in blocks[-1])
                node.size = BLOCK * (len(blocks) - 1) + last
            if node.fmt in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                node.tail = node.size % BLOCK
            node.nlink = node.st.st_nlink
            if node.fmt == stat.S_IFDIR:
                node.nlink = 2 + sum(1 for _, c in node.children if c.fmt == stat.S_IFDIR)

    def layout(self) -> int:
        """nids, inline tails and data blocks; the image's size in blocks.

        An inode (with its xattrs) starts a new block rather than cross one;
        a tail goes inline when it fits after its inode, or when starting a
        new block for it wastes less than a data block of its own would.
        """
        self._sizes()
        pos = _META_START
        for node in self.nodes:
            pos = -(-pos // _SLOT) * _SLOT
            room = BLOCK - pos % BLOCK
            need = node.isize + node.tail
            if node.tail and need <= BLOCK and (need <= room or room < BLOCK - node.tail):
                node.layout = _FLAT_INLINE
                if need > room:
                    pos += room
            else:
                node.layout = _FLAT_PLAIN
                if node.isize > room:
                    pos += room
            node.nid = pos // _SLOT
            pos += node.isize + (node.tail if node.layout == _FLAT_INLINE else 0)
        if self.nodes[0].nid > 0xFFFF:
            raise ImageError("the root's nid does not fit 16 bits")
        block = -(-pos // BLOCK)
        for node in self.nodes:
            if node.blocks:
                node.blkaddr = block
                block += node.blocks
        return block

    # -- pass 2: writing -----------------------------------------------------

    def _inode(self, node: _Node) -> bytes:
        st = node.st
        if node.fmt in (stat.S_IFCHR, stat.S_IFBLK):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            u = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        elif node.fmt in (stat.S_IFIFO, stat.S_IFSOCK):
            u = 0
        else:
            u = node.blkaddr
        icount = (len(node.xattrs) - _XATTR_HEADER) // 4 + 1 if node.xattrs else 0
        sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        return struct.pack(
            "<HHHHQIIIIQII16x",
            _EXTENDED | node.layout << 1,
            icount,
            st.st_mode & 0xFFFF,
            0,
            node.size,
            u & 0xFFFFFFFF,
            node.nid & 0xFFFFFFFF,
            st.st_uid,
            st.st_gid,
            max(sec, 0),
            nsec,
            node.nlink,
        )

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.out, view, offset)
            view, offset = view[n:], offset + n

    def _place(self, node: _Node, data: bytes) -> None:
        """``data`` (a directory's or symlink's) at the node's blocks and inline tail."""
        body = len(data) - (node.tail if node.layout == _FLAT_INLINE else 0)
        if body:
            self._pwrite(data[:body], node.blkaddr * BLOCK)
        if node.layout == _FLAT_INLINE:
            self._pwrite(data[body:], node.nid * _SLOT + node.isize)

    def _dir_data(self, node: _Node) -> bytes:
        out = bytearray()
        for i, block in enumerate(self._dir_blocks(self._entries(node))):
            if i:
                out += bytes(-len(out) % BLOCK)
            nameoff = _DIRENT * len(block)
            head, names = bytearray(), bytearray()
            for name, child in block:
                head += struct.pack("<QHBx", child.nid, nameoff + len(names), _FT[child.fmt])
                names += name
            out += head + names
        return bytes(out)

    def _copy(self, src: int, length: int, dst_off: int) -> None:
        """``length`` bytes of src at dst_off, data ranges only: holes stay holes."""
        pos = 0
        while pos < length:
            try:
                pos = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return  # a hole to the end
                raise
            end = min(os.lseek(src, pos, os.SEEK_HOLE), length)
            while pos < end:
                n = _copy_range(src, self.out, end - pos, pos, dst_off + pos)
                if n == 0:
                    raise ImageError("a file shrank while its image was built")
                pos += n

    def _file(self, node: _Node, fd: int) -> None:
        inline = node.tail if node.layout == _FLAT_INLINE else 0
        body = node.size - inline
        self._copy(fd, body, node.blkaddr * BLOCK)
        if inline:
            tail = os.pread(fd, inline, body)
            if len(tail) != inline:
                raise ImageError("a file shrank while its image was built")
            self._pwrite(tail, node.nid * _SLOT + node.isize)

    def write(self, dfd: int, node: _Node) -> None:
        """Inodes and data of ``node``'s subtree (``dfd`` is its directory)."""
        self._pwrite(self._inode(node) + node.xattrs, node.nid * _SLOT)
        self._place(node, self._dir_data(node))
        for name, child in node.children:
            sname = os.fsdecode(name)
            if child.fmt == stat.S_IFDIR:
                cfd = os.open(sname, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self.write(cfd, child)
                finally:
                    os.close(cfd)
                continue
            if child.written:
                continue
            child.written = True
            self._pwrite(self._inode(child) + child.xattrs, child.nid * _SLOT)
            if child.fmt == stat.S_IFLNK:
                self._place(child, child.target)
            elif child.fmt == stat.S_IFREG and child.size:
                fd = os.open(sname, _FILE_FLAGS, dir_fd=dfd)
                try:
                    self._file(child, fd)
                finally:
                    os.close(fd)

    def superblock(self, root: _Node, blocks: int, fs_uuid: uuid_mod.UUID) -> bytes:
        sec, nsec = divmod(root.st.st_mtime_ns, 1_000_000_000)
        return struct.pack(
            "<IIIBBHQQIIII16s16sIHHH38x",
            _MAGIC,
            0,  # checksum: not used (feature_compat says so)
            0,  # feature_compat
            12,  # blkszbits
            0,  # sb_extslots
            root.nid,
            len(self.nodes),
            max(sec, 0),
            nsec,
            blocks,
            0,  # meta_blkaddr
            0,  # xattr_blkaddr: no shared xattrs
            fs_uuid.bytes,
            b"",
            0,  # feature_incompat
            0,
            0,  # extra_devices
            0,
        )


def _copy_range(src: int, dst: int, n: int, src_off: int, dst_off: int) -> int:
    """copy_file_range (no copy through Python), or pread/pwrite where it is refused."""
    try:
        return os.copy_file_range(src, dst, n, src_off, dst_off)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, min(n, 1 << 20), src_off)
    view = memoryview(data)
    while view:
        w = os.pwrite(dst, view, dst_off)
        view, dst_off = view[w:], dst_off + w
    return len(data)


def build(rootfs: str | os.PathLike[str], out_fd: int, fs_uuid: uuid_mod.UUID, what: str) -> None:
    """Write the erofs image of the tree at ``rootfs`` into ``out_fd`` (a new,
    empty file); any failure is one ImageError line, the file the caller's to remove."""
    try:
        root_fd = os.open(rootfs, _DIR_FLAGS)
    except OSError as e:
        raise ImageError(f"{what}: cannot open {rootfs}: {e.strerror}") from e
    try:
        b = _Builder(out_fd, what)
        root = b.root(root_fd)
        blocks = b.layout()
        os.ftruncate(out_fd, blocks * BLOCK)
        b.write(root_fd, root)
        b._pwrite(b.superblock(root, blocks, fs_uuid), _SUPER_OFFSET)
    except ImageError as e:
        raise ImageError(f"{what}: cannot build its erofs image: {e}") from e
    except OSError as e:
        raise ImageError(f"{what}: cannot build its erofs image: {e}") from e
    finally:
        os.close(root_fd)
