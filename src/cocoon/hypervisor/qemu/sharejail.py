"""Exec a share's file server (virtiofsd, virtfs-proxy-helper) in a jail of its own.

The file server runs as root, because it must give the guest's files their
owners on the host; the guest on the other end is untrusted. So the backend
starts it through this script::

    python3 -I -S sharejail.py [--ro] [--slave] [--isolate] [--caps CAP,...] DIR -- PROG [ARG...]

In order, then exec (same pid: what the backend recorded is the server):

- a new mount namespace with every mount private (nothing propagates back to
  the host) or, with ``--slave``, a slave of the host's (nothing propagates
  back either, but mounts the host makes later under a shared DIR reach the
  server: a pooled sandbox's hub), and DIR bound onto itself nosuid and nodev (read-only too with
  ``--ro``: QEMU 7.2's C virtiofsd has no read-only option, and a ``ro``
  mount inside the guest is a request, not a guarantee). These mounts exist
  only in the server's namespace and vanish with it: no host mount to
  record, to leak after a crash, or for a later ``rm -r`` to descend into.
  A read-only bind is not recursive on purpose: a recursive bind would carry
  DIR's submounts along *writable* (a remount applies to one mount only), so
  mounts below DIR show as empty directories instead. A writable one is
  recursive: an OCI bundle's binds dir is a tree of bind mounts.
- ``--isolate``: new network, IPC and UTS namespaces too (virtiofsd makes its
  own; virtfs-proxy-helper, which only chroots, does not).
- ``--caps``: every capability but these dropped from the bounding set, and
  no_new_privs: the server can never regain what it does not need.

Run as a script with ``-I -S``: stdlib only, no cocoon import (~20 ms).
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
LAST_CAP = 63  # unknown ones fail with EINVAL and are skipped
CAPS = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
    "setgid": 6, "setuid": 7, "setpcap": 8, "sys_chroot": 18, "mknod": 27,
}  # fmt: skip


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SystemExit(f"cocoon sharejail: {what}: {os.strerror(err)}")


def enter(path: str, readonly: bool, isolate: bool, slave: bool) -> None:
    """Give this process its own view of ``path`` (and namespaces with ``isolate``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    src = os.fsencode(path)
    flags = CLONE_NEWNS | (CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS if isolate else 0)
    _check(libc.unshare(flags), "unshare")
    how = MS_SLAVE if slave else MS_PRIVATE
    _check(libc.mount(None, b"/", None, MS_REC | how, None), "make / rprivate or rslave")
    _check(libc.mount(src, src, None, MS_BIND | (0 if readonly else MS_REC), None), f"bind {path}")
    remount = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    _check(libc.mount(None, src, None, remount, None), f"remount {path}")
    if readonly and not os.statvfs(path).f_flag & os.ST_RDONLY:
        raise SystemExit(f"cocoon sharejail: {path} is still writable after the remount")


def limit(keep: set[int]) -> None:
    """Bound the capabilities the exec'd server can hold to ``keep``; no_new_privs."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(LAST_CAP + 1):
        if cap in keep or libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
            continue
        if ctypes.get_errno() != 22:  # EINVAL: no such capability on this kernel
            _check(-1, f"drop capability {cap}")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def main(argv: list[str]) -> None:
    args = argv[1:]
    readonly = isolate = slave = False
    keep: set[int] | None = None
    while args and args[0].startswith("--") and args[0] != "--":
        opt = args.pop(0)
        if opt == "--ro":
            readonly = True
        elif opt == "--isolate":
            isolate = True
        elif opt == "--slave":
            slave = True
        elif opt == "--caps" and args:
            try:
                keep = {CAPS[name] for name in args.pop(0).split(",") if name}
            except KeyError as e:
                raise SystemExit(f"cocoon sharejail: unknown capability {e}") from None
        else:
            raise SystemExit(f"cocoon sharejail: unknown option {opt}")
    if len(args) < 3 or args[1] != "--" or not os.path.isabs(args[0]):
        raise SystemExit(
            "usage: sharejail.py [--ro] [--slave] [--isolate] [--caps NAME,...] DIR -- PROGRAM"
        )
    enter(args[0], readonly, isolate, slave)
    if keep is not None:
        limit(keep)
    os.execv(args[2], args[2:])


if __name__ == "__main__":
    main(sys.argv)
