"""The jailer: set up a VMM's jail in the child of a fork, before it execs
the VMM.

``jail.Plan.child_setup`` runs ``enter`` in the child subprocess forks, after
its stdio is set and before the exec: the host's own interpreter, already
loaded, so a jail costs a few system calls, not an interpreter's start. The
child then execs tini, which forks the VMM: the child's pid becomes tini's,
the host's child, and the VMM tini's, pid 1 of a pid namespace of its own
(the host records both; see the backend's ``_wait_exec``). In order:

1. new mount, ipc, uts and (for what it forks) pid namespaces (and network,
   when the VMM's NICs arrive as fds): nothing it mounts is seen on the host
   (the host moves the VMM into the sandbox's cgroups once it runs);
2. a tmpfs root holding only the plan's paths, each bound at the path it has
   on the host (so the VMM's command line is unchanged), read-only unless the
   plan says otherwise; a few /dev nodes; /proc with only the jail's own
   processes visible (hidepid=invisible: its uid is its own); a /dev of a
   few nodes made for it;
3. pivot_root into it, the old root detached, the new root made read-only;
4. every capability dropped from the bounding set, then groups, gid and uid
   changed to the sandbox's; no_new_privs; no core dumps (a core would be a
   copy of tenant memory); open files and processes capped;
5. exec.

Any failure raises; the child reports it in one line and exits 125 (see
``child_setup``): the VMM never starts half-jailed. The child runs only this
module's system calls: nothing that takes a lock another thread of the
parent might have held at the fork.
"""

from __future__ import annotations

import ctypes
import os
import resource
import stat
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SYS_PIVOT_ROOT = 155  # x86_64
LAST_CAP = 63  # drop them all; unknown ones fail with EINVAL and are skipped

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            src.encode() if src else None,
            dst.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {src or fstype} on {dst}",
    )


def _mountpoint(root: str, path: str, like: os.stat_result) -> str:
    """Create ``path`` under ``root`` (a dir or an empty file, as ``like``)."""
    inside = root + path
    os.makedirs(os.path.dirname(inside), mode=0o755, exist_ok=True)
    if stat.S_ISDIR(like.st_mode):
        os.makedirs(inside, mode=0o755, exist_ok=True)
    elif not os.path.lexists(inside):
        os.close(os.open(inside, os.O_CREAT | os.O_WRONLY, 0o600))
    return inside


def _bind(root: str, path: str, writable: bool) -> None:
    """``path`` at the same path in the jail; read-only, no suid, unless writable."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise JailError(f"{path}: {e.strerror}") from None
    inside = _mountpoint(root, path, st)
    _mount(path, inside, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID
    if not writable:
        flags |= MS_RDONLY
    if not stat.S_ISCHR(st.st_mode):
        flags |= MS_NODEV
    _mount(None, inside, None, flags)


#: The /dev every VMM gets: (name, major, minor); world-usable like the host's.
DEVICES = [("null", 1, 3), ("zero", 1, 5), ("random", 1, 8), ("urandom", 1, 9)]


def _devices(dev: str, uid: int, gid: int, kvm: bool) -> None:
    """A /dev of its own: the basics, and /dev/kvm (the jail's uid's alone)
    where KVM is used. Nodes made here, so no host /dev is in view."""
    os.makedirs(dev, mode=0o755)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=16k,nr_inodes=16")
    for name, major, minor in DEVICES:
        os.mknod(f"{dev}/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)
    if kvm:
        os.mknod(f"{dev}/kvm", stat.S_IFCHR | 0o600, os.makedev(10, 232))
        os.chown(f"{dev}/kvm", uid, gid)


def _links(root: str, links: list[str]) -> None:
    """Top-level symlinks such as /lib -> usr/lib (Debian's merged /usr)."""
    for path in links:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)


def _pivot(root: str) -> None:
    old = os.path.join(root, ".old")
    os.mkdir(old, 0o700)
    _check(_libc.syscall(SYS_PIVOT_ROOT, root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount the host's root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_REC)


def _drop(uid: int, gid: int, nofile: int, nproc: int) -> None:
    for cap in range(LAST_CAP + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            raise JailError(f"dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient caps")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # with uid 0 gone, so are the permitted capabilities
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if os.getresuid() != (uid, uid, uid) or os.getgroups():
        raise JailError("the uid or groups did not change")


def enter(plan: dict[str, Any]) -> None:
    root: str = plan["root"]
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    if plan.get("net_ns", True):
        flags |= CLONE_NEWNET
    if plan.get("pid_ns", False):
        # Our children's: we stay outside, the first process we fork (the
        # VMM, through tini) is pid 1 there. /proc below is mounted from
        # our side, with hidepid: the VMM still sees only its own uid.
        flags |= CLONE_NEWPID
    _check(_libc.unshare(flags), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k,nr_inodes=256")
    _links(root, plan.get("links", []))
    for path in plan.get("ro", []):
        _bind(root, path, writable=False)
    for path in plan.get("rw", []):
        _bind(root, path, writable=True)
    _devices(root + "/dev", plan["uid"], plan["gid"], plan.get("kvm", False))
    os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           "hidepid=invisible,subset=pid")  # fmt: skip
    _libc.sethostname(b"cocoon-jail", 11)
    _pivot(root)
    _drop(plan["uid"], plan["gid"], plan["nofile"], plan["nproc"])
    os.chdir("/")
