"""A bundle's root file system from the mounts containerd hands a shim.

runc's callers mount the rootfs themselves before `create`; a shim v2 is
handed the snapshotter's mounts instead (an overlay of the image's layers, or
a bind of one directory) and mounts them at ``<bundle>/rootfs`` itself, then
unmounts them when the task is deleted. The mount is made on the host, and
the rootfs then reaches the VM as any bundle's does (runtime.bundle).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cocoon.errors import BundleError, HostError
from cocoon.log import teardown_step
from cocoon.util.fs import mount_points_under
from cocoon.util.proc import run

MOUNT_TIMEOUT_S = 30.0
#: How many mounts stacked on one path ``unmount`` takes off, at most.
MAX_STACKED = 16
#: A mount's fields are the snapshotter's (paths under containerd's root), but
#: bounded all the same before they reach mount(8)'s argv.
MAX_OPTIONS_BYTES = 64 << 10
#: Types a snapshotter gives (overlayfs, native, devmapper's block devices...).
MOUNT_TYPES = frozenset({"overlay", "bind", "rbind", "ext4", "xfs", "erofs", "tmpfs"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    """containerd's ``types.Mount`` (its ``target``, a path inside the rootfs,
    is left for later: no snapshotter sets it for a container's root)."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


def mount(mounts: list[Mount], target: Path) -> None:
    """Each of ``mounts`` at ``target``, in order (a later one over an earlier
    one); on a failure, what was mounted is undone and BundleError says why."""
    target.mkdir(mode=0o711, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            run(_argv(m, target), timeout_s=MOUNT_TIMEOUT_S, error=BundleError)
            done += 1
    except BaseException:
        for _ in range(done):
            _umount(str(target))
        raise


def _argv(m: Mount, target: Path) -> list[str]:
    if m.type not in MOUNT_TYPES:
        raise BundleError(f"rootfs mount of type {m.type[:40]!r} is not supported")
    opts = [o for o in m.options if o]
    if sum(len(o) + 1 for o in opts) > MAX_OPTIONS_BYTES:
        raise BundleError("rootfs mount options are too long")
    if any("," in o for o in opts):  # one option each: mount(8) would split it
        raise BundleError("rootfs mount option with a comma")
    argv = ["mount"]
    if m.type in ("bind", "rbind"):
        # mount(8) makes a bind from its options: rbind (or bind), then ro by a remount.
        if not any(o in ("bind", "rbind") for o in opts):
            opts.insert(0, m.type)
    else:
        argv += ["-t", m.type]
    if opts:
        argv += ["-o", ",".join(opts)]
    return [*argv, "--", m.source or "none", str(target)]


def unmount(target: Path) -> None:
    """Every mount at or under ``target``, newest first; never fails (what
    could not be unmounted is logged). Lazily when the plain unmount is
    refused: a pod VM's file server may still hold files of a member's root
    until its guest forgets them."""
    for _ in range(MAX_STACKED):  # mounts stacked on one another: one goes per pass
        points = set(mount_points_under(target))
        if not points:
            return
        for mp in sorted(points, key=len, reverse=True):
            _umount(mp)


def _umount(path: str) -> None:
    with teardown_step(log, f"unmounting {path}", f"{path}, mounted", errors=(HostError,)):
        try:
            run(["umount", path], timeout_s=MOUNT_TIMEOUT_S)
        except HostError:
            if not os.path.ismount(path):
                return
            run(["umount", "-l", path], timeout_s=MOUNT_TIMEOUT_S)
