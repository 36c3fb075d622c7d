"""cocoon's own erofs writer: what the kernel reads back is the tree, entry by entry."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from cocoon.errors import ImageError
from cocoon.images import erofs
from tests.unit.imagekit import mounted
from tests.unit.treediff import differences, read_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounts images")


def _tricky_tree(root: Path) -> None:
    """Every kind of entry and every layout case the writer has."""
    root.mkdir()
    (root / ("n" * 255)).write_bytes(b"a name of NAME_MAX")
    (root / "lost+found").mkdir()
    (root / "lost+found" / "f").write_bytes(b"kept")
    (root / "lost+found.txt").write_bytes(b"kept too")
    for size in (0, 1, 100, 4095, 4096, 4097, 3 * 4096 + 17, 70_000):
        (root / f"size-{size}").write_bytes(os.urandom(size))
    big = root / "big-dir"  # dirents over many blocks: lookups binary-search them
    big.mkdir()
    for i in range(600):
        (big / (f"{i:04d}-" + "x" * (i % 200))).write_bytes(b"%d" % i)
    deep = root
    for i in range(16):  # a path of ~4.1 KB: longer than PATH_MAX with the mount point
        deep = deep / (f"{i:02d}" + "d" * 248)
        deep.mkdir()
    (deep / "leaf").write_bytes(b"deep")
    (root / "suid").write_bytes(b"s")
    os.chmod(root / "suid", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "owned").write_bytes(b"o")
    os.chown(root / "owned", 4_000_000_000, 3_000_000_000)
    os.utime(root / "owned", ns=(0, 1_234_567_891_123_456_789))
    os.link(root / "owned", root / "owned-link")
    os.link(root / "owned", root / "sticky" / "owned-link2")
    os.setxattr(root / "owned", "user.file", b"v" * 300)
    os.setxattr(root / "sticky", "user.dir", b"d")
    os.setxattr(root, "user.root", b"r")
    os.setxattr(root / "size-100", "user.a", b"1")
    os.setxattr(root / "size-100", "trusted.host", b"dropped: the unpacker never sets it")
    os.mkfifo(root / "fifo")
    os.symlink("/short", root / "sym")
    os.symlink("t" * 4000, root / "long-sym")  # does not fit inline after most inodes
    with open(root / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(b"data")
    os.chmod(root, 0o751)
    os.utime(root, ns=(0, 5_000_000_123))


def test_own_writer_image_reads_back_as_the_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tricky_tree(src)
    img = tmp_path / "image.erofs"
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        erofs.build(src, fd, uuid.UUID(int=1), "image test")
    finally:
        os.close(fd)
    fsck = subprocess.run(["fsck.erofs", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # the 64 MiB sparse file's holes are holes of the image file too
    assert img.stat().st_blocks * 512 < 8 << 20 < img.stat().st_size
    want = read_tree(src, ("user.",))
    with mounted(img, tmp_path / "mnt") as m:
        got = read_tree(m, ("user.", "trusted."))
        # every name is found by lookup too (binary search over the dirent blocks)
        for name in os.listdir(m / "big-dir"):
            assert (m / "big-dir" / name).read_bytes() == (src / "big-dir" / name).read_bytes()
    assert differences(want, got, "tree", "erofs") == []
    assert want["links"] == [[b"owned", b"owned-link", b"sticky/owned-link2"]]


def test_own_writer_failure_is_one_line(tmp_path: Path) -> None:
    img = tmp_path / "image.erofs"
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(ImageError, match=r"^image x: cannot open .*missing"):
            erofs.build(tmp_path / "missing", fd, uuid.UUID(int=1), "image x")
    finally:
        os.close(fd)
