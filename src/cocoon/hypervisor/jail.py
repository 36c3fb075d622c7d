"""Jailed VMMs: one unprivileged uid per sandbox, and the plan the jailer follows.

A VMM is the door in the VM's wall: a guest that exploits a device-emulation
bug lands in QEMU. Jailed, what it finds there is a process of a uid no other
sandbox has, with no capabilities, no way to gain any (no_new_privs), QEMU's
seccomp sandbox (no exec, no privilege change, no resource control), a root
holding only its own VM's files, no network (its taps arrive as fds), and a
/proc that shows only itself.

uids are handed out from ``security.uid_base`` up, one file per uid under
``/run/cocoon-uids/`` (host-wide: every state root shares the range) naming
its state root and sandbox (created with O_EXCL under a lock):
recorded in the sandbox's state before QEMU starts, removed when the sandbox
is destroyed, and by ``cocoon gc`` for sandboxes that no longer exist.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cocoon.errors import HypervisorError
from cocoon.hypervisor import jailer
from cocoon.util.fs import locked_file

#: Paths every QEMU needs: its binary, libraries and firmware, read-only.
SYSTEM_RO = ["/usr", "/etc/ld.so.cache"]
#: Debian's merged /usr: these are symlinks into /usr on the host and in the jail.
SYSTEM_LINKS = ["/bin", "/sbin", "/lib", "/lib64"]
#: QEMU's own seccomp filter, everything but the basics denied.
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: Open files: disks, sockets, eventfds (two per virtqueue with vhost).
NOFILE = 4096
#: Processes and threads of the jail's uid (a vCPU thread each, I/O workers).
NPROC = 512
#: The VMM is pid 1 of a pid namespace of its own, and a pid namespace's
#: first process must be forked into it: Debian's tini (27 KB, outside the
#: namespace, the jail's uid) forks it, forwards signals and exits with its
#: status, so the host still sees how the VMM ended.
TINI = "/usr/bin/tini"


@dataclass(frozen=True)
class Jail:
    """Who a jailed VMM runs as; the plan is built from its VM's spec."""

    uid: int
    gid: int
    #: cocoon's runtime root (sealed template RAM holders keep records there).
    state_root: Path


@dataclass
class Plan:
    uid: int
    gid: int
    root: Path
    ro: list[str] = field(default_factory=list)
    rw: list[str] = field(default_factory=list)
    kvm: bool = False
    net_ns: bool = True
    #: The sandbox's cgroup dirs (hypervisor.cgroup): the host moves the
    #: VMM in once it runs (``cgroup.enter``), not the jailer before it.
    cgroups: list[str] = field(default_factory=list)

    def argv(self, vmm: list[str]) -> list[str]:
        """What the jailed child execs: ``vmm`` in a pid namespace of its own
        under TINI (``child_setup`` made that namespace)."""
        return under_tini(vmm)

    def child_setup(self) -> Callable[[], None]:
        """The jail, entered in the forked child before it execs ``argv``
        (subprocess's ``preexec_fn``, called after the child's stdio is set).

        In the child of a fork, not a ``python3 jailer.py`` of its own: an
        interpreter's start was ~15 ms of every sandbox's start. The child
        runs only the jailer's few system calls, nothing that takes a lock
        another thread of ours might have held at the fork. A failure is one
        line on its stderr (the VMM's log) and exit 125: the VMM never starts
        half-jailed."""
        plan = {
            "uid": self.uid,
            "gid": self.gid,
            "root": str(self.root),
            "links": SYSTEM_LINKS,
            "ro": [p for p in SYSTEM_RO if os.path.exists(p)]
            + [p for p in _unique(self.ro) if not _under_system(p)],
            "rw": _unique(self.rw),
            "kvm": self.kvm,
            "net_ns": self.net_ns,
            "nofile": NOFILE,
            "nproc": NPROC,
            "pid_ns": True,
        }

        def setup() -> None:  # pragma: no cover - runs in the forked child
            try:
                jailer.enter(plan)
            except BaseException as e:  # noqa: BLE001 - the child must never return half-jailed
                os.write(2, f"cocoon jailer: {e}\n".encode(errors="replace"))
                os._exit(125)

        return setup


def under_tini(argv: list[str]) -> list[str]:
    """``argv`` forked by TINI, for a launcher that unshared a pid namespace
    and then execs this: ``argv`` is pid 1 there (the jailed VMM, a share's
    file server), tini its parent outside, the launcher's child."""
    if not os.access(TINI, os.X_OK):
        raise HypervisorError(f"{TINI} missing: the jail needs it (apt-get install tini)")
    # -s: tini is not pid 1 (the program is), so it registers as a subreaper
    return [TINI, "-s", "--", *argv]


def _under_system(path: str) -> bool:
    """Already in the jail read-only with /usr (a kernel override kept there):
    a bind inside that read-only bind could not make its mount point."""
    return any(path.startswith(d.rstrip("/") + "/") for d in SYSTEM_RO)


def _unique(paths: list[str]) -> list[str]:
    return list(dict.fromkeys(paths))


#: uids are the host's, whatever state root a sandbox lives under (two roots
#: must never hand out one uid): the allocation records live here.
UIDS = Path("/run/cocoon-uids")


def _owner(root: Path, sandbox_id: str) -> str:
    return f"{root}\n{sandbox_id}"


def allocate(root: Path, sandbox_id: str, base: int, count: int) -> int:
    """A uid no live sandbox on this host has, recorded as ``sandbox_id``'s
    (of state root ``root``).

    Handed out round-robin from the last one, so a uid freed a moment ago is
    the last to come back."""
    UIDS.mkdir(parents=True, exist_ok=True, mode=0o700)
    with locked_file(UIDS / ".lock", 10.0, "the uid allocator"):
        last_file = UIDS / ".last"
        try:
            last = int(last_file.read_text())
        except (OSError, ValueError):
            last = base - 1
        for i in range(count):
            uid = base + (last - base + 1 + i) % count
            try:
                fd = os.open(UIDS / str(uid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(_owner(root, sandbox_id))
            last_file.write_text(str(uid))
            return uid
    raise HypervisorError(
        f"all {count} jail uids from {base} are taken: raise security.uid_count or run `cocoon gc`"
    )


def release(root: Path, uid: int, sandbox_id: str) -> None:
    """Give ``uid`` back if it is still ``sandbox_id``'s."""
    path = UIDS / str(uid)
    with contextlib.suppress(OSError):
        if path.read_text() == _owner(root, sandbox_id):
            path.unlink()


def owners(root: Path) -> dict[int, str]:
    """Every uid allocated to a sandbox of state root ``root``, and that sandbox."""
    out: dict[int, str] = {}
    if not UIDS.is_dir():
        return out
    for p in UIDS.iterdir():
        with contextlib.suppress(OSError, ValueError):
            where, _, sid = p.read_text().partition("\n")
            if where == str(root):
                out[int(p.name)] = sid
    return out


def sweep(root: Path, live: set[str]) -> list[int]:
    """Release the uids of ``root``'s sandboxes that no longer exist (their owner crashed)."""
    freed = []
    for uid, sid in owners(root).items():
        if sid not in live:
            release(root, uid, sid)
            freed.append(uid)
    return freed


def give(path: Path, jail: Jail, mode: int = 0o600) -> None:
    """Make a file the jailed VMM must write its own (and nobody else's)."""
    os.chown(path, jail.uid, jail.gid)
    os.chmod(path, mode)
