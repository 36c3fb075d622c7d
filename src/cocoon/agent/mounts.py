"""Mounts made with mount(2) itself, not a busybox `mount` per request.

Each helper process costs tens of milliseconds under TCG (fork, exec, and
the translation of code no clone of a template has run yet); a container's
root alone is three mounts. ctypes is imported with the agent, so a cold boot
pays for it once and a template's clones not at all.
"""

from __future__ import annotations

import ctypes
import os

from cocoon.agent.session import RemoteError

_libc = ctypes.CDLL(None, use_errno=True)

#: mount(8) option words that are flags, not file-system data.
FLAGS = {
    "ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "sync": 0x10,
    "dirsync": 0x80, "noatime": 0x400, "nodiratime": 0x800, "bind": 0x1000,
    "rbind": 0x1000 | 0x4000, "remount": 0x20, "relatime": 0x200000,
    "strictatime": 0x1000000,
}  # fmt: skip
CLEARS = {"rw", "suid", "dev", "exec", "atime", "diratime", "async", "defaults"}


def mount(source: str, target: str, fstype: str, options: list[str]) -> None:
    flags = 0
    data = []
    for o in options:
        if o in FLAGS:
            flags |= FLAGS[o]
        elif o not in CLEARS:
            data.append(o)
    ret = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        ",".join(data).encode() if data else None,
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise RemoteError("mount_failed", f"mount {source[:200]} on {target[:200]}: "
                                          f"{os.strerror(err)}")  # fmt: skip


def umount(target: str) -> None:
    if _libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise RemoteError("umount_failed", f"umount {target[:200]}: {os.strerror(err)}")
