"""Exec virtiofsd on a directory that is read-only for it, enforced by the host kernel.

QEMU 7.2's C virtiofsd has no read-only option, and the guest on the other end
is untrusted: a ``ro`` mount inside the guest is a request, not a guarantee.
So the backend starts virtiofsd through this script::

    python3 -I -S roshare.py DIR -- virtiofsd -o source=DIR ...

It enters a new mount namespace, makes every mount in it private (nothing
propagates back to the host), bind-mounts DIR onto itself and remounts that
bind read-only, then execs virtiofsd (same pid: what the backend recorded is
virtiofsd). The read-only mount exists only in virtiofsd's namespace and
vanishes with it: no host mount to record, to leak after a crash, or for a
later ``rm -r`` of a state dir to descend into.

The bind is not recursive on purpose: a recursive bind would carry DIR's
submounts along *writable* (a remount applies to one mount only), so mounts
below DIR show as empty directories instead.

Run as a script with ``-I -S``: stdlib only, no cocoon import (~20 ms).
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SystemExit(f"cocoon roshare: {what}: {os.strerror(err)}")


def enter_readonly(path: str) -> None:
    """Make ``path`` a read-only mount in a private mount namespace of this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    src = os.fsencode(path)
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / rprivate")
    _check(libc.mount(src, src, None, MS_BIND, None), f"bind {path}")
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    _check(libc.mount(None, src, None, flags, None), f"remount {path} read-only")
    if not os.statvfs(path).f_flag & os.ST_RDONLY:
        raise SystemExit(f"cocoon roshare: {path} is still writable after the remount")


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--" or not os.path.isabs(argv[1]):
        raise SystemExit("usage: roshare.py ABSOLUTE_DIR -- PROGRAM [ARG...]")
    enter_readonly(argv[1])
    os.execv(argv[3], argv[3:])


if __name__ == "__main__":
    main(sys.argv)
