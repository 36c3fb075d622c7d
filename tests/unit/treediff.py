"""Trees read back entry by entry, for comparing an unpacked image with another."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

#: What is compared per path.
FIELDS = ("type", "mode", "uid", "gid", "size", "sha256", "target", "rdev", "mtime_ns", "xattrs")


XATTRS = ("user.", "security.")


def read_tree(root: Path, xattr_prefixes: tuple[str, ...] = XATTRS) -> dict[str, Any]:
    """path (bytes, relative) -> its metadata, and "links": the hardlink groups.

    Walked with dir fds (``os.fwalk``), so paths longer than PATH_MAX once
    joined to the mount point are read too.
    """
    out: dict[bytes, dict[str, Any]] = {}
    by_inode: dict[tuple[int, int], list[bytes]] = {}
    for dirpath, dirs, files, dfd in os.fwalk(os.fsencode(root)):
        rel_dir = os.path.relpath(dirpath, os.fsencode(root))
        base = b"" if rel_dir == b"." else rel_dir + b"/"
        if not base:
            out[b"."] = _entry(dfd, None)
        for name in dirs + files:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            e = _entry(dfd, name, st, xattr_prefixes)
            out[base + name] = e
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                by_inode.setdefault((st.st_dev, st.st_ino), []).append(base + name)
    groups = sorted(sorted(g) for g in by_inode.values() if len(g) > 1)
    return {"entries": out, "links": groups}


def _entry(
    dfd: int,
    name: bytes | None,
    st: os.stat_result | None = None,
    xattr_prefixes: tuple[str, ...] = XATTRS,
) -> dict[str, Any]:
    st = st or os.fstat(dfd)
    kind = stat.S_IFMT(st.st_mode)
    e: dict[str, Any] = {
        "type": {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                 stat.S_IFIFO: "fifo", stat.S_IFCHR: "char", stat.S_IFBLK: "block"}[kind],
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else 0,
        "sha256": None,
        "target": None,
        "rdev": (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind in (stat.S_IFCHR, stat.S_IFBLK) else None,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": {},
    }  # fmt: skip
    if kind == stat.S_IFLNK:
        assert name is not None
        e["target"] = os.readlink(name, dir_fd=dfd)
        return e
    if kind == stat.S_IFREG:
        assert name is not None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            h = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            e["sha256"] = h.hexdigest()
            e["xattrs"] = _xattrs(fd, xattr_prefixes)
        finally:
            os.close(fd)
    elif kind == stat.S_IFDIR:
        fd = dfd if name is None else os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
        try:
            e["xattrs"] = _xattrs(fd, xattr_prefixes)
        finally:
            if fd != dfd:
                os.close(fd)
    return e


def _xattrs(fd: int, prefixes: tuple[str, ...]) -> dict[str, bytes]:
    return {n: os.getxattr(fd, n) for n in sorted(os.listxattr(fd)) if n.startswith(prefixes)}


def differences(a: dict[str, Any], b: dict[str, Any], la: str, lb: str) -> list[str]:
    """One line per path (and field) where the trees differ, naming the path."""
    out = []
    ea, eb = a["entries"], b["entries"]
    for path in sorted(set(ea) | set(eb)):
        shown = repr(path if len(path) <= 80 else path[:60] + b"..." + path[-16:])
        if path not in ea or path not in eb:
            out.append(f"{shown}: only in {la if path in ea else lb}")
            continue
        for f in FIELDS:
            if ea[path][f] != eb[path][f]:
                out.append(f"{shown}: {f} {la}={ea[path][f]!r} {lb}={eb[path][f]!r}")
    if a["links"] != b["links"]:
        out.append(f"hardlink groups: {la}={a['links']!r} {lb}={b['links']!r}")
    return out
