"""Bind mounts on the host by system call rather than by running mount(8).

A container's start and removal bind and unbind several host paths (an OCI
bundle's rootfs and files, a pooled sandbox's hub). Each mount(8) or umount(8)
is a process that loads libmount, libblkid and libselinux: 3-6 ms apiece here,
tens of milliseconds on every `cocoon-runtime create` and `delete`. The system
calls are what those programs make in the end.
"""

from __future__ import annotations

import ctypes
import os

from cocoon.errors import HostError

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MNT_DETACH = 2

#: statvfs's per-mount flags and the mount(2) flags that set them again.
_KEPT = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)


def _mount(source: str | None, target: str, flags: int, what: str) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise HostError(f"{what} {target}: {os.strerror(err)}")


def bind(source: str, target: str, *, recursive: bool = False) -> None:
    """``mount --bind`` (``--rbind`` if ``recursive``)."""
    flags = MS_BIND | (MS_REC if recursive else 0)
    _mount(source, target, flags, f"binding {source} at")


def remount_readonly(target: str) -> None:
    """``mount -o remount,bind,ro``, keeping the bind's nosuid, nodev, noexec
    and atime flags: a bind remount sets every per-mount flag anew, and
    leaving one out would clear it."""
    kept = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    flags |= sum(ms for st, ms in _KEPT if kept & st)
    _mount(None, target, flags, "making read-only")


def make_shared(target: str) -> None:
    """``mount --make-shared``: mounts made under it later propagate to its peers."""
    _mount(None, target, MS_SHARED, "making shared")


def detach(target: str) -> None:
    """``umount -l``: gone from the tree now, released once nothing uses it."""
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise HostError(f"unmounting {target}: {os.strerror(err)}")
